"""Runner that decodes JPEGs on the GPU in batches (:mod:`featurepipe.gpu_decode`); other
files go through :class:`~featurepipe.embedding.pixels.Pixels` in the same batch."""

from __future__ import annotations

from collections.abc import Iterator

from featurepipe.embedding.memory import default_workers
from featurepipe.embedding.runners.base import Batch, Runner, Work, run_loader
from featurepipe.gpu_decode import GPUDecodeLoader

__all__ = ["RUNNER", "NvjpegRunner"]


class NvjpegRunner(Runner):
    """DataLoader processes read and vet the files; nvjpeg decodes each batch on the GPU."""

    name = "nvjpeg"

    def __init__(self) -> None:
        super().__init__()
        self.loader: GPUDecodeLoader | None = None  # kept for its decode counts (tests)

    def run(self, work: Work) -> Iterator[Batch]:
        model = self._model(work)
        source = work.pixels.source
        n = len(source)
        self.loader = GPUDecodeLoader(
            work.pixels, range(n), source.paths, [list(b) for b in work.batches],
            work.backbone.preprocess, work.pixels.policy.max_pixels, work.device,
            workers=default_workers(work.device) if work.workers is None else work.workers)
        yield from run_loader(self.loader, model, work)


RUNNER = NvjpegRunner
