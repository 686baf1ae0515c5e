"""`featurepipe demo`: the data it picks, the table, and the line that says what the table shows."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from featurepipe.cli import main
from featurepipe.demo import load_demo_data, per_class_subsets, run_demo, summary_line
from featurepipe.exceptions import ConfigError
from tests.helpers import TINY


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion(tmp_path: Path) -> Path:
    """Fashion-MNIST's four IDX files, shrunk: 10 classes, 8 training and 3 test images each."""
    rng = np.random.default_rng(0)
    root = tmp_path / "fmnist"
    root.mkdir()
    for stem, n in (("train", 80), ("t10k", 30)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 40, size=(n, 28, 28))
        for c in range(10):  # a bright square whose place is the class: learnable from pixels
            images[labels == c, 2 * c:2 * c + 6, 2 * c:2 * c + 6] = 250
        _write_idx(root / f"{stem}-images-idx3-ubyte.gz", images)
        _write_idx(root / f"{stem}-labels-idx1-ubyte.gz", labels)
    return root


def test_auto_uses_fashion_mnist_when_present_else_digits(fake_fashion: Path, tmp_path: Path
                                                          ) -> None:
    data = load_demo_data("auto", fake_fashion, n_test=20)
    assert data.name == "fashion-mnist" and len(data.test_labels) == 20
    assert data.train_images.shape == (80, 28, 28) and data.classes[0] == "T-shirt/top"
    assert load_demo_data("auto", tmp_path / "missing").name == "digits"
    with pytest.raises(ConfigError, match="apt-get install dataset-fashion-mnist"):
        load_demo_data("fashion-mnist", tmp_path / "missing")


def test_subsets_are_nested_and_balanced() -> None:
    labels = np.repeat(np.arange(4), 10)
    subsets = per_class_subsets(labels, [2, 5])
    assert set(subsets[2]) <= set(subsets[5])
    assert np.bincount(labels[subsets[5]]).tolist() == [5, 5, 5, 5]


def test_summary_line_says_why_pixels_win() -> None:
    rows = [{"labels_per_class": 5, "frozen_accuracy": 0.70, "pixels_accuracy": 0.60},
            {"labels_per_class": 50, "frozen_accuracy": 0.80, "pixels_accuracy": 0.75}]
    line = summary_line(rows, "fashion-mnist", "lite0")
    assert "beat raw pixels at every size" in line and "widest with the fewest labels" in line
    rows[1]["pixels_accuracy"] = 0.9
    line = summary_line(rows, "digits", "lite0")
    assert line.startswith("Raw pixels win at 50 labels per class") and "8x8 digits" in line


def test_demo_on_fashion_mnist_files(fake_fashion: Path, tmp_path: Path) -> None:
    out = run_demo(tmp_path / "demo", data_dir=fake_fashion, sizes=(2, 4), n_test=20,
                   progress=False, backbone=TINY["backbone"], weights=TINY["weights"],
                   image_size=TINY["image_size"], layer=None)
    assert out["dataset"] == "fashion-mnist" and out["n_test"] == 20
    assert [r["n_train"] for r in out["rows"]] == [20, 40]
    assert out["embed"]["n_rows"] == 40 + 20
    assert set(out["stages"]) == {"load", "embed", "fit"}
    assert "| labels per class |" in out["table"] and out["summary"].endswith(".")
    for r in out["rows"]:
        assert 0.0 <= r["pixels_accuracy"] <= 1.0 and 0.0 <= r["frozen_accuracy"] <= 1.0
    # A rerun reuses the store: nothing is embedded again.
    again = run_demo(tmp_path / "demo", data_dir=fake_fashion, sizes=(2, 4), n_test=20,
                     progress=False, backbone=TINY["backbone"], weights=TINY["weights"],
                     image_size=TINY["image_size"], layer=None)
    assert again["embed"]["n_computed"] == 0 and again["rows"] == out["rows"]


def test_demo_cli_prints_table_and_summary(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    import featurepipe.demo as demo

    real = demo.run_demo

    def small(*args: object, **kw: object) -> dict:
        kw.update(sizes=(2,), n_test=20, backbone=TINY["backbone"], weights=TINY["weights"],
                  image_size=TINY["image_size"], layer=None)
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(demo, "run_demo", small)
    assert main(["demo", "--out", str(tmp_path / "d"), "--dataset", "digits", "--quiet"]) == 0
    out = capsys.readouterr()
    assert "digits: accuracy on 20 test images" in out.out and "| 2 | 20 |" in out.out
    assert out.out.strip().splitlines()[-1].startswith(("Raw pixels win", "Frozen"))
    assert out.err == ""
    assert main(["demo", "--out", str(tmp_path / "d"), "--dataset", "digits", "--json",
                 "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["dataset"] == "digits"
