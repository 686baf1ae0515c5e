"""The runner interface: decode and embed planned batches, one ``(indices, reasons, features)``
tuple per batch, in any order.

A runner owns how batches are decoded and pushed through the network (threads, processes, one
stream per core, nvjpeg, a Ray cluster); it never plans, writes or commits. What it did
(compiled or not, on which device) is returned by :meth:`Runner.provenance` for the driver to
pass to the commit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from featurepipe.backbones import Backbone
from featurepipe.compiling import CompiledExtractor
from featurepipe.embedding.forward import Forward, prepare_model, start_forward_good
from featurepipe.embedding.pixels import Pixels

__all__ = ["Batch", "Provenance", "Runner", "Work", "run_loader"]

#: One finished batch: source indices, reasons ("" = decoded), features of the good ones.
Batch = tuple[list[int], list[str], np.ndarray]


@dataclass(frozen=True)
class Work:
    """What a runner computes: the planned batches of source indices and how to embed them."""

    pixels: Pixels
    batches: Sequence[Sequence[int]]
    backbone: Backbone
    device: torch.device
    precision: str
    batch_size: int
    workers: int | None = None
    compile: bool = False
    status: Callable[[str], None] = field(default=lambda _text: None, compare=False)


@dataclass(frozen=True)
class Provenance:
    """How features were made; recorded with the entry, never part of its key."""

    runner: str
    device: str
    compiled: bool = False
    compile_seconds: float = 0.0

    def store_attrs(self) -> dict[str, Any]:
        """The entry attributes a commit records (the same names stores always had)."""
        return {"compiled": self.compiled, "device": self.device}


class Runner(ABC):
    """Decode + forward for planned batches. Subclasses set :attr:`name` and :meth:`run`."""

    name: ClassVar[str] = "runner"

    def __init__(self) -> None:
        self._compiled: CompiledExtractor | None = None
        self._device = "cpu"

    @abstractmethod
    def run(self, work: Work) -> Iterator[Batch]:
        """Yield every batch of ``work`` once, each with its own features."""

    def provenance(self) -> Provenance:
        """What the last :meth:`run` did (read once its iterator is exhausted)."""
        compiled = self._compiled is not None and self._compiled.active
        return Provenance(self.name, self._device, compiled,
                          self._compiled.compile_seconds if compiled and self._compiled else 0.0)

    def _model(self, work: Work, batch_size: int | None = None, per_core: bool = False
               ) -> Forward:
        """The network for ``work``, compiled when the work asks for it."""
        self._device = str(work.device)
        module = prepare_model(work.backbone, work.device)
        if not work.compile:
            self._compiled = None
            return module
        self._compiled = CompiledExtractor(module, batch_size or work.batch_size, work.device,
                                           work.precision, per_core=per_core)
        return self._compiled


def run_loader(loader: Iterable[tuple[list[int], torch.Tensor, list[str]]], model: Forward,
               work: Work) -> Iterator[Batch]:
    """The decode -> forward loop of every loader-based runner, one batch in flight: launch
    batch n, then collect batch n-1 while a GPU works."""
    in_flight: tuple[list[int], list[str], Callable[[], np.ndarray]] | None = None
    for idx, x, reasons in loader:
        launched = start_forward_good(model, x, reasons, work.device, work.precision)
        if in_flight is not None:
            yield in_flight[0], in_flight[1], in_flight[2]()
        in_flight = (idx, reasons, launched)
    if in_flight is not None:
        yield in_flight[0], in_flight[1], in_flight[2]()
