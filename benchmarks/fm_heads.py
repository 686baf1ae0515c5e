"""The two head families of benchmarks/protocol.md and their holdout search, for any features.

Every feature set (raw pixels, HOG, frozen layers) gets exactly these heads and grids:

- linear: ``StandardScaler`` + multinomial L2 ``LogisticRegression`` (lbfgs), ``C`` grid;
- kernel: ``StandardScaler`` + RBF kernel (``gamma = g / n_features``) approximated by
  ``Nystroem`` with a fixed number of components, + a least-squares classifier solved for every
  C at once (:class:`RidgePath`, deviation 2); or exact ``SVC`` on small sets.

:func:`kernel_head` is the one place that builds the scalable kernel head, so it can be swapped
for ``featurepipe.heads``' kernel preset when that exists, without touching the search.

The search fits each grid point on the fit rows and scores the validation rows; the grid's
feature map (scaler, Nystroem) is fitted once per ``g`` and shared by its ``C`` values, and the
logistic regression is warm-started along increasing ``C`` and stops once ``PATIENCE`` Cs in a
row improve neither validation accuracy nor log-loss (deviation 2: past that point the weakly
regularised fits only cost time). A point whose solver did not converge
is marked, and the chosen point must have converged (else the result is a failure).

The logistic regression is :class:`Multinomial`: sklearn's multinomial L2 objective, tolerance
and iteration cap, minimised by ``featurepipe.heads.probe.fit_multinomial`` (scipy L-BFGS on
float32 products) instead of sklearn's float64 ``lbfgs`` (protocol deviation 1: the same model,
fast enough to run every arm on all 60,000 rows of a 2-core machine). ``SOLVER = "sklearn"``
restores sklearn's solver.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.kernel_approximation import Nystroem
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from featurepipe.heads.probe import fit_multinomial

__all__ = ["KERNEL_CS", "KERNEL_G", "KERNEL_G_WIDE", "LINEAR_CS", "MAX_ITER", "N_COMPONENTS",
           "PATIENCE", "RIDGE_CS", "RIDGE_CS_WIDE", "SOLVER", "Multinomial", "RidgePath",
           "Search", "final_fit", "kernel_head", "linear_head", "search"]

LINEAR_CS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
KERNEL_G: tuple[float, ...] = (0.3, 1.0, 3.0)
KERNEL_CS: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0)
#: The least-squares kernel head's C path (deviation 2: every C costs one product, so wider).
RIDGE_CS: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
N_COMPONENTS = 2000
#: Deviation 4's sensitivity grids: the kernel grid widened past the corner (smallest g,
#: largest C) that the classical arms chose.
KERNEL_G_WIDE: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0, 3.0)
RIDGE_CS_WIDE: tuple[float, ...] = (*RIDGE_CS, 1e4, 1e5)
#: The linear C path stops after this many Cs in a row improve neither the best validation
#: accuracy nor the best validation log-loss (deviation 2; None: the whole grid).
PATIENCE: int | None = 1
MAX_ITER = 5000
TOL = 1e-4
#: "featurepipe" (protocol deviation 1) or "sklearn" (the declared original).
SOLVER = "featurepipe"


class Multinomial(ClassifierMixin, BaseEstimator):
    """``LogisticRegression(C, solver="lbfgs", tol, max_iter)``'s model and objective, fitted
    by :func:`featurepipe.heads.probe.fit_multinomial`; ``warm_start`` like sklearn's."""

    def __init__(self, C: float = 1.0, max_iter: int = MAX_ITER, tol: float = TOL,
                 warm_start: bool = False) -> None:
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.warm_start = warm_start

    def fit(self, X: np.ndarray, y: np.ndarray) -> Multinomial:
        X = np.ascontiguousarray(X, dtype=np.float32)
        self.classes_, codes = np.unique(y, return_inverse=True)
        init = self.params_ if self.warm_start and hasattr(self, "params_") else None
        self.params_, nit = fit_multinomial(X, codes, len(self.classes_), float(self.C),
                                            init=init, max_iter=self.max_iter, tol=self.tol)
        self.n_iter_ = np.array([nit])
        if nit >= self.max_iter:
            warnings.warn(f"Multinomial: L-BFGS stopped at max_iter={self.max_iter} "
                          f"(C={self.C:g})", ConvergenceWarning, stacklevel=2)
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        return X @ self.params_[:, :-1].T.astype(np.float32) + self.params_[:, -1]

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]

    def log_loss(self, X: np.ndarray, y: np.ndarray) -> float:
        """Mean log-loss on ``(X, y)`` (the path's second stopping score)."""
        from scipy.special import log_softmax

        logp = log_softmax(self.decision_function(X).astype(np.float64), axis=1)
        codes = np.searchsorted(self.classes_, y)
        return float(-logp[np.arange(len(codes)), codes].mean())


class RidgePath(ClassifierMixin, BaseEstimator):
    """One-vs-rest least-squares classifier (``RidgeClassifier``'s model: +-1 targets, an
    unpenalised intercept, ``alpha = 1 / (2 C)``), solved for every C of a path at once.

    On a Nystroem map this is the least-squares RBF kernel machine (deviation 2): the
    eigendecomposition of the centred Gram matrix is computed once and each C costs one
    matrix product, where a logistic fit on thousands of kernel features costs hundreds of
    L-BFGS iterations per C.
    """

    def __init__(self, C: float = 1.0) -> None:
        self.C = C

    def _moments(self, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
        X = np.asarray(X, dtype=np.float32)
        self.classes_, codes = np.unique(y, return_inverse=True)
        Y = -np.ones((len(codes), len(self.classes_)), dtype=np.float32)
        Y[np.arange(len(codes)), codes] = 1.0
        x_mean = X.mean(axis=0, dtype=np.float64)
        y_mean = Y.mean(axis=0, dtype=np.float64)
        Xc = X - x_mean.astype(np.float32)
        gram = (Xc.T @ Xc).astype(np.float64)
        xty = (Xc.T @ (Y - y_mean.astype(np.float32))).astype(np.float64)
        return gram, xty, x_mean, y_mean

    def fit(self, X: np.ndarray, y: np.ndarray) -> RidgePath:
        gram, xty, x_mean, y_mean = self._moments(X, y)
        gram[np.diag_indices_from(gram)] += 1.0 / (2.0 * self.C)
        self._set(np.linalg.solve(gram, xty), x_mean, y_mean)
        return self

    def fit_path(self, X: np.ndarray, y: np.ndarray, cs: Sequence[float]
                 ) -> list[RidgePath]:
        """A fitted copy per C of ``cs``, from one eigendecomposition."""
        gram, xty, x_mean, y_mean = self._moments(X, y)
        lam, V = np.linalg.eigh(gram)
        B = V.T @ xty
        out = []
        for C in cs:
            model = RidgePath(C=C)
            model.classes_ = self.classes_
            model._set(V @ (B / (lam + 1.0 / (2.0 * C))[:, None]), x_mean, y_mean)
            out.append(model)
        return out

    def _set(self, W: np.ndarray, x_mean: np.ndarray, y_mean: np.ndarray) -> None:
        self.coef_ = W.T.astype(np.float32)
        self.intercept_ = (y_mean - x_mean @ W).astype(np.float32)
        self.n_iter_ = np.array([0])

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, dtype=np.float32) @ self.coef_.T + self.intercept_

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]


def _logreg(C: float, seed: int) -> Any:
    if SOLVER == "featurepipe":
        return Multinomial(C=C)
    return LogisticRegression(C=C, solver="lbfgs", max_iter=MAX_ITER, tol=TOL,
                              random_state=seed)


def linear_head(C: float, seed: int = 0) -> Pipeline:
    """Standardised multinomial L2 logistic regression."""
    return Pipeline([("scale", StandardScaler()), ("clf", _logreg(C, seed))])


def kernel_head(g: float, C: float, n_features: int, *, n_rows: int,
                n_components: int = N_COMPONENTS, exact: bool = False,
                seed: int = 0) -> Pipeline:
    """Standardised RBF kernel head, ``gamma = g / n_features``.

    ``exact``: ``SVC`` (quadratic in ``n_rows``: small sets only); otherwise ``Nystroem`` with
    ``min(n_components, n_rows)`` components + the least-squares classifier :class:`RidgePath`
    (deviation 2).
    """
    gamma = g / n_features
    if exact:
        return Pipeline([("scale", StandardScaler()),
                         ("clf", SVC(kernel="rbf", C=C, gamma=gamma, random_state=seed))])
    ny = Nystroem(kernel="rbf", gamma=gamma, n_components=min(n_components, n_rows),
                  random_state=seed)
    return Pipeline([("scale", StandardScaler()), ("map", ny), ("clf", RidgePath(C=C))])


@dataclass
class Search:
    """What a holdout search tried and chose."""

    family: str
    points: list[dict[str, Any]] = field(default_factory=list)
    chosen: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    not_run: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "points": self.points, "chosen": self.chosen,
                "seconds": self.seconds, "not_run": self.not_run}


def _record(res: Search, log: Any, family: str, point: dict[str, Any]) -> None:
    res.points.append(point)
    if log:
        log(f"  {family} g={point['g']} C={point['C']:g}: val {point['val_accuracy']:.4f}"
            f"{'' if point['converged'] else ' (not converged)'} in "
            f"{point['fit_seconds']:.1f} s")


def _fit_quiet(est: Any, X: np.ndarray, y: np.ndarray) -> tuple[Any, list[str], bool]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est.fit(X, y)
    msgs = list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught
                              if not issubclass(w.category, DeprecationWarning)))
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return est, msgs, converged


def search(family: str, X_fit: np.ndarray, y_fit: np.ndarray, X_val: np.ndarray,
           y_val: np.ndarray, *, exact: bool = False, n_components: int = N_COMPONENTS,
           seed: int = 0, log: Any = None) -> Search:
    """Fit every grid point of ``family`` ("linear" or "kernel") on the fit rows, score the
    validation rows, choose the best validation accuracy (ties: smaller C, then smaller g)."""
    res = Search(family)
    t_all = time.perf_counter()
    gs: Sequence[float | None] = (None,) if family == "linear" else KERNEL_G
    cs = LINEAR_CS if family == "linear" else KERNEL_CS if exact else RIDGE_CS
    d = X_fit.shape[1]
    for g in gs:
        if family == "linear":
            pipe = linear_head(cs[0], seed)
        else:
            pipe = kernel_head(float(g or 1.0), cs[0], d, n_rows=len(X_fit), exact=exact,
                               n_components=n_components, seed=seed)
        t0 = time.perf_counter()
        feat = clone(pipe[:-1]).fit(X_fit)  # scaler (+ Nystroem), shared by this g's C values
        F_fit, F_val = feat.transform(X_fit), feat.transform(X_val)
        if SOLVER == "featurepipe":  # its products run in float32: convert once, not per C
            F_fit, F_val = F_fit.astype(np.float32), F_val.astype(np.float32)
        map_seconds = time.perf_counter() - t0
        clf = clone(pipe[-1])
        if isinstance(clf, RidgePath):  # every C from one eigendecomposition
            t0 = time.perf_counter()
            models = clf.fit_path(F_fit, y_fit, cs)
            path_seconds = (time.perf_counter() - t0) / len(cs)
            for C, model in zip(cs, models, strict=True):
                acc = float((model.predict(F_val) == y_val).mean())
                _record(res, log, family, {
                    "g": g, "C": C, "val_accuracy": acc, "converged": True, "warnings": [],
                    "fit_seconds": path_seconds, "map_seconds": map_seconds, "n_iter": 0})
            continue
        if isinstance(clf, (LogisticRegression, Multinomial)):
            clf.set_params(warm_start=True)  # each C starts from the previous C's solution
        best_acc, best_loss, bad = -1.0, np.inf, 0
        for C in cs:
            if PATIENCE is not None and bad >= PATIENCE:
                res.points.append({"g": g, "C": C, "val_accuracy": None, "converged": None,
                                   "not_run": "C path stopped (deviation 2)"})
                continue
            t0 = time.perf_counter()
            clf.set_params(C=C)
            clf, msgs, ok = _fit_quiet(clf, F_fit, y_fit)
            acc = float((clf.predict(F_val) == y_val).mean())
            loss = clf.log_loss(F_val, y_val) if isinstance(clf, Multinomial) else None
            _record(res, log, family, {
                "g": g, "C": C, "val_accuracy": acc, "val_log_loss": loss, "converged": ok,
                "warnings": msgs, "fit_seconds": time.perf_counter() - t0,
                "map_seconds": map_seconds, "n_iter": int(np.max(getattr(clf, "n_iter_", [0])))})
            if loss is not None:
                bad = 0 if (acc > best_acc or loss < best_loss) else bad + 1
                best_acc, best_loss = max(best_acc, acc), min(best_loss, loss)
    res.points, skipped = ([p for p in res.points if p["val_accuracy"] is not None],
                           [p for p in res.points if p["val_accuracy"] is None])
    res.not_run = skipped
    best = max(p["val_accuracy"] for p in res.points)
    ties = [p for p in res.points if p["val_accuracy"] == best]
    res.chosen = min(ties, key=lambda p: (p["C"], p["g"] or 0.0))
    res.seconds = time.perf_counter() - t_all
    return res


def final_fit(family: str, chosen: dict[str, Any], X: np.ndarray, y: np.ndarray, *,
              exact: bool = False, n_components: int = N_COMPONENTS, seed: int = 0
              ) -> tuple[Pipeline, dict[str, Any]]:
    """The chosen configuration fitted once on all training rows; (model, fit record)."""
    if family == "linear":
        pipe = linear_head(chosen["C"], seed)
    else:
        pipe = kernel_head(chosen["g"], chosen["C"], X.shape[1], n_rows=len(X), exact=exact,
                           n_components=n_components, seed=seed)
    t0 = time.perf_counter()
    pipe, msgs, ok = _fit_quiet(pipe, X, y)
    return pipe, {"seconds": time.perf_counter() - t0, "converged": ok, "warnings": msgs}
