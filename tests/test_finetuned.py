"""`featurepipe predict` / `evaluate` serve a fine-tuned network like a saved head."""

from __future__ import annotations

import json

import numpy as np
import pytest

from featurepipe.cli import main
from featurepipe.exceptions import ConfigError
from featurepipe.finetune import finetune
from featurepipe.model import load_model
from featurepipe.sources import open_source
from tests.helpers import TINY, write_good_images


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft") / "photos"
    write_good_images(root / "a", 8, seed=1)
    write_good_images(root / "b", 8, seed=2)
    out = root.parent / "run"
    result = finetune(str(root), out, epochs=1, precision="fp32", verbose=0, val_size=0.25,
                      batch_size=8, **TINY)
    return root, out, result.estimator


def test_loaded_folder_predicts_like_the_estimator(finetuned):
    root, out, est = finetuned
    paths = [s.path for s in open_source(root).samples]
    model = load_model(out, workers=0, precision="fp32")
    np.testing.assert_allclose(model.predict_proba(paths), est.predict_proba(paths),
                               rtol=1e-4, atol=1e-5)
    assert list(model.classes_) == ["a", "b"]
    assert model.score_kind == "probability"


def test_cli_predict_and_evaluate_accept_the_output_folder(finetuned, capsys):
    root, out, est = finetuned
    assert main(["predict", str(out), str(root / "a"), "--json", "--workers", "0"]) == 0
    predictions = json.loads(capsys.readouterr().out)["predictions"]
    assert len(predictions) == 8
    assert {p["label"] for p in predictions} <= {"a", "b"}
    assert main(["evaluate", str(out / "model"), str(root), "--json", "--workers", "0",
                 "--precision", "fp32"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_test"] == 16
    assert report["accuracy"] == pytest.approx(est.score(str(root)), abs=1e-9)


def test_a_folder_without_an_export_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="fine-tuned model folder"):
        load_model(tmp_path)
