"""One batch through the network: the model on its device, uint8 in, float32 features out."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from featurepipe.backbones import Backbone
from featurepipe.devices import autocast_context

__all__ = ["Forward", "NormalizedInput", "compile_for_streams", "forward_features",
           "forward_good", "prepare_model", "start_forward", "start_forward_good"]

#: A forward pass: the model's callable (a module or a compiled extractor).
Forward = Callable[[torch.Tensor], torch.Tensor]


class NormalizedInput(torch.nn.Module):
    """Normalise uint8 batches on the model's device, then run the extractor.

    Decoders send uint8 crops (:meth:`PreprocessSpec.decode_transform`); the conversion here is
    ``ToDtype(float32, scale=True)`` + ``Normalize`` of ``eval_transform``, the same operations
    in the same order, so features equal the per-image float path bit for bit. Float batches
    are taken as normalised already and pass straight through.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, extractor: torch.nn.Module, mean: Sequence[float], std: Sequence[float]
                 ) -> None:
        super().__init__()
        self.extractor = extractor
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.to(torch.float32).mul_(1.0 / 255).sub(self.mean).div_(self.std)
        return self.extractor(x)


def prepare_model(backbone: Backbone, device: torch.device) -> torch.nn.Module:
    """The extractor on its device, eval mode, channels_last (oneDNN / tensor cores like NHWC),
    taking uint8 or normalised float batches (:class:`NormalizedInput`)."""
    pre = backbone.preprocess
    model = NormalizedInput(backbone.extractor, pre.mean, pre.std).eval().to(device)
    return model.to(memory_format=torch.channels_last)


def start_forward(model: Forward, x: torch.Tensor, device: torch.device, precision: str
                  ) -> Callable[[], np.ndarray]:
    """Launch one batch's forward pass; the returned call waits for its float32 features.

    On a GPU the features come back by an asynchronous copy into pinned memory, so the caller
    can queue the next batch before it waits for this one: the GPU never idles while the host
    writes features or launches kernels. Elsewhere the work is done when this returns.
    """
    x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast_context(device, precision):
        out = model(x)
    if device.type != "cuda":
        feats = out.float().cpu().numpy()
        return lambda: feats
    host = torch.empty(out.shape, dtype=torch.float32, pin_memory=True)
    with torch.inference_mode():
        host.copy_(out, non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def finish() -> np.ndarray:
        done.synchronize()
        return host.numpy()

    return finish


def forward_features(model: Forward, x: torch.Tensor, device: torch.device, precision: str
                     ) -> torch.Tensor:
    """One batch through the extractor, returned as float32 on the CPU."""
    return torch.from_numpy(start_forward(model, x, device, precision)())


def start_forward_good(model: Forward, x: torch.Tensor, reasons: Sequence[str],
                       device: torch.device, precision: str) -> Callable[[], np.ndarray]:
    """:func:`forward_good`, launched: call the result for the features (:func:`start_forward`)."""
    good = [k for k, r in enumerate(reasons) if not r]
    if not good:
        return lambda: np.zeros((0, 0), dtype=np.float32)
    return start_forward(model, x if len(good) == len(reasons) else x[good], device, precision)


def forward_good(model: Forward, x: torch.Tensor, reasons: Sequence[str], device: torch.device,
                 precision: str) -> np.ndarray:
    """Features of the images that decoded; bad ones are left out of the batch (every runner)."""
    return start_forward_good(model, x, reasons, device, precision)()


def compile_for_streams(compiled: Forward, input_size: tuple[int, int], device: torch.device,
                        precision: str) -> None:
    """Compile before the streams start, in a thread set up like theirs: dynamo guards on the
    thread count, so a graph compiled in this thread would be compiled again in each stream."""
    from concurrent.futures import ThreadPoolExecutor

    from featurepipe.embedding.memory import run_ops_single_threaded

    x = torch.zeros(1, 3, *input_size, dtype=torch.uint8)
    with ThreadPoolExecutor(1, initializer=run_ops_single_threaded) as pool:
        pool.submit(forward_features, compiled, x, device, precision).result()
