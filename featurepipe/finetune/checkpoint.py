"""Atomic checkpoint files and RNG state capture.

A checkpoint is only ever replaced whole: it is written to a temp file in the same folder,
flushed, fsynced, then ``os.replace``-d over the old one (and the folder entry fsynced). A crash or
SIGKILL at any point leaves either the previous complete checkpoint or the new complete one, never
a torn file.

Checkpoints hold only tensors and plain Python values (the numpy RNG state is stored as a tensor),
so they load with ``torch.load(weights_only=True)``: opening a checkpoint cannot run code.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["atomic_save", "default_file_mode", "get_rng_state", "load_checkpoint",
           "set_rng_state"]


def default_file_mode() -> int:
    """The mode ``open()`` would give a new file: 0o666 less the process umask.

    ``mkstemp`` creates its temp files 0o600 whatever the umask; files renamed into place from
    it get this mode instead, so a run folder is as readable as the user's other files.
    """
    umask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return 0o666 & ~umask


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically (temp file + fsync + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint written by :func:`atomic_save` onto the CPU (``weights_only=True``)."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)


def get_rng_state() -> dict[str, Any]:
    """Python ``random``, numpy, torch CPU and (when present) CUDA RNG states as plain values."""
    # The legacy global numpy RNG is what third-party code seeds and draws from; capture it as is.
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states captured by :func:`get_rng_state`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(  # noqa: NPY002
        (n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
