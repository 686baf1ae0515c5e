"""Compiled CPU embedding as one stream per core: each thread decodes a batch and embeds it alone.

Why: a forward pass spread over every core loses time to its OpenMP barriers, and the decode
phase between two forward passes wakes every core for ~50 ms of work. Independent streams, one
per core, each single-threaded from file to feature, keep every core busy on its own batch.
Measured on 2 Sapphire Rapids cores (lite0, bf16, compiled, 500x375 JPEGs):

- forward pass alone: 243-251 img/s as one two-thread team (batch 16-64); 266-270 as two
  single-threaded streams of 8 images a call (125 and 196 at 64 a call, where the activations
  of two streams no longer fit the caches);
- end to end: 218-230 img/s in streams against 187-203 with the two phases alternating over
  both cores (:class:`featurepipe.embed._DecodeInThreads`).

The graph must be compiled for it (:class:`featurepipe.compiling.CompiledExtractor` with
``per_core=True``): kernels for one thread, and inductor's C++ wrapper, which runs the graph
with the GIL released (with the Python wrapper two streams convoy on the GIL: 140 img/s).
An eager forward pass holds the GIL between operators, so eager runs keep the alternating
threads.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch

#: Images per compiled call in a stream. Forward pass alone, two streams: 266-270 img/s at 8,
#: 261-270 at 16, 202-205 at 32, 196 at 64.
STREAM_CHUNK = 8

Batch = tuple[list[int], list[str], np.ndarray]


def empty_batch(n: int, input_size: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised ``(n, 3, H, W)`` batch laid out channels-last (the layout the forward
    pass runs in), for decoders to write crops into."""
    return torch.empty((n, *input_size, 3), dtype=dtype).permute(0, 3, 1, 2)


class _Decodes(Protocol):
    input_size: tuple[int, int]
    fill_dtype: torch.dtype

    def decode_into(self, k: int, out: torch.Tensor) -> tuple[int, str]: ...


class CoreStreams:
    """``(indices, reasons, features)`` per batch, from ``streams`` threads in completion order.

    Each thread takes the next batch of dataset positions, decodes it into its own uint8
    channels-last buffer (``dataset.decode_into``), and calls ``embed(x, reasons)`` for the
    features of the images that decoded. ``initializer`` runs first in each thread (the engine
    passes :func:`featurepipe.embed.run_ops_single_threaded`). The first exception of any
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
