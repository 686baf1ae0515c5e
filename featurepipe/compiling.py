"""Optional ``torch.compile`` of the feature extractor for long embedding runs.

Why: eager mode runs every operator as its own pass over memory and, under autocast, re-casts
each weight on every call. Inductor fuses the element-wise tails into the convolutions' loops.
Measured on efficientnet_lite0, 224 px, batch 64, real photos, 2 Sapphire Rapids cores: forward
pass alone 75 -> 92 img/s under bf16 autocast, 34 -> 70 img/s in fp32 (with ``freezing``); end to
end from JPEG files under bf16, 70.8 -> 99.0 img/s once compiled, for a one-off compile of 29 s
on a cold inductor cache (``benchmarks/results/throughput-cpu.md``; less when inductor's on-disk
cache already holds the graph).

``freezing`` (BatchNorm folded into the convolutions, weights pre-packed) is used under fp32
only. Under bf16 it was faster still (147 img/s) but folding BatchNorm into bf16 convolutions
moves the residual stream from fp32 to bf16: min cosine to fp32 features fell from 0.994 to 0.961
on 3,072 photos, below the 0.99 the engine promises. So it is not used there.

``"auto"`` compiles only where that pays and where nothing changes but speed:

- on CPU (the GPU path is not measured here yet; ask with ``"on"``);
- under bf16/fp16 autocast: ``fp32`` stays the exact, eager mode unless asked (``"on"``);
- for at least :data:`AUTO_MIN_IMAGES` images (in 224x224 equivalents) to compute: a cached or
  small rerun never waits for a compile;
- when a C++ compiler is on ``PATH`` (inductor's CPU backend needs one).

Compiled features differ from eager ones at the rounding level of the precision (bf16: min
cosine 0.9998 between the two); the store key does not change (like the device, the kernel
choice is provenance, recorded in the entry's ``compiled`` attribute). Batches are padded to the
full batch size so one graph serves the whole run (the short last batch and batches with skipped
files do not recompile). Any compile error falls back to eager with a
:class:`~featurepipe.exceptions.FeaturePipeWarning`: a long run never dies for an optimisation.
"""

from __future__ import annotations

import shutil
import time
import warnings
from typing import Any

import torch
from torch import nn

from featurepipe.exceptions import ConfigError, FeaturePipeWarning

COMPILE_CHOICES = ("auto", "on", "off")
#: ``auto`` compiles when at least this many 224x224 images' worth of pixels are to be computed
#: (6,000 at 224 px, 33,000 at 96 px): at 70.8 -> 99.0 img/s end to end (bf16, 2 cores), a cold
#: 29 s compile pays from about 7,200 images and a warm ~8 s one from about 2,000.
AUTO_MIN_IMAGES = 6000


def check_choice(choice: str) -> None:
    """Refuse anything but ``auto``, ``on`` and ``off``, naming the value."""
    if choice not in COMPILE_CHOICES:
        raise ConfigError(f"compile must be one of {', '.join(COMPILE_CHOICES)}; got {choice!r}")


def has_cxx_compiler() -> bool:
    """Inductor's CPU backend builds C++ kernels; without a compiler it cannot run."""
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def should_compile(choice: str, device: torch.device, precision: str, n_images: int,
                   input_size: tuple[int, int] = (224, 224)) -> bool:
    """Resolve ``"auto" | "on" | "off"`` for one run (see the module docstring for the rules)."""
    check_choice(choice)
    if choice != "auto":
        return choice == "on"
    work = n_images * input_size[0] * input_size[1] / (224 * 224)
    return (device.type == "cpu" and precision != "fp32" and work >= AUTO_MIN_IMAGES
            and has_cxx_compiler())


class CompiledExtractor:
    """Calls a compiled copy of ``model`` on batches padded to ``batch_size``; eager on failure.

    Called like the module it wraps (inside the caller's ``inference_mode`` and autocast). Every
    batch is copied into one reused channels_last buffer, so the compiled graph always sees the
    same shape, layout and tensor kind (an inference tensor and a normal one are two graphs).
    """

    def __init__(self, model: nn.Module, batch_size: int, freeze: bool = False) -> None:
        self.eager = model
        self.batch_size = batch_size
        self.freeze = freeze
        self.compiled: Any = torch.compile(model, dynamic=False)
        self.failed: str | None = None
        self.compile_seconds = 0.0  # wall time of the first call (compile + one batch)
        self._buffer: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        """False once a compile error sent the run back to eager."""
        return self.failed is None

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        shape = (self.batch_size, *x.shape[1:])
        buf = self._buffer
        if buf is None or buf.shape != shape or buf.dtype != x.dtype or buf.device != x.device:
            buf = torch.zeros(shape, dtype=x.dtype, device=x.device).contiguous(
                memory_format=torch.channels_last)
            self._buffer = buf
        n = x.shape[0]
        buf[:n].copy_(x)
        buf[n:].zero_()
        return buf

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.failed is not None or x.ndim != 4 or x.shape[0] > self.batch_size:
            return self.eager(x)
        import torch._inductor.config as inductor_config

        n = x.shape[0]
        first = not self.compile_seconds
        t0 = time.perf_counter()
        try:
            # freezing is read when the graph compiles, on the first call; passed as
            # torch.compile(options=...) it was measured slower (128 vs 178 img/s, bf16), so the
            # global switch is patched around each call.
            with inductor_config.patch(freezing=self.freeze):
                out = self.compiled(self._padded(x))[:n].clone()
        except Exception as exc:  # noqa: BLE001 - any backend failure: fall back, keep going
            return self._fall_back(exc, x)
        if first:
            self.compile_seconds = time.perf_counter() - t0
        return out

    def _fall_back(self, exc: Exception, x: torch.Tensor) -> torch.Tensor:
        first = str(exc).splitlines()[0] if str(exc) else ""
        self.failed = f"{type(exc).__name__}: {first}"
        warnings.warn(f"torch.compile failed ({self.failed[:300]}); embedding continues "
                      "without it (--compile off hides this)", FeaturePipeWarning, stacklevel=3)
        return self.eager(x)

