"""A tqdm bar over the fits of a scikit-learn grid or randomized search.

``GridSearchCV`` reports progress only as ``verbose`` lines on stdout (which would corrupt
``--json`` output). :func:`search_progress` instead swaps, for the duration of one fit, the
search's ``scoring`` for a scorer that scores as before and advances a bar on stderr: the search
calls its scorer once per (candidate, fold) fit. The original scoring is put back afterwards, so
the fitted search holds nothing of the bar.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sklearn.metrics import check_scoring
from sklearn.model_selection import GridSearchCV, ParameterGrid, RandomizedSearchCV

__all__ = ["search_progress"]


class _BarScorer:
    """Score with ``scorer`` and advance ``bar`` once per call."""

    def __init__(self, scorer: Any, bar: Any) -> None:
        self.scorer = scorer
        self.bar = bar

    def __call__(self, estimator: Any, X: Any, y: Any) -> float:
        score = self.scorer(estimator, X, y)
        self.bar.update(1)
        return score


def _n_fits(search: GridSearchCV | RandomizedSearchCV, n_splits: int) -> int:
    if isinstance(search, GridSearchCV):
        return len(ParameterGrid(search.param_grid)) * n_splits
    return int(search.n_iter) * n_splits


@contextmanager
def search_progress(search: Any, n_splits: int | None, *, desc: str = "search") -> Iterator[None]:
    """Show a bar over ``search``'s fits while the block runs (a no-op for other estimators).

    Parameters
    ----------
    search : estimator
        A ``GridSearchCV`` or ``RandomizedSearchCV`` with a single (or default) scoring.
    n_splits : int or None
        Folds of the search (``None``: no bar).
    desc : str
        The bar's label.
    """
    scoring = getattr(search, "scoring", None)
    single = scoring is None or isinstance(scoring, str) or callable(scoring)
    if not isinstance(search, GridSearchCV | RandomizedSearchCV) or not n_splits or not single:
        yield
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=_n_fits(search, n_splits), desc=desc, unit="fit", leave=False)
    search.scoring = _BarScorer(check_scoring(search.estimator, scoring=scoring), bar)
    try:
        yield
    finally:
        bar.close()
        search.scoring = scoring
        if hasattr(search, "scorer_"):
            search.scorer_ = check_scoring(search.estimator, scoring=scoring)
