"""Standardise concatenated layers block by block, so every layer weighs the same in a head.

Features of several layers of a network are concatenated side by side (``[blocks.4 | blocks.5 |
penultimate]``); each layer is a *block* of columns. A plain ``StandardScaler`` gives every
column unit variance, so a layer's share of the total variance is its width: a 1280-wide
penultimate layer would carry eleven times the weight of a 112-wide ``blocks.4``, and an
L2-penalised linear head (or an RBF kernel, whose distances sum over columns) would mostly listen
to the widest layer whatever the narrow one knows. :class:`BlockStandardScaler` standardises every
column and then multiplies each block by a weight proportional to ``1 / sqrt(width)``, so every
block carries the same total variance. The common factor is chosen so that the whole matrix
keeps the total variance a ``StandardScaler`` would give it (the number of columns): the heads'
regularisation grids keep their meaning, and a single block is exactly a ``StandardScaler``.

:func:`block_head` puts the scaler in front of a head (in place of a preset's own
``StandardScaler``, which would undo the weighting).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from sklearn.base import BaseEstimator, OneToOneFeatureMixin, TransformerMixin, clone
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted, validate_data

__all__ = ["BlockStandardScaler", "block_head", "block_weights"]


def block_weights(block_dims: Sequence[int]) -> np.ndarray:
    """The factor of each block: ``sqrt(total width / (n_blocks * width))``.

    Proportional to ``1 / sqrt(width)``, so a block of ``w`` unit-variance columns carries the
    total variance ``total / n_blocks`` whatever ``w`` is; the blocks together carry ``total``.

    Parameters
    ----------
    block_dims : sequence of int
        Width of each block, in column order.

    Returns
    -------
    ndarray of shape (n_blocks,)

    Examples
    --------
    >>> block_weights([100, 25]).round(4).tolist()
    [0.7906, 1.5811]
    >>> block_weights([64]).tolist()
    [1.0]
    """
    dims = np.asarray(block_dims, dtype=np.float64)
    return np.sqrt(dims.sum() / (len(dims) * dims))


def _checked_dims(block_dims: Any, n_features: int) -> tuple[int, ...]:
    if block_dims is None:
        return (n_features,)
    try:
        dims = tuple(int(d) for d in block_dims)
    except (TypeError, ValueError):
        raise ValueError(f"block_dims must be a sequence of positive integers; got "
                         f"{block_dims!r}") from None
    if not dims or min(dims) < 1 or any(int(d) != d for d in block_dims):
        raise ValueError(f"block_dims must be a non-empty sequence of positive integers; got "
                         f"{block_dims!r}")
    if sum(dims) != n_features:
        raise ValueError(f"block_dims {list(dims)} add up to {sum(dims)} columns but X has "
                         f"{n_features}; give one width per concatenated layer")
    return dims


class BlockStandardScaler(OneToOneFeatureMixin, TransformerMixin, BaseEstimator):
    """Standardise every column, then weight each block of columns by ``~1/sqrt(width)``.

    Use it on layers concatenated side by side so that each layer carries the same total
    variance whatever its width (see the module docstring for why a plain ``StandardScaler``
    lets the widest layer dominate).

    Parameters
    ----------
    block_dims : sequence of int or None, default=None
        Width of each block (layer), in column order; must add up to the number of columns.
        ``None``: one block of every column (then this is a ``StandardScaler``).

    Attributes
    ----------
    scaler_ : StandardScaler
        Fitted on every column.
    block_dims_ : tuple of int
    block_weights_ : ndarray of shape (n_blocks,)
        :func:`block_weights` of ``block_dims_``.
    weights_ : ndarray of shape (n_features,)
        Each column's block weight.
    n_features_in_ : int

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(200, 12))
    >>> Z = BlockStandardScaler(block_dims=(9, 3)).fit_transform(X)
    >>> [round(float(Z[:, :9].var(axis=0).sum()), 6), round(float(Z[:, 9:].var(axis=0).sum()), 6)]
    [6.0, 6.0]
    """

    def __init__(self, block_dims: Sequence[int] | None = None) -> None:
        self.block_dims = block_dims

    def fit(self, X: ArrayLike, y: Any = None) -> BlockStandardScaler:
        """Learn each column's mean and scale.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : ignored

        Returns
        -------
        self : BlockStandardScaler
        """
        data: np.ndarray = validate_data(self, X, dtype=[np.float64, np.float32])
        self.block_dims_ = _checked_dims(self.block_dims, data.shape[1])
        self.scaler_ = StandardScaler().fit(data)
        self.block_weights_ = block_weights(self.block_dims_)
        self.weights_ = np.repeat(self.block_weights_, self.block_dims_).astype(data.dtype)
        return self

    def transform(self, X: ArrayLike) -> np.ndarray:
        """Standardised, block-weighted columns (same dtype as ``X`` for float input).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples, n_features)
        """
        check_is_fitted(self)
        data: np.ndarray = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        return self.scaler_.transform(data) * self.weights_.astype(data.dtype, copy=False)

    def inverse_transform(self, X: ArrayLike) -> np.ndarray:
        """Undo :meth:`transform`.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples, n_features)
        """
        check_is_fitted(self)
        data: np.ndarray = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        return self.scaler_.inverse_transform(data / self.weights_.astype(data.dtype, copy=False))

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags


def block_head(head: BaseEstimator, block_dims: Sequence[int]) -> BaseEstimator:
    """``head`` fed by a :class:`BlockStandardScaler` over ``block_dims``.

    A pipeline that starts with a ``StandardScaler`` (the ``logreg``, ``linear-svm``,
    ``svm-rbf`` and ``ridge`` presets) gets the block scaler *in its place*: a
    ``StandardScaler`` after it would give every column unit variance again and undo the
    weighting. Any other head gets the block scaler in front. Heads that standardise
    internally (the ``sgd`` preset) undo the weighting themselves.

    Parameters
    ----------
    head : BaseEstimator
        An unfitted head (cloned, not modified).
    block_dims : sequence of int
        Width of each concatenated layer.

    Returns
    -------
    BaseEstimator
        A ``Pipeline``.
    """
    scaler = BlockStandardScaler(block_dims=tuple(int(d) for d in block_dims))
    head = clone(head)
    if isinstance(head, Pipeline) and isinstance(head.steps[0][1], StandardScaler):
        name = head.steps[0][0]
        return Pipeline([(name, scaler), *head.steps[1:]], memory=head.memory,
                        verbose=head.verbose)
    return make_pipeline(scaler, head)
