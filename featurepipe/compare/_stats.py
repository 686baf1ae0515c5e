"""Uncertainty of a test score: Wilson intervals for accuracy, exact McNemar for paired arms.

Both wrap :func:`scipy.stats.binomtest`: the Wilson score interval is its
``proportion_ci(method="wilson")``, and the exact McNemar test is a two-sided binomial test on
the discordant pairs (images one arm gets right and the other wrong), which is how two
classifiers scored on the *same* test images are compared without assuming independence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from featurepipe.exceptions import ConfigError

__all__ = ["accuracy_interval", "mcnemar_exact", "paired_comparison", "wilson_interval"]


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion.

    Parameters
    ----------
    successes : int
        Correct predictions.
    n : int
        Trials (test images); must be >= 1.
    confidence : float, default=0.95

    Returns
    -------
    (low, high) : tuple of float

    Examples
    --------
    >>> [round(v, 4) for v in wilson_interval(9, 10)]
    [0.5958, 0.9821]
    """
    from scipy.stats import binomtest

    if n < 1 or not 0 <= successes <= n:
        raise ConfigError(f"need 0 <= successes <= n and n >= 1; got {successes} of {n}")
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence,
                                                         method="wilson")
    return float(ci.low), float(ci.high)


def accuracy_interval(y_true: Sequence[Any] | np.ndarray, y_pred: Sequence[Any] | np.ndarray,
                      confidence: float = 0.95) -> dict[str, float | int]:
    """Accuracy with its Wilson interval: ``{accuracy, ci_low, ci_high, n, correct}``."""
    correct = _correct(y_true, y_pred)
    k, n = int(correct.sum()), len(correct)
    low, high = wilson_interval(k, n, confidence)
    return {"accuracy": k / n, "ci_low": low, "ci_high": high, "n": n, "correct": k}


def mcnemar_exact(correct_a: Sequence[bool] | np.ndarray,
                  correct_b: Sequence[bool] | np.ndarray) -> dict[str, float | int]:
    """Exact (binomial) McNemar test of two classifiers scored on the same images.

    Parameters
    ----------
    correct_a, correct_b : sequence of bool
        Per test image: did arm A (B) predict it correctly. Same images, same order.

    Returns
    -------
    dict
        ``a_only`` (A right, B wrong), ``b_only``, ``discordant``, ``pvalue`` (two-sided;
        1.0 when there are no discordant pairs).

    Examples
    --------
    >>> mcnemar_exact([True] * 10 + [False], [False] * 10 + [True])["pvalue"] < 0.02
    True
    """
    from scipy.stats import binomtest

    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ConfigError(f"paired correctness vectors must be 1-d and of the same length; "
                          f"got shapes {a.shape} and {b.shape}")
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    n = a_only + b_only
    p = 1.0 if n == 0 else float(binomtest(a_only, n, 0.5, alternative="two-sided").pvalue)
    return {"a_only": a_only, "b_only": b_only, "discordant": n, "pvalue": p}


def paired_comparison(y_true: Sequence[Any] | np.ndarray, pred_a: Sequence[Any] | np.ndarray,
                      pred_b: Sequence[Any] | np.ndarray) -> dict[str, float | int]:
    """Accuracy difference A - B on the same images and its exact McNemar p-value."""
    ca, cb = _correct(y_true, pred_a), _correct(y_true, pred_b)
    test = mcnemar_exact(ca, cb)
    return {"accuracy_a": float(ca.mean()), "accuracy_b": float(cb.mean()),
            "difference": float(ca.mean() - cb.mean()), **test}


def _correct(y_true: Sequence[Any] | np.ndarray, y_pred: Sequence[Any] | np.ndarray
             ) -> np.ndarray:
    t, p = np.asarray(y_true), np.asarray(y_pred)
    if t.shape != p.shape or t.ndim != 1 or len(t) == 0:
        raise ConfigError(f"labels and predictions must be non-empty 1-d arrays of one length; "
                          f"got shapes {t.shape} and {p.shape}")
    return np.asarray(t == p, dtype=bool)
