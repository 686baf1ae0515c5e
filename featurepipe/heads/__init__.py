"""Classifier heads on cached image features: presets, CV search, small-class fallback, out-of-core.

A *head* is any scikit-learn classifier trained on the feature matrix of a
:class:`~featurepipe.store.FeatureStore` entry. :func:`make_head` builds one from a preset name, a
``"module:Class"`` string or an estimator object; :func:`fit_head` fits it, adapting the
cross-validation to tiny classes instead of crashing; :func:`chosen_params` reports what the search
picked; :func:`fixed_head` turns a fitted head into one that refits its chosen values without
searching. The ``"sgd"`` preset, :class:`OutOfCoreSGDClassifier`, can also learn from chunks
streamed out of the store, so the feature matrix never has to fit in memory.

Submodules: :mod:`~featurepipe.heads.blocks` (standardising concatenated layers so each
weighs the same), :mod:`~featurepipe.heads.probe` (the ``logreg`` preset's fast C-searched logistic
regression), :mod:`~featurepipe.heads.kernel` (the ``svm-rbf`` preset: exact SVC on small sets,
Nystroem + probe past them), :mod:`~featurepipe.heads.progress` (bars over search fits).

Searches sit *inside* the pipeline, after the scaler (``StandardScaler -> search(classifier)``): the
scaler is fit once instead of once per fold and candidate, and the probe,
``LogisticRegressionCV`` and ``RidgeClassifierCV`` can only be used that way. The price is that the
validation folds share the scaler's mean and variance with the training folds, a leak too small to
change which value wins.
"""

from __future__ import annotations

import importlib
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from sklearn.base import BaseEstimator, ClassifierMixin, clone, is_classifier
from sklearn.linear_model import (
    LogisticRegression,
    LogisticRegressionCV,
    RidgeClassifier,
    RidgeClassifierCV,
    SGDClassifier,
)
from sklearn.model_selection import GridSearchCV, RandomizedSearchCV, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC
from sklearn.utils import check_random_state
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_is_fitted, column_or_1d, validate_data

from featurepipe.exceptions import ConfigError, FeaturePipeWarning
from featurepipe.heads.blocks import BlockStandardScaler, block_head, block_weights
from featurepipe.heads.kernel import EXACT_MAX_ROWS, RBFKernelClassifier
from featurepipe.heads.kernel import SVM_RBF_GRID as SVM_RBF_GRID
from featurepipe.heads.probe import DEFAULT_CS, LogisticProbeCV
from featurepipe.heads.progress import search_progress

__all__ = [
    "EXACT_MAX_ROWS",
    "HEAD_PRESETS",
    "BlockStandardScaler",
    "LogisticProbeCV",
    "OutOfCoreSGDClassifier",
    "RBFKernelClassifier",
    "ScaledGammaSVC",
    "block_head",
    "block_weights",
    "chosen_params",
    "fixed_head",
    "fit_head",
    "make_head",
]

HEAD_PRESETS: tuple[str, ...] = ("logreg", "linear-svm", "svm-rbf", "knn", "ridge", "sgd")

# Search grids. Each is symmetric around a sensible default: when a class is too small for
# cross-validation, fit_head falls back to the middle value ((len - 1) // 2) of every grid.
LOGREG_CS: tuple[float, ...] = DEFAULT_CS
LINEAR_SVM_CS: tuple[float, ...] = LOGREG_CS
KNN_NEIGHBORS: tuple[int, ...] = (1, 5, 10, 20)
RIDGE_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-2, 6, 9))

# lbfgs on standardized features stops at sklearn's tol=1e-4 after tens of iterations (measured on
# 5000 x 1280 features: <= 20 for every C in the grid); 1000 leaves a wide margin.
LOGREG_MAX_ITER = 1000
LINEAR_SVM_MAX_ITER = 10_000

_SEARCHES = (GridSearchCV, RandomizedSearchCV, LogisticRegressionCV, RidgeClassifierCV,
             LogisticProbeCV, RBFKernelClassifier)
#: Searches that draw their own progress bar when their ``verbose`` is set.
_PROGRESS_SEARCHES = (LogisticProbeCV, RBFKernelClassifier)


# --------------------------------------------------------------------------------------------
# make_head


def make_head(
    head: str | BaseEstimator = "logreg",
    *,
    cv: int = 5,
    random_state: int | None = 0,
    n_jobs: int | None = None,
) -> BaseEstimator:
    """Build an unfitted classifier head.

    Parameters
    ----------
    head : str or estimator, default="logreg"
        A preset name from :data:`HEAD_PRESETS`, a ``"module:Class"`` string naming a scikit-learn
        classifier (created with its defaults, plus ``random_state`` / ``n_jobs`` when it takes
        them), or a classifier object (cloned, never modified).

        - ``logreg``: ``StandardScaler`` + :class:`LogisticProbeCV`, multinomial L2 logistic
          regression (float32 L-BFGS), ``C`` from :data:`LOGREG_CS` along a warm-started path,
          validated by stratified K-fold CV, or by one stratified split from
          ``LogisticProbeCV.split_threshold`` rows on (the linear-probe protocol of Kornblith
          et al., 2019); refit on all rows at the chosen ``C``.
        - ``linear-svm``: ``StandardScaler`` + ``LinearSVC(dual="auto")``, ``C`` by grid search.
        - ``svm-rbf``: ``StandardScaler`` + :class:`RBFKernelClassifier`: up to
          :data:`EXACT_MAX_ROWS` rows an exact RBF ``SVC`` with ``C`` and ``gamma_scale``
          (``gamma`` as a multiple of sklearn's ``"scale"`` heuristic) by grid search (decision
          scores only); past it a Nystroem approximation of the kernel + :class:`LogisticProbeCV`.
        - ``knn``: cosine ``KNeighborsClassifier``, ``n_neighbors`` from :data:`KNN_NEIGHBORS` by
          grid search (:func:`fit_head` drops values larger than the training folds).
        - ``ridge``: ``StandardScaler`` + ``RidgeClassifierCV``, ``alpha`` by efficient
          leave-one-out CV (``cv`` is not used).
        - ``sgd``: :class:`OutOfCoreSGDClassifier`, no search; can learn from streamed chunks.
    cv : int, default=5
        Number of stratified folds for the searches (shuffled with ``random_state``).
    random_state : int or None, default=0
        Seeds the fold shuffling and the randomized estimators.
    n_jobs : int or None, default=None
        Parallel jobs for the searches (``None`` = 1).

    Returns
    -------
    estimator : BaseEstimator
        An unfitted classifier; fit it with :func:`fit_head` to get the small-class fallback.

    Raises
    ------
    ConfigError
        Unknown preset, a string that does not import a classifier, or a bad ``cv``.

    Examples
    --------
    >>> from featurepipe.heads import make_head
    >>> make_head("knn", cv=3).param_grid
    {'n_neighbors': [1, 5, 10, 20]}
    """
    if isinstance(cv, bool) or not isinstance(cv, int | np.integer) or cv < 2:
        raise ConfigError(f"cv must be an integer >= 2 (number of folds), got {cv!r}")
    if isinstance(head, BaseEstimator):
        return _require_classifier(clone(head), repr(head))
    if not isinstance(head, str):
        raise ConfigError(
            f"head must be a preset name, a 'module:Class' string or a scikit-learn classifier, "
            f"got {type(head).__name__}"
        )
    if ":" in head:
        return _import_head(head, random_state=random_state, n_jobs=n_jobs)
    if head not in _PRESET_BUILDERS:
        raise ConfigError(
            f"unknown head {head!r}; choose one of {', '.join(HEAD_PRESETS)}, "
            f"or give a scikit-learn classifier as 'module:Class'"
        )
    folds = StratifiedKFold(n_splits=int(cv), shuffle=True, random_state=random_state)
    return _PRESET_BUILDERS[head](folds, random_state, n_jobs)


def _require_classifier(estimator: Any, name: str) -> BaseEstimator:
    if not is_classifier(estimator):
        raise ConfigError(f"head {name} is a {type(estimator).__name__}, not a classifier")
    return estimator


def _import_head(spec: str, *, random_state: int | None, n_jobs: int | None) -> BaseEstimator:
    """Create ``Class()`` from ``"module:Class"``, seeded and parallelised like the presets."""
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise ConfigError(f"head {spec!r} is not of the form 'module:Class'")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import head {spec!r}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, BaseEstimator)):
        raise ConfigError(f"head {spec!r} is not a scikit-learn estimator class")
    try:
        estimator = cls()
    except TypeError as exc:
        raise ConfigError(f"head {spec!r} cannot be created without arguments: {exc}") from exc
    _require_classifier(estimator, repr(spec))
    known = estimator.get_params(deep=False)
    overrides = {"random_state": random_state, "n_jobs": n_jobs}
    return estimator.set_params(**{k: v for k, v in overrides.items() if k in known})


def _logreg(folds: StratifiedKFold, random_state: int | None, n_jobs: int | None) -> Pipeline:
    """StandardScaler + LogisticProbeCV: float32, warm-started C path, one split when n is large.

    ``n_jobs`` is not used: the probe's matrix products run on the BLAS threads.
    """
    probe = LogisticProbeCV(Cs=LOGREG_CS, cv=int(folds.n_splits), max_iter=LOGREG_MAX_ITER,
                            random_state=random_state)
    return make_pipeline(StandardScaler(), probe)


def _linear_svm(folds: StratifiedKFold, random_state: int | None, n_jobs: int | None) -> Pipeline:
    svc = LinearSVC(dual="auto", max_iter=LINEAR_SVM_MAX_ITER, random_state=random_state)
    search = GridSearchCV(svc, {"C": list(LINEAR_SVM_CS)}, cv=folds, n_jobs=n_jobs)
    return make_pipeline(StandardScaler(), search)


def _svm_rbf(folds: StratifiedKFold, random_state: int | None, n_jobs: int | None) -> Pipeline:
    kernel = RBFKernelClassifier(cv=int(folds.n_splits), random_state=random_state)
    return make_pipeline(StandardScaler(), kernel)


def _knn(folds: StratifiedKFold, random_state: int | None, n_jobs: int | None) -> GridSearchCV:
    knn = KNeighborsClassifier(metric="cosine")
    return GridSearchCV(knn, {"n_neighbors": list(KNN_NEIGHBORS)}, cv=folds, n_jobs=n_jobs)


def _ridge(folds: StratifiedKFold, random_state: int | None, n_jobs: int | None) -> Pipeline:
    return make_pipeline(StandardScaler(), RidgeClassifierCV(alphas=RIDGE_ALPHAS))


def _sgd(folds: StratifiedKFold, random_state: int | None, n_jobs: int | None) -> BaseEstimator:
    return OutOfCoreSGDClassifier(random_state=random_state)


_PRESET_BUILDERS: dict[str, Callable[..., BaseEstimator]] = {
    "logreg": _logreg,
    "linear-svm": _linear_svm,
    "svm-rbf": _svm_rbf,
    "knn": _knn,
    "ridge": _ridge,
    "sgd": _sgd,
}


# --------------------------------------------------------------------------------------------
# chosen_params


def chosen_params(fitted: BaseEstimator) -> dict[str, Any]:
    """Return the hyperparameters that cross-validation picked in a fitted head.

    Looks inside pipelines and reads ``best_params_`` (grid/randomized search), ``C_``
    (``LogisticRegressionCV``) and ``alpha_`` (``RidgeClassifierCV``). Parameter names lose their
    ``step__`` prefixes unless two would collide.

    Parameters
    ----------
    fitted : BaseEstimator
        A fitted head.

    Returns
    -------
    params : dict
        Plain JSON-able values, e.g. ``{"C": 0.1}``; ``{}`` when the head has no search.
    """
    check_is_fitted(fitted)
    found: dict[str, Any] = {}
    for estimator in _pipeline_steps(fitted):
        if hasattr(estimator, "best_params_"):
            found.update(estimator.best_params_)
        elif isinstance(estimator, LogisticRegressionCV | LogisticProbeCV):
            found["C"] = float(np.ravel(estimator.C_)[0])
        elif isinstance(estimator, RidgeClassifierCV):
            found["alpha"] = float(estimator.alpha_)
    return _short_keys({key: _to_builtin(value) for key, value in found.items()})


def _pipeline_steps(estimator: BaseEstimator) -> Iterator[BaseEstimator]:
    if isinstance(estimator, Pipeline):
        for _, step in estimator.steps:
            if step is not None and step != "passthrough":
                yield from _pipeline_steps(step)
    else:
        yield estimator


def _short_keys(params: dict[str, Any]) -> dict[str, Any]:
    """``{"svc__C": 1}`` -> ``{"C": 1}``, keeping the long name where two short ones collide."""
    short = [key.rsplit("__", 1)[-1] for key in params]
    return {
        (s if short.count(s) == 1 else key): value
        for s, (key, value) in zip(short, params.items(), strict=True)
    }


def _to_builtin(value: Any) -> Any:
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    if isinstance(value, list | tuple):
        return [_to_builtin(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return repr(value)


def fixed_head(fitted: BaseEstimator) -> BaseEstimator:
    """An unfitted copy of a fitted head with every search replaced by what it chose.

    Refitting it on more rows (all labelled rows, after an evaluation split) trains the same
    model without searching again.

    Parameters
    ----------
    fitted : BaseEstimator
        A fitted head, e.g. from :func:`fit_head`.

    Returns
    -------
    estimator : BaseEstimator
        Unfitted; a head without searches comes back as a plain clone.
    """
    check_is_fitted(fitted)
    fixed = clone(fitted)
    for path, search in _find_searches(fitted):
        fixed = _replace(fixed, path, _chosen_estimator(search))
    return fixed


def _chosen_estimator(search: BaseEstimator) -> BaseEstimator:
    if isinstance(search, GridSearchCV | RandomizedSearchCV):
        return clone(search.estimator).set_params(**search.best_params_)
    if isinstance(search, LogisticProbeCV):
        return clone(search).set_params(Cs=(float(search.C_),))
    if isinstance(search, RBFKernelClassifier):
        params = search.best_params_
        if not search.approximate_:
            return ScaledGammaSVC(C=params["C"], gamma_scale=params["gamma_scale"],
                                  random_state=search.random_state)
        return clone(search).set_params(exact_max_rows=0, probe_Cs=(params["C"],))
    if isinstance(search, LogisticRegressionCV):
        shared = LogisticRegression().get_params().keys() & search.get_params().keys() - {"n_jobs"}
        logreg = LogisticRegression(**{k: search.get_params()[k] for k in shared})
        return logreg.set_params(C=float(np.ravel(search.C_)[0]))
    return RidgeClassifier(alpha=float(search.alpha_), fit_intercept=search.fit_intercept,
                           class_weight=search.class_weight)


def _is_frozen_kernel(search: RBFKernelClassifier) -> bool:
    return search.exact_max_rows == 0 and len(search.probe_Cs) == 1


# --------------------------------------------------------------------------------------------
# fit_head


def fit_head(
    estimator: BaseEstimator, X: ArrayLike, y: ArrayLike, *, progress: bool = False
) -> tuple[BaseEstimator, dict]:
    """Fit a head, adapting its cross-validation to classes too small for it.

    When the smallest class has fewer samples than a search has folds, the search runs with as
    many folds as that class has samples; when a class has a single sample, the search is skipped
    and the middle value of every grid is used. Either way a :class:`FeaturePipeWarning` says
    which classes and what was done. ``knn`` grids drop ``n_neighbors`` values larger than the
    smallest training fold. Rows labelled ``-1`` (unlabelled in the feature store) are *not*
    removed here: ``-1`` is a legitimate class label to scikit-learn.

    Parameters
    ----------
    estimator : BaseEstimator
        An unfitted classifier, usually from :func:`make_head`. It is cloned, not modified.
    X : array-like of shape (n_samples, n_features)
        Features; float16 is converted to float32 (sklearn would otherwise upcast to float64).
    y : array-like of shape (n_samples,)
        Class labels.
    progress : bool, default=False
        Show a tqdm bar on stderr over each search's fits (which C or candidate, which fold).

    Returns
    -------
    fitted : BaseEstimator
        The fitted clone (possibly with a search replaced by a fixed-parameter estimator).
    info : dict
        ``fit_seconds`` (float), ``params`` (:func:`chosen_params`, or the fixed values used when a
        search was skipped) and ``warnings`` (messages of the FeaturePipeWarnings issued and of
        the warnings raised while fitting, each once; the latter are re-issued after the fit).

    Raises
    ------
    ConfigError
        Fewer than 2 classes, or ``X`` and ``y`` of different lengths.
    """
    if not isinstance(estimator, BaseEstimator):
        raise ConfigError(f"estimator must be a scikit-learn estimator, got {type(estimator)!r}")
    features = _float_features(X)
    target = column_or_1d(np.asarray(y))
    if len(features) != len(target):
        raise ConfigError(f"X has {len(features)} rows but y has {len(target)} labels")
    labels, counts = np.unique(target, return_counts=True)
    if len(labels) < 2:
        raise ConfigError(
            f"need at least 2 classes to fit a head, got {len(labels)} "
            f"({[_to_builtin(v) for v in labels]}); unlabelled rows are -1 in the feature store"
        )
    fitted, notes, fixed = _adapt_searches(clone(estimator), labels, counts)
    for note in notes:
        warnings.warn(note, FeaturePipeWarning, stacklevel=2)
    searches = _find_searches(fitted)
    shown = [s for _, s in searches if isinstance(s, _PROGRESS_SEARCHES)]
    for search in shown if progress else []:
        search.set_params(verbose=1)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught, ExitStack() as bars:
        warnings.simplefilter("always")
        for _, search in searches if progress else []:
            folds, name = _n_splits(search), _search_name(search)
            bars.enter_context(search_progress(search, folds, desc=name))
        fitted.fit(features, target)
    seconds = time.perf_counter() - start
    for search in shown:  # the saved model should not draw bars in someone else's process
        search.set_params(verbose=0)
    raised = _reissue_once(caught)
    info = {
        "fit_seconds": seconds,
        "params": {**_short_keys(fixed), **chosen_params(fitted)},
        "warnings": notes + raised,
    }
    return fitted, info


def _float_features(X: ArrayLike) -> Any:
    """float16 -> float32; leave other inputs for the estimator to validate."""
    if getattr(X, "dtype", None) == np.float16:
        return np.asarray(X, dtype=np.float32)
    return X if hasattr(X, "__len__") and hasattr(X, "shape") else np.asarray(X)


def _reissue_once(caught: list[warnings.WarningMessage]) -> list[str]:
    """Re-issue recorded warnings (deduplicated) so the caller's filters apply; return messages."""
    seen: set[str] = set()
    messages: list[str] = []
    for w in caught:
        text = f"{w.category.__name__}: {w.message}"
        if text in seen:
            continue
        seen.add(text)
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if not issubclass(w.category, DeprecationWarning | PendingDeprecationWarning):
            messages.append(text)  # developer-facing deprecations stay out of the report
    return messages


def _adapt_searches(
    estimator: BaseEstimator, labels: np.ndarray, counts: np.ndarray
) -> tuple[BaseEstimator, list[str], dict[str, Any]]:
    """Shrink or skip every fold-based search that the smallest class cannot fill."""
    notes: list[str] = []
    fixed: dict[str, Any] = {}
    smallest = int(counts.min())
    for path, search in _find_searches(estimator):
        folds = _n_splits(search)
        if folds is None:
            continue
        if smallest >= 2 and smallest < folds:
            search.set_params(cv=_with_n_splits(search.cv, smallest))
            notes.append(
                f"{_describe_small(labels, counts, folds)}, fewer than the {folds} "
                f"cross-validation folds of {_search_name(search)}; used {smallest}-fold "
                "cross-validation instead."
            )
            folds = smallest
        elif smallest < 2:
            replacement, params = _fixed_estimator(search)
            _cap_neighbors_param(replacement, int(counts.sum()))
            params = {key: replacement.get_params()[key] for key in params}
            estimator = _replace(estimator, path, replacement)
            fixed.update(params)
            notes.append(
                f"{_describe_small(labels, counts, 2)}; cross-validation needs at least 2 samples "
                f"per class, so {_search_name(search)} was skipped and the head was fit on all "
                f"rows with {_short_keys(params)} (the middle of the grid)."
            )
            continue
        _cap_neighbors_grid(search, counts, folds)
    return estimator, notes, {k: _to_builtin(v) for k, v in fixed.items()}


def _find_searches(estimator: BaseEstimator) -> list[tuple[str, BaseEstimator]]:
    """(param path, search) for the outermost searches; ``""`` is the estimator itself."""
    if isinstance(estimator, _SEARCHES):
        return [("", estimator)]
    found: list[tuple[str, BaseEstimator]] = []
    for path, value in estimator.get_params(deep=True).items():
        nested = any(path.startswith(outer + "__") for outer, _ in found)
        if isinstance(value, _SEARCHES) and not nested:
            found.append((path, value))
    return found


def _n_splits(search: BaseEstimator) -> int | None:
    """Folds of a stratified K-fold search; None for leave-one-out or custom splitters."""
    if isinstance(search, LogisticProbeCV) and len(search.Cs) == 1:
        return None  # a single C is fit without validation
    if isinstance(search, RBFKernelClassifier) and _is_frozen_kernel(search):
        return None
    cv = search.cv
    if cv is None:
        return None if isinstance(search, RidgeClassifierCV) else 5
    if isinstance(cv, int | np.integer):
        return int(cv)
    if isinstance(cv, StratifiedKFold):
        return int(cv.n_splits)
    return None


def _with_n_splits(cv: Any, n_splits: int) -> Any:
    if isinstance(cv, StratifiedKFold):
        return StratifiedKFold(n_splits, shuffle=cv.shuffle, random_state=cv.random_state)
    return n_splits


def _middle(values: Iterable[Any]) -> Any:
    values = list(values)
    return values[(len(values) - 1) // 2]


def _fixed_estimator(search: BaseEstimator) -> tuple[BaseEstimator, dict[str, Any]]:
    """The searched estimator at the middle of its grid (defaults for randomized searches)."""
    if isinstance(search, GridSearchCV):
        grid = search.param_grid[0] if isinstance(search.param_grid, list) else search.param_grid
        params = {name: _middle(values) for name, values in grid.items()}
        return clone(search.estimator).set_params(**params), params
    if isinstance(search, RandomizedSearchCV):
        return clone(search.estimator), {}
    if isinstance(search, LogisticProbeCV):
        c = float(_middle(sorted(search.Cs)))
        return LogisticRegression(C=c, max_iter=search.max_iter, tol=search.tol), {"C": c}
    if isinstance(search, RBFKernelClassifier):
        params = {"C": float(_middle(search.Cs)),
                  "gamma_scale": float(_middle(search.gamma_scales))}
        return ScaledGammaSVC(random_state=search.random_state, **params), params
    if isinstance(search, LogisticRegressionCV):
        # n_jobs is deprecated on LogisticRegression (sklearn 1.8) and only parallelises folds.
        shared = LogisticRegression().get_params().keys() & search.get_params().keys() - {"n_jobs"}
        logreg = LogisticRegression(**{k: search.get_params()[k] for k in shared})
        cs = search.Cs if not isinstance(search.Cs, int) else np.logspace(-4, 4, search.Cs)
        return logreg.set_params(C=float(_middle(cs))), {"C": float(_middle(cs))}
    alpha = float(_middle(search.alphas))
    ridge = RidgeClassifier(
        alpha=alpha, fit_intercept=search.fit_intercept, class_weight=search.class_weight
    )
    return ridge, {"alpha": alpha}


def _replace(estimator: BaseEstimator, path: str, new: BaseEstimator) -> BaseEstimator:
    if path == "":
        return new
    return estimator.set_params(**{path: new})


def _search_name(search: BaseEstimator) -> str:
    inner = getattr(search, "estimator", None)
    if isinstance(inner, BaseEstimator):
        return f"{type(search).__name__}({type(inner).__name__})"
    return type(search).__name__


def _describe_small(labels: np.ndarray, counts: np.ndarray, below: int) -> str:
    """'class 3 has 2 samples, class 'cat' has 1 sample' for the classes with < ``below``."""
    small = [(label, int(n)) for label, n in zip(labels, counts, strict=True) if n < below]
    parts = [f"class {_to_builtin(label)!r} has {n} sample{'s' * (n != 1)}" for label, n in small]
    more = f" and {len(parts) - 5} more small classes" if len(parts) > 5 else ""
    return ", ".join(parts[:5]) + more


def _cap_neighbors_grid(search: BaseEstimator, counts: np.ndarray, folds: int) -> None:
    """Drop n_neighbors candidates larger than the smallest stratified training fold."""
    grid = getattr(search, "param_grid", None)
    if not isinstance(grid, dict):
        return
    n_train = int(counts.sum() - sum(math.ceil(c / folds) for c in counts))
    for name, values in grid.items():
        if name.rsplit("__", 1)[-1] == "n_neighbors":
            kept = [k for k in values if k <= n_train] or [max(n_train, 1)]
            search.set_params(param_grid={**grid, name: kept})


def _cap_neighbors_param(estimator: BaseEstimator, n_samples: int) -> None:
    for name, value in estimator.get_params().items():
        if name.rsplit("__", 1)[-1] == "n_neighbors" and isinstance(value, int):
            estimator.set_params(**{name: min(value, n_samples)})


# --------------------------------------------------------------------------------------------
# estimators


class ScaledGammaSVC(ClassifierMixin, BaseEstimator):
    """RBF ``SVC`` whose ``gamma`` is a multiple of sklearn's ``"scale"`` heuristic.

    A grid over absolute ``gamma`` values only makes sense for one feature scale and dimension;
    ``gamma_scale`` is relative, so one grid fits every backbone: ``gamma = gamma_scale /
    (n_features * X.var())`` (``gamma_scale=1`` is ``SVC(gamma="scale")``).

    Parameters
    ----------
    C : float, default=1.0
        Regularization parameter of ``SVC``.
    gamma_scale : float, default=1.0
        Multiple of the ``"scale"`` gamma.
    random_state : int or None, default=None
        Passed to ``SVC`` (which only uses it for probability calibration). There is no
        ``probability`` option: it is deprecated in ``SVC`` since sklearn 1.9 and makes fits ~5x
        slower; wrap the head in ``CalibratedClassifierCV(..., ensemble=False)`` for probabilities.

    Attributes
    ----------
    gamma_ : float
        The absolute gamma used.
    svc_ : SVC
        The fitted SVC.
    classes_ : ndarray of shape (n_classes,)
    n_features_in_ : int
    """

    def __init__(
        self,
        C: float = 1.0,
        gamma_scale: float = 1.0,
        random_state: int | None = None,
    ) -> None:
        self.C = C
        self.gamma_scale = gamma_scale
        self.random_state = random_state

    def fit(self, X: ArrayLike, y: ArrayLike) -> ScaledGammaSVC:
        """Fit the SVC with the relative gamma resolved on ``X``."""
        features, target = validate_data(self, X, y, dtype=[np.float64, np.float32])
        check_classification_targets(target)
        variance = float(features.var(dtype=np.float64))
        n_features = features.shape[1]
        self.gamma_ = self.gamma_scale / (n_features * variance) if variance > 0 else 1.0
        svc = SVC(C=self.C, gamma=self.gamma_, random_state=self.random_state)
        self.svc_ = svc.fit(features, target)
        self.classes_ = self.svc_.classes_
        return self

    def decision_function(self, X: ArrayLike) -> np.ndarray:
        """Signed distances to the separating hyperplanes (one-vs-rest shape)."""
        X = self._validated(X)
        return self.svc_.decision_function(X)

    def predict(self, X: ArrayLike) -> np.ndarray:
        """Predicted class labels."""
        X = self._validated(X)
        return self.svc_.predict(X)

    def _validated(self, X: ArrayLike) -> np.ndarray:
        """Check fitted first: unfitted calls raise NotFittedError, not AttributeError."""
        check_is_fitted(self)
        return validate_data(self, X, reset=False, dtype=[np.float64, np.float32])


def _has_proba(estimator: OutOfCoreSGDClassifier) -> bool:
    return estimator.loss in ("log_loss", "modified_huber")


class OutOfCoreSGDClassifier(ClassifierMixin, BaseEstimator):
    """Standardized linear SGD classifier that can learn from chunks streamed off disk.

    ``fit(X, y)`` works on in-memory arrays like any classifier. :meth:`fit_chunks` learns from an
    iterator of chunks (e.g. ``FeatureStore.iter_chunks``) with memory bounded by the chunk size:
    one pass fits a ``StandardScaler`` incrementally and collects the classes, then ``epochs``
    passes feed the scaled, row-shuffled chunks to ``SGDClassifier.partial_fit``.

    Parameters
    ----------
    loss : str, default="log_loss"
        ``SGDClassifier`` loss; ``"log_loss"`` and ``"modified_huber"`` give ``predict_proba``.
    alpha : float, default=1e-4
        L2 regularization strength.
    epochs : int, default=5
        Passes over the data after the scaling pass.
    chunk_rows : int, default=4096
        Most rows given to one ``partial_fit`` call; larger chunks are split.
    random_state : int or None, default=0
        Seeds the row shuffling and ``SGDClassifier``.
    classes : array-like or None, default=None
        All class labels; ``None`` takes the labels seen in the data.
    average : bool or int, default=True
        ``SGDClassifier(average=...)``: averaged SGD. With a handful of epochs the last iterate
        still jumps around (test accuracy varied by ~7 points across seeds on a 3-class
        problem); the average is stable and within a point of ``LogisticRegression``.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    n_features_in_ : int
    scaler_ : StandardScaler
        Fitted on all training rows.
    sgd_ : SGDClassifier
        The linear model, on scaled features.
    n_rows_seen_ : int
        Labelled rows in one pass over the data.

    Examples
    --------
    >>> import numpy as np
    >>> from featurepipe.heads import OutOfCoreSGDClassifier
    >>> rng = np.random.default_rng(0)
    >>> X, y = rng.normal(size=(100, 4)), np.repeat([0, 1], 50)
    >>> X[y == 1] += 3
    >>> chunks = lambda: ((X[i : i + 25], y[i : i + 25]) for i in range(0, 100, 25))
    >>> OutOfCoreSGDClassifier().fit_chunks(chunks).score(X, y)
    1.0
    """

    def __init__(
        self,
        loss: str = "log_loss",
        alpha: float = 1e-4,
        epochs: int = 5,
        chunk_rows: int = 4096,
        random_state: int | None = 0,
        classes: ArrayLike | None = None,
        average: bool | int = True,
    ) -> None:
        self.loss = loss
        self.alpha = alpha
        self.epochs = epochs
        self.chunk_rows = chunk_rows
        self.random_state = random_state
        self.classes = classes
        self.average = average

    def fit(self, X: ArrayLike, y: ArrayLike) -> OutOfCoreSGDClassifier:
        """Fit on in-memory arrays, in slices of ``chunk_rows`` rows.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
            Every label is a class, ``-1`` included.

        Returns
        -------
        self : OutOfCoreSGDClassifier
        """
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        check_classification_targets(y)
        return self._fit_stream(lambda: iter([(X, y)]), self.classes, drop_unlabelled=False)

    def fit_chunks(
        self, chunk_factory: Callable[[], Iterable[Any]], classes: ArrayLike | None = None
    ) -> OutOfCoreSGDClassifier:
        """Fit from chunks, holding one chunk in memory at a time.

        Parameters
        ----------
        chunk_factory : callable
            ``chunk_factory()`` returns a *fresh* iterable of chunks each time it is called
            (``1 + epochs`` times). A chunk is an ``(X_chunk, y_chunk)`` tuple or an object with
            ``.features`` and ``.labels`` (as ``FeatureStore.iter_chunks`` yields).
        classes : array-like or None, default=None
            All class labels; overrides the ``classes`` parameter. ``None``: those seen.

        Returns
        -------
        self : OutOfCoreSGDClassifier
            Rows labelled ``-1`` (unlabelled in the feature store) are ignored.
        """
        if not callable(chunk_factory):
            raise ConfigError(
                "chunk_factory must be a callable returning a fresh iterator of chunks, "
                f"got {type(chunk_factory).__name__}"
            )
        wanted = self.classes if classes is None else classes
        # The first chunk sets the feature count; forget the one from an earlier fit.
        self.__dict__.pop("n_features_in_", None)
        self.__dict__.pop("feature_names_in_", None)
        return self._fit_stream(chunk_factory, wanted, drop_unlabelled=True)

    def _fit_stream(
        self, chunk_factory: Callable[[], Iterable[Any]], classes: Any, *, drop_unlabelled: bool
    ) -> OutOfCoreSGDClassifier:
        self._check_params()
        rng = check_random_state(self.random_state)
        seen = self._scan(chunk_factory, drop_unlabelled)
        self.classes_ = self._resolve_classes(classes, seen)
        self.sgd_ = SGDClassifier(
            loss=self.loss,
            alpha=self.alpha,
            average=self.average,
            random_state=rng.randint(np.iinfo(np.int32).max),
        )
        for epoch in range(self.epochs):
            rows = 0
            for X, y in self._batches(chunk_factory(), drop_unlabelled):
                order = rng.permutation(len(y))
                scaled = self.scaler_.transform(X[order])
                self.sgd_.partial_fit(scaled, y[order], classes=self.classes_)
                rows += len(y)
            if rows != self.n_rows_seen_:
                raise ConfigError(
                    f"chunk_factory() yielded {rows} labelled rows in epoch {epoch + 1} but "
                    f"{self.n_rows_seen_} in the scaling pass; it must return a fresh iterator "
                    "over the same data on every call"
                )
        return self

    def _check_params(self) -> None:
        for name in ("epochs", "chunk_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")

    def _scan(
        self, chunk_factory: Callable[[], Iterable[Any]], drop_unlabelled: bool
    ) -> np.ndarray:
        """First pass: fit the scaler incrementally; return the labels seen."""
        self.scaler_ = StandardScaler()
        seen: list[np.ndarray] = []
        self.n_rows_seen_ = 0
        for X, y in self._batches(chunk_factory(), drop_unlabelled):
            self.scaler_.partial_fit(X)
            seen.append(np.unique(y))
            self.n_rows_seen_ += len(y)
        if self.n_rows_seen_ == 0:
            raise ConfigError("no labelled rows to fit: every chunk was empty or labelled -1")
        return np.unique(np.concatenate(seen))

    def _resolve_classes(self, classes: Any, seen: np.ndarray) -> np.ndarray:
        check_classification_targets(seen)
        if classes is None:
            classes = seen
        classes = np.unique(np.asarray(classes))
        unknown = np.setdiff1d(seen, classes)
        if len(unknown):
            raise ConfigError(
                f"labels {unknown.tolist()[:10]} are not in classes={classes.tolist()}"
            )
        if len(classes) < 2:
            raise ConfigError(f"need at least 2 classes to fit, got 1 class: {classes.tolist()}")
        return classes

    def _batches(
        self, chunks: Iterable[Any], drop_unlabelled: bool
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Validated (X, y) slices of at most ``chunk_rows`` rows, unlabelled rows dropped."""
        for index, chunk in enumerate(chunks):
            X, y = self._unpack(chunk, index)
            if drop_unlabelled:
                keep = y != -1
                X, y = (X, y) if keep.all() else (X[keep], y[keep])
            for start in range(0, len(y), self.chunk_rows):
                stop = start + self.chunk_rows
                # float64 per slice: float16 store features and mixed dtypes all reach SGD alike.
                yield check_array(X[start:stop], dtype=np.float64), y[start:stop]

    def _unpack(self, chunk: Any, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(features, labels) of a tuple or store chunk, shapes checked, not yet converted."""
        features, labels = (
            (chunk.features, chunk.labels) if hasattr(chunk, "features") else tuple(chunk)
        )
        X = np.asarray(features)
        y = column_or_1d(np.asarray(labels))
        if X.ndim != 2 or len(X) != len(y):
            raise ConfigError(
                f"chunk {index} must hold a 2-D feature array and one label per row, got "
                f"features of shape {X.shape} and {len(y)} labels"
            )
        if not hasattr(self, "n_features_in_"):
            self.n_features_in_ = X.shape[1]
        if X.shape[1] != self.n_features_in_:
            raise ConfigError(
                f"chunk {index} has {X.shape[1]} features, expected {self.n_features_in_}"
            )
        return X, y

    def decision_function(self, X: ArrayLike) -> np.ndarray:
        """Confidence scores of the linear model on standardized features."""
        X = self._scaled(X)
        return self.sgd_.decision_function(X)

    def predict(self, X: ArrayLike) -> np.ndarray:
        """Predicted class labels."""
        X = self._scaled(X)
        return self.sgd_.predict(X)

    @available_if(_has_proba)
    def predict_proba(self, X: ArrayLike) -> np.ndarray:
        """Class probabilities (``loss="log_loss"`` or ``"modified_huber"``)."""
        X = self._scaled(X)
        return self.sgd_.predict_proba(X)

    def _scaled(self, X: ArrayLike) -> np.ndarray:
        """Check fitted first: unfitted calls raise NotFittedError, not AttributeError."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        return self.scaler_.transform(X)
