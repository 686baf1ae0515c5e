"""ImageEmbedder: sklearn checks, embed-once caching in pipelines and searches, pickling."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks

from featurepipe.estimators import ImageEmbedder, clear_caches, drop_bad
from featurepipe.exceptions import (
    BackboneError,
    ConfigError,
    DecodeError,
    FeaturePipeError,
    FeaturePipeWarning,
)
from featurepipe.records import SkippedFile
from featurepipe.sources import open_source
from featurepipe.store import FeatureStore
from tests.helpers import TINY, write_good_images

SETTINGS = {**TINY, "precision": "fp32", "workers": 0}

# Checks that feed a 2-D numeric table to fit/transform. ImageEmbedder takes images and refuses a
# table with a ConfigError, so these cannot pass on it; the image-adapted run below drives the
# same checks through the real embedding path.
_TABLE = "feeds a 2-D numeric table; ImageEmbedder takes images (see the image-adapted run)"
# Checks that expect sklearn's own tabular validation (messages about samples, features, NaN,
# sparse or complex input). Images are validated by featurepipe.decode with its own messages.
_VALIDATION = "expects sklearn's tabular input validation message; images are validated by decode"
# Images have no input feature count.
_NO_N_FEATURES_IN = "images have no n_features_in_ (inputs are images, not feature columns)"

VALIDATION_CHECKS = {
    name: _VALIDATION for name in (
        "check_complex_data", "check_estimators_empty_data_messages", "check_estimators_nan_inf",
        "check_estimator_sparse_tag", "check_estimator_sparse_array",
        "check_estimator_sparse_matrix", "check_fit2d_1sample", "check_fit2d_1feature",
        "check_positive_only_tag_during_fit", "check_fit2d_predict1d",
    )
}
TABLE_CHECKS = {
    name: _TABLE for name in (
        "check_fit_score_takes_y", "check_estimators_overwrite_params",
        "check_dont_overwrite_parameters", "check_estimators_fit_returns_self",
        "check_readonly_memmap_input", "check_n_features_in_after_fitting",
        "check_estimators_dtypes", "check_dtype_object", "check_pipeline_consistency",
        "check_estimators_pickle", "check_f_contiguous_array_estimator",
        "check_transformer_data_not_an_array", "check_transformer_general",
        "check_transformer_preserve_dtypes", "check_methods_sample_order_invariance",
        "check_methods_subset_invariance", "check_dict_unchanged", "check_fit_idempotent",
        "check_fit_check_is_fitted", "check_n_features_in",
    )
}
#: Skipped/expected-to-fail checks of ImageEmbedder, each with its reason.
EMBEDDER_EXPECTED_FAILED = {**TABLE_CHECKS, **VALIDATION_CHECKS}


class TableAsImages(ImageEmbedder):
    """Test-only adapter: each row of a numeric table becomes a 1 x n_features grey image.

    Values are squashed into [0, 1] by a sigmoid (a fixed, row-wise map), so sklearn's checks
    drive the real fit / transform / cache / pickle path of ImageEmbedder with image inputs.
    """

    def fit(self, X, y=None):
        return super().fit(_table_to_images(X), y)

    def transform(self, X):
        return super().transform(_table_to_images(X))


def _table_to_images(X):
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"Expected 2D array, got {X.ndim}D array instead")
    return (1.0 / (1.0 + np.exp(-X)))[:, None, :]


#: Expected failures of the image-adapted run: the adapter converts with np.asarray, so it
#: cannot show ImageEmbedder's own handling of the odd tabular inputs.
ADAPTER_EXPECTED_FAILED = {
    **{name: reason for name, reason in VALIDATION_CHECKS.items()
       if name not in ("check_positive_only_tag_during_fit", "check_fit2d_1sample",
                       "check_fit2d_1feature")},  # these pass through the adapter
    "check_n_features_in": _NO_N_FEATURES_IN,
    "check_n_features_in_after_fitting": _NO_N_FEATURES_IN,
    "check_transformer_general": "images of any size are accepted: a table of another width is "
                                 "an image of another size, not an error",
}


@pytest.fixture(autouse=True)
def _fresh_features():
    """Each test starts without memoised features (the loaded tiny network may stay)."""
    clear_caches(backbones=False)
    yield
    clear_caches(backbones=False)


@pytest.fixture
def counted():
    """Count the images that go through the backbone (a forward hook on the shared network)."""
    seen = {"images": 0}
    backbone = ImageEmbedder(**SETTINGS).fit(np.zeros((1, 8, 8, 3), np.uint8)).backbone_

    def count(_module, args):
        seen["images"] += int(args[0].shape[0])

    handle = backbone.extractor.register_forward_pre_hook(count)
    yield seen
    handle.remove()


@pytest.fixture
def two_classes(tmp_path):
    paths = write_good_images(tmp_path / "a", 6, seed=1) + write_good_images(tmp_path / "b", 6, 2)
    return [str(p) for p in paths], np.repeat([0, 1], 6)


# --------------------------------------------------------------------------- sklearn checks


@parametrize_with_checks([ImageEmbedder(**SETTINGS)],
                         expected_failed_checks=lambda est: EMBEDDER_EXPECTED_FAILED)
def test_sklearn_checks_image_embedder(estimator, check):
    check(estimator)


@parametrize_with_checks([TableAsImages(**SETTINGS)],
                         expected_failed_checks=lambda est: ADAPTER_EXPECTED_FAILED)
def test_sklearn_checks_through_images(estimator, check):
    check(estimator)


# --------------------------------------------------------------------------- embed once


def test_grid_search_over_head_embeds_each_image_once(two_classes, counted):
    paths, y = two_classes
    pipe = make_pipeline(ImageEmbedder(**SETTINGS), LogisticRegression(max_iter=200))
    search = GridSearchCV(pipe, {"logisticregression__C": [0.1, 1.0, 10.0]},
                          cv=StratifiedKFold(3, shuffle=True, random_state=0))
    search.fit(paths, y)
    assert counted["images"] == len(paths)
    search.predict(paths)
    assert counted["images"] == len(paths)


def test_cross_val_score_and_repeated_paths_embed_once(two_classes, counted):
    paths, y = two_classes
    pipe = make_pipeline(ImageEmbedder(**SETTINGS), LogisticRegression(max_iter=200))
    cross_val_score(pipe, paths, y, cv=3)
    assert counted["images"] == len(paths)
    emb = ImageEmbedder(**SETTINGS).fit(paths)
    doubled = emb.transform(paths + paths[:3])
    assert doubled.shape == (15, emb.feature_dim_) and doubled.dtype == np.float32
    np.testing.assert_array_equal(doubled[12:], doubled[:3])
    assert counted["images"] == len(paths)


def test_store_cache_is_reused_across_processes(two_classes, counted, tmp_path):
    paths, y = two_classes
    cache = tmp_path / "cache.h5"
    pipe = make_pipeline(ImageEmbedder(**SETTINGS, cache=str(cache)),
                         LogisticRegression(max_iter=200))
    GridSearchCV(pipe, {"logisticregression__C": [0.1, 1.0]}, cv=3).fit(paths, y)
    assert counted["images"] == len(paths)
    assert FeatureStore(cache).info()["n_rows"] == len(paths)
    in_store = ImageEmbedder(**SETTINGS, cache=str(cache)).fit(paths).transform(paths)
    clear_caches(backbones=False)  # as a new process would start: no features in memory
    again = ImageEmbedder(**SETTINGS, cache=str(cache)).fit(paths).transform(paths[::-1])
    assert counted["images"] == len(paths)
    np.testing.assert_array_equal(again[::-1], in_store)
    clear_caches(backbones=False)
    in_memory = ImageEmbedder(**SETTINGS).fit(paths).transform(paths)
    np.testing.assert_allclose(in_memory, in_store, rtol=1e-5, atol=1e-6)


def test_arrays_are_content_addressed(counted):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(4, 20, 20, 3), dtype=np.uint8)
    b = np.concatenate([a[2:], rng.integers(0, 256, size=(2, 20, 20, 3), dtype=np.uint8)])
    emb = ImageEmbedder(**SETTINGS).fit(a)
    fa = emb.transform(np.concatenate([a, a[:1]]))
    assert counted["images"] == 4
    np.testing.assert_array_equal(fa[4], fa[0])
    fb = emb.transform(b)  # two rows seen before, two new ones
    assert counted["images"] == 6
    np.testing.assert_array_equal(fb[:2], fa[2:4])
    assert not np.array_equal(fb[2], fb[3])


def test_float16_dtype_rounds_like_the_store(two_classes):
    paths, _ = two_classes
    f32 = ImageEmbedder(**SETTINGS).fit(paths).transform(paths)
    f16 = ImageEmbedder(**SETTINGS, dtype="float16").fit(paths).transform(paths)
    assert f16.dtype == np.float32
    np.testing.assert_array_equal(f16, f32.astype(np.float16).astype(np.float32))


# --------------------------------------------------------------------------- pickling


def test_pickle_carries_spec_not_weights(two_classes, counted):
    paths, y = two_classes
    emb = ImageEmbedder(**SETTINGS).fit(paths)
    before = emb.transform(paths)
    blob = pickle.dumps(emb)
    assert len(blob) < 100_000
    copy = pickle.loads(blob)
    assert "backbone_" not in vars(copy) and copy.key_ == emb.key_
    clear_caches()  # no shared features or network: the copy must rebuild from its spec
    np.testing.assert_allclose(copy.transform(paths), before, rtol=1e-5, atol=1e-6)
    assert "backbone_" in vars(copy)
    assert clone(emb).get_params() == emb.get_params()
    pipe = make_pipeline(ImageEmbedder(**SETTINGS), LogisticRegression(max_iter=200))
    pipe.fit(paths, y)
    assert len(pickle.dumps(pipe)) < 100_000


# --------------------------------------------------------------------------- bad images


def test_bad_image_raises_by_default_naming_the_file_and_why(mixed_folder):
    root, expected = mixed_folder
    emb = ImageEmbedder(**SETTINGS).fit(root)
    assert emb.on_error == "raise"
    with pytest.raises(DecodeError, match="and 2 more bad images") as info:
        emb.transform(root)
    first = info.value.path
    assert Path(first).is_absolute() and expected[Path(first).relative_to(root).as_posix()]
    assert str(info.value).startswith(f"{first}: {info.value.reason}")
    for name, why in expected.items():
        if why:
            assert Path(name).name in str(info.value)
    assert {Path(i).relative_to(root).as_posix() for i, _ in emb.skipped_} == {
        name for name, why in expected.items() if why}
    assert not hasattr(emb, "failed_mask_")


def test_zero_keeps_a_zero_row_per_bad_image_with_a_mask(mixed_folder):
    root, expected = mixed_folder
    bad_names = {name for name, why in expected.items() if why}
    emb = ImageEmbedder(**SETTINGS, on_error="zero").fit(root)
    with pytest.warns(FeaturePipeWarning, match="could not be embedded") as record:
        F = emb.transform(root)
    assert "truncated" in str(record[0].message)
    skipped = {Path(i).relative_to(root).as_posix(): r for i, r in emb.skipped_}
    assert set(skipped) == bad_names
    assert all(skipped[name].startswith(expected[name]) for name in bad_names)
    assert all(isinstance(s, SkippedFile) for s in emb.skipped_)
    mask = emb.valid_mask(root)
    np.testing.assert_array_equal(emb.failed_mask_, ~mask)
    assert emb.failed_mask_.sum() == len(bad_names) and emb.failed_mask_.dtype == bool
    assert not F[emb.failed_mask_].any() and F[~emb.failed_mask_].any(axis=1).all()
    emb.transform(root / "a")  # the mask describes the last call
    assert emb.failed_mask_.shape == (6,) and not emb.failed_mask_.any()
    with pytest.raises(ConfigError, match=r"on_error must be 'raise' or 'zero'; got 'skip'"):
        ImageEmbedder(**SETTINGS, on_error="skip").fit(root)


def test_drop_bad_keeps_y_aligned_and_fit_embeds_nothing_new(mixed_folder, counted):
    from featurepipe.sources import open_source

    root, expected = mixed_folder
    src = open_source(root)
    paths = [s.path for s in src.samples]
    pipe = make_pipeline(ImageEmbedder(**SETTINGS), LogisticRegression(max_iter=200))
    X_ok, y_ok = drop_bad(paths, src.labels, pipe[0])
    n_good = sum(why is None for why in expected.values())
    assert len(X_ok) == len(y_ok) == n_good
    kept = {Path(p).relative_to(root).as_posix() for p in X_ok}
    assert all(expected[name] is None for name in kept)
    assert y_ok.tolist() == [src.labels[paths.index(p)] for p in X_ok]
    n = counted["images"]
    pipe.fit(X_ok, y_ok)  # no warning: filterwarnings=error would fail the test
    assert counted["images"] == n
    arr = np.zeros((3, 8, 8), dtype=np.uint8)
    assert drop_bad(arr, None, ImageEmbedder(**SETTINGS))[0].shape == (3, 8, 8)


# --------------------------------------------------------------------------- validation


def test_init_stores_params_and_fit_validates(two_classes):
    paths, _ = two_classes
    emb = ImageEmbedder(backbone="no-such-net", batch_size=0)  # nothing checked yet
    assert emb.batch_size == 0
    with pytest.raises(ConfigError, match="batch_size must be a positive integer; got 0"):
        emb.fit(paths)
    with pytest.raises(BackboneError):
        ImageEmbedder(backbone="no-such-net").fit(paths)
    with pytest.raises(ConfigError, match="dtype must be one of"):
        ImageEmbedder(**SETTINGS, dtype="float64").fit(paths)
    with pytest.raises(ConfigError, match=r"takes images.*shape \(5, 3\).*fit a classifier"):
        ImageEmbedder(**SETTINGS).fit(np.zeros((5, 3)))
    with pytest.raises(ConfigError, match="got a list holding int"):
        ImageEmbedder(**SETTINGS).fit([1, 2])
    emb = ImageEmbedder(**SETTINGS).fit(paths)
    assert emb.get_feature_names_out()[0] == "imageembedder0"
    assert emb.n_features_out_ == emb.feature_dim_ == len(emb.get_feature_names_out())


# --------------------------------------------------------------------------- PIL images


def _modes_and_sizes(tmp_path):
    """PIL images of several modes and sizes, and the same images as lossless files."""
    rng = np.random.default_rng(7)
    noise = rng.integers(0, 256, size=(30, 26, 4), dtype=np.uint8)
    images = [Image.fromarray(noise[..., :3]), Image.fromarray(noise, "RGBA").resize((40, 21)),
              Image.fromarray(noise[..., 0], "L"), Image.fromarray(noise[..., 1], "L").convert("P"),
              Image.fromarray(noise[..., 2].astype(np.uint16) * 257),
              Image.fromarray(noise, "RGBA").convert("CMYK")]
    paths = []
    for i, img in enumerate(images):
        paths.append(str(tmp_path / f"{i}.{'tif' if img.mode == 'CMYK' else 'png'}"))
        img.save(paths[-1])
    return images, paths


def test_pil_images_embed_like_the_same_files_and_are_content_addressed(tmp_path, counted):
    images, paths = _modes_and_sizes(tmp_path)
    emb = ImageEmbedder(**SETTINGS).fit(images)
    from_files = ImageEmbedder(**SETTINGS).fit(paths).transform(paths)
    assert counted["images"] == len(paths)
    F = emb.transform(images + [images[0]])
    assert counted["images"] == 2 * len(paths)  # the repeat is embedded once
    np.testing.assert_allclose(F[:-1], from_files, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(F[-1], F[0])
    again = emb.transform([img.copy() for img in images[::-1]])  # equal pixels, new objects
    assert counted["images"] == 2 * len(paths)
    np.testing.assert_array_equal(again[::-1], F[:-1])
    pipe = make_pipeline(ImageEmbedder(**SETTINGS), LogisticRegression(max_iter=200))
    assert pipe.fit(images, [0, 1] * 3).predict(images[:2]).shape == (2,)


def test_pil_images_go_through_the_cache_store(tmp_path):
    images, _ = _modes_and_sizes(tmp_path)
    cache = tmp_path / "cache.h5"
    stored = ImageEmbedder(**SETTINGS, cache=cache).fit(images).transform(images)
    assert sorted(FeatureStore(cache).load().ids) == sorted(
        f"image:{open_source(images).fingerprint(i).partition(':')[2]}" for i in range(6))
    clear_caches(backbones=False)
    np.testing.assert_array_equal(
        ImageEmbedder(**SETTINGS, cache=cache).fit(images).transform(images), stored)


def test_bad_pil_image_is_named_by_its_position(tmp_path):
    images, paths = _modes_and_sizes(tmp_path)
    X = [*images[:2], Image.new("RGB", (1010, 10)), images[2]]
    with pytest.raises(DecodeError, match=r"^X\[2\]: aspect ratio 1010:10 over the limit"):
        ImageEmbedder(**SETTINGS).fit(X).transform(X)
    emb = ImageEmbedder(**SETTINGS, on_error="zero").fit(X)
    with pytest.warns(FeaturePipeWarning, match=r"X\[2\] \(aspect ratio"):
        F = emb.transform(X)
    assert emb.failed_mask_.tolist() == [False, False, True, False] and not F[2].any()
    X_ok, y_ok = drop_bad(X, [0, 1, 0, 1], emb)
    assert len(X_ok) == 3 and X_ok[2] is images[2] and y_ok.tolist() == [0, 1, 1]
    with pytest.raises(ConfigError, match="mixing 1 PIL images with str items"):
        ImageEmbedder(**SETTINGS).fit([images[0], paths[1]])
    with pytest.raises(ConfigError, match=r"one PIL image \(pass a list"):
        ImageEmbedder(**SETTINGS).fit(images[0])


# --------------------------------------------------------------------------- several layers


def test_layers_give_each_layer_side_by_side_from_one_forward(two_classes, counted):
    paths, _ = two_classes
    joint = ImageEmbedder(**SETTINGS, layers="blocks.3,penultimate").fit(paths)
    singles = [ImageEmbedder(**SETTINGS, layer=layer).fit(paths) for layer in ("blocks.3", None)]
    assert joint.layer_dims_ == tuple(s.feature_dim_ for s in singles)
    assert [p["layer"] for p in joint.key_parts_] == ["blocks.3", None]
    assert joint.key_parts_ == [s.key_parts_ for s in singles]
    assert joint.key_ not in {s.key_ for s in singles}  # memoised apart from either layer
    handle = joint.backbone_.extractor.register_forward_pre_hook(
        lambda _m, args: counted.__setitem__("joint", counted.get("joint", 0) + len(args[0])))
    try:
        features = joint.transform(paths)
    finally:
        handle.remove()
    assert counted.get("joint") == len(paths)  # each image through the network once
    np.testing.assert_array_equal(features, np.hstack([s.transform(paths) for s in singles]))
    assert joint.get_feature_names_out().shape == (sum(joint.layer_dims_),)


def test_layers_survive_pickling_and_cloning(two_classes):
    paths, _ = two_classes
    joint = ImageEmbedder(**SETTINGS, layers=["blocks.3", None]).fit(paths)
    expected = joint.transform(paths)
    clear_caches()  # a new process: no features, no network
    again = pickle.loads(pickle.dumps(joint))
    assert "backbone_" not in again.__dict__
    np.testing.assert_array_equal(again.transform(paths), expected)
    assert clone(joint).get_params()["layers"] == ["blocks.3", None]


def test_an_embedder_pickled_before_layers_existed_still_loads(two_classes):
    paths, _ = two_classes
    emb = ImageEmbedder(**SETTINGS).fit(paths)
    expected = emb.transform(paths)
    state = emb.__getstate__()
    for name in ("layers", "layer_specs_", "layer_dims_"):
        state.pop(name)
    clear_caches()
    old = ImageEmbedder.__new__(ImageEmbedder)
    old.__setstate__(state)
    assert old.get_params()["layers"] is None and old.layer_dims_ == (emb.feature_dim_,)
    np.testing.assert_array_equal(old.transform(paths), expected)


@pytest.mark.parametrize("extra, match", [
    ({"layer": "blocks.3"}, "layer= or layers=, not both"),
    ({"cache": "feats.h5"}, "does not take cache="),
    ({"layers": "blocks.3,blocks.3"}, "more than once"),
    ({"layers": "blocks.3,no_such_layer"}, "no_such_layer"),
])
def test_bad_layer_lists_are_one_line_errors(two_classes, extra, match):
    kw = {"layers": "blocks.3,penultimate", **extra}
    with pytest.raises(FeaturePipeError, match=match) as err:
        ImageEmbedder(**SETTINGS, **kw).fit(two_classes[0])
    assert "\n" not in str(err.value)
