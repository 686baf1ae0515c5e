"""Saved models: round trip in a fresh process, skops, spec-mismatch refusal, version warnings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from featurepipe.backbones import BackboneSpec, export_finetuned, load_backbone, reset_classifier
from featurepipe.cli_heads import fit_store
from featurepipe.embed import embed
from featurepipe.exceptions import (
    ConfigError,
    DecodeError,
    FeaturePipeWarning,
    SpecMismatchError,
)
from featurepipe.heads import HEAD_PRESETS, fit_head, make_head
from featurepipe.model import (
    ImageClassifier,
    key_parts_from_attrs,
    load_model,
    save_model,
)
from featurepipe.records import SkippedFile
from featurepipe.store import FeatureStore
from tests.helpers import TINY, write_good_images

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A labelled TINY store of two classes, a logreg head fitted on it, and its model file."""
    root = tmp_path_factory.mktemp("model")
    write_good_images(root / "photos" / "cat", 6, seed=3)
    write_good_images(root / "photos" / "dog", 6, seed=4)
    store = root / "photos.h5"
    embed(root / "photos", store, TINY["backbone"], weights=TINY["weights"],
          image_size=TINY["image_size"], precision="fp32", workers=0, progress=False)
    result = fit_store(store, "logreg", cv=2, test_size=0)
    path = save_model(root / "model.joblib", result.head, result.backbone_spec,
                      result.class_names, result.store_key, result.key_parts)
    images = sorted(str(p) for p in (root / "photos").rglob("*.*"))
    return {"root": root, "store": store, "result": result, "path": path, "images": images}


def _model(trained, **options):
    return load_model(trained["path"], device="cpu", workers=0, precision="fp32", **options)


def test_model_file_holds_spec_not_weights(trained):
    payload = joblib.load(trained["path"])
    assert payload["backbone_spec"] == BackboneSpec(TINY["backbone"], "random", None, 32).to_dict()
    assert payload["class_names"] == ["cat", "dog"]
    assert payload["store_key"] == trained["result"].store_key
    assert payload["key_parts"]["dtype"] == "float16"
    assert {"featurepipe", "scikit-learn", "torch"} <= set(payload["versions"])
    assert Path(trained["path"]).stat().st_size < 100_000


def test_predicts_from_images_like_the_store_features(trained):
    model = _model(trained)
    data = FeatureStore(trained["store"]).load()
    by_id = dict(zip(data.ids, data.features, strict=True))
    ordered = np.stack([by_id[Path(p).relative_to(trained["root"] / "photos").as_posix()]
                        for p in trained["images"]])
    np.testing.assert_allclose(model.predict_proba(trained["images"]),
                               model.scores_features(ordered), rtol=1e-5, atol=1e-6)
    labels = model.predict(trained["images"])
    assert set(labels) <= {"cat", "dog"} and list(model.classes_) == ["cat", "dog"]
    top = model.top_k(trained["images"][:2], k=5)
    assert [len(t) for t in top] == [2, 2] and top[0][0][0] == labels[0]


def test_fresh_process_predicts_exactly_like_memory(trained):
    model = _model(trained)
    expected = model.predict_proba(trained["images"]).tolist()
    code = (
        "import json, sys\n"
        "from featurepipe.model import load_model\n"
        "m = load_model(sys.argv[1], device='cpu', workers=0, precision='fp32')\n"
        "print(json.dumps({'proba': m.predict_proba(sys.argv[2:]).tolist(),\n"
        "                  'labels': m.predict(sys.argv[2:]).tolist()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, trained["path"], *trained["images"]],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["proba"] == expected
    assert got["labels"] == model.predict(trained["images"]).tolist()


def test_features_of_another_spec_are_refused(trained):
    model = _model(trained)
    parts = trained["result"].key_parts
    F = FeatureStore(trained["store"]).load().features
    model.predict_features(F, key_parts=parts)  # same spec: fine
    other = {**parts, "layer": "blocks.1", "preprocess": {**parts["preprocess"], "mean": [0.5]}}
    with pytest.raises(SpecMismatchError, match=r"layer: null vs \"blocks.1\".*preprocess"):
        model.predict_features(F, key_parts=other)
    with pytest.raises(SpecMismatchError, match=r"shape \(12, 7\).*expects \(n, 256\)"):
        model.predict_features(F[:, :7])
    # dtype and precision only round the same features differently: accepted
    model.predict_features(F, key_parts={**parts, "dtype": "float32", "precision": "bf16"})


def test_backbone_that_loads_differently_is_refused(trained, tmp_path):
    r = trained["result"]
    parts = {**r.key_parts, "weights_sha256": "0" * 64}
    path = save_model(tmp_path / "m.joblib", r.head, r.backbone_spec, r.class_names,
                      r.store_key, parts)
    with pytest.raises(SpecMismatchError, match="weights_sha256"):
        load_model(path, workers=0).predict(trained["images"][:1])


def test_version_mismatch_warns(trained, tmp_path):
    import joblib

    r = trained["result"]
    path = save_model(tmp_path / "old.joblib", r.head, r.backbone_spec, r.class_names,
                      r.store_key, r.key_parts)
    payload = joblib.load(path)  # a file written by an older featurepipe
    payload["versions"]["featurepipe"] = "0.0.1"
    joblib.dump(payload, path)
    with pytest.warns(FeaturePipeWarning, match=r"saved with featurepipe 0\.0\.1, but "
                                                r"featurepipe 0\.1\.0 is installed"):
        load_model(path)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(ConfigError, match="no model file at"):
        load_model(tmp_path / "nope.joblib")
    joblib.dump({"hello": 1}, tmp_path / "other.joblib")
    with pytest.raises(ConfigError, match="not a featurepipe model"):
        load_model(tmp_path / "other.joblib")
    (tmp_path / "junk.joblib").write_bytes(b"not a pickle")
    with pytest.raises(ConfigError, match="not a readable featurepipe model"):
        load_model(tmp_path / "junk.joblib")


def test_model_file_with_the_marker_but_missing_fields_is_one_line(trained, tmp_path, capsys):
    import joblib

    from featurepipe.cli import main

    r = trained["result"]
    path = save_model(tmp_path / "m.joblib", r.head, r.backbone_spec, r.class_names,
                      r.store_key, r.key_parts)
    payload = joblib.load(path)
    for damage in ("head", "backbone_spec"):
        broken = dict(payload)
        del broken[damage]
        joblib.dump(broken, tmp_path / "broken.joblib")
        with pytest.raises(ConfigError, match=f"damaged featurepipe model file: it lacks {damage}"):
            load_model(tmp_path / "broken.joblib")
    joblib.dump({**payload, "backbone_spec": 7}, tmp_path / "broken.joblib")
    with pytest.raises(ConfigError, match="its backbone_spec cannot be read"):
        load_model(tmp_path / "broken.joblib")
    assert main(["predict", str(tmp_path / "broken.joblib"), str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "broken.joblib" in err and "Traceback" not in err


def test_bad_images_raise_from_predict_but_are_listed_by_embed(trained, mixed_folder):
    root, expected = mixed_folder
    model = _model(trained)
    with pytest.raises(DecodeError, match="more bad images"):
        model.predict(root)
    emb = model.embed(root)
    assert (~emb.valid).sum() == sum(1 for why in expected.values() if why)
    assert all(isinstance(s, SkippedFile) and s.reason for s in emb.skipped)
    assert emb.skipped_positions == np.flatnonzero(~emb.valid).tolist()
    assert [s.id for s in emb.skipped] == [emb.ids[p] for p in emb.skipped_positions]


# --------------------------------------------------------------------------- skops


class ExtraHead(LogisticRegression):
    """A classifier type skops does not know: loading must name it."""


@pytest.mark.parametrize("preset", HEAD_PRESETS)
def test_skops_round_trip_of_every_preset(preset, trained, tmp_path):
    pytest.importorskip("skops")
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 256)).astype(np.float32)
    y = np.repeat([0, 1], 30)
    X[y == 1] += 0.5
    head, _ = fit_head(make_head(preset, cv=3), X, y)
    r = trained["result"]
    path = save_model(tmp_path / "m.skops", head, r.backbone_spec, r.class_names, r.store_key,
                      r.key_parts, metrics={"accuracy": np.float64(0.5)})
    model = load_model(path)
    np.testing.assert_array_equal(model.predict_features(X), ImageClassifier(
        head, r.backbone_spec, r.class_names, key_parts=r.key_parts).predict_features(X))
    assert model.metrics == {"accuracy": 0.5}
    assert model.score_kind == ("probability" if hasattr(head, "predict_proba") else "decision")


def test_skops_refuses_untrusted_types(trained, tmp_path):
    pytest.importorskip("skops")
    X = np.random.default_rng(0).normal(size=(20, 256))
    head = ExtraHead().fit(X, np.repeat([0, 1], 10))
    r = trained["result"]
    path = save_model(tmp_path / "m.skops", head, r.backbone_spec, r.class_names, r.store_key,
                      r.key_parts)
    with pytest.raises(ConfigError, match=r"not trusted: \['tests.test_model.ExtraHead'\]"):
        load_model(path)
    assert isinstance(load_model(path, trusted=["tests.test_model.ExtraHead"]).head, ExtraHead)


def test_decision_only_head(trained):
    X = FeatureStore(trained["store"]).load().features
    head, _ = fit_head(make_head("linear-svm", cv=2), X, np.repeat([0, 1], 6))
    r = trained["result"]
    model = ImageClassifier(head, r.backbone_spec, r.class_names, key_parts=r.key_parts,
                            workers=0, precision="fp32")
    assert model.score_kind == "decision"
    with pytest.raises(ConfigError, match="no predict_proba"):
        model.predict_proba(trained["images"][:1])
    scores = model.scores_features(X)  # binary: one score becomes two columns
    assert scores.shape == (12, 2)
    np.testing.assert_allclose(scores[:, 1], model.decision_function(trained["images"]),
                               rtol=1e-4, atol=1e-5)


def test_fine_tuned_export_works_as_backbone(tmp_path):
    spec = BackboneSpec(TINY["backbone"], "random", None, TINY["image_size"])
    bb = load_backbone(spec)
    model = reset_classifier(bb.model, 2, bb.family)
    out = export_finetuned(model, spec, ["a", "b"], bb.preprocess, tmp_path / "ft")
    write_good_images(tmp_path / "imgs" / "a", 3, seed=5)
    write_good_images(tmp_path / "imgs" / "b", 3, seed=6)
    embed(tmp_path / "imgs", tmp_path / "s.h5", str(out), precision="fp32", workers=0,
          progress=False)
    fs = FeatureStore(tmp_path / "s.h5")
    data = fs.load()
    head = LogisticRegression().fit(data.features, data.labels)
    path = save_model(tmp_path / "m.joblib", head, BackboneSpec.from_dict(data.attrs["spec"]),
                      data.class_names, data.key, key_parts_from_attrs(data.attrs))
    loaded = load_model(path, workers=0, precision="fp32")
    assert loaded.backbone_spec.name == str(out)
    paths = sorted(str(p) for p in (tmp_path / "imgs").rglob("*.*"))
    np.testing.assert_array_equal(loaded.predict(paths),
                                  np.array(data.class_names)[head.predict(data.features)])
