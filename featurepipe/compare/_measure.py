"""Wall time and peak memory of one arm, measured the same way for every arm.

Peak memory is the rise of the process's resident-set high-water mark (Linux ``VmHWM``, reset
through ``/proc/self/clear_refs``) over the resident set at the start, after freed heap memory
has been returned to the OS. Unlike ``tracemalloc`` it
sees what torch, libsvm and BLAS allocate outside Python's allocator, and it adds no overhead.
Where the reset is not possible (other systems, locked-down containers) ``tracemalloc``'s peak is
used instead, and the method is recorded beside the number.
"""

from __future__ import annotations

import ctypes
import gc
import time
import tracemalloc
from pathlib import Path
from types import TracebackType

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
MIB = 1024 * 1024


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``).

    Otherwise memory freed by an earlier arm stays resident and this arm's allocations can reuse
    it without raising the resident set: its peak would read as zero.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel or sandbox does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


class Measure:
    """Context manager: ``seconds`` and ``peak_mib`` of the block, and ``memory_method``.

    Examples
    --------
    >>> with Measure() as m:
    ...     _ = bytearray(10)
    >>> m.seconds >= 0 and m.memory_method in ("rss_hwm_delta", "tracemalloc_peak")
    True
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.peak_mib = 0.0
        self.memory_method = "rss_hwm_delta"
        self._start_kib = 0
        self._t0 = 0.0
        self._tracing = False

    def __enter__(self) -> Measure:
        _release_free_memory()
        if _reset_hwm():
            self._start_kib = _status_kib("VmRSS") or 0
        else:
            self.memory_method = "tracemalloc_peak"
            self._tracing = not tracemalloc.is_tracing()
            if self._tracing:
                tracemalloc.start()
            tracemalloc.reset_peak()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.seconds = time.perf_counter() - self._t0
        if self.memory_method == "rss_hwm_delta":
            peak = _status_kib("VmHWM") or self._start_kib
            self.peak_mib = max(0, peak - self._start_kib) / 1024
        else:
            self.peak_mib = tracemalloc.get_traced_memory()[1] / MIB
            if self._tracing:
                tracemalloc.stop()
