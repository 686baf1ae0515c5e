"""Eager CPU runner: a thread pool decodes each batch, then the forward pass runs on every core.

On a CPU the forward pass already uses every core; decode worker processes would fight it for
them. Here the cores decode a batch together, then run its forward pass together, so the phases
alternate instead of contending (measured in ``benchmarks/results/throughput-cpu-8k.md``). Each
thread writes its crops straight into the batch and runs torch's ops alone.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator, Sequence

import torch

from featurepipe.embedding.memory import run_ops_single_threaded
from featurepipe.embedding.pixels import Pixels, empty_batch
from featurepipe.embedding.runners.base import Batch, Runner, Work, run_loader

__all__ = ["RUNNER", "DecodeInThreads", "ThreadsRunner"]


class DecodeInThreads:
    """``(indices, uint8 batch, reasons)`` per batch, decoded by ``threads`` threads."""

    def __init__(self, pixels: Pixels, batches: Sequence[Sequence[int]], threads: int) -> None:
        self.pixels, self.batches, self.threads = pixels, batches, max(1, threads)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[list[int], torch.Tensor, list[str]]]:
        from concurrent.futures import ThreadPoolExecutor

        px = self.pixels
        with ThreadPoolExecutor(self.threads, thread_name_prefix="featurepipe-decode",
                                initializer=run_ops_single_threaded) as pool:
            for batch in self.batches:
                # Each thread writes its crops into the batch: no per-image tensor, no stack.
                x = empty_batch(len(batch), px.input_size, px.fill_dtype)
                todo: queue.SimpleQueue[int] = queue.SimpleQueue()
                for j in range(len(batch)):
                    todo.put(j)
                done: list[tuple[int, str]] = [(-1, "")] * len(batch)
                for task in [pool.submit(self._drain, todo, batch, x, done)
                             for _ in range(self.threads)]:
                    task.result()
                yield [i for i, _ in done], x, [r for _, r in done]

    def _drain(self, todo: queue.SimpleQueue[int], batch: Sequence[int], x: torch.Tensor,
               done: list[tuple[int, str]]) -> None:
        """Decode the batch's next image until none is left: one task per thread and batch,
        not one per image (whose futures and wake-ups would hold the GIL)."""
        while True:
            try:
                j = todo.get_nowait()
            except queue.Empty:
                return
            done[j] = self.pixels.decode_into(batch[j], x[j])


class ThreadsRunner(Runner):
    """Decode threads in this process alternating with the forward pass (the eager CPU default)."""

    name = "threads"

    def run(self, work: Work) -> Iterator[Batch]:
        model = self._model(work)
        loader = DecodeInThreads(work.pixels, work.batches, torch.get_num_threads())
        yield from run_loader(loader, model, work)


RUNNER = ThreadsRunner
