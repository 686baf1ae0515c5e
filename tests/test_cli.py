"""CLI paths: happy path, JSON output, and one clear line + non-zero exit for every user error."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from featurepipe.cli import main
from tests.helpers import write_good_images

TINY_ARGS = [
    "--backbone",
    "timm:test_efficientnet",
    "--weights",
    "random",
    "--image-size",
    "32",
    "--precision",
    "fp32",
    "--workers",
    "0",
    "--quiet",
]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_embed_then_inspect_json(mixed_folder, tmp_path, capsys):
    root, expected = mixed_folder
    store = str(tmp_path / "s.h5")
    code, out, _ = _run(capsys, "embed", str(root), "--out", store, *TINY_ARGS)
    assert code == 0
    assert "skipped b/zero.jpg: empty" in out

    code, out, _ = _run(capsys, "inspect", store, "--json")
    desc = json.loads(out)
    assert len(desc["entries"]) == 1 and desc["differs"] == {}
    info = desc["entries"][0]
    bad = sorted(k for k, v in expected.items() if v)
    assert code == 0
    assert info["n_rows"] == len(expected) - len(bad)
    assert info["n_skipped"] == len(bad)
    assert sorted(s["id"] for s in info["skipped"]) == bad
    assert info["classes"] == ["a", "b"]
    assert info["backbone"] == "timm:test_efficientnet"
    assert info["dim"] > 0


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["embed", "/no/such/folder", "--out", "x.h5"], "/no/such/folder"),
        (["embed", "EMPTY", "--out", "x.h5"], "EMPTY"),
        (["embed", "GOOD", "--out", "x.h5", "--backbone", "nosuchnet"], "efficientnet_lite0"),
        (["inspect", "/no/such/store.h5"], "/no/such/store.h5"),
        (["inspect", "NOTSTORE"], "NOTSTORE"),
    ],
)
def test_user_errors_are_one_clear_line(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "EMPTY").mkdir()
    write_good_images(tmp_path / "GOOD" / "a", 2, seed=1)
    (tmp_path / "NOTSTORE").write_text("hello")
    code, out, err = _run(capsys, *argv)
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("featurepipe: error:"), err
    assert needle in lines[0]


def test_store_built_with_another_spec_is_refused(tmp_path, capsys):
    root = tmp_path / "photos"
    write_good_images(root / "a", 2, seed=1)
    write_good_images(root / "b", 2, seed=2)
    store = str(tmp_path / "s.h5")
    assert _run(capsys, "embed", str(root), "--out", store, *TINY_ARGS)[0] == 0
    other = [a if a != "32" else "48" for a in TINY_ARGS]
    code, _, err = _run(capsys, "embed", str(root), "--out", store, *other)
    assert code == 1
    assert "another spec" in err and "preprocess" in err and "--replace" in err
    code, out, _ = _run(capsys, "embed", str(root), "--out", store, *other, "--replace", "--json")
    assert code == 0 and json.loads(out)["n_computed"] == 4
    code, out, _ = _run(capsys, "inspect", store, "--json")
    assert len(json.loads(out)["entries"]) == 1


def test_debug_shows_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "featurepipe.cli",
            "--debug",
            "embed",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "x.h5"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "SourceError" in proc.stderr


def test_models_lists_the_offline_default(capsys):
    code, out, _ = _run(capsys, "models", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and rows["efficientnet_lite0"]["offline"] is True
