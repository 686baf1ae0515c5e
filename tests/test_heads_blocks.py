"""BlockStandardScaler: every concatenated layer carries the same total variance."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from featurepipe.heads import BlockStandardScaler, block_head, block_weights, make_head


def _blocks(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    wide = rng.normal(5.0, 3.0, size=(300, 40))
    narrow = rng.normal(-2.0, 0.1, size=(300, 5))
    return np.hstack([wide, narrow])


def test_every_block_carries_the_same_total_variance():
    Z = BlockStandardScaler(block_dims=(40, 5)).fit_transform(_blocks())
    totals = [Z[:, :40].var(axis=0).sum(), Z[:, 40:].var(axis=0).sum()]
    np.testing.assert_allclose(totals, [22.5, 22.5])  # (40 + 5) / 2 each
    np.testing.assert_allclose(Z.mean(axis=0), 0.0, atol=1e-12)
    # Every column's variance is the inverse of its block's width, up to the common factor.
    per_column = Z.var(axis=0)
    np.testing.assert_allclose(per_column[:40] * 40, 22.5)
    np.testing.assert_allclose(per_column[40:] * 5, 22.5)


def test_weights_are_inverse_square_roots_of_the_widths():
    w = block_weights([1280, 112, 320])
    np.testing.assert_allclose(w[0] / w[1], np.sqrt(112 / 1280))
    np.testing.assert_allclose(w[2] / w[1], np.sqrt(112 / 320))
    np.testing.assert_allclose((w ** 2 * np.array([1280, 112, 320])).sum(), 1280 + 112 + 320)


def test_one_block_is_a_standard_scaler_and_inverse_round_trips():
    X = _blocks(1)
    np.testing.assert_allclose(BlockStandardScaler().fit_transform(X),
                               StandardScaler().fit_transform(X))
    scaler = BlockStandardScaler(block_dims=[40, 5]).fit(X)
    np.testing.assert_allclose(scaler.inverse_transform(scaler.transform(X)), X)
    assert scaler.transform(X.astype(np.float32)).dtype == np.float32


def test_widths_that_do_not_add_up_are_one_clear_error():
    with pytest.raises(ValueError, match=r"add up to 44 columns but X has 45"):
        BlockStandardScaler(block_dims=(40, 4)).fit(_blocks())
    with pytest.raises(ValueError, match="positive integers"):
        BlockStandardScaler(block_dims=(45, 0)).fit(_blocks())


def test_block_head_replaces_the_presets_scaler():
    head = block_head(make_head("logreg", cv=2), (40, 5))
    assert isinstance(head, Pipeline)
    assert [type(s).__name__ for _, s in head.steps] == ["BlockStandardScaler", "LogisticProbeCV"]
    knn = block_head(make_head("knn", cv=2), (40, 5))
    assert [type(s).__name__ for _, s in knn.steps] == ["BlockStandardScaler", "GridSearchCV"]


@parametrize_with_checks([BlockStandardScaler(), BlockStandardScaler(block_dims=None)])
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)
