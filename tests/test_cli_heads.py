"""``featurepipe fit / predict / evaluate`` end to end on a tiny folder, errors, out-of-core sgd."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest

from featurepipe.cli import main
from featurepipe.store import FeatureStore
from tests.helpers import TINY, write_good_images

ENGINE = ["--backbone", TINY["backbone"], "--weights", TINY["weights"], "--image-size",
          str(TINY["image_size"]), "--precision", "fp32", "--workers", "0", "--quiet"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three classes of tiny images, embedded with the TINY backbone."""
    root = tmp_path_factory.mktemp("cli")
    for seed, name in enumerate(("ant", "bee", "cow")):
        write_good_images(root / "photos" / name, 6, seed=20 + seed)
    assert main(["embed", str(root / "photos"), "--out", str(root / "photos.h5"), *ENGINE]) == 0
    return root


def test_fit_predict_evaluate(photos, tmp_path, capsys):
    model = tmp_path / "model.joblib"
    code, out, _ = run(capsys, "fit", photos / "photos.h5", "--head", "logreg", "--cv", "2",
                       "--test-size", "0.5", "--out", model, "--plots", tmp_path / "plots",
                       "--json")
    assert code == 0
    report = json.loads(out)
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "head", "params", "fit_seconds",
                "per_class", "n_train", "n_test"):
        assert key in report
    assert report["n_train"] == 9 and report["n_test"] == 9 and "C" in report["params"]
    assert set(report["per_class"]) == {"ant", "bee", "cow"}
    assert (tmp_path / "plots" / "confusion_matrix.png").stat().st_size > 1000

    code, out, _ = run(capsys, "fit", photos / "photos.h5", "--head", "knn", "--cv", "2",
                       "--out", tmp_path / "knn.joblib")
    assert code == 0 and "chosen: n_neighbors=" in out and "macro-F1" in out

    images = sorted((photos / "photos" / "ant").iterdir())[:2]
    (tmp_path / "broken.jpg").write_bytes(b"")
    code, out, _ = run(capsys, "predict", model, *images, tmp_path / "broken.jpg",
                       "--top-k", "2", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["score_kind"] == "probability" and len(result["predictions"]) == 2
    assert [len(p["top_k"]) for p in result["predictions"]] == [2, 2]
    assert result["skipped"] == [{"file": str(tmp_path / "broken.jpg"), "reason": "empty file"}]

    code, out, _ = run(capsys, "predict", model, photos / "photos" / "bee")
    assert code == 0 and "| file | label | probability | top-3 |" in out
    assert out.count("bee/img_") == 6

    code, out, _ = run(capsys, "evaluate", model, photos / "photos", "--json")
    assert code == 0
    scores = json.loads(out)
    assert scores["n_test"] == 18 and 0 <= scores["accuracy"] <= 1


def test_decision_scores_and_module_class_head(photos, tmp_path, capsys):
    model = tmp_path / "svm.joblib"
    code, out, _ = run(capsys, "fit", photos / "photos.h5", "--head", "linear-svm", "--cv", "2",
                       "--test-size", "0", "--out", model)
    assert code == 0 and "0 test rows" in out
    code, out, _ = run(capsys, "predict", model, photos / "photos" / "ant")
    assert code == 0 and "| decision |" in out and "decision-function values" in out
    code, out, _ = run(capsys, "fit", photos / "photos.h5", "--head",
                       "sklearn.linear_model:RidgeClassifier", "--out", tmp_path / "r.joblib",
                       "--test-size", "0.5", "--json")
    assert code == 0 and json.loads(out)["head"] == "sklearn.linear_model:RidgeClassifier"


def test_fit_on_a_separate_test_store(photos, tmp_path, capsys):
    test_dir = tmp_path / "test"
    write_good_images(test_dir / "bee", 2, seed=40)
    write_good_images(test_dir / "cow", 2, seed=41)
    assert main(["embed", str(test_dir), "--out", str(tmp_path / "test.h5"), *ENGINE]) == 0
    code, out, _ = run(capsys, "fit", photos / "photos.h5", "--cv", "2", "--test",
                       tmp_path / "test.h5", "--out", tmp_path / "m.joblib", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["n_train"] == 18 and report["n_test"] == 4
    assert report["per_class"]["ant"]["support"] == 0  # classes matched by name
    # two entries, neither with the training key: the one of the same spec (float32) is used
    bigger = [a if a != "32" else "48" for a in ENGINE]
    assert main(["embed", str(test_dir), "--out", str(tmp_path / "two.h5"), *bigger]) == 0
    assert main(["embed", str(test_dir), "--out", str(tmp_path / "two.h5"), "--add-entry",
                 "--dtype", "float32", *ENGINE]) == 0
    code, out, _ = run(capsys, "fit", photos / "photos.h5", "--cv", "2", "--test",
                       tmp_path / "two.h5", "--out", tmp_path / "m.joblib", "--json")
    assert code == 0 and json.loads(out)["n_test"] == 4


def test_errors_are_one_line(photos, tmp_path, capsys):
    store = photos / "photos.h5"
    code, _, err = run(capsys, "fit", store, "--head", "nope", "--out", tmp_path / "m.joblib")
    assert code == 1 and err.count("\n") == 1 and "unknown head 'nope'" in err

    flat = tmp_path / "flat"
    write_good_images(flat, 4, seed=50)
    assert main(["embed", str(flat), "--out", str(tmp_path / "flat.h5"), *ENGINE]) == 0
    code, _, err = run(capsys, "fit", tmp_path / "flat.h5", "--out", tmp_path / "m.joblib")
    assert code == 1 and "4 of 4 rows are unlabelled (label -1)" in err

    other = [a if a != "32" else "48" for a in ENGINE]
    assert main(["embed", str(photos / "photos"), "--out", str(tmp_path / "big.h5"), *other]) == 0
    code, _, err = run(capsys, "fit", store, "--cv", "2", "--test", tmp_path / "big.h5",
                       "--out", tmp_path / "m.joblib")
    assert code == 1 and err.count("\n") == 1
    assert "another spec" in err and "preprocess" in err and "spec:" in err

    code, _, err = run(capsys, "predict", tmp_path / "missing.joblib", photos / "photos")
    assert code == 1 and "no model file at" in err

    code, _, err = run(capsys, "fit", store, "--cv", "2", "--out", tmp_path / "m.joblib")
    assert code == 0
    odd = tmp_path / "odd"
    write_good_images(odd / "ant", 1, seed=60)
    write_good_images(odd / "zebra", 1, seed=61)
    code, _, err = run(capsys, "evaluate", tmp_path / "m.joblib", odd)
    assert code == 1 and "classes ['zebra'] are not among the model's classes" in err
    (tmp_path / "zero.jpg").write_bytes(b"")
    code, out, err = run(capsys, "predict", tmp_path / "m.joblib", tmp_path / "zero.jpg")
    assert code == 1 and "skipped" in out and "none of the 1 images" in err


def _big_store(tmp_path, source, n=4_000, dim=32, classes=4):
    """A store 16x larger than the test's cap of 250 rows, with the TINY entry's attributes."""
    fs = FeatureStore(source)
    key = fs.resolve_key()
    attrs = {**fs.attrs(key), "dim": dim, "dtype": "float32"}
    rng = np.random.default_rng(0)
    labels = np.arange(n) % classes
    centres = rng.normal(size=(classes, dim)).astype(np.float32)
    path = tmp_path / "big.h5"
    with FeatureStore(path).writer(key, attrs) as writer:
        ids = [f"row{i:06d}" for i in range(n)]
        for start in range(0, n, 5000):
            stop = min(n, start + 5000)
            X = centres[labels[start:stop]] + rng.normal(size=(stop - start, dim)) * 2
            writer.write_shard(f"s{start:06d}", ids[start:stop], ["fp"] * (stop - start),
                               X.astype(np.float32))
        writer.commit([(i, "fp", int(lab)) for i, lab in zip(ids, labels, strict=True)],
                      ["w", "x", "y", "z"])
    return path


def test_sgd_streams_a_store_in_bounded_chunks(photos, tmp_path, capsys, monkeypatch):
    path = _big_store(tmp_path, photos / "photos.h5")
    largest = {"rows": 0}
    real_iter = FeatureStore.iter_chunks

    def watched(self, *args, **kwargs):
        for chunk in real_iter(self, *args, **kwargs):
            largest["rows"] = max(largest["rows"], len(chunk.ids))
            yield chunk

    def refuse(*args, **kwargs):
        raise AssertionError("the sgd head must not load the whole entry")

    monkeypatch.setattr(FeatureStore, "iter_chunks", watched)
    monkeypatch.setattr(FeatureStore, "load", refuse)
    monkeypatch.setattr(FeatureStore, "read_rows", refuse)
    code, out, err = run(capsys, "fit", path, "--head", "sgd", "--chunk-rows", "250",
                         "--out", tmp_path / "sgd.joblib", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert largest["rows"] == 250  # never more rows in memory than the cap
    assert report["n_train"] == 3_200 and report["n_test"] == 800
    assert report["accuracy"] > 0.9


def test_fit_refuses_store_without_rows_left_after_split(photos, tmp_path, capsys):
    one = tmp_path / "one"
    shutil.copytree(photos / "photos" / "ant", one / "ant")
    write_good_images(one / "bee", 1, seed=70)
    assert main(["embed", str(one), "--out", str(tmp_path / "one.h5"), *ENGINE]) == 0
    code, _, err = run(capsys, "fit", tmp_path / "one.h5", "--out", tmp_path / "m.joblib")
    assert code == 1 and "cannot hold out a stratified 0.2 test split" in err


def test_help_lists_every_preset():
    from featurepipe.cli_heads import PRESET_NAMES
    from featurepipe.heads import HEAD_PRESETS

    assert PRESET_NAMES == HEAD_PRESETS


def test_fit_refits_on_every_row_after_scoring_and_says_so(photos, tmp_path, capsys):
    store = photos / "photos.h5"
    code, out, _ = run(capsys, "fit", store, "--cv", "2", "--test-size", "0.5",
                       "--out", tmp_path / "m.joblib", "--json", "--quiet")
    report = json.loads(out)
    assert code == 0 and report["n_train"] == 9 and report["n_test"] == 9
    assert report["refit_on_all_rows"] is True and report["model_rows"] == 18
    code, out, _ = run(capsys, "fit", store, "--cv", "2", "--test-size", "0.5",
                       "--out", tmp_path / "m.joblib", "--no-refit", "--quiet")
    assert code == 0 and "trained on the 9 training rows only (--no-refit)" in out
    code, out, _ = run(capsys, "fit", store, "--cv", "2", "--out", tmp_path / "m.joblib",
                       "--quiet")
    assert code == 0 and "refit on all 18 labelled rows" in out


def test_fit_shows_search_progress_unless_quiet(photos, tmp_path, capsys):
    store = photos / "photos.h5"
    code, _, err = run(capsys, "fit", store, "--cv", "2", "--out", tmp_path / "m.joblib")
    assert code == 0 and "C search" in err
    code, _, err = run(capsys, "fit", store, "--cv", "2", "--out", tmp_path / "m.joblib",
                       "--quiet")
    assert code == 0 and err == ""


def test_fit_refuses_unwritable_out_before_any_work(photos, tmp_path, capsys, monkeypatch):
    import featurepipe.cli_heads as cli_heads

    def no_work(*args, **kwargs):
        raise AssertionError("fit must check --out before loading or fitting anything")

    monkeypatch.setattr(cli_heads, "fit_store", no_work)
    target = tmp_path / "nonexistent" / "dir" / "m.skops"
    code, _, err = run(capsys, "fit", photos / "photos.h5", "--out", target)
    assert code == 1 and err.count("\n") == 1
    assert str(target) in err and "does not exist" in err


def test_fit_names_rows_with_non_finite_features(photos, tmp_path, capsys):
    # The writer now skips non-finite rows, so a bad store is one damaged after its commit
    # (or written before that rule): corrupt two rows of a committed entry in place.
    bad = tmp_path / "bad.h5"
    shutil.copy(_big_store(tmp_path, photos / "photos.h5", n=40), bad)
    key = FeatureStore(bad).resolve_key()
    with h5py.File(bad, "r+") as fh:
        fh[f"entries/{key}/features"][3, 0] = np.nan
        fh[f"entries/{key}/features"][17, 5] = np.inf
    ids = FeatureStore(bad).lookup(key)
    names = sorted(ids, key=lambda i: ids[i][0])
    for head in ("logreg", "sgd"):
        code, _, err = run(capsys, "fit", bad, "--head", head, "--out", tmp_path / "m.joblib")
        assert code == 1 and err.count("\n") == 1, err
        assert str(bad) in err and "non-finite features (NaN or inf) in 2 row(s)" in err
        assert repr(names[3]) in err and repr(names[17]) in err


def test_predict_and_evaluate_take_quiet(photos, tmp_path, capsys):
    model = tmp_path / "m.joblib"
    assert run(capsys, "fit", photos / "photos.h5", "--cv", "2", "--out", model, "--quiet")[0] == 0
    code, out, err = run(capsys, "predict", model, photos / "photos" / "ant", "--quiet", "--json")
    assert code == 0 and len(json.loads(out)["predictions"]) == 6 and err == ""
    code, out, err = run(capsys, "evaluate", model, photos / "photos", "--quiet", "--json")
    assert code == 0 and json.loads(out)["n_test"] == 18 and err == ""


def test_evaluate_lists_skipped_images_as_id_and_reason(photos, tmp_path, capsys):
    folder = tmp_path / "photos"
    shutil.copytree(photos / "photos", folder)
    (folder / "ant" / "broken.jpg").write_bytes(b"")
    model = tmp_path / "knn.joblib"
    assert run(capsys, "fit", photos / "photos.h5", "--head", "knn", "--cv", "2",
               "--test-size", "0", "--out", model)[0] == 0
    code, out, _ = run(capsys, "evaluate", model, folder, "--json")
    assert code == 0
    result = json.loads(out)
    assert result["n_test"] == 18
    broken = str(folder / "ant" / "broken.jpg")
    assert result["skipped"] == [{"id": broken, "reason": "empty file"}]
    code, out, _ = run(capsys, "evaluate", model, folder)
    assert code == 0 and f"skipped {broken}: empty file" in out.splitlines()
