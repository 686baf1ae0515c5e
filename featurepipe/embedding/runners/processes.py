"""Runner with DataLoader worker processes decoding ahead of the forward pass (GPUs, or
``workers=N`` on a CPU)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

from torch.utils.data import DataLoader

from featurepipe.embedding import worker_guard
from featurepipe.embedding.memory import default_workers
from featurepipe.embedding.pixels import collate
from featurepipe.embedding.runners.base import Batch, Runner, Work, run_loader
from featurepipe.exceptions import FeaturePipeWarning

__all__ = ["RUNNER", "ProcessesRunner", "workers_that_fit"]


class ProcessesRunner(Runner):
    """``workers`` DataLoader processes (default :func:`default_workers`) feed one batch in
    flight; on a GPU the next batch decodes while the current one computes.

    Before any worker starts, the batches they may hold at once are checked against the free
    shared memory (:func:`~featurepipe.embedding.worker_guard.check_shared_memory`), and no
    batch is waited for longer than ``timeout`` seconds, so a worker that dies or loses a
    batch ends the run with one line instead of a hang.
    """

    name = "processes"

    def __init__(self, timeout: float = worker_guard.WORKER_TIMEOUT_S) -> None:
        super().__init__()
        self.timeout = timeout

    def run(self, work: Work) -> Iterator[Batch]:
        n = workers_that_fit(work)
        model = self._model(work)
        loader = DataLoader(work.pixels, batch_sampler=[list(b) for b in work.batches],
                            num_workers=n, collate_fn=collate,
                            pin_memory=work.device.type == "cuda", persistent_workers=False,
                            prefetch_factor=worker_guard.PREFETCH if n else None,
                            timeout=self.timeout if n else 0)
        yield from worker_guard.one_line_failures(run_loader(loader, model, work), self.timeout)


def workers_that_fit(work: Work) -> int:
    """The decode processes for ``work``: as asked (refused when their batches cannot fit in
    shared memory), or the default lowered to what fits, with a warning."""
    default = default_workers(work.device)
    asked = work.workers if work.workers is not None else default
    n = worker_guard.check_shared_memory(
        asked, [len(b) for b in work.batches], work.pixels.input_size,
        device_type=work.device.type, asked=work.workers is not None)
    if n < asked:
        warnings.warn(f"decoding with {n} worker process(es) instead of {asked}: "
                      f"{worker_guard.SHM_PATH} has too little free space for more",
                      FeaturePipeWarning, stacklevel=2)
    return n


RUNNER = ProcessesRunner
