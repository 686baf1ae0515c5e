"""The one atomic file writer: unique temp names, old file intact on error, umask honoured."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from featurepipe.atomic import atomic_path, atomic_write, atomic_write_text, temp_name


def test_replaces_the_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    target.write_text("old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_error_keeps_the_old_file_and_removes_the_temp(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")

    def broken(fh: object) -> None:
        fh.write(b"half")  # type: ignore[attr-defined]
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_temp_names_never_repeat(tmp_path: Path) -> None:
    names = {temp_name(tmp_path / "x.h5") for _ in range(200)}
    assert len(names) == 200
    assert all(n.parent == tmp_path and n.name.startswith("x.h5.tmp-") for n in names)


@pytest.mark.skipif(os.name == "nt", reason="POSIX modes")
@pytest.mark.parametrize("write", ["stream", "path"])
def test_new_file_mode_honours_the_umask(tmp_path: Path, write: str) -> None:
    old = os.umask(0o022)
    try:
        target = tmp_path / "model.joblib"
        if write == "stream":
            atomic_write_text(target, "x")
        else:
            with atomic_path(target) as tmp:
                tmp.write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


@pytest.mark.skipif(os.name == "nt", reason="POSIX modes")
def test_model_files_get_the_mode_a_plain_open_would(tmp_path: Path) -> None:
    """Model files were written 0600 (a private temp file renamed); now the umask decides."""
    from sklearn.linear_model import LogisticRegression

    from featurepipe.backbones import BackboneSpec
    from featurepipe.model import SPEC_PARTS, save_model

    head = LogisticRegression().fit([[0.0], [1.0]], [0, 1])
    old = os.umask(0o022)
    try:
        path = save_model(tmp_path / "m.joblib", head, BackboneSpec("efficientnet_lite0"),
                          ["a", "b"], "k", {name: None for name in SPEC_PARTS})
    finally:
        os.umask(old)
    assert stat.S_IMODE(Path(path).stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.joblib"]
