"""A fast, C-searched multinomial logistic regression: the ``logreg`` preset's classifier.

:class:`LogisticProbeCV` fits the same model as ``LogisticRegression(C=...)`` (multinomial, L2, an
unpenalised intercept, sklearn's objective ``mean log-loss + ||W||^2 / (2 C n)``) with
``scipy.optimize`` L-BFGS on float32 matrix products, and chooses ``C`` on the training rows only:

* the C path runs from strong to weak regularisation, each fit warm-started from the previous
  one, and stops at the first C that improves neither the best validation accuracy nor the best
  log-loss (weakly regularised fits are the slow ones, and past that point they only overfit);
* above ``split_threshold`` rows one stratified validation split is used (large validation sets
  already measure accuracy to a fraction of a point), below it stratified K-fold;
* ties are broken honestly: every C whose accuracy is within one binomial standard error of the
  best counts as a tie, and the tied C with the lowest validation log-loss wins. On an easy,
  separable problem every C scores 100%, and log-loss then picks the weakly regularised model
  whose probabilities are confident, instead of the most regularised one;
* the fits along the path stop at a looser gradient tolerance (``search_tol``: they only rank
  the Cs); the final model is refit on all rows at the chosen C to ``tol``, warm-started from
  the search.

The matrix products run in float32 on the BLAS threads the machine has; only the parameter
vector handed to scipy is float64. No torch: ``featurepipe fit`` stays free of it. Timings are in
``benchmarks/results/heads_speed.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize
from scipy.special import logsumexp
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import StratifiedKFold
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from featurepipe.splits import stratified_split

__all__ = ["DEFAULT_CS", "LogisticProbeCV", "fit_multinomial"]

#: The C grid: symmetric around 0.1 on a log scale (the middle is the small-class fallback).
DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-4, 2, 7))


def _loss_grad(
    params: np.ndarray, X: np.ndarray, Y: np.ndarray, l2: float
) -> tuple[float, np.ndarray]:
    """Mean multinomial log-loss + ``l2 / 2 * ||W||^2`` and its gradient; float32 products."""
    n_classes = Y.shape[1]
    Wb = params.reshape(n_classes, X.shape[1] + 1).astype(np.float32)
    W, b = Wb[:, :-1], Wb[:, -1]
    Z = X @ W.T
    Z += b
    Z -= Z.max(axis=1, keepdims=True)
    np.exp(Z, out=Z)
    norm = Z.sum(axis=1, keepdims=True)
    # log p(true class) = log(exp(z_y) / sum exp(z)); Y is one-hot, so sum(Y * Z) picks exp(z_y).
    p_true = (Z * Y).sum(axis=1, dtype=np.float64) / norm[:, 0]
    n = X.shape[0]
    loss = -np.log(np.maximum(p_true, 1e-300)).sum() / n
    Z /= norm
    Z -= Y
    grad = np.empty_like(Wb, dtype=np.float64)
    grad[:, :-1] = (Z.T @ X) / n
    grad[:, -1] = Z.sum(axis=0, dtype=np.float64) / n
    Wd = W.astype(np.float64)
    loss += 0.5 * l2 * float((Wd * Wd).sum())
    grad[:, :-1] += l2 * Wd
    return float(loss), grad.ravel()


def fit_multinomial(
    X: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    C: float,
    *,
    init: np.ndarray | None = None,
    max_iter: int = 1000,
    tol: float = 1e-4,
) -> tuple[np.ndarray, int]:
    """Minimise sklearn's multinomial L2 objective by L-BFGS; return ``(W|b, iterations)``.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features), float32
    y : ndarray of shape (n_samples,)
        Class indices ``0 .. n_classes - 1``.
    n_classes : int
    C : float
        Inverse regularisation strength, as in ``LogisticRegression``.
    init : ndarray of shape (n_classes, n_features + 1), optional
        Warm start (weights with the intercept as the last column).
    max_iter, tol : int, float
        L-BFGS iterations and gradient tolerance (sklearn's ``gtol`` meaning).

    Returns
    -------
    params : ndarray of shape (n_classes, n_features + 1), float64
    n_iter : int
    """
    n, d = X.shape
    Y = np.zeros((n, n_classes), dtype=np.float32)
    Y[np.arange(n), y] = 1.0
    x0 = np.zeros(n_classes * (d + 1)) if init is None else np.asarray(init, np.float64).ravel()
    result = minimize(
        _loss_grad,
        x0,
        args=(X, Y, 1.0 / (C * n)),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": max_iter, "gtol": tol, "ftol": 64 * np.finfo(float).eps,
                 "maxls": 50},
    )
    return result.x.reshape(n_classes, d + 1), int(result.nit)


def _log_proba(X: np.ndarray, params: np.ndarray) -> np.ndarray:
    Z = X @ params[:, :-1].T.astype(X.dtype) + params[:, -1].astype(X.dtype)
    return Z - logsumexp(Z, axis=1, keepdims=True)


class LogisticProbeCV(ClassifierMixin, BaseEstimator):
    """Multinomial L2 logistic regression with ``C`` chosen on the training rows.

    Parameters
    ----------
    Cs : sequence of float, default=DEFAULT_CS
        Candidate inverse regularisation strengths (searched from small to large); a single
        value is fit directly, without validation.
    cv : int, default=5
        Stratified folds below ``split_threshold`` rows (fewer when a class is smaller).
    split_threshold : int, default=20000
        From this many rows on, one stratified split holding out ``val_size`` is used instead.
    val_size : float, default=0.2
        Validation fraction of the single split.
    patience : int or None, default=1
        Stop the C path after this many Cs in a row that improve neither the best accuracy nor
        the best log-loss so far; ``None`` runs every C.
        Validation curves along an L2 path are unimodal in practice, so one such C marks the
        far side of the optimum.
    max_iter : int, default=1000
        L-BFGS iterations per fit.
    tol : float, default=1e-4
        L-BFGS gradient tolerance of the final fit (sklearn's ``tol`` meaning).
    search_tol : float, default=1e-3
        Gradient tolerance of the fits along the C path: they only have to rank the Cs, and the
        final fit starts from the chosen one and converges to ``tol``.
    refit : bool, default=True
        Refit on all rows at the chosen C (``False`` keeps the search's model: the training
        part of the single split, or the fold-average of the K-fold models).
    random_state : int or None, default=0
        Seeds the fold and split shuffling.
    verbose : int, default=0
        ``> 0``: a tqdm progress bar on stderr over the search's fits.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    coef_ : ndarray of shape (1, n_features) for 2 classes, else (n_classes, n_features)
    intercept_ : ndarray of shape (1,) or (n_classes,)
    C_ : float
        The chosen C.
    cv_results_ : dict
        ``C``, ``accuracy``, ``log_loss`` (mean over the splits, NaN where the path stopped early)
        and ``tied`` (the Cs within noise of the best), plus ``splits`` and ``noise``.
    n_iter_ : int
        L-BFGS iterations of the final fit.
    n_features_in_ : int
    """

    def __init__(
        self,
        Cs: Sequence[float] = DEFAULT_CS,
        cv: int = 5,
        split_threshold: int = 20_000,
        val_size: float = 0.2,
        patience: int | None = 1,
        max_iter: int = 1000,
        tol: float = 1e-4,
        search_tol: float = 1e-3,
        refit: bool = True,
        random_state: int | None = 0,
        verbose: int = 0,
    ) -> None:
        self.Cs = Cs
        self.cv = cv
        self.split_threshold = split_threshold
        self.val_size = val_size
        self.patience = patience
        self.max_iter = max_iter
        self.tol = tol
        self.search_tol = search_tol
        self.refit = refit
        self.random_state = random_state
        self.verbose = verbose

    # ------------------------------------------------------------------ fit

    def fit(self, X: ArrayLike, y: ArrayLike) -> LogisticProbeCV:
        """Search C on the training rows, then fit at the chosen C.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Computed in float32.
        y : array-like of shape (n_samples,)

        Returns
        -------
        self : LogisticProbeCV
        """
        X, y = validate_data(self, X, y, dtype=[np.float32, np.float64])
        X = np.ascontiguousarray(X, dtype=np.float32)
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(
                f"need samples of at least 2 classes in the data, got 1 class: {self.classes_}")
        cs = sorted(float(c) for c in self.Cs)
        if not cs or min(cs) <= 0:
            raise ValueError(f"Cs must be positive floats, got {self.Cs!r}")
        k = len(self.classes_)
        splits = self._splits(codes) if len(cs) > 1 else []
        if len(cs) == 1:  # nothing to choose: one fit at that C
            chosen, start = cs[0], None
            self.cv_results_ = {"C": cs, "splits": 0, "note": "one C given: no search"}
        elif splits:
            chosen, start = self._search(X, codes, k, cs, splits)
        else:  # a class too small to validate on: the middle of the grid, no search
            chosen, start = cs[(len(cs) - 1) // 2], None
            self.cv_results_ = {"C": cs, "splits": 0, "note": "no search: a class has 1 sample"}
        if self.refit or start is None:
            params, self.n_iter_ = fit_multinomial(
                X, codes, k, chosen, init=start, max_iter=self.max_iter, tol=self.tol)
        else:
            params, self.n_iter_ = start, 0
        self.C_ = chosen
        self._set_coef(params)
        return self

    def _splits(self, codes: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        smallest = int(np.bincount(codes).min())
        if smallest < 2:
            return []
        if len(codes) >= self.split_threshold:
            return [stratified_split(codes, self.val_size, seed=self.random_state, sort=False,
                                     what="validation split")]
        folds = StratifiedKFold(n_splits=min(int(self.cv), smallest), shuffle=True,
                                random_state=self.random_state)
        return list(folds.split(np.zeros(len(codes)), codes))

    def _search(
        self, X: np.ndarray, codes: np.ndarray, k: int, cs: list[float],
        splits: list[tuple[np.ndarray, np.ndarray]],
    ) -> tuple[float, np.ndarray]:
        n_val = sum(len(val) for _, val in splits)
        acc = np.full(len(cs), np.nan)
        loss = np.full(len(cs), np.nan)
        solutions: list[np.ndarray] = []
        previous: list[np.ndarray | None] = [None] * len(splits)
        parts = [(np.ascontiguousarray(X[tr]), codes[tr], X[va], codes[va]) for tr, va in splits]
        bar = _progress(len(cs) * len(splits), self.verbose)
        bad = 0
        try:
            for i, C in enumerate(cs):
                hits, nll = 0.0, 0.0
                for j, (Xtr, ytr, Xva, yva) in enumerate(parts):
                    if bar is not None:
                        bar.set_postfix_str(f"C={C:g} split {j + 1}/{len(parts)}")
                    params, _ = fit_multinomial(Xtr, ytr, k, C, init=previous[j],
                                                max_iter=self.max_iter, tol=self.search_tol)
                    previous[j] = params
                    logp = _log_proba(Xva, params)
                    hits += float((logp.argmax(axis=1) == yva).sum())
                    nll -= float(logp[np.arange(len(yva)), yva].sum(dtype=np.float64))
                    if bar is not None:
                        bar.update(1)
                acc[i], loss[i] = hits / n_val, nll / n_val
                solutions.append(np.mean([p for p in previous if p is not None], axis=0))
                # Past the optimum: no better accuracy and a worse log-loss than seen so far.
                worse = acc[i] <= np.nanmax(acc[:i], initial=-1.0) and loss[i] > np.nanmin(loss)
                bad = bad + 1 if worse else 0
                if self.patience is not None and bad >= self.patience:
                    break
        finally:
            if bar is not None:
                bar.close()
        best_acc = float(np.nanmax(acc))
        noise = _noise(best_acc, n_val)
        tied = np.flatnonzero(acc >= best_acc - noise)
        pick = int(tied[np.argmin(loss[tied])])
        self.cv_results_ = {
            "C": cs, "accuracy": acc.tolist(), "log_loss": loss.tolist(),
            "tied": [cs[t] for t in tied], "noise": noise, "splits": len(splits),
        }
        return cs[pick], solutions[pick]

    def _set_coef(self, params: np.ndarray) -> None:
        W = params[:, :-1].astype(np.float32)
        b = params[:, -1].astype(np.float32)
        if len(self.classes_) == 2:  # sklearn's binary shape: one row, class 1 against class 0
            W, b = W[1:] - W[:1], b[1:] - b[:1]
        self.coef_, self.intercept_ = W, b

    # ------------------------------------------------------------------ predict

    def decision_function(self, X: ArrayLike) -> np.ndarray:
        """Logits, shape (n_samples,) for 2 classes and (n_samples, n_classes) otherwise."""
        check_is_fitted(self)
        features = validate_data(self, X, reset=False, dtype=[np.float32, np.float64])
        scores = features.astype(np.float32, copy=False) @ self.coef_.T + self.intercept_
        return scores[:, 0] if scores.shape[1] == 1 else scores

    def predict_proba(self, X: ArrayLike) -> np.ndarray:
        """Softmax probabilities, shape (n_samples, n_classes), in the order of ``classes_``."""
        return np.exp(self.predict_log_proba(X))

    def predict_log_proba(self, X: ArrayLike) -> np.ndarray:
        """Log of :meth:`predict_proba` (float64, so it agrees with ``log(predict_proba)``)."""
        scores = self.decision_function(X).astype(np.float64)
        if scores.ndim == 1:
            scores = np.column_stack([np.zeros_like(scores), scores])
        return scores - logsumexp(scores, axis=1, keepdims=True)

    def predict(self, X: ArrayLike) -> np.ndarray:
        """The most probable class of each row."""
        scores = self.decision_function(X)
        index = (scores > 0).astype(int) if scores.ndim == 1 else scores.argmax(axis=1)
        return self.classes_[index]


def _noise(accuracy: float, n: int) -> float:
    """One binomial standard error of an accuracy measured on n rows (at least one row)."""
    return max(math.sqrt(max(accuracy * (1 - accuracy), 0.0) / max(n, 1)), 1.0 / max(n, 1))


def _progress(total: int, verbose: int) -> Any:
    if not verbose or total < 2:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="C search", unit="fit", leave=False)
