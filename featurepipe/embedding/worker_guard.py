"""Guards for decode worker processes: enough shared memory up front, and no endless wait.

A DataLoader worker hands each batch to the main process through shared memory (``/dev/shm``
on Linux). When that is too small (many containers mount 1-64 MiB there) the worker fails to
allocate it while pickling the batch in a background thread, which only prints the error: the
batch never arrives and the main process would wait for it forever. So a run with worker
processes first compares what its batches in flight may need with what ``/dev/shm`` has free,
and the loader waits for a batch at most :data:`WORKER_TIMEOUT_S` seconds. See
``docs/reliability.md`` ("Decode workers").
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import TypeVar

from featurepipe.exceptions import ConfigError, WorkerError

__all__ = [
    "PREFETCH",
    "SHM_PATH",
    "WORKER_TIMEOUT_S",
    "check_shared_memory",
    "in_flight_bytes",
    "one_line_failures",
    "shm_free_bytes",
    "worker_failure",
]

T = TypeVar("T")

#: Where torch's worker processes put the batches they pass on (Linux).
SHM_PATH = "/dev/shm"  # noqa: S108 - a fixed system path, not a temp file

#: Batches each worker decodes ahead (the DataLoader's ``prefetch_factor``).
PREFETCH = 4

#: How long the main process waits for one batch from its workers before giving up. Generous:
#: the workers decode ahead while the forward pass runs, so a healthy run waits far less; a
#: batch that has not come by then comes from a worker that died or lost it.
WORKER_TIMEOUT_S = 600.0


def shm_free_bytes(path: str | os.PathLike[str] = SHM_PATH) -> int | None:
    """Bytes an unprivileged process may still allocate under ``path``; None where there is
    no such folder (macOS, Windows: torch shares memory another way there)."""
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):  # missing, or no statvfs (Windows)
        return None
    return st.f_bavail * st.f_frsize


def in_flight_bytes(workers: int, batch_sizes: Sequence[int], input_size: tuple[int, int],
                    prefetch: int = PREFETCH) -> int:
    """Shared memory the batches in flight may hold at once: ``workers x prefetch`` batches
    (no more than there are) of the largest batch, each image a ``3 x H x W`` uint8 crop."""
    if workers <= 0 or not batch_sizes:
        return 0
    height, width = input_size
    n_batches = min(workers * prefetch, len(batch_sizes))
    return n_batches * max(batch_sizes) * 3 * height * width


def check_shared_memory(workers: int, batch_sizes: Sequence[int], input_size: tuple[int, int],
                        *, device_type: str = "cpu", prefetch: int = PREFETCH,
                        free_bytes: int | None = None,
                        shm_path: str | os.PathLike[str] = SHM_PATH, asked: bool = True) -> int:
    """Refuse ``workers`` decode processes whose batches cannot fit in shared memory.

    A worker count the user did not ask for (``asked=False``: the runner's default) is
    lowered to what fits instead, down to 0 (decode in the main process).

    Parameters
    ----------
    workers : int
        Decode worker processes asked for (0 decodes in the main process: nothing to check).
    batch_sizes : sequence of int
        Images per planned batch.
    input_size : (int, int)
        Height and width of a crop.
    device_type : str
        ``"cpu"`` (leaving ``--workers`` unset decodes in threads) or an accelerator's type
        (where ``--workers 0`` decodes in the main process); only the advice differs.
    prefetch : int
        Batches each worker decodes ahead.
    free_bytes : int, optional
        Free shared memory; read from ``shm_path`` when not given.
    shm_path : path
        The shared-memory folder; where it does not exist, nothing is checked.
    asked : bool
        Whether the user chose ``workers``.

    Returns
    -------
    int
        The workers to start: ``workers``, or fewer when not asked for.

    Raises
    ------
    ConfigError
        ``workers`` was asked for and does not fit: one line naming ``/dev/shm``, what the
        run needs and has, and what to do instead.
    """
    need = in_flight_bytes(workers, batch_sizes, input_size, prefetch)
    free = shm_free_bytes(shm_path) if free_bytes is None else free_bytes
    if need == 0 or free is None or need <= free:
        return workers
    height, width = input_size
    per_worker = prefetch * max(batch_sizes) * 3 * height * width
    fits = free // per_worker
    if not asked:
        return min(workers, fits)
    instead = ("leave --workers unset to decode in threads (workers=None; no shared memory)"
               if device_type == "cpu" else
               "use --workers 0 to decode in the main process (no shared memory)")
    fewer = f", use --workers {fits} or fewer" if fits > 0 else ""
    in_flight = min(workers * prefetch, len(batch_sizes))
    raise ConfigError(
        f"--workers {workers} needs about {_size(need)} of shared memory for up to {in_flight} "
        f"batches in flight ({workers} workers x {prefetch} decoded ahead, {max(batch_sizes)} "
        f"crops of 3x{height}x{width} bytes each) but {os.fspath(shm_path)} has {_size(free)} "
        f"free, so a worker would fail to hand its batch over; {instead}{fewer}, lower "
        f"--batch-size, or enlarge {os.fspath(shm_path)} (docker run --shm-size=...)")


def worker_failure(exc: BaseException, timeout: float) -> WorkerError | None:
    """The one-line error for a DataLoader's own failure (a worker that died, or no batch
    within ``timeout`` seconds); None for any other error, which is not the workers'."""
    text = str(exc)
    if not isinstance(exc, RuntimeError) or not text.startswith("DataLoader"):
        return None
    first = text.strip().splitlines()[0]
    return WorkerError(
        f"decode worker processes failed ({first}; the wait for a batch is limited to "
        f"{timeout:g} s); a worker that cannot allocate shared memory in {SHM_PATH} loses its "
        "batch: enlarge it, use fewer --workers, or leave --workers unset to decode in "
        "threads (on a CPU)")


def one_line_failures(items: Iterator[T], timeout: float) -> Iterator[T]:
    """``items``, with a DataLoader's own failure raised as :func:`worker_failure`'s line."""
    try:
        yield from items
    except RuntimeError as exc:
        error = worker_failure(exc, timeout)
        if error is None:
            raise
        raise error from exc


def _size(nbytes: int) -> str:
    """``nbytes`` in MiB, or in KiB below one MiB (a tiny run must not read "0.0 MiB")."""
    if nbytes < 2**20:
        return f"{nbytes / 2**10:.1f} KiB"
    return f"{nbytes / 2**20:.1f} MiB"
