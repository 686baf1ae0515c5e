"""Atomic file writes: readers see the old file or the new one, never half of either.

Every file featurepipe replaces (store shards and commits, checkpoints, training history, model
files, reports) goes through here: the new content is written to a temp file with a unique name
in the same folder (two processes writing one file never share a temp file), flushed and fsynced,
``os.replace``-d over the target, and the folder fsynced so the rename survives a crash. On any
error the temp file is removed and the old file is left as it was. The new file gets the mode a
plain ``open(path, "w")`` would give it (``0o666`` less the umask).

An ``OSError`` while writing (a full disk, a quota, no permission; also when a writer such as
``torch.save`` turned it into a ``RuntimeError``) comes out as a
:class:`~featurepipe.exceptions.WriteError`: still an ``OSError`` with the same ``errno``, but
its message names the file the caller asked for (not the temp file) and says "no space left on
device" for a full disk or quota, so every writer's caller can print it as the one line it is.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from featurepipe.exceptions import FeaturePipeError, WriteError

__all__ = ["TEMP_NAME_PATTERN", "atomic_path", "atomic_write", "atomic_write_bytes",
           "atomic_write_text", "fsync_dir", "temp_name"]

#: How temp names end (a regular expression), so a cleanup can recognise leftovers.
TEMP_NAME_PATTERN = r"\.tmp-\d+-[0-9a-f]+"


def temp_name(path: str | os.PathLike[str]) -> Path:
    """A temp path beside ``path`` that no other process or thread picks: ``NAME.tmp-PID-HEX``."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def _os_error(exc: BaseException) -> OSError | None:
    """The ``OSError`` of a failed write: ``exc`` itself, or the one a ``RuntimeError`` was
    raised while handling (``torch.save`` reports a failed ``write`` of its file object as
    ``RuntimeError: [enforce fail ...] unexpected pos``). featurepipe's own errors pass."""
    if isinstance(exc, FeaturePipeError):
        return None
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, RuntimeError):
        inner = exc.__cause__ or exc.__context__
        if isinstance(inner, OSError) and not isinstance(inner, FeaturePipeError):
            return inner
    return None


def _write_error(path: Path, exc: OSError) -> WriteError:
    """``exc`` from writing ``path`` as one line naming ``path``.

    ``errno`` is kept and ``strerror`` holds the reason alone, so a caller that words its own
    line from them (``store_checks.write_error``) does not repeat the path. h5py may report a
    full disk only in its text, as HDF5's ``errno = 28``.
    """
    no_space = exc.errno in (errno.ENOSPC, errno.EDQUOT) or "errno = 28" in str(exc)
    why = "no space left on device" if no_space else (exc.strerror or str(exc))
    code = errno.ENOSPC if no_space and exc.errno is None else exc.errno
    return WriteError(f"cannot write {path}: {why}", code, why, str(path))


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename in ``path`` durable (directories cannot be opened for fsync on Windows)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path for a writer that needs a file name (HDF5, ``torch.save`` to a path).

    When the block ends without an error, the temp file is fsynced and replaces ``path``;
    otherwise it is removed. The block must create the file and close it.
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        failed = _os_error(exc)
        if failed is not None:
            raise _write_error(path, failed) from exc
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> None:
    """Call ``write`` on a binary file object, then replace ``path`` with what it wrote.

    Examples
    --------
    >>> atomic_write("out.npz", lambda fh: np.savez(fh, x=x))  # doctest: +SKIP
    """
    with atomic_path(path) as tmp:
        # O_EXCL: never write into someone else's file; 0o666 & ~umask, as open() does.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                     0o666)
        with os.fdopen(fd, "wb") as fh:
            write(fh)  # atomic_path fsyncs, replaces, and turns a failed write into one line


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically."""
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``text`` atomically."""
    atomic_write_bytes(path, text.encode(encoding))
