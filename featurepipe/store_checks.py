"""What the feature store checks in files and rows it did not write cleanly itself.

A file that h5py cannot open is diagnosed (a damaged store may be rebuilt, a foreign file never
is), a commit reserves its disk space before HDF5 writes a byte, failed writes become one line
naming the path, and rows holding NaN or infinity are found before a head fits on them. See
``docs/reliability.md`` ("Feature store guarantees").
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featurepipe.exceptions import StoreError

__all__ = [
    "NON_FINITE_REASON",
    "Diagnosis",
    "diagnose",
    "non_finite_error",
    "non_finite_rows",
    "reserve",
    "write_error",
]

#: Skipped-record reason of rows that came out of the network holding NaN or infinity.
NON_FINITE_REASON = "non-finite features"

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_SIGNATURE_OFFSETS = (0, 512, 1024, 2048, 4096)  # HDF5 looks there (after a user block)
# Names only a featurepipe store holds: the root attribute sits near the start of the file, the
# entries' index and attributes near the end, so a truncated file keeps the first and a file
# whose header was overwritten keeps the others.
_OUR_MARKERS = (b"featurepipe_store_version", b"skipped_fingerprints", b"feature_format_version")
_MARKER_SCAN = 1 << 20  # bytes read at each end of a file that cannot be opened


@dataclass(frozen=True)
class Diagnosis:
    """Why a file cannot be opened as a store, and whether it is a damaged featurepipe store."""

    message: str
    ours: bool


def diagnose(path: Path, error: Exception) -> Diagnosis:
    """Tell a damaged store (which ``embed --replace`` may rebuild) from a foreign file.

    Parameters
    ----------
    path : Path
        A file h5py could not open.
    error : Exception
        h5py's error, quoted in the message.

    Returns
    -------
    Diagnosis
        ``ours`` is True only when featurepipe's own names are found in the file.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(_MARKER_SCAN)
            fh.seek(max(len(head), size - _MARKER_SCAN))
            tail = fh.read(_MARKER_SCAN)
    except OSError as exc:
        return Diagnosis(f"{path} cannot be read ({exc.strerror or exc})", ours=False)
    hdf5 = any(head.startswith(_HDF5_SIGNATURE, k) for k in _SIGNATURE_OFFSETS)
    if any(marker in head or marker in tail for marker in _OUR_MARKERS):
        what = "truncated or corrupt HDF5" if hdf5 else "HDF5 header missing or overwritten"
        return Diagnosis(
            f"{path} is a damaged featurepipe store ({what}: {error}); "
            "`featurepipe embed ... --replace` rebuilds it",
            ours=True,
        )
    if hdf5:
        return Diagnosis(
            f"{path} is a damaged HDF5 file that does not look like a featurepipe store "
            f"({error}); not overwriting it: move it away or pick another path",
            ours=False,
        )
    kind = "empty file" if size == 0 else f"starts with {head[:8]!r}"
    return Diagnosis(
        f"{path} is not a featurepipe store (not an HDF5 file: {kind}); "
        "not overwriting it: move it away or pick another path",
        ours=False,
    )


def write_error(what: str, path: Path, exc: BaseException) -> StoreError:
    """One line for a failed write: the path, and "no space left on device" when that is why.

    h5py reports a failed write as an ``OSError`` with ``errno`` set, or as a ``RuntimeError``
    whose text carries HDF5's ``errno = 28``.
    """
    no_space = getattr(exc, "errno", None) == errno.ENOSPC or "errno = 28" in str(exc)
    why = "no space left on device" if no_space else (getattr(exc, "strerror", None) or str(exc))
    return StoreError(f"cannot write {what} {path}: {why}")


def reserve(path: Path, nbytes: int) -> None:
    """Allocate ``nbytes`` for the existing file ``path`` before HDF5 writes into it.

    HDF5 buffers writes and meets a full disk only when it flushes; after a failed flush it
    cannot close the file cleanly and crashes the process later (at the next flush or at exit).
    With the space allocated up front the disk is full here, before HDF5 starts, or not at all.
    Where the filesystem cannot preallocate, the free space is compared instead.

    Raises
    ------
    OSError
        ``ENOSPC`` when the space is not there.
    """
    fd = os.open(path, os.O_RDWR)
    try:
        fallocate = getattr(os, "posix_fallocate", None)
        if fallocate is not None:
            try:
                fallocate(fd, 0, nbytes)
                return
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise
        # no preallocation here (macOS, Windows, some network filesystems): compare instead
        if shutil.disk_usage(path.parent).free < nbytes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    finally:
        os.close(fd)


def non_finite_rows(block: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows of a 2-D block holding a NaN or an infinity."""
    if block.size == 0:
        return np.zeros(len(block), dtype=bool)
    return ~np.isfinite(block).all(axis=1)


def non_finite_error(path: Path, key: str, ids: Sequence[str], count: int) -> StoreError:
    """The error for ``count`` rows a head cannot fit on, naming the first few ``ids``."""
    shown = ", ".join(repr(i) for i in ids[:3]) + (", ..." if count > 3 else "")
    return StoreError(
        f"entry {key} in {path} holds non-finite features (NaN or inf) in {count} row(s), "
        f"e.g. {shown}; embed again into a new store (another --out, or delete this one): "
        "rows that come out non-finite are now skipped"
    )
