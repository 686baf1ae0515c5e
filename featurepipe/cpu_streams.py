"""Compiled CPU embedding as one stream per core: each thread decodes a batch and embeds it alone.

Why: a forward pass spread over every core loses time to its OpenMP barriers, and the decode
phase between two forward passes wakes every core for a short burst of work. Independent
streams, one per core, each single-threaded from file to feature, keep every core busy on its
own batch (measured in ``benchmarks/results/throughput-cpu-8k.md`` and
``benchmarks/results/stream_breakdown-cpu.md``; see ``docs/performance.md``).

The graph must be compiled for it (:class:`featurepipe.compiling.CompiledExtractor` with
``per_core=True``): kernels for one thread, and inductor's C++ wrapper, which runs the graph
with the GIL released (with the Python wrapper the streams convoy on the GIL). An eager forward
pass holds the GIL between operators, so eager runs keep the alternating decode threads.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from featurepipe.embedding.pixels import empty_batch

#: Images per compiled call in a stream: small enough that the activations of every stream stay
#: in the caches (chosen by measurement, ``docs/performance.md``).
STREAM_CHUNK = 8

__all__ = ["STREAM_CHUNK", "Batch", "CoreStreams"]

Batch = tuple[list[int], list[str], np.ndarray]


class _Decodes(Protocol):
    input_size: tuple[int, int]
    fill_dtype: torch.dtype

    def decode_into(self, k: int, out: torch.Tensor) -> tuple[int, str]: ...


class CoreStreams:
    """``(indices, reasons, features)`` per batch, from ``streams`` threads in completion order.

    Each thread takes the next batch of dataset positions, decodes it into its own uint8
    channels-last buffer (``dataset.decode_into``), and calls ``embed(x, reasons)`` for the
    features of the images that decoded. ``initializer`` runs first in each thread (the engine
    passes :func:`featurepipe.embedding.memory.run_ops_single_threaded`). The first exception of any
    thread is raised here; closing the iterator early stops the threads after their current
    batch.
    """

    def __init__(self, dataset: _Decodes, batches: Iterable[Sequence[int]],
                 embed: Callable[[torch.Tensor, list[str]], np.ndarray], streams: int,
                 initializer: Callable[[], Any] | None = None) -> None:
        self.dataset, self.batches, self.embed = dataset, batches, embed
        self.streams, self.initializer = max(1, streams), initializer

    def __iter__(self) -> Iterator[Batch]:
        todo: queue.SimpleQueue[list[int]] = queue.SimpleQueue()
        count = 0
        for batch in self.batches:
            todo.put(list(batch))
            count += 1
        results: queue.SimpleQueue[Batch | BaseException | None] = queue.SimpleQueue()
        stop = threading.Event()
        threads = [threading.Thread(target=self._run, args=(todo, results, stop), daemon=True,
                                    name=f"featurepipe-stream-{n}")
                   for n in range(min(self.streams, count))]
        for thread in threads:
            thread.start()
        try:
            finished = 0
            while finished < len(threads):
                item = results.get()
                if item is None:
                    finished += 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            stop.set()
            while True:  # drop the batches not started, so streams stop after their current one
                try:
                    todo.get_nowait()
                except queue.Empty:
                    break
            for thread in threads:
                thread.join()

    def _run(self, todo: queue.SimpleQueue[list[int]],
             results: queue.SimpleQueue[Batch | BaseException | None],
             stop: threading.Event) -> None:
        try:
            if self.initializer is not None:
                self.initializer()
            while not stop.is_set():
                try:
                    batch = todo.get_nowait()
                except queue.Empty:
                    break
                x = empty_batch(len(batch), self.dataset.input_size, self.dataset.fill_dtype)
                done = [self.dataset.decode_into(k, x[j]) for j, k in enumerate(batch)]
                reasons = [r for _, r in done]
                results.put(([i for i, _ in done], reasons, self.embed(x, reasons)))
        except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread
            results.put(exc)
        finally:
            results.put(None)
