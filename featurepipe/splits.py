"""The one stratified train/test split: compare, ``fit``, fine-tuning, the demo and the probe.

Every caller needs the same three things: scikit-learn's stratified shuffle (so a seed picks the
same rows everywhere), sizes checked up front with a message naming the class counts, and one
rule for what happens when stratifying is impossible. scikit-learn can stratify only when every
class has at least 2 members and both parts can hold one row of every class; otherwise the
caller chooses:

* ``fallback="raise"`` (the default, for test splits): a :class:`ConfigError` naming the counts.
  A test set missing a class would report an accuracy that says nothing about that class.
* ``fallback="random"`` (for splits that only steer training, such as a validation part for
  early stopping): an unstratified shuffle of the same sizes and seed, with a
  :class:`FeaturePipeWarning` saying why.

The rows picked are exactly those of ``sklearn.model_selection.train_test_split`` (stratified, or
not for the fallback) with the same sizes and ``random_state``: the helper only adds the checks.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import numpy as np

from featurepipe.exceptions import ConfigError, FeaturePipeWarning

__all__ = ["split_sizes", "stratified_split", "stratified_subsample"]


def split_sizes(n: int, test_size: float | int) -> tuple[int, int]:
    """``(n_train, n_test)`` for ``n`` rows, computed as scikit-learn does.

    Parameters
    ----------
    n : int
        Number of rows.
    test_size : float or int
        Fraction in (0, 1) (``ceil(test_size * n)`` rows) or a count of test rows.

    Returns
    -------
    (n_train, n_test) : tuple of int

    Raises
    ------
    ConfigError
        ``test_size`` is not a fraction or count, or leaves one part empty.
    """
    if isinstance(test_size, bool | np.bool_) or not isinstance(
            test_size, int | float | np.integer | np.floating):
        raise ConfigError(f"test_size must be a fraction in (0, 1) or a row count; "
                          f"got {test_size!r}")
    if isinstance(test_size, float | np.floating):
        if not 0.0 < float(test_size) < 1.0:
            raise ConfigError(f"test_size={test_size!r}: a fraction must lie in (0, 1)")
        n_test = math.ceil(float(test_size) * n)
    else:
        n_test = int(test_size)
    n_train = n - n_test
    if n_test < 1 or n_train < 1:
        raise ConfigError(f"test_size={test_size!r} of {n} rows leaves {n_train} training and "
                          f"{n_test} test rows; both parts need at least one")
    return n_train, n_test


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value (``2``, not ``np.int64(2)``, in messages)."""
    return value.item() if isinstance(value, np.generic) else value


def _why_not_stratified(labels: np.ndarray, n_train: int, n_test: int) -> str | None:
    """Why scikit-learn cannot stratify these sizes, or None when it can."""
    classes, counts = np.unique(labels, return_counts=True)
    smallest = int(np.argmin(counts))
    if counts[smallest] < 2:
        return f"class {_plain(classes[smallest])!r} has only {int(counts[smallest])} member"
    if n_test < len(classes):
        return f"{n_test} test rows cannot hold one row of each of the {len(classes)} classes"
    if n_train < len(classes):
        return f"{n_train} training rows cannot hold one row of each of the {len(classes)} classes"
    return None


def stratified_split(
    labels: Any,
    test_size: float | int,
    *,
    seed: int | np.random.RandomState | None,
    fallback: Literal["raise", "random"] = "raise",
    sort: bool = True,
    what: str = "test split",
    hint: str = "",
) -> tuple[np.ndarray, np.ndarray]:
    """Train and test positions of ``labels``, stratified by class.

    Parameters
    ----------
    labels : array-like of shape (n,)
        Class of every row (any hashable values).
    test_size : float or int
        Fraction in (0, 1) or count of rows in the test part.
    seed : int, RandomState or None
        ``random_state`` of the shuffle; the same seed gives the same rows.
    fallback : {"raise", "random"}
        When stratifying is impossible (a class with fewer than 2 rows, or a part smaller than
        the number of classes): raise a :class:`ConfigError`, or split at random with a
        :class:`FeaturePipeWarning`.
    sort : bool
        True returns each part in row order; False keeps scikit-learn's shuffled order (callers
        that draw further subsets from it by position rely on that order).
    what : str
        Name of the split in messages ("test split", "validation split").
    hint : str
        What the user can do instead, appended to the error.

    Returns
    -------
    (train, test) : tuple of ndarray of int64
        Positions into ``labels``; disjoint, together every row.

    Raises
    ------
    ConfigError
        Invalid ``test_size`` or ``fallback``; or stratifying is impossible and ``fallback`` is
        ``"raise"``.
    """
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    if fallback not in ("raise", "random"):
        raise ConfigError(f"fallback={fallback!r}: expected 'raise' or 'random'")
    n = len(labels)
    n_train, n_test = split_sizes(n, test_size)
    positions = np.arange(n, dtype=np.int64)
    why = _why_not_stratified(labels, n_train, n_test)
    if why is None:
        train, test = train_test_split(positions, test_size=n_test, train_size=n_train,
                                       stratify=labels, random_state=seed)
    elif fallback == "raise":
        classes, counts = np.unique(labels, return_counts=True)
        shown = {_plain(c): int(k) for c, k in zip(classes, counts, strict=True)}
        raise ConfigError(f"cannot make a stratified {what} with test_size={test_size!r} of {n} "
                          f"rows (class counts {shown}): {why}" + (f"; {hint}" if hint else ""))
    else:
        warnings.warn(f"{what} is not stratified ({why})", FeaturePipeWarning, stacklevel=2)
        train, test = train_test_split(positions, test_size=n_test, train_size=n_train,
                                       random_state=seed)
    train, test = np.asarray(train, dtype=np.int64), np.asarray(test, dtype=np.int64)
    return (np.sort(train), np.sort(test)) if sort else (train, test)


def stratified_subsample(labels: Any, n: int, seed: int | None) -> np.ndarray:
    """Positions (in row order) of a stratified random subsample of ``n`` rows.

    All rows when ``n`` is at least their number. It is the training part of
    :func:`stratified_split`, so it falls back to a random subsample, with a warning, when a class
    is too small to stratify at this size.
    """
    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels), dtype=np.int64)
    keep, _ = stratified_split(labels, len(labels) - int(n), seed=seed, fallback="random",
                               what="subsample")
    return keep
