"""Optional ``torch.compile`` of the feature extractor for long embedding runs.

Why: eager mode runs every operator as its own pass over memory and, under autocast, re-casts
each weight on every call. Inductor fuses the element-wise tails into the convolutions' loops,
and on a CPU ``freezing`` (below) folds and pre-packs the weights; the compiled run goes one
stream per core (:mod:`featurepipe.cpu_streams`). Speeds and compile times are measured in
``benchmarks/results/throughput-cpu-8k.md`` (summary in ``docs/performance.md``).

On a CPU the graph is compiled with inductor's ``freezing``: BatchNorm folded into the
convolutions, weights pre-packed for oneDNN, conv + activation + residual fused. Folding a
BatchNorm into a *depthwise* convolution is the one step bf16 cannot take: those 3x3 filters
sum 9 terms and their BatchNorm scales are large (efficientnet_lite0), so the folded bf16
weights lose enough precision that features drift visibly from fp32 (a folded fp32 depthwise
conv does not). :func:`depthwise_norms_in_fp32` therefore runs each BatchNorm that follows a
grouped convolution in fp32, outside autocast, on the convolution's bf16 output: inductor cannot
fold across that cast, and every other convolution still folds; features then agree with eager
bf16 as closely as eager bf16 agrees with fp32 (``docs/performance.md``).

``"auto"`` compiles only where that pays and where nothing changes but speed:

- on CPU (the GPU path has no measurement yet; ask with ``"on"``);
- under bf16/fp16 autocast: ``fp32`` stays the exact, eager mode unless asked (``"on"``);
- for at least :data:`AUTO_MIN_IMAGES` images (in 224x224 equivalents) to compute: a cached or
  small rerun never waits for a compile;
- when a C++ compiler is on ``PATH`` (inductor's CPU backend needs one).

Compiled features differ from eager ones at the rounding level of the precision; the store key
does not change (like the device, the kernel choice is provenance, recorded in the entry's
``compiled`` attribute). Batches are padded to the compiled batch size, and larger ones run in
chunks of it, so one graph serves the whole run (the short last batch and batches with skipped
files do not recompile). On CPU the engine compiles for one stream per core
(:mod:`featurepipe.cpu_streams`). Any compile error falls back to eager with a
:class:`~featurepipe.exceptions.FeaturePipeWarning`: a long run never dies for an optimisation.
"""

from __future__ import annotations

import copy
import shutil
import threading
import time
import warnings
from typing import Any

import torch
from torch import nn

from featurepipe.exceptions import ConfigError, FeaturePipeWarning

__all__ = [
    "AUTO_MIN_IMAGES",
    "COMPILE_CHOICES",
    "CompiledExtractor",
    "check_choice",
    "depthwise_norms_in_fp32",
    "has_cxx_compiler",
    "should_compile",
]

COMPILE_CHOICES = ("auto", "on", "off")
#: ``auto`` compiles when at least this many 224x224 images' worth of pixels are to be computed:
#: about where a cold compile has paid for itself in the measured end-to-end speed-up
#: (``benchmarks/results/throughput-cpu-8k.md``, ``docs/performance.md``).
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


class _Fp32Norm(nn.Module):
    """Runs the wrapped norm in fp32 with autocast off (see the module docstring for why)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.norm(x.float())


def depthwise_norms_in_fp32(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose BatchNorms that follow a grouped convolution run in fp32.

    "Follow" means the next sibling module (timm's ``conv_dw``/``bn2``, torchvision's
    ``Conv2dNormActivation``). In fp32 the copy computes exactly what the original does; the
    original is returned as is when there is nothing to wrap (resnets).
    """
    def pairs(root: nn.Module) -> list[tuple[nn.Module, str]]:
        found = []
        for parent in root.modules():
            kids = list(parent.named_children())
            for (_, conv), (name, norm) in zip(kids, kids[1:], strict=False):
                if (isinstance(conv, nn.Conv2d) and conv.groups > 1
                        and isinstance(norm, nn.modules.batchnorm._BatchNorm)):
                    found.append((parent, name))
        return found

    if not pairs(model):
        return model
    model = copy.deepcopy(model)
    for parent, name in pairs(model):
        setattr(parent, name, _Fp32Norm(getattr(parent, name)))
    return model


class CompiledExtractor:
    """Calls a compiled copy of ``model`` on chunks of ``batch_size`` images; eager on failure.

    Called like the module it wraps (inside the caller's ``inference_mode`` and autocast). Every
    chunk is copied into a reused channels_last buffer (one per calling thread), so the compiled
    graph always sees the same shape, layout and tensor kind (an inference tensor and a normal
    one are two graphs); a larger batch is run chunk by chunk.

    ``per_core``: compile for callers that each run alone on one core
    (:class:`featurepipe.cpu_streams.CoreStreams`): inductor's C++ kernels are generated for one
    thread (``cpp.threads=1``), and its C++ wrapper (``cpp_wrapper``) runs the whole graph with
    the GIL released. With the default Python wrapper the graph holds the GIL between kernels,
    so two threads running it side by side barely beat one (``docs/performance.md``).

    Thread-safe once compiled: the first call compiles under a lock, with inductor's config
    patched for that call only (the settings are read when the graph compiles).
    """

    def __init__(self, model: nn.Module, batch_size: int, device: torch.device | None = None,
                 precision: str = "fp32", per_core: bool = False) -> None:
        t0 = time.perf_counter()
        self.eager = model
        self.batch_size = batch_size
        self.freeze = (device or torch.device("cpu")).type == "cpu"  # GPU freezing: not measured
        self.per_core = per_core and self.freeze
        if self.freeze and precision != "fp32":
            model = depthwise_norms_in_fp32(model)
        self.compiled: Any = torch.compile(model, dynamic=False)  # imports dynamo (slow, cold)
        self.failed: str | None = None
        # Wall time of this setup plus the first call (compile + one batch).
        self._setup_seconds = time.perf_counter() - t0
        self.compile_seconds = 0.0
        self._compile_lock = threading.Lock()
        self._local = threading.local()

    @property
    def active(self) -> bool:
        """False once a compile error sent the run back to eager."""
        return self.failed is None

    def inductor_options(self) -> dict[str, Any]:
        """The inductor settings this graph is compiled with.

        ``freezing`` (CPU) measured faster as the global switch than as
        ``torch.compile(options=...)`` (``docs/performance.md``), hence a patch of the config.
        """
        options: dict[str, Any] = {"freezing": self.freeze}
        if self.per_core:
            options.update({"cpp.threads": 1, "cpp_wrapper": True})
        return options

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        shape = (self.batch_size, *x.shape[1:])
        buf = getattr(self._local, "buffer", None)
        if buf is None or buf.shape != shape or buf.dtype != x.dtype or buf.device != x.device:
            buf = torch.zeros(shape, dtype=x.dtype, device=x.device).contiguous(
                memory_format=torch.channels_last)
            self._local.buffer = buf
        n = x.shape[0]
        buf[:n].copy_(x)
        buf[n:].zero_()
        return buf

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.failed is not None or x.ndim != 4:
            return self.eager(x)
        if x.shape[0] > self.batch_size:
            step = self.batch_size
            return torch.cat([self(x[s:s + step]) for s in range(0, x.shape[0], step)])
        if not self.compile_seconds:
            with self._compile_lock:
                if not self.compile_seconds and self.failed is None:
                    return self._first_call(x)
            if self.failed is not None:
                return self.eager(x)
        return self.compiled(self._padded(x))[:x.shape[0]].clone()

    def _first_call(self, x: torch.Tensor) -> torch.Tensor:
        """Compile (the first call does) under this graph's inductor settings."""
        import torch._inductor.config as inductor_config

        t0 = time.perf_counter()
        try:
            with inductor_config.patch(self.inductor_options()):
                out = self.compiled(self._padded(x))[:x.shape[0]].clone()
        except Exception as exc:  # noqa: BLE001 - any backend failure: fall back, keep going
            return self._fall_back(exc, x)
        self.compile_seconds = self._setup_seconds + time.perf_counter() - t0
        return out

    def _fall_back(self, exc: Exception, x: torch.Tensor) -> torch.Tensor:
        first = str(exc).splitlines()[0] if str(exc) else ""
        self.failed = f"{type(exc).__name__}: {first}"
        warnings.warn(f"torch.compile failed ({self.failed[:300]}); embedding continues "
                      "without it (--compile off hides this)", FeaturePipeWarning, stacklevel=3)
        return self.eager(x)
