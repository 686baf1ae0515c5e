"""Process-level CPU tuning for embedding: glibc's heap and OpenMP teams of decode threads.

Both settings change speed and memory, never features; the measurements are in
``docs/performance.md`` (``benchmarks/results/memory.md``,
``benchmarks/results/throughput-cpu-8k.md``).
"""

from __future__ import annotations

import os
import sys
from functools import cache, lru_cache
from typing import Any

import torch

__all__ = ["default_workers", "keep_buffers_in_heap", "release_free_heap",
           "run_ops_single_threaded"]

#: glibc ``mallopt`` parameters, and the values featurepipe sets on CPU: a 1 GiB mmap and trim
#: threshold (every activation of a batch comes from the heap and stays there), and a top pad
#: of one whole per-thread heap (64 MiB, glibc's ``HEAP_MAX_SIZE`` on 64-bit).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_HEAP_THRESHOLD = 1 << 30
_THREAD_HEAP_SIZE = 64 << 20


def release_free_heap() -> bool:
    """Hand the allocator's free pages back to the OS (``malloc_trim``; glibc only).

    Called after every shard: glibc keeps freed activation buffers in its heap, which would
    otherwise fragment and grow over a long run; once per shard the trim costs little
    (measured in ``benchmarks/results/memory.md``).
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim(0)
    return True


@lru_cache(maxsize=1)
def keep_buffers_in_heap() -> bool:
    """Serve large CPU buffers from malloc's heap, not fresh mmaps (glibc; once per process).

    glibc maps every allocation above its mmap threshold afresh and unmaps it when it is
    freed, so a batch's large activations would page-fault in again on every batch. Threads
    other than the main one allocate from arenas of 64 MiB heaps that glibc unmaps as soon as
    one is wholly free, whatever the trim threshold; a top pad of a whole heap keeps them. It
    only reserves address space: pages are used when touched. Freed memory stays in the heap
    until the trim after each shard (:func:`release_free_heap`).

    Process-wide and not undone (glibc cannot restore its adaptive threshold).
    ``FEATUREPIPE_MALLOC=default`` in the environment skips it.
    """
    if os.environ.get("FEATUREPIPE_MALLOC", "").lower() == "default":
        return False
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_THRESHOLD) == 1
    ok = libc.mallopt(_M_TOP_PAD, _THREAD_HEAP_SIZE) == 1 and ok
    # Without this, freeing the heap's top buffer would hand it back (and fault it in again).
    return libc.mallopt(_M_TRIM_THRESHOLD, _HEAP_THRESHOLD) == 1 and ok


def run_ops_single_threaded() -> None:
    """Make torch run this thread's CPU ops on this thread alone (a decode thread's initializer).

    By default each thread that calls a parallel torch op (the crop's resize and copy) leads an
    OpenMP team as wide as the machine, so two decode threads on two cores run four threads.
    The setting is OpenMP's per-thread one, in the libgomp torch ships: the forward pass in the
    main thread keeps its team. Where that library is not there, nothing changes.
    """
    omp = _torch_libgomp()
    if omp is not None and hasattr(omp, "omp_set_num_threads"):
        torch.get_num_threads()  # torch's own per-thread set-up first, or it would undo this
        omp.omp_set_num_threads(1)


def default_workers(device: torch.device) -> int:
    """Decode worker processes: leave the cores to the forward pass on CPU, feed the GPU
    generously. (On a CPU the engine decodes in threads unless workers are asked for.)"""
    cores = os.cpu_count() or 1
    if device.type == "cpu":
        return max(0, min(4, cores // 2))
    return max(1, min(32, cores - 1))


def _torch_libgomp() -> Any:
    """The OpenMP runtime torch's Linux wheels ship and run on (None elsewhere)."""
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")
    return _shared_library(path) if os.path.exists(path) else None


def _libc() -> Any:
    return _shared_library("libc.so.6") if sys.platform == "linux" else None


@cache
def _shared_library(name: str) -> Any:
    """A ctypes handle of an already loaded or loadable shared library, or None."""
    try:
        import ctypes

        return ctypes.CDLL(name)
    except OSError:
        return None
