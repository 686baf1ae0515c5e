"""compare / learning_curve / CLI: every arm measured under one protocol, on a tiny image folder.

One comparison run (module fixture) with spies on the two places models are fitted
(``heads.fit_head`` and ``FineTuneClassifier.fit``) backs most checks, so the file stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featurepipe.cli import main
from featurepipe.compare import compare, ids_digest, learning_curve
from featurepipe.compare._arms import max_train_for
from featurepipe.compare._data import per_class_subsample
from featurepipe.exceptions import ConfigError, FeaturePipeWarning
from featurepipe.store import FeatureStore
from tests.helpers import TINY

CLASSES = ("a", "b", "c")
PER_CLASS = 10
FAST = {"backbones": TINY["backbone"], "weights": TINY["weights"],
        "image_size": TINY["image_size"], "precision": "fp32", "workers": 0, "progress": False,
        "cv": 2, "pixel_size": 8, "hog_size": 16, "hog_cell": 4}
TINY_CLI = ["--backbones", TINY["backbone"], "--weights", "random", "--image-size", "32",
            "--precision", "fp32", "--workers", "0", "--quiet"]


def _write_folder(root: Path) -> Path:
    """Three classes of tinted noise (learnable even by a random backbone) plus one broken file."""
    rng = np.random.default_rng(0)
    for k, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            arr = rng.integers(0, 120, size=(20, 20, 3), dtype=np.uint8)
            arr[..., k] += 120
            Image.fromarray(arr).save(root / name / f"{i:02d}.png")
    (root / "a" / "broken.jpg").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One comparison with every arm family; records what each fit was given."""
    import featurepipe.heads as heads
    from featurepipe.finetune import FineTuneClassifier

    tmp = tmp_path_factory.mktemp("compare")
    root = _write_folder(tmp / "photos")
    seen: dict[str, list] = {"head_X": [], "finetune_ids": [], "on_fit": []}
    real_fit_head, real_ft_fit = heads.fit_head, FineTuneClassifier.fit

    def spy_fit_head(estimator, X, y):
        seen["head_X"].append(np.asarray(X, dtype=np.float32).copy())
        return real_fit_head(estimator, X, y)

    def spy_ft_fit(self, X, y=None):
        seen["finetune_ids"].append(list(X.ids))
        return real_ft_fit(self, X, y)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(heads, "fit_head", spy_fit_head)
        mp.setattr(FineTuneClassifier, "fit", spy_ft_fit)
        res = compare(root, tmp / "report", heads="logreg", finetune=("head", "full"),
                      finetune_epochs=1, test_size=0.3,
                      on_fit=lambda arm, part: seen["on_fit"].append((arm, list(part.ids))),
                      **FAST)
    return {"res": res, "seen": seen, "root": root, "out": tmp / "report"}


def test_every_arm_reports_every_metric(run):
    res = run["res"]
    arms = [r["arm"] for r in res.rows]
    assert arms == ["pixels+logreg", "pixels+svm-rbf", "hog+logreg", "hog+svm-rbf",
                    f"{TINY['backbone']}+logreg", "finetune-head", "finetune-full"]
    for r in res.rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["macro_f1"] <= 1.0
        low, high = r["accuracy_ci95"]
        assert 0.0 <= low <= r["accuracy"] <= high <= 1.0
        assert 0.0 <= r["val_accuracy"] <= 1.0 and r["n_val"] == res.split["n_val"] > 0
        assert isinstance(r["converged"], bool)
        # durations: >= 0, as a coarse clock can read 0.0 for a fast step
        assert r["fit_seconds"] >= 0 and r["train_seconds"] >= r["fit_seconds"]
        assert r["predict_ms_per_image"] >= 0
        assert r["peak_mib"] >= 0 and r["memory_method"] in ("rss_hwm_delta", "tracemalloc_peak")
        assert r["n_test"] == res.split["n_test"]
    assert [e["backbone"] for e in res.embedding] == [TINY["backbone"]]  # reported once
    assert res.row("finetune-full")["epochs_run"] == 1
    assert [(c["family_a"], c["family_b"]) for c in res.comparisons] == [
        ("frozen", "classical"), ("finetune", "classical"), ("finetune", "frozen")]
    for c in res.comparisons:
        assert 0.0 < c["pvalue"] <= 1.0
        assert c["a"] == res.best(c["family_a"])["arm"] and c["b"] == res.best(c["family_b"])["arm"]
    assert not (run["out"] / "compare.partial.json").exists()
    saved = json.loads(Path(res.paths["json"]).read_text())
    assert [r["arm"] for r in saved["rows"]] == arms
    with np.load(res.paths["predictions"]) as z:  # kept for McNemar against later runs
        assert set(z.files) == {"y_test", *arms} and len(z["y_test"]) == res.split["n_test"]
    md = Path(res.paths["markdown"]).read_text()
    assert "| arm | accuracy | macro_f1 | accuracy_95ci | val_accuracy | n_train | n_val |" in md
    assert "exact McNemar" in md
    assert Path(res.paths["png"]).read_bytes()[:4] == b"\x89PNG"


def test_same_images_and_split_for_every_arm(run):
    res, out = run["res"], run["out"]
    split = json.loads((out / "split.json").read_text())
    assert not set(split["train_ids"]) & set(split["test_ids"])
    assert len(split["train_ids"]) + len(split["test_ids"]) == len(CLASSES) * PER_CLASS
    assert "a/broken.jpg" not in split["train_ids"] + split["test_ids"]
    assert [s["id"] for s in res.skipped] == ["a/broken.jpg"]
    assert {r["test_ids_sha256"] for r in res.rows} == {ids_digest(split["test_ids"])}
    # every arm is fitted on the same rows: the training split minus the shared validation rows
    assert sorted(split["fit_ids"] + split["val_ids"]) == sorted(split["train_ids"])
    assert {r["train_ids_sha256"] for r in res.rows} == {ids_digest(split["fit_ids"])}
    assert {r["n_train"] for r in res.rows} == {len(split["fit_ids"])}


def test_hyperparameter_search_only_sees_training_rows(run):
    out, seen = run["out"], run["seen"]
    split = json.loads((out / "split.json").read_text())
    test_ids = set(split["test_ids"])
    val_ids = set(split["val_ids"])
    for _arm, ids in seen["on_fit"]:
        assert not set(ids) & test_ids and not set(ids) & val_ids
    fs = FeatureStore(out / "features.h5").load()
    row = {id_: k for k, id_ in enumerate(fs.ids)}
    train_feats = fs.features[[row[i] for i in split["fit_ids"]]]
    test_feats = fs.features[[row[i] for i in split["test_ids"]]]
    frozen = [X for X in seen["head_X"] if X.shape[1] == fs.features.shape[1]]
    assert len(frozen) == 1  # the frozen logreg head: fitted (and CV-searched) once, on ...
    np.testing.assert_array_equal(frozen[0], train_feats)  # ... exactly the training rows
    assert not any((np.abs(frozen[0] - t).sum(axis=1) == 0).any() for t in test_feats)
    assert len(seen["head_X"]) == 5  # four classical arms + one frozen head
    assert all(len(X) == len(split["fit_ids"]) for X in seen["head_X"])
    assert len(seen["finetune_ids"]) == 2
    assert all(ids == split["fit_ids"] for ids in seen["finetune_ids"])


def test_learning_curve_shape_and_plot(run):
    curve = learning_curve(run["root"], run["out"], [2, 4], seeds=2, classical="pixels+logreg",
                           heads="logreg", test_size=0.3, **FAST)
    assert curve.arms == ["pixels+logreg", f"{TINY['backbone']}+logreg"]
    assert curve.accuracy.shape == (2, 2, 2) and not np.isnan(curve.accuracy).any()
    assert curve.embedding[0]["n_computed"] == 0
    assert {r["test_ids_sha256"] for r in curve.rows} == {run["res"].split["test_ids_sha256"]}
    assert {(r["samples_per_class"], r["n_train"]) for r in curve.rows} == {(2, 6), (4, 12)}
    saved = json.loads(Path(curve.paths["json"]).read_text())
    assert np.asarray(saved["accuracy"]).shape == (2, 2, 2)
    assert Path(curve.paths["png"]).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ConfigError, match="largest size possible"):
        learning_curve(run["root"], run["out"], [50], heads="logreg", classical=(),
                       test_size=0.3, **FAST)


def test_subsampling_helpers():
    labels = np.repeat([0, 1, 2], 5)
    rows = per_class_subsample(labels, 3, seed=1)
    assert np.bincount(labels[rows]).tolist() == [3, 3, 3]
    assert not np.array_equal(rows, per_class_subsample(labels, 3, seed=2))
    with pytest.raises(ConfigError):
        per_class_subsample(labels, 6, seed=0)
    caps = {"*svm-rbf": 100, "finetune-*": 50}
    assert max_train_for("pixels+svm-rbf", caps) == 100
    assert max_train_for("finetune-full", caps) == 50
    assert max_train_for("pixels+logreg", caps) is None


def test_cli_compare_rerun_reuses_cached_features(run, capsys):
    code = main(["compare", str(run["root"]), "--out", str(run["out"]), "--heads", "logreg",
                 "--classical", "pixels+logreg", "--no-finetune", "--test-size", "0.3",
                 "--cv", "2", "--pixel-size", "8", "--json", *TINY_CLI])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert [r["arm"] for r in out["rows"]] == ["pixels+logreg", f"{TINY['backbone']}+logreg"]
    (emb,) = out["embedding"]
    assert emb["n_computed"] == 0 and emb["cached"]  # a rerun embeds nothing ...
    first = run["res"].embedding[0]
    assert emb["computed_images_per_second"] == first["computed_images_per_second"]  # ... but
    assert out["split"]["test_ids_sha256"] == run["res"].split["test_ids_sha256"]  # remembers


def test_cli_finetune(run, tmp_path, capsys):
    with pytest.warns(FeaturePipeWarning, match="broken.jpg"):
        code = main(["finetune", str(run["root"]), "--out", str(tmp_path / "ft"),
                     "--backbone", TINY["backbone"], "--weights", "random", "--image-size", "32",
                     "--epochs", "1", "--precision", "fp32", "--val-size", "0.3", "--json",
                     "--quiet"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0
    assert summary["epochs_run"] == 1 and summary["n_skipped"] == 1
    assert Path(summary["paths"]["checkpoint"]).exists()


@pytest.mark.parametrize(("flag", "expected"), [([], "basic"),
                                               (["--augment", "erasing"], "erasing"),
                                               (["--augment", "none"], None)])
def test_cli_finetune_passes_the_augmentation(monkeypatch, tmp_path, capsys, flag, expected):
    import featurepipe.finetune

    seen = {}

    def spy(source, out_dir, **params):
        seen.update(params)
        raise ConfigError("stopped by the test")

    monkeypatch.setattr(featurepipe.finetune, "finetune", spy)
    assert main(["finetune", str(tmp_path), "--out", str(tmp_path / "ft"), *flag]) == 1
    assert seen["augment"] == expected
    assert "stopped by the test" in capsys.readouterr().err


def test_cli_errors_are_one_line(tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "x.png")
    code = main(["compare", str(flat), "--out", str(tmp_path / "r"), *TINY_CLI])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("featurepipe: error:") and "unlabelled" in err
    assert err.count("\n") == 1

    code = main(["finetune", str(flat), "--out", str(tmp_path / "ft"), "--epochs", "0"])
    err = capsys.readouterr().err
    assert code == 1 and "epochs" in err


def test_cli_defaults_mirror_the_library():
    """The CLI copies these so that ``featurepipe --help`` does not import torch."""
    from featurepipe import cli_compare
    from featurepipe.compare import DEFAULT_CLASSICAL, DEFAULT_HEADS, FINETUNE_STRATEGIES
    from featurepipe.finetune import STRATEGIES
    from featurepipe.finetune.augment import AUGMENTS

    assert cli_compare.AUGMENTS == tuple(a for a in AUGMENTS if a is not None)
    assert cli_compare.DEFAULT_HEADS == DEFAULT_HEADS
    assert cli_compare.DEFAULT_CLASSICAL == DEFAULT_CLASSICAL
    assert cli_compare.FINETUNE_STRATEGIES == FINETUNE_STRATEGIES
    assert cli_compare.STRATEGIES == tuple(STRATEGIES)


def test_cli_compare_layer_feeds_frozen_arms(run, tmp_path, capsys):
    """``--layer`` swaps the frozen arms' features for that layer's pooled output."""
    from featurepipe.backbones import load_backbone, resolve_spec

    layer = "blocks.1"
    bb = load_backbone(resolve_spec(TINY["backbone"], weights="random", layer=layer,
                                    image_size=TINY["image_size"]))
    code = main(["compare", str(run["root"]), "--out", str(tmp_path / "r"), "--heads", "logreg",
                 "--classical", "none", "--no-finetune", "--test-size", "0.3", "--cv", "2",
                 "--layer", layer, "--json", *TINY_CLI])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    (emb,) = out["embedding"]
    assert emb["dim"] == bb.feature_dim != run["res"].embedding[0]["dim"]
    assert out["settings"]["layer"] == layer
    assert emb["key"] != run["res"].embedding[0]["key"]  # another layer is another entry
    assert FeatureStore(tmp_path / "r" / "features.h5").load(emb["key"]).features.shape[1] == \
        bb.feature_dim


def test_each_arm_shows_progress(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A search or a fine-tune can take minutes: a bar on stderr names the arm being trained."""
    root = _write_folder(tmp_path / "photos")
    compare(root, tmp_path / "report", heads="logreg", classical="pixels+logreg",
            finetune=("head",), finetune_epochs=1, test_size=0.3,
            **{**FAST, "progress": True})
    err = capsys.readouterr().err
    assert "compare arms" in err and "3/3" in err
    assert "epoch" in err.lower()  # the fine-tune arm's own bar


# ------------------------------------------------------------------ the test set selects nothing


def _write_split(root: Path, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for k, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 120, size=(20, 20, 3), dtype=np.uint8)
            arr[..., k] += 120
            Image.fromarray(arr).save(root / name / f"{i:02d}.png")
    return root


def test_corrupted_test_labels_change_no_choice_only_the_test_score(tmp_path):
    """Permute the test labels: every selection (headline arms, hyperparameters, validation
    scores) must stay the same, while the reported test accuracies move."""
    from featurepipe.sources import open_source

    train = _write_split(tmp_path / "train", 12, seed=1)
    test_root = _write_split(tmp_path / "test", 8, seed=2)
    honest = open_source(test_root)
    names = [honest.class_names[c] for c in honest.labels]
    # a derangement of the labels: every test image now carries a wrong class
    wrong = [CLASSES[(CLASSES.index(n) + 1) % len(CLASSES)] for n in names]
    corrupted = open_source(test_root, labels=wrong)
    kwargs = {**FAST, "heads": ("logreg", "knn"), "classical": ("pixels+logreg", "hog+logreg"),
              "finetune": None, "val_size": 6}
    a = compare(train, tmp_path / "a", test_source=honest, **kwargs)
    b = compare(train, tmp_path / "b", test_source=corrupted, **kwargs)

    def choices(res):
        return ([(r["arm"], r["params"], r["val_accuracy"], r["train_ids_sha256"])
                 for r in res.rows],
                {fam: res.best(fam)["arm"] for fam in ("classical", "frozen")},
                [(c["a"], c["b"]) for c in res.comparisons])

    assert choices(a) == choices(b)
    assert [r["accuracy"] for r in a.rows] != [r["accuracy"] for r in b.rows]
    assert max(r["accuracy"] for r in a.rows) > max(r["accuracy"] for r in b.rows)


def test_best_is_chosen_by_validation_never_by_test_accuracy():
    from featurepipe.compare import CompareResult

    rows = [
        {"arm": "x+logreg", "family": "frozen", "accuracy": 0.95, "val_accuracy": 0.80},
        {"arm": "x+knn", "family": "frozen", "accuracy": 0.85, "val_accuracy": 0.90},
        {"arm": "pixels+logreg", "family": "classical", "accuracy": 0.99, "val_accuracy": 0.70},
        {"arm": "hog+logreg", "family": "classical", "accuracy": 0.60, "val_accuracy": 0.75},
    ]
    res = CompareResult(rows, [], {}, {}, Path("."))
    assert res.best("frozen")["arm"] == "x+knn"
    assert res.best("classical")["arm"] == "hog+logreg"
    assert res.best()["arm"] == "x+knn"
    with pytest.raises(KeyError, match="finetune"):
        res.best("finetune")


def test_every_arm_gets_the_same_training_cap(run, tmp_path):
    with pytest.raises(ConfigError, match="same rows"):
        compare(run["root"], tmp_path / "r", heads="logreg", classical="pixels+logreg",
                finetune=None, test_size=0.3, max_train={"pixels*": 6}, **FAST)
    res = compare(run["root"], tmp_path / "r", heads="logreg", classical="pixels+logreg",
                  finetune=None, test_size=0.3, max_train=9, **FAST)
    assert {r["n_train"] for r in res.rows} == {9}
    assert len({r["train_ids_sha256"] for r in res.rows}) == 1


def test_no_holdout_names_no_headline(run, tmp_path):
    res = compare(run["root"], tmp_path / "r", heads="logreg", classical="pixels+logreg",
                  finetune=None, test_size=0.3, val_size=0, **FAST)
    assert {r["n_val"] for r in res.rows} == {0} and res.split["n_val"] == 0
    assert all(r["val_accuracy"] is None for r in res.rows) and res.comparisons == []
    assert {r["n_train"] for r in res.rows} == {res.split["n_train"]}
    with pytest.raises(KeyError, match="validation accuracy"):
        res.best("frozen")


def _long_arm_rows(n: int) -> list[dict]:
    """Rows as compare() writes them, with the long arm names real backbones and strategies get;
    two outliers set the axes' scales and the other arms crowd together, where names written
    beside the points would pile up."""
    names = ["pixels+logreg", "hog+svm-rbf", "timm:convnext_tiny.fb_in22k_ft_in1k+logreg",
             "timm:convnext_tiny.fb_in22k_ft_in1k+svm-rbf", "finetune:efficientnet_lite0:gradual",
             "efficientnet_lite0@blocks.5+knn", "a_long_backbone_name_" * 4, "x" * 80]
    families = ["classical", "classical", "frozen", "frozen", "finetune", "frozen", "other"]
    rows = []
    for i in range(n):
        acc, seconds = {0: (0.80, 2.0), 1: (0.95, 600.0)}.get(i, (0.90 + 0.0005 * i, 40 + i / 2))
        rows.append({"arm": f"{names[i % len(names)]}{'' if i < len(names) else f'-{i}'}",
                     "family": families[i % len(families)], "n_train": 4000,
                     "accuracy": acc, "accuracy_ci95": [acc - 0.02, min(acc + 0.02, 1.0)],
                     "train_seconds": seconds})
    return rows


def _tick_labels(axis) -> list:
    """The labels an axis draws: visible, non-empty, at a tick inside the view."""
    lo, hi = sorted(axis.get_view_interval())
    ticks = [*axis.get_major_ticks(), *axis.get_minor_ticks()]
    return [t.label1 for t in ticks
            if t.label1.get_visible() and t.label1.get_text() and lo <= t.get_loc() <= hi]


@pytest.mark.parametrize(("n_arms", "seconds"), [(1, None), (7, None), (24, None), (7, 40.0),
                                                 (7, 1e5)])
def test_compare_plot_arm_names_are_readable_and_no_labels_overlap(n_arms: int,
                                                                   seconds: float | None) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from featurepipe.compare import compare_figure

    rows = _long_arm_rows(n_arms)
    for i, r in enumerate(rows if seconds else []):  # all close (40 s) or many decades (1e5)
        r["train_seconds"] = seconds * (1.0 + 0.02 * i) if seconds < 1e5 else 10.0 ** (i - 2)
    fig = compare_figure(rows)
    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    names = _tick_labels(fig.axes[0].yaxis)
    shown = sorted(t.get_text().replace("\n", "").replace(" ", "") for t in names)
    assert shown == sorted(f"{r['arm']}(n=4000)" for r in rows)  # every name, whole
    assert max(len(line) for t in names for line in t.get_text().split("\n")) <= 34
    for ax in fig.axes:
        title = ax.xaxis.label.get_window_extent(renderer)
        assert title.x0 >= 0 and title.x1 <= fig.bbox.x1 and title.y0 >= 0  # not cut off
        for axis in (ax.xaxis, ax.yaxis):
            boxes = [t.get_window_extent(renderer) for t in _tick_labels(axis)]
            assert boxes or axis is not ax.xaxis  # every x axis is labelled
            for i, a in enumerate(boxes):
                assert a.x0 >= 0 and a.y0 >= 0 and a.x1 <= fig.bbox.x1 and a.y1 <= fig.bbox.y1
                for b in boxes[i + 1:]:
                    assert not a.overlaps(b), (a, b)
    for box in (t.get_window_extent(renderer) for t in names):
        assert box.x1 <= fig.axes[0].bbox.x0  # left of the plot, not drawn over it
