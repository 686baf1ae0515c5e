"""``compare --layers``: frozen arms per layer and side by side, on the same rows and budgets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from featurepipe.cli import main
from featurepipe.compare import compare
from featurepipe.exceptions import ConfigError
from tests.test_compare import FAST, TINY_CLI, _write_split

LAYERS = "blocks.3,penultimate"
BB = FAST["backbones"]
ARMS = [f"{BB}@blocks.3+logreg", f"{BB}@penultimate+logreg",
        f"{BB}@blocks.3,penultimate+logreg"]


@pytest.fixture(scope="module")
def layered(tmp_path_factory):
    import featurepipe.heads as heads

    tmp = tmp_path_factory.mktemp("cmp_layers")
    train = _write_split(tmp / "train", 12, seed=1)
    test = _write_split(tmp / "test", 6, seed=2)
    seen: list[tuple[str, np.ndarray]] = []
    real = heads.fit_head

    def spy(estimator, X, y):
        seen.append((type(estimator[0]).__name__ if hasattr(estimator, "steps") else "",
                     np.asarray(X, dtype=np.float32).copy()))
        return real(estimator, X, y)

    fits: list[tuple[str, list[str]]] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(heads, "fit_head", spy)
        res = compare(train, tmp / "report", test_source=test, layers=LAYERS,
                      **{**FAST, "heads": "logreg", "classical": "pixels+logreg",
                         "finetune": None, "val_size": 6},
                      on_fit=lambda arm, part: fits.append((arm, list(part.ids))))
    return {"res": res, "seen": seen, "fits": fits, "train": train, "test": test, "tmp": tmp}


def test_an_arm_per_layer_and_one_side_by_side(layered):
    res = layered["res"]
    frozen = [r for r in res.rows if r["family"] == "frozen"]
    assert [r["arm"] for r in frozen] == ARMS
    assert frozen[2]["layers"] == ["blocks.3", "penultimate"]
    assert {r["n_train"] for r in res.rows} == {res.split["n_fit"]}
    assert len({r["train_ids_sha256"] for r in res.rows}) == 1  # same rows for every arm
    assert all(len(r["accuracy_ci95"]) == 2 for r in res.rows)
    dims = {e["features"]: e["dim"] for e in res.embedding}
    assert set(dims) == {f"{BB}@blocks.3", f"{BB}@penultimate"}
    # The side-by-side arm's head reads both layers, through the block scaler.
    scaler, X = layered["seen"][-1]
    assert scaler == "BlockStandardScaler"
    assert X.shape[1] == dims[f"{BB}@blocks.3"] + dims[f"{BB}@penultimate"]
    assert "n_train" in res.table and f"{BB}@blocks.3,penultimate+logreg" in res.table
    assert res.settings["layers"] == ["blocks.3", "penultimate"]
    # One pass made both layers, so the side-by-side arm pays that pass once, like each layer.
    for role in {e["role"] for e in res.embedding}:  # one pass per side (train, test)
        assert len({e["computed_images_per_second"] for e in res.embedding
                    if e["role"] == role}) == 1
    feature_cost = [r["train_seconds"] - r["fit_seconds"] for r in frozen]
    assert feature_cost[0] > 0 and feature_cost[2] == pytest.approx(feature_cost[0])


def test_headline_among_layers_is_chosen_by_validation(layered):
    res = layered["res"]
    frozen = [r for r in res.rows if r["family"] == "frozen"]
    best = max(frozen, key=lambda r: r["val_accuracy"])
    first_best = next(r for r in frozen if r["val_accuracy"] == best["val_accuracy"])
    assert res.best("frozen")["arm"] == first_best["arm"]


def test_layer_and_layers_together_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="not both"):
        compare(tmp_path, tmp_path / "r", layer="blocks.3", layers=LAYERS, **FAST)


def test_cli_compare_layers(layered, tmp_path, capsys):
    code = main(["compare", str(layered["train"]), "--test-source", str(layered["test"]),
                 "--out", str(tmp_path / "r"), "--heads", "logreg", "--classical", "none",
                 "--no-finetune", "--cv", "2", "--val-size", "6", "--layers", LAYERS, "--json",
                 *TINY_CLI])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["arm"] for r in out["rows"]] == ARMS
    ours = {r["arm"]: r["val_accuracy"] for r in layered["res"].rows}
    assert {r["arm"]: r["val_accuracy"] for r in out["rows"]} == {a: ours[a] for a in ARMS}


def test_cli_layers_refused_for_learning_curves(layered, tmp_path: Path, capsys):
    code = main(["compare", str(layered["train"]), "--out", str(tmp_path / "r"),
                 "--samples-per-class", "2", "--layers", LAYERS, *TINY_CLI])
    assert code != 0
    assert "learning curves take one --layer" in capsys.readouterr().err
