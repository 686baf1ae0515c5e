"""The ``svm-rbf`` preset's classifier: exact RBF SVC on small sets, Nystroem + logistic past them.

An exact ``SVC`` costs between O(n^2) and O(n^3) to fit, so its grid search becomes the slowest
step of a project long before the features stop fitting in memory. :class:`RBFKernelClassifier`
keeps the exact, grid-searched SVC up to ``exact_max_rows`` training rows and above that maps the
rows through a Nystroem approximation of the same RBF kernel (``n_components`` landmarks, the same
relative ``gamma``) and fits the C-searched linear probe
(:class:`~featurepipe.heads.probe.LogisticProbeCV`) on it: linear in n, and it gains
``predict_proba``. Timings and the accuracy against exact SVC are in
``benchmarks/results/heads_speed.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.kernel_approximation import Nystroem
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from featurepipe.heads.probe import DEFAULT_CS, LogisticProbeCV
from featurepipe.heads.progress import search_progress

__all__ = ["EXACT_MAX_ROWS", "RBFKernelClassifier", "SVM_RBF_GRID"]

#: The exact branch's grid; ``gamma_scale`` multiplies sklearn's ``gamma="scale"``.
SVM_RBF_GRID: dict[str, tuple[float, ...]] = {
    "C": (0.1, 1.0, 10.0),
    "gamma_scale": (0.1, 1.0, 10.0),
}
_CS, _GAMMA_SCALES = SVM_RBF_GRID["C"], SVM_RBF_GRID["gamma_scale"]
#: Above this many rows the exact search costs more than the approximation, which is as
#: accurate there (measured in benchmarks/results/heads_speed.md).
EXACT_MAX_ROWS = 2_000


def _approximated(estimator: RBFKernelClassifier) -> bool:
    return getattr(estimator, "approximate_", True)


class RBFKernelClassifier(ClassifierMixin, BaseEstimator):
    """RBF-kernel classifier: exact grid-searched SVC, or Nystroem + logistic past a row count.

    Parameters
    ----------
    exact_max_rows : int, default=EXACT_MAX_ROWS
        Training sets up to this many rows get the exact ``SVC`` with ``C`` and ``gamma_scale``
        from ``grid`` by stratified ``cv``-fold search; larger ones the approximation.
    Cs, gamma_scales : tuple of float, default=SVM_RBF_GRID's
        The exact branch's search grid.
    n_components : int, default=2000
        Nystroem landmarks (capped at the number of rows).
    gamma_scale : float, default=1.0
        The approximation's ``gamma`` as a multiple of ``1 / (n_features * X.var())``.
    probe_Cs : sequence of float, default=DEFAULT_CS
        The approximation's logistic ``C`` candidates.
    cv : int, default=5
        Stratified folds of the searches.
    random_state : int or None, default=0
        Seeds folds, landmarks and splits.
    verbose : int, default=0
        ``> 0``: progress bars on stderr.

    Attributes
    ----------
    approximate_ : bool
        Whether the Nystroem branch was used.
    model_ : estimator
        The fitted ``GridSearchCV`` (exact) or ``Pipeline(Nystroem, StandardScaler,
        LogisticProbeCV)`` (approximate).
    best_params_ : dict
        The chosen ``C`` and ``gamma_scale`` (and ``n_components`` when approximated).
    classes_ : ndarray of shape (n_classes,)
    n_features_in_ : int
    """

    def __init__(
        self,
        exact_max_rows: int = EXACT_MAX_ROWS,
        Cs: Sequence[float] = _CS,
        gamma_scales: Sequence[float] = _GAMMA_SCALES,
        n_components: int = 2000,
        gamma_scale: float = 1.0,
        probe_Cs: Sequence[float] = DEFAULT_CS,
        cv: int = 5,
        random_state: int | None = 0,
        verbose: int = 0,
    ) -> None:
        self.exact_max_rows = exact_max_rows
        self.Cs = Cs
        self.gamma_scales = gamma_scales
        self.n_components = n_components
        self.gamma_scale = gamma_scale
        self.probe_Cs = probe_Cs
        self.cv = cv
        self.random_state = random_state
        self.verbose = verbose

    def fit(self, X: ArrayLike, y: ArrayLike) -> RBFKernelClassifier:
        """Fit the exact or the approximate branch, whichever the row count calls for.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)

        Returns
        -------
        self : RBFKernelClassifier
        """
        from featurepipe.heads import ScaledGammaSVC  # the package root defines the exact SVC

        features, target = validate_data(self, X, y, dtype=[np.float32, np.float64])
        check_classification_targets(target)
        self.classes_ = np.unique(target)
        if len(self.classes_) < 2:
            raise ValueError(
                f"need samples of at least 2 classes in the data, got 1 class: {self.classes_}")
        smallest = int(np.unique(target, return_counts=True)[1].min())
        self.approximate_ = len(target) > self.exact_max_rows
        if not self.approximate_:
            folds = StratifiedKFold(min(int(self.cv), max(smallest, 2)), shuffle=True,
                                    random_state=self.random_state)
            grid = {"C": list(self.Cs), "gamma_scale": list(self.gamma_scales)}
            search = GridSearchCV(ScaledGammaSVC(random_state=self.random_state), grid, cv=folds,
                                  verbose=0)
            with search_progress(search, folds.n_splits if self.verbose else None,
                                 desc="RBF SVC search"):
                self.model_ = search.fit(features, target)
            self.best_params_ = {k: float(v) for k, v in search.best_params_.items()}
            return self
        features = features.astype(np.float32, copy=False)
        variance = float(features.var(dtype=np.float64))
        gamma = self.gamma_scale / (features.shape[1] * variance) if variance > 0 else 1.0
        self.model_ = Pipeline([
            ("nystroem", Nystroem(kernel="rbf", gamma=gamma,
                                  n_components=min(int(self.n_components), len(target)),
                                  random_state=self.random_state)),
            ("scale", StandardScaler()),
            ("probe", LogisticProbeCV(Cs=self.probe_Cs, cv=self.cv, random_state=self.random_state,
                                      verbose=self.verbose)),
        ]).fit(features, target)
        self.best_params_ = {"C": float(self.model_[-1].C_), "gamma_scale": float(self.gamma_scale),
                             "n_components": int(self.model_[0].n_components)}
        return self

    def decision_function(self, X: ArrayLike) -> np.ndarray:
        """Decision scores of the fitted branch."""
        X = self._validated(X)
        return self.model_.decision_function(X)

    def predict(self, X: ArrayLike) -> np.ndarray:
        """Predicted class labels."""
        X = self._validated(X)
        return self.model_.predict(X)

    @available_if(_approximated)
    def predict_proba(self, X: ArrayLike) -> np.ndarray:
        """Class probabilities (approximate branch only: the exact SVC has none)."""
        X = self._validated(X)
        return self.model_.predict_proba(X)

    def _validated(self, X: ArrayLike) -> np.ndarray:
        check_is_fitted(self)
        return validate_data(self, X, reset=False, dtype=[np.float32, np.float64])

