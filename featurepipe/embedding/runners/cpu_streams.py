"""Compiled CPU runner: one stream per core, each decoding a batch and embedding it alone
(:class:`featurepipe.cpu_streams.CoreStreams`). The graph is compiled once, before the streams
start, for one thread and with inductor's C++ wrapper (GIL released); if that compile fails the
run goes on with decode threads and the eager network."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from featurepipe.cpu_streams import STREAM_CHUNK, CoreStreams
from featurepipe.embedding.forward import compile_for_streams, forward_good
from featurepipe.embedding.memory import run_ops_single_threaded
from featurepipe.embedding.runners.base import Batch, Runner, Work, run_loader
from featurepipe.embedding.runners.threads import DecodeInThreads

__all__ = ["RUNNER", "CpuStreamsRunner"]


class CpuStreamsRunner(Runner):
    """``torch.get_num_threads()`` streams over a graph compiled for one core."""

    name = "cpu-streams"

    def __init__(self) -> None:
        super().__init__()
        self.n_streams = 0  # streams of the last run (0: it fell back to decode threads)

    def run(self, work: Work) -> Iterator[Batch]:
        model = self._model(work, STREAM_CHUNK, per_core=True)
        pre = work.backbone.preprocess
        if self._compiled is not None:
            work.status("compiling, once")
            compile_for_streams(self._compiled, pre.input_size, work.device, work.precision)
            work.status("")
        if self._compiled is None or not self._compiled.active:
            loader = DecodeInThreads(work.pixels, work.batches, torch.get_num_threads())
            yield from run_loader(loader, model, work)
            return
        dev, precision = work.device, work.precision
        self.n_streams = torch.get_num_threads()
        yield from self.streams(
            work.pixels, work.batches,
            lambda x, reasons: forward_good(model, x, reasons, dev, precision), self.n_streams)

    def streams(self, pixels: Any, batches: Sequence[Sequence[int]],
                embed: Callable[[torch.Tensor, list[str]], np.ndarray], n: int
                ) -> Iterable[Batch]:
        """The streams over ``batches`` (a subclass may wrap ``pixels`` or ``embed``, e.g. to
        time them: ``benchmarks/stream_breakdown.py``)."""
        return CoreStreams(pixels, batches, embed, n, initializer=run_ops_single_threaded)


RUNNER = CpuStreamsRunner
