"""Runner with DataLoader worker processes decoding ahead of the forward pass (GPUs, or
``workers=N`` on a CPU)."""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import DataLoader

from featurepipe.embedding.memory import default_workers
from featurepipe.embedding.pixels import collate
from featurepipe.embedding.runners.base import Batch, Runner, Work, run_loader

__all__ = ["RUNNER", "ProcessesRunner"]


class ProcessesRunner(Runner):
    """``workers`` DataLoader processes (default :func:`default_workers`) feed one batch in
    flight; on a GPU the next batch decodes while the current one computes."""

    name = "processes"

    def run(self, work: Work) -> Iterator[Batch]:
        model = self._model(work)
        n = default_workers(work.device) if work.workers is None else work.workers
        loader = DataLoader(work.pixels, batch_sampler=[list(b) for b in work.batches],
                            num_workers=n, collate_fn=collate,
                            pin_memory=work.device.type == "cuda", persistent_workers=False,
                            prefetch_factor=4 if n else None)
        yield from run_loader(loader, model, work)


RUNNER = ProcessesRunner
