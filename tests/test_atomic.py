"""The one atomic file writer: unique temp names, old file intact on error, umask honoured."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from featurepipe.atomic import atomic_path, atomic_write, atomic_write_text, temp_name
from featurepipe.exceptions import FeaturePipeError, StoreError, WriteError
from featurepipe.store_checks import write_error


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


def _full_disk(code: int = errno.ENOSPC) -> OSError:
    return OSError(code, os.strerror(code), "/the/temp/file")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
@pytest.mark.parametrize("writer", ["stream", "path"])
def test_full_disk_is_one_line_naming_the_path(tmp_path: Path, writer: str, code: int) -> None:
    """A full disk (or quota) used to come out as the writer's raw OSError, without the path."""
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"old")
    with pytest.raises(WriteError) as info:
        if writer == "stream":
            def fill(fh: object) -> None:
                fh.write(b"half")  # type: ignore[attr-defined]
                raise _full_disk(code)

            atomic_write(target, fill)
        else:
            with atomic_path(target) as tmp:
                tmp.write_bytes(b"half")
                raise _full_disk(code)
    error = info.value
    assert str(error) == f"cannot write {target}: no space left on device"
    assert isinstance(error, FeaturePipeError) and isinstance(error, OSError)
    assert (error.errno, error.filename) == (code, str(target))
    assert isinstance(error.__cause__, OSError)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_other_write_errors_keep_their_reason_and_errno(tmp_path: Path) -> None:
    def denied(fh: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    with pytest.raises(WriteError) as info:
        atomic_write(tmp_path / "h.json", denied)
    assert str(info.value) == f"cannot write {tmp_path / 'h.json'}: Permission denied"
    assert info.value.errno == errno.EACCES
    # featurepipe's own errors and errors that are not OSErrors pass through unchanged
    for exc in (StoreError("already one line"), ValueError("not a write")):
        def fail(fh: object, exc: Exception = exc) -> None:
            raise exc

        with pytest.raises(type(exc)) as raised:
            atomic_write(tmp_path / "h.json", fail)
        assert raised.value is exc
    assert list(tmp_path.iterdir()) == []


def test_store_wording_of_a_write_error_is_one_line_without_repeating(tmp_path: Path) -> None:
    """store.py words its own line (``cannot write shard ...``) from what atomic raises."""
    target = tmp_path / "s.h5.parts" / "k" / "shard-0.npz"
    for cause, why in ((_full_disk(), "no space left on device"), (OSError("boom"), "boom")):
        def fail(fh: object, cause: OSError = cause) -> None:
            raise cause

        target.parent.mkdir(parents=True, exist_ok=True)
        with pytest.raises(WriteError) as info:
            atomic_write(target, fail)
        line = str(write_error("shard", target, info.value))
        assert line == f"cannot write shard {target}: {why}"
    # HDF5 reports a full disk in its text only
    hdf5 = OSError("Can't write data (file write failed: ... errno = 28, error message = ...)")
    with pytest.raises(WriteError, match="no space left on device") as info, \
            atomic_path(tmp_path / "s.h5"):
        raise hdf5
    assert info.value.errno == errno.ENOSPC


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
