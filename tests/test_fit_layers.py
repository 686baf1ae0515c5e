"""``fit --layers``: layer lists side by side, the layer choice, models on several layers."""

from __future__ import annotations

import json

import h5py
import joblib
import numpy as np
import pytest
from sklearn.base import clone

from featurepipe.cli import main
from featurepipe.cli_heads import fit_store
from featurepipe.embed import embed
from featurepipe.exceptions import ConfigError
from featurepipe.heads import BlockStandardScaler, fit_head, make_head
from featurepipe.identity import key_parts_from_attrs
from featurepipe.layer_entries import find_layer_entries, load_layer_data
from featurepipe.model import load_model, save_model
from featurepipe.splits import stratified_split
from featurepipe.store import FeatureStore
from tests.helpers import TINY, write_good_images

LAYERS = ("blocks.3", "blocks.4")


def _embed(folder, store, layer):
    return embed(folder, store, TINY["backbone"], weights=TINY["weights"], layer=layer,
                 image_size=TINY["image_size"], precision="fp32", workers=0, progress=False)


@pytest.fixture(scope="module")
def two_layers(tmp_path_factory):
    """A labelled TINY store holding the entries of two layers (one per embed run)."""
    root = tmp_path_factory.mktemp("layers")
    for seed, name in enumerate(("ant", "bee")):
        write_good_images(root / "photos" / name, 10, seed=40 + seed)
    store = root / "photos.h5"
    for layer in LAYERS:
        _embed(root / "photos", store, layer)
    images = sorted(str(p) for p in (root / "photos").rglob("*.*"))
    return {"root": root, "store": store, "images": images}


def _blocks(store):
    fs = FeatureStore(store)
    keys, layers = find_layer_entries(fs, LAYERS)
    return load_layer_data(fs, keys, layers)


def test_layer_list_fit_equals_a_head_on_the_standardised_concatenation(two_layers):
    result = fit_store(two_layers["store"], "logreg", cv=2, test_size=0, layers="blocks.3,blocks.4")
    data = _blocks(two_layers["store"])
    assert result.layers == LAYERS and result.block_dims == data.block_dims
    assert [type(s).__name__ for _, s in result.head.steps] == ["BlockStandardScaler",
                                                               "LogisticProbeCV"]
    # By hand: standardise each layer, weight it by sqrt(total / (n_layers * width)), fit the
    # preset's classifier on that matrix.
    total = sum(data.block_dims)
    Z = np.hstack([(b - b.mean(0)) / np.where(b.std(0) > 0, b.std(0), 1)
                   * np.sqrt(total / (2 * b.shape[1]))
                   for b in (data.block(0), data.block(1))])
    manual = clone(make_head("logreg", cv=2)).set_params(standardscaler="passthrough")
    manual, _ = fit_head(manual, Z.astype(np.float32), data.labels)
    np.testing.assert_allclose(result.head[0].transform(data.features), Z, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(result.head.predict(data.features), manual.predict(Z))
    np.testing.assert_allclose(result.head[-1].coef_, manual[-1].coef_, rtol=1e-3, atol=1e-5)


def test_a_single_layer_is_a_plain_fit(two_layers):
    one = fit_store(two_layers["store"], "logreg", cv=2, test_size=0.3, layers="blocks.4")
    fs = FeatureStore(two_layers["store"])
    key = find_layer_entries(fs, ("blocks.4",))[0][0]
    plain = fit_store(two_layers["store"], "logreg", cv=2, test_size=0.3, key=key)
    assert one.store_key == plain.store_key and one.layers == ()
    assert one.metrics == plain.metrics and one.params == plain.params


def test_model_on_two_layers_predicts_from_image_files(two_layers, tmp_path, capsys):
    path = tmp_path / "two.joblib"
    argv = ["fit", two_layers["store"], "--layers", "blocks.3,blocks.4", "--head", "logreg",
            "--cv", "2", "--test-size", "0", "--out", path, "--json", "--quiet"]
    assert main([str(a) for a in argv]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layers"] == list(LAYERS) and sum(report["block_dims"]) > 0
    model = load_model(path, device="cpu", workers=0, precision="fp32")
    assert model.layer_names == list(LAYERS)
    assert model.block_dims == tuple(report["block_dims"])
    data = _blocks(two_layers["store"])
    by_id = {id_: row for id_, row in zip(data.ids, data.features, strict=True)}
    ids = [p.split("/photos/")[1] for p in two_layers["images"]]
    expected = model.predict_features(np.stack([by_id[i] for i in ids]),
                                      key_parts=data.key_parts)
    np.testing.assert_array_equal(model.predict(two_layers["images"]), expected)
    emb = model.embed(two_layers["images"])
    np.testing.assert_allclose(emb.features, np.stack([by_id[i] for i in ids]), atol=1e-3)
    with pytest.raises(ConfigError, match="one mapping per layer"):
        model.predict_features(emb.features, key_parts=data.key_parts[0])
    assert joblib.load(path)["format_version"] == 2


def test_missing_layer_is_one_line_naming_the_embed_command(two_layers, capsys):
    argv = ["fit", two_layers["store"], "--layers", "blocks.3,penultimate", "--out",
            two_layers["root"] / "never.joblib", "--quiet"]
    assert main([str(a) for a in argv]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "has no entry of layer penultimate (it holds blocks.3, blocks.4)" in err
    assert "`featurepipe embed " in err and "--layers blocks.3,penultimate --out" in err
    assert str(two_layers["root"] / "photos") in err


def test_rows_a_layer_lacks_are_dropped_with_a_note(two_layers, tmp_path, capsys):
    import shutil

    store = tmp_path / "partial.h5"
    _embed(two_layers["root"] / "photos", store, "blocks.3")
    fewer = tmp_path / "photos"
    shutil.copytree(two_layers["root"] / "photos", fewer)
    (fewer / "ant" / "img_000.jpg").unlink()
    _embed(fewer, store, "blocks.4")
    result = fit_store(store, "logreg", cv=2, test_size=0, layers=LAYERS)
    assert result.n_train == 19
    assert "dropped 1 row(s) that some layer lacks or skipped (e.g. ant/img_000.jpg)" in \
        result.warnings
    argv = ["fit", store, "--layers", "blocks.3,blocks.4", "--cv", "2", "--test-size", "0",
            "--out", tmp_path / "m.joblib", "--quiet"]
    assert main([str(a) for a in argv]) == 0
    assert capsys.readouterr().err.count("dropped 1 row(s)") == 1
    # A file edited between the two layers' runs: its rows would describe two images.
    edited = fewer / "bee" / "img_001.png"
    edited.write_bytes(edited.read_bytes() + b"\0")
    _embed(fewer, store, "blocks.4")
    again = fit_store(store, "logreg", cv=2, test_size=0, layers=LAYERS)
    assert again.n_train == 18
    assert any("changed between the layers' embeddings (e.g. bee/img_001.png)" in w
               for w in again.warnings)


def test_layer_choice_reads_training_rows_only(two_layers, tmp_path):
    store = tmp_path / "copy.h5"
    store.write_bytes(two_layers["store"].read_bytes())
    first = fit_store(store, "logreg", cv=2, test_size=0.3, seed=1, layers="auto",
                      choose_layers=True)
    assert [s["layers"] for s in first.layer_scores] == [["blocks.3"], ["blocks.4"],
                                                         ["blocks.3", "blocks.4"]]
    assert sum(s["chosen"] for s in first.layer_scores) == 1
    # Overwrite every test row of every layer with noise: the choice and its scores must not move.
    data = _blocks(store)
    _, test_rows = stratified_split(data.labels, 0.3, seed=1)
    test_ids = {data.ids[r] for r in test_rows}
    rng = np.random.default_rng(0)
    with h5py.File(store, "r+") as fh:
        for key in data.keys:
            group = fh["entries"][key]
            ids = [i.decode() if isinstance(i, bytes) else i for i in group["ids"][()]]
            rows = sorted(r for r, i in enumerate(ids) if i in test_ids)
            feats = group["features"][()]
            feats[rows] = rng.normal(0, 50, size=(len(rows), feats.shape[1]))
            group["features"][...] = feats
    altered = _blocks(store)
    assert not np.allclose(altered.features[test_rows], data.features[test_rows])
    np.testing.assert_array_equal(np.delete(altered.features, test_rows, axis=0),
                                  np.delete(data.features, test_rows, axis=0))
    again = fit_store(store, "logreg", cv=2, test_size=0.3, seed=1, layers="auto",
                      choose_layers=True)
    assert again.layer_scores == first.layer_scores
    assert again.layers == first.layers and again.n_test == first.n_test == len(test_ids)


def test_auto_needs_the_choice_and_choice_needs_layers(two_layers):
    with pytest.raises(ConfigError, match="choose_layers=True"):
        fit_store(two_layers["store"], layers="auto")
    with pytest.raises(ConfigError, match="needs a layer list"):
        fit_store(two_layers["store"], choose_layers=True)


def test_single_layer_model_file_of_format_1_still_loads(two_layers, tmp_path):
    """A file as featurepipe wrote it before layer lists (format 1, no ``layers``)."""
    fs = FeatureStore(two_layers["store"])
    key = find_layer_entries(fs, ("blocks.4",))[0][0]
    result = fit_store(two_layers["store"], "logreg", cv=2, test_size=0, key=key)
    new = save_model(tmp_path / "new.joblib", result.head, result.backbone_spec,
                     result.class_names, result.store_key, result.key_parts)
    payload = joblib.load(new)
    assert payload["format_version"] == 1 and "layers" not in payload
    old = tmp_path / "old.joblib"
    joblib.dump({k: v for k, v in payload.items()}, old)
    model = load_model(old, device="cpu", workers=0, precision="fp32")
    assert model.layers == [] and model.layer_names == ["blocks.4"]
    F = fs.load(key).features
    np.testing.assert_array_equal(
        model.predict_features(F, key_parts=key_parts_from_attrs(fs.attrs(key))),
        np.asarray(result.class_names, dtype=object)[result.head.predict(F)])
    assert isinstance(BlockStandardScaler(), BlockStandardScaler)


def test_model_on_two_layers_saved_as_skops_loads_with_the_trusted_list(two_layers, tmp_path):
    pytest.importorskip("skops")
    path = tmp_path / "two.skops"
    argv = ["fit", two_layers["store"], "--layers", "blocks.3,blocks.4", "--head", "logreg",
            "--cv", "2", "--test-size", "0", "--out", path, "--quiet"]
    assert main([str(a) for a in argv]) == 0
    model = load_model(path, device="cpu", workers=0, precision="fp32")  # no trusted=[...]
    assert model.layer_names == list(LAYERS)
    assert len(model.predict(two_layers["images"])) == len(two_layers["images"])


def test_model_on_two_layers_embeds_images_in_one_pass(two_layers, tmp_path, monkeypatch):
    import featurepipe.estimators as estimators

    path = tmp_path / "two.joblib"
    argv = ["fit", two_layers["store"], "--layers", "blocks.3,blocks.4", "--head", "logreg",
            "--cv", "2", "--test-size", "0", "--out", path, "--quiet"]
    assert main([str(a) for a in argv]) == 0
    estimators.clear_caches(backbones=False)
    passes = []
    real = estimators.embed_in_memory

    def counted(source, backbone, *args, **kwargs):
        passes.append((len(source), backbone.layer_dims))
        return real(source, backbone, *args, **kwargs)

    monkeypatch.setattr(estimators, "embed_in_memory", counted)
    model = load_model(path, device="cpu", workers=0, precision="fp32")
    model.predict(two_layers["images"])
    assert passes == [(len(two_layers["images"]), model.block_dims)]
    # With a cache store each layer reads and fills its own entry: one pass per layer, once.
    cached = load_model(path, device="cpu", workers=0, precision="fp32", cache=tmp_path / "c.h5")
    np.testing.assert_array_equal(cached.predict(two_layers["images"]),
                                  model.predict(two_layers["images"]))
    assert sorted(FeatureStore(tmp_path / "c.h5").keys()) == sorted(
        layer["key"] for layer in model.layers)
