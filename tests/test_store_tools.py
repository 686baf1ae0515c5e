"""inspect (every entry, what differs), export (npy / parquet / csv) and layers, offline."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from featurepipe.cli import main
from featurepipe.embed import embed
from featurepipe.exceptions import MissingDependencyError
from featurepipe.store import FeatureStore
from featurepipe.store_tools import describe_store, export_entry
from tests.helpers import TINY, write_good_images


@pytest.fixture(scope="module")
def two_entries(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One store, the same images embedded at two input sizes: two entries."""
    root = tmp_path_factory.mktemp("store")
    write_good_images(root / "photos" / "cat", 3, seed=0)
    write_good_images(root / "photos" / "dog", 3, seed=1)
    store = root / "s.h5"
    for size in (32, 48):
        embed(root / "photos", store, TINY["backbone"], weights=TINY["weights"], image_size=size,
              precision="fp32", workers=0, progress=False, other_entries="keep")
    return store


def test_describe_names_what_differs(two_entries: Path) -> None:
    desc = describe_store(two_entries)
    assert len(desc["entries"]) == 2
    assert {"preprocess", "spec"} <= set(desc["differs"])
    assert "backbone" not in desc["differs"] and "n_rows" not in desc["differs"]
    sizes = sorted(e["spec"]["image_size"] for e in desc["entries"])
    assert sizes == [32, 48]
    one = describe_store(two_entries, desc["entries"][0]["key"][:6])
    assert len(one["entries"]) == 1 and one["differs"] == {}


def test_inspect_cli_text_and_json(two_entries: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(two_entries)]) == 0
    out = capsys.readouterr().out
    assert out.count("\nentry ") == 2 and "what differs between the entries:" in out
    assert "  preprocess:" in out
    assert main(["inspect", str(two_entries), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["entries"]) == 2 and "spec" in data["differs"]


@pytest.mark.parametrize("fmt", ["npy", "csv"])
def test_export(two_entries: Path, tmp_path: Path, fmt: str,
                capsys: pytest.CaptureFixture[str]) -> None:
    key = FeatureStore(two_entries).keys()[0]
    expected = FeatureStore(two_entries).load(key)
    out = tmp_path / f"feats.{fmt}"
    assert main(["export", str(two_entries), "--format", fmt, "--key", key, "--out", str(out),
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_rows"] == 6 and summary["key"] == key and out.is_file()
    if fmt == "npy":
        data = np.load(out)
        np.testing.assert_array_equal(data["features"], expected.features)
        assert data["ids"].tolist() == expected.ids
        assert data["class_names"].tolist() == ["cat", "dog"]
    else:
        with open(out, newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0][:3] == ["id", "label", "f0"] and len(rows) == 7
        assert {r[1] for r in rows[1:]} == {"cat", "dog"}
        np.testing.assert_allclose(np.array(rows[1][2:], dtype=np.float32),
                                   expected.features[0], rtol=1e-6)


def test_export_several_entries_needs_a_key(two_entries: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(two_entries), "--out", str(tmp_path / "x.npz")]) == 1
    assert "entr" in capsys.readouterr().err


def test_parquet_without_pyarrow_is_one_line(two_entries: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    with pytest.raises(MissingDependencyError, match="pip install pyarrow") as info:
        export_entry(two_entries, tmp_path / "x.parquet", "parquet",
                     FeatureStore(two_entries).keys()[0])
    assert "\n" not in str(info.value) and not (tmp_path / "x.parquet").exists()


def test_parquet_with_pyarrow(two_entries: Path, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is an optional dependency")
    key = FeatureStore(two_entries).keys()[0]
    export_entry(two_entries, tmp_path / "x.parquet", "parquet", key)
    table = pq.read_table(tmp_path / "x.parquet")
    assert table.num_rows == 6 and table.column_names[:3] == ["id", "label", "f0"]


def test_layers_offline(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["layers", "--quiet"]) == 0  # the offline default
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert "blocks.5" in names and "conv_stem" in names
    assert main(["layers", "timm:resnet18", "--depth", "1", "--json"]) == 0  # no download
    rows = json.loads(capsys.readouterr().out)
    assert {"name": "layer3", "type": "Sequential"} in rows
