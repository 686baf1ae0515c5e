"""Runner that decodes JPEGs on the GPU in batches (:mod:`featurepipe.gpu_decode`); other
files go through :class:`~featurepipe.embedding.pixels.Pixels` in the same batch."""

from __future__ import annotations

from collections.abc import Iterator

from featurepipe.embedding import worker_guard
from featurepipe.embedding.runners.base import Batch, Runner, Work, run_loader
from featurepipe.embedding.runners.processes import workers_that_fit
from featurepipe.gpu_decode import GPUDecodeLoader

__all__ = ["RUNNER", "NvjpegRunner"]


class NvjpegRunner(Runner):
    """DataLoader processes read and vet the files; nvjpeg decodes each batch on the GPU."""

    name = "nvjpeg"

    def __init__(self, timeout: float = worker_guard.WORKER_TIMEOUT_S) -> None:
        super().__init__()
        self.loader: GPUDecodeLoader | None = None  # kept for its decode counts (tests)
        self.timeout = timeout

    def run(self, work: Work) -> Iterator[Batch]:
        # Workers pass file bytes, or crops of the files nvjpeg cannot take: the crop estimate
        # of the shared memory they need is a lower bound here, which still catches a tiny one.
        workers = workers_that_fit(work)
        model = self._model(work)
        source = work.pixels.source
        n = len(source)
        self.loader = GPUDecodeLoader(
            work.pixels, range(n), source.paths, [list(b) for b in work.batches],
            work.backbone.preprocess, work.pixels.policy.max_pixels, work.device,
            workers=workers, timeout=self.timeout)
        batches = run_loader(self.loader, model, work)
        yield from worker_guard.one_line_failures(batches, self.timeout)


RUNNER = NvjpegRunner
