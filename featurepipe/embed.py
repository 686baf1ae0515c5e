"""Local embedding engine: batched DataLoader -> backbone -> feature store.

Only what the store does not already hold is computed. Work is cut into deterministic shards
(fixed slices of the plan, batches never cross a shard), each written atomically as it completes,
so a killed run resumes where it stopped and ends with the rows of an uninterrupted run
(bit-identical under fp32; under bf16 when both runs pick the same kernels, see
:mod:`featurepipe.compiling`).
"""

from __future__ import annotations

import hashlib
import os
import platform
import queue
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cache, lru_cache
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from featurepipe.backbones import (
    Backbone,
    BackboneDescription,
    BackboneSpec,
    describe_backbone,
    load_backbone,
    resolve_spec,
)
from featurepipe.backbones._spec import ResizeCenterCrop
from featurepipe.compiling import CompiledExtractor, check_choice, should_compile
from featurepipe.cpu_streams import STREAM_CHUNK, CoreStreams, empty_batch
from featurepipe.decode import DecodePolicy
from featurepipe.devices import (  # noqa: F401 - re-exported: engine callers use these names
    PRECISIONS,
    autocast_context,
    cpu_has_native_bf16,
    resolve_device,
    resolve_precision,
)
from featurepipe.exceptions import ConfigError, DecodeError, SpecMismatchError
from featurepipe.gpu_decode import GPUDecodeLoader, check_decoder
from featurepipe.sources import ImageSource, open_source
from featurepipe.store import FEATURE_FORMAT_VERSION, FeatureStore, StoreWriter, entry_key

FEATURE_DTYPES = ("float16", "float32")
ON_ERROR = ("skip", "raise")


@dataclass
class EmbedReport:
    """What one `embed` call did; printed by the CLI, returned to Python callers.

    ``n_computed`` images were embedded by this call, ``n_reused`` rows copied from the
    committed entry, and ``n_resumed`` images taken from the shards an interrupted run left on
    disk (computed then, committed now).
    """

    store: str
    key: str
    backbone: str
    n_total: int
    n_rows: int
    n_computed: int
    n_reused: int
    n_skipped: int
    n_dropped: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0
    device: str = "cpu"
    precision: str = "fp32"
    compiled: bool = False
    compile_seconds: float = 0.0
    n_resumed: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["skipped"] = [{"id": i, "reason": r} for i, r in self.skipped]
        return d


# --------------------------------------------------------------------------- memory


def release_free_heap() -> bool:
    """Hand the allocator's free pages back to the OS (``malloc_trim``; glibc only).

    Called after every shard. glibc keeps freed activation buffers in its heap, which fragments:
    measured on 5,600 images (lite0, batch 64), RSS climbed 1.15 -> 1.9 GB with nothing done.
    An earlier fix pinned the mmap threshold instead, so every large buffer was a fresh mmap;
    that bounded memory but page-faulted on every batch and cost a quarter of the forward speed
    (149 -> 112 img/s compiled). A trim runs once per shard (~1,000 images): about 15 ms, plus
    the freed pages faulting in again (with no trim, 2,048 photos embedded 1-2% faster; with
    one stream per core, 8,192 photos: 28 faults per image with it, none without, 224 against
    226 img/s); peak RSS grew 45 MB from 2,000 to 20,000 images with it
    (``benchmarks/results/memory.md``).
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim(0)
    return True


#: glibc ``mallopt`` parameters, and the values featurepipe sets on CPU: a 1 GiB mmap and trim
#: threshold (every activation of a batch comes from the heap and stays there), and a top pad
#: of one whole per-thread heap (64 MiB, glibc's ``HEAP_MAX_SIZE`` on 64-bit).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_HEAP_THRESHOLD = 1 << 30
_THREAD_HEAP_SIZE = 64 << 20


@lru_cache(maxsize=1)
def keep_buffers_in_heap() -> bool:
    """Serve large CPU buffers from malloc's heap, not fresh mmaps (glibc; once per process).

    glibc maps every allocation above its mmap threshold (adaptive, at most 32 MiB) afresh
    and unmaps it when it is freed, so a batch's large activations page-fault in again on
    every batch: measured 2,500 minor page faults per image for lite0 at batch 64 (compiled,
    bf16, 2 cores), where the forward pass alone ran at 140 img/s; from the heap, with no page
    faults, at 221. Freed memory stays in the heap until the trim after each shard
    (:func:`release_free_heap`), which keeps peak RSS flat over long runs
    (``benchmarks/results/memory.md``).

    Threads other than the main one (the CPU streams, decode threads) allocate from arenas
    made of 64 MiB heaps, and glibc unmaps such a heap as soon as all of it is free, whatever
    the trim threshold; a stream whose activations straddle two heaps then faults the second
    one in again on every call. It depended on the process's history: lite0 streams ran
    some runs at 390-770 faults per image and a forward pass 8-15% slower, others at 22
    (``benchmarks/stream_breakdown.py``); strace counted 96 heaps made in one 2,048-image
    run. A top pad of a whole heap keeps them (5 heaps in the same run, 22-30 faults per
    image in every run). It only reserves address space: pages are used when touched.

    Process-wide and not undone (glibc cannot restore its adaptive threshold).
    ``FEATUREPIPE_MALLOC=default`` in the environment skips it.
    """
    if os.environ.get("FEATUREPIPE_MALLOC", "").lower() == "default":
        return False
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_THRESHOLD) == 1
    ok = libc.mallopt(_M_TOP_PAD, _THREAD_HEAP_SIZE) == 1 and ok
    # Without this, freeing the heap's top buffer would hand it back (and fault it in again).
    return libc.mallopt(_M_TRIM_THRESHOLD, _HEAP_THRESHOLD) == 1 and ok


def run_ops_single_threaded() -> None:
    """Make torch run this thread's CPU ops on this thread alone (a decode thread's initializer).

    By default each thread that calls a parallel torch op (the crop's resize and copy) leads an
    OpenMP team as wide as the machine, so two decode threads on two cores run four threads.
    The setting is OpenMP's per-thread one, in the libgomp torch ships: the forward pass in the
    main thread keeps its team. Where that library is not there, nothing changes.
    """
    omp = _torch_libgomp()
    if omp is not None and hasattr(omp, "omp_set_num_threads"):
        torch.get_num_threads()  # torch's own per-thread set-up first, or it would undo this
        omp.omp_set_num_threads(1)


def _torch_libgomp() -> Any:
    """The OpenMP runtime torch's Linux wheels ship and run on (None elsewhere)."""
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")
    return _shared_library(path) if os.path.exists(path) else None


def _libc() -> Any:
    return _shared_library("libc.so.6") if sys.platform == "linux" else None


@cache
def _shared_library(name: str) -> Any:
    """A ctypes handle of an already loaded or loadable shared library, or None."""
    try:
        import ctypes

        return ctypes.CDLL(name)
    except OSError:
        return None


def default_workers(device: torch.device) -> int:
    """Decode worker processes: leave the cores to the forward pass on CPU, feed the GPU
    generously. (The embedding engine's CPU default is :class:`_DecodeInThreads` instead.)"""
    cores = os.cpu_count() or 1
    if device.type == "cpu":
        return max(0, min(4, cores // 2))
    return max(1, min(32, cores - 1))


# --------------------------------------------------------------------------- key and attrs


def key_parts(backbone: Backbone | BackboneDescription, policy: DecodePolicy, precision: str,
              dtype: str, decoder: str = "pil") -> dict:
    """Everything that changes a feature value; hashed into the store's entry key.

    ``decoder`` enters only when it is not the default Pillow path, so existing keys stay valid.
    """
    extra = {} if decoder == "pil" else {"decoder": decoder}
    return {**extra,
        "backbone": backbone.spec.name,
        "spec": backbone.spec.to_dict(),
        "weights_sha256": backbone.weights_sha256,
        "layer": backbone.spec.layer,
        "preprocess": backbone.preprocess.to_dict(),
        "decode_policy": policy.to_dict(),
        "dtype": dtype,
        "precision": precision,
        "feature_format_version": FEATURE_FORMAT_VERSION,
    }


def library_versions() -> dict[str, str]:
    """Versions recorded with every store entry (read from package metadata: no heavy imports)."""
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for dist in ("featurepipe", "torch", "torchvision", "timm", "numpy", "h5py", "pillow",
                 "scikit-learn"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def store_attrs(parts: dict, dim: int | None, device: torch.device) -> dict:
    """Readable attributes for the store entry: the key's parts plus provenance."""
    return {
        **parts,
        "dim": dim,
        "device": str(device),
        "versions": library_versions(),
    }


def refuse_other_specs(fs: FeatureStore, key: str, parts: dict) -> None:
    """Stop when the store was built with another spec, naming what differs."""
    if not fs.exists():
        return
    for other in fs.keys():
        if other == key:
            continue
        theirs = fs.attrs(other)
        differs = [name for name, value in parts.items()
                   if _canonical(theirs.get(name)) != _canonical(value)]
        raise SpecMismatchError(
            f"{fs.path} holds features made with another spec (backbone "
            f"{theirs.get('backbone', '?')}; differs in: {', '.join(differs) or 'key'}); "
            "use --replace to recompute, --add-entry to keep both, or another --out")


def _canonical(value: Any) -> str:
    import json

    return json.dumps(value, sort_keys=True, default=str)


# --------------------------------------------------------------------------- data loading


class _SourceDataset(Dataset):
    """Decodes and preprocesses one sample; a bad file becomes a zero tensor plus a reason.

    Samples are decoded to uint8 tensors (:meth:`ImageSource.load_tensor`: plain JPEGs skip
    Pillow), so ``transform`` takes tensors, as ``decode_transform`` and ``eval_transform`` do.
    The zero tensor has ``fill_dtype`` so that it stacks with the good ones (uint8 for the
    embedding engines' :meth:`~PreprocessSpec.decode_transform`, float32 for ``eval_transform``).
    """

    def __init__(
        self,
        source: ImageSource,
        indices: Sequence[int],
        transform: Callable,
        policy: DecodePolicy,
        input_size: tuple[int, int],
        target_size: int | None,
        fill_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.source = source
        self.fill_dtype = fill_dtype
        self.indices = list(indices)
        self.transform = transform
        self.policy = policy
        self.input_size = input_size
        self.target_size = target_size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[int, torch.Tensor, str]:
        i, crop, reason = self._guarded(k, self.transform)
        if crop is None:
            crop = torch.zeros(3, *self.input_size, dtype=self.fill_dtype)
        return i, crop, reason

    def decode_into(self, k: int, out: torch.Tensor) -> tuple[int, str]:
        """``__getitem__`` written into ``out``, a ``(3, H, W)`` slot of a batch: the source
        index and the reason it failed ("" when it did not; the slot is then zeros)."""
        transform = self.transform
        if isinstance(transform, ResizeCenterCrop):
            i, _, reason = self._guarded(k, lambda image: transform(image, out=out))
        else:
            i, _, reason = self._guarded(k, lambda image: out.copy_(transform(image)))
        if reason:
            out.zero_()
        return i, reason

    def _guarded(self, k: int, finish: Callable[[Any], torch.Tensor]
                 ) -> tuple[int, torch.Tensor | None, str]:
        """Sample ``k`` decoded and passed to ``finish``; a failure of either becomes a reason."""
        i = self.indices[k]
        try:
            image = self.source.load_tensor(i, self.policy, target_size=self.target_size)
            return i, finish(image), ""
        except DecodeError as exc:
            reason = exc.reason
        except Exception as exc:  # noqa: BLE001 - one odd file must never kill a long run
            reason = f"failed: {type(exc).__name__}: {exc}"
        return i, None, reason


def _collate(batch: list[tuple[int, torch.Tensor, str]]
             ) -> tuple[list[int], torch.Tensor, list[str]]:
    """Stack into ``(B, 3, H, W)`` laid out channels_last, the layout the forward pass runs in.

    Decoded crops are HWC in memory already (:class:`ResizeCenterCrop`), so this is one copy.
    (Decode threads skip it: :meth:`_SourceDataset.decode_into` writes into the batch.)
    """
    idx, tensors, reasons = zip(*batch, strict=True)
    x = torch.stack([t.permute(1, 2, 0) for t in tensors]).permute(0, 3, 1, 2)
    return list(idx), x.as_subclass(torch.Tensor), list(reasons)


def plan_shards(indices: Sequence[int], ids: Sequence[str], fps: Sequence[str], shard_size: int
                ) -> list[tuple[str, list[int]]]:
    """Cut the work into fixed slices named by position and content, so a rerun finds them again."""
    shards = []
    for n, start in enumerate(range(0, len(indices), shard_size)):
        part = list(indices[start:start + shard_size])
        digest = hashlib.blake2b(digest_size=8)
        for i in part:
            digest.update(ids[i].encode())
            digest.update(b"\0")
            digest.update(fps[i].encode())
            digest.update(b"\n")
        shards.append((f"{n:06d}-{digest.hexdigest()}", part))
    return shards


class _ShardBatchSampler:
    """Batches in dataset positions that never cross a shard boundary (deterministic batching)."""

    def __init__(self, shards: list[tuple[str, list[int]]], batch_size: int) -> None:
        self.batches: list[list[int]] = []
        offset = 0
        for _, part in shards:
            for start in range(0, len(part), batch_size):
                stop = min(start + batch_size, len(part))
                self.batches.append(list(range(offset + start, offset + stop)))
            offset += len(part)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


# --------------------------------------------------------------------------- the engine


def _validate(batch_size: int, dtype: str, on_error: str, workers: int | None) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer; got {batch_size!r}")
    if dtype not in FEATURE_DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(FEATURE_DTYPES)}; got {dtype!r}")
    if on_error not in ON_ERROR:
        raise ConfigError(f"on_error must be 'skip' or 'raise'; got {on_error!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 0):
        raise ConfigError(f"workers must be a non-negative integer; got {workers!r}")


class NormalizedInput(torch.nn.Module):
    """Normalise uint8 batches on the model's device, then run the extractor.

    Decode workers send uint8 crops (:meth:`PreprocessSpec.decode_transform`); the conversion
    here is ``ToDtype(float32, scale=True)`` + ``Normalize`` of ``eval_transform``, the same
    operations in the same order, so features equal the per-image float path bit for bit.
    Float batches are taken as normalised already and pass straight through.
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


def forward_features(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                     device: torch.device, precision: str) -> torch.Tensor:
    """One batch through the extractor, returned as float32 on the CPU."""
    return torch.from_numpy(start_forward(model, x, device, precision)())


def start_forward(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                  device: torch.device, precision: str) -> Callable[[], np.ndarray]:
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


def embed(
    source: Any,
    store: str | os.PathLike | FeatureStore,
    backbone: str | BackboneSpec = "efficientnet_lite0",
    *,
    weights: str | None = None,
    layer: str | None = None,
    image_size: int | None = None,
    labels: Sequence | np.ndarray | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    compile: str = "auto",  # noqa: A002 - mirrors torch.compile and the CLI's --compile
    decoder: str = "pil",
    dtype: str = "float16",
    on_error: str = "skip",
    decode_policy: DecodePolicy | None = None,
    content_hash: bool = False,
    drop_missing: bool = True,
    shard_size: int | None = None,
    lock_timeout: float = 3600.0,
    other_entries: str = "keep",
    progress: bool = True,
    loaded_backbone: Backbone | None = None,
    log: Callable[[str], None] | None = None,
) -> EmbedReport:
    """Embed a source into a feature store, computing only what the store lacks.

    Parameters
    ----------
    source : folder, CSV manifest, list of paths, array, IDX file or ImageSource
        Anything :func:`featurepipe.sources.open_source` accepts.
    store : path or FeatureStore
        The HDF5 file. Rows of other specs in it are left alone.
    backbone, weights, layer, image_size
        The backbone spec (see :func:`featurepipe.backbones.resolve_spec`).
    batch_size, workers, device, precision
        Engine settings. ``precision="auto"`` is bf16 on CPUs with native bf16 and on CUDA
        (fp16 where bf16 is missing), fp32 elsewhere; ``"fp32"`` is exact mode.
    compile : {"auto", "on", "off"}
        ``torch.compile`` the extractor (see :mod:`featurepipe.compiling`). ``auto`` does on CPU
        under bf16 for runs of at least 6,000 images to compute (at 224 px; more at smaller
        sizes): 110.7 -> 211.3 img/s end to end (lite0, 2 cores) after a 24 s cold compile.
        ``on`` under fp32: about 2x the forward speed, features equal to eager within 1e-6.
    decoder : {"pil", "nvjpeg"}
        ``nvjpeg`` decodes JPEGs on the CUDA GPU in batches (:mod:`featurepipe.gpu_decode`;
        other files still go through Pillow). Pixels differ slightly from Pillow's, so it is
        part of the store key.
    dtype : {"float16", "float32"}
        How features are stored.
    on_error : {"skip", "raise"}
        ``skip`` records bad files with a reason in the store and the report; ``raise`` stops
        with a :class:`~featurepipe.exceptions.DecodeError` naming the file.
    drop_missing : bool
        Drop rows of files no longer in the source (True for folders that changed).
    other_entries : {"keep", "error", "replace"}
        What to do when the store already holds features made with another spec: keep them beside
        the new entry, stop with a :class:`~featurepipe.exceptions.SpecMismatchError` that says what
        differs (the CLI's default), or drop them.

    Returns
    -------
    EmbedReport

    Examples
    --------
    >>> from featurepipe.embed import embed
    >>> report = embed("photos/", "photos.h5")  # doctest: +SKIP
    >>> report.n_rows, report.n_skipped  # doctest: +SKIP
    (1200, 3)
    """
    _validate(batch_size, dtype, on_error, workers)
    check_choice(compile)
    t0 = time.perf_counter()
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    check_decoder(decoder, dev)
    compiled: CompiledExtractor | None = None

    def compute(job: EmbedJob, shards: list[tuple[str, list[int]]], writer: StoreWriter) -> None:
        nonlocal compiled
        compiled = _run_shards(job, shards, writer, workers, progress, compile)

    report = run_embed(
        source, store, backbone, compute, device=dev, precision=prec, weights=weights,
        layer=layer, image_size=image_size, labels=labels, batch_size=batch_size, dtype=dtype,
        on_error=on_error, decode_policy=decode_policy, content_hash=content_hash,
        drop_missing=drop_missing, shard_size=shard_size, lock_timeout=lock_timeout,
        other_entries=other_entries, loaded_backbone=loaded_backbone, log=log, t0=t0,
        decoder=decoder,
    )
    if compiled is None or not compiled.active:
        return report
    return replace(report, compiled=True, compile_seconds=compiled.compile_seconds)


# --------------------------------------------------------------------------- shared steps


@dataclass
class EmbedJob:
    """What an engine's compute step needs: the planned source, the model and the settings.

    Built by :func:`run_embed` once the store has been planned; the same object drives the local
    DataLoader loop and the Ray workers, so both decode, batch and cast in exactly the same way.
    """

    source: ImageSource
    backbone: Backbone
    policy: DecodePolicy
    device: torch.device
    precision: str
    dtype: str
    batch_size: int
    on_error: str
    ids: list[str]
    fps: list[str]
    decoder: str = "pil"

    @property
    def np_dtype(self) -> type:
        """The numpy type features are stored as."""
        return np.float16 if self.dtype == "float16" else np.float32

    def dataset(self, indices: Sequence[int]) -> _SourceDataset:
        """Decode + preprocess of the given source indices, with the backbone's own transform."""
        pre = self.backbone.preprocess
        return _SourceDataset(self.source, indices, pre.decode_transform(), self.policy,
                              pre.input_size,
                              pre.resize_size if self.policy.reduce_on_load else None,
                              fill_dtype=torch.uint8)


#: An engine's compute step: embed the pending shards of a job, writing each through the writer.
ComputeShards = Callable[[EmbedJob, list[tuple[str, list[int]]], StoreWriter], None]


def default_shard_size(batch_size: int) -> int:
    """About 1024 rows, a whole number of batches (so batches never cross a shard)."""
    return max(batch_size, 1024 // batch_size * batch_size)


def shard_batches(shards: Sequence[tuple[str, Sequence[int]]], batch_size: int
                  ) -> list[tuple[str, list[int]]]:
    """The batches :class:`_ShardBatchSampler` makes, as ``(shard name, source indices)``."""
    return [(name, list(part[start:start + batch_size]))
            for name, part in shards for start in range(0, len(part), batch_size)]


def run_embed(
    source: Any,
    store: str | os.PathLike | FeatureStore,
    backbone: str | BackboneSpec,
    compute: ComputeShards,
    *,
    device: torch.device,
    precision: str,
    weights: str | None = None,
    layer: str | None = None,
    image_size: int | None = None,
    labels: Sequence | np.ndarray | None = None,
    batch_size: int = 64,
    dtype: str = "float16",
    on_error: str = "skip",
    decode_policy: DecodePolicy | None = None,
    content_hash: bool = False,
    drop_missing: bool = True,
    shard_size: int | None = None,
    lock_timeout: float = 3600.0,
    other_entries: str = "keep",
    loaded_backbone: Backbone | None = None,
    log: Callable[[str], None] | None = None,
    t0: float | None = None,
    decoder: str = "pil",
) -> EmbedReport:
    """Plan against the store, run ``compute`` on the missing shards, commit, report.

    Every engine goes through here, so they share the entry key, the shard plan (names and
    boundaries) and the commit: a store made by one engine is re-used by the other, and a killed
    run of either resumes from the shards already on disk. ``device`` and ``precision`` are the
    resolved values the workers will use (they go into the key and the attributes).
    """
    t0 = time.perf_counter() if t0 is None else t0
    say = log or (lambda _msg: None)
    src = open_source(source, labels=labels)
    src.require_unique_ids()  # before any work: the commit keeps one row per id
    policy = decode_policy or DecodePolicy()
    # The key needs only the weights hash and preprocessing: a cached rerun never builds the net.
    desc: Backbone | BackboneDescription
    if loaded_backbone is None:
        spec = backbone if isinstance(backbone, BackboneSpec) else resolve_spec(
            backbone, weights=weights, layer=layer, image_size=image_size)
        desc = describe_backbone(spec)
    else:
        desc = loaded_backbone
    parts = key_parts(desc, policy, precision, dtype, decoder)
    key = entry_key(parts)
    fs = store if isinstance(store, FeatureStore) else FeatureStore(store)
    if other_entries not in ("keep", "error", "replace"):
        raise ConfigError(f"other_entries must be keep, error or replace; got {other_entries!r}")
    if other_entries == "error":
        refuse_other_specs(fs, key, parts)

    ids = [s.id for s in src.samples]
    fps = [src.fingerprint(i, content_hash=content_hash) for i in range(len(src))]
    with fs.writer(key, store_attrs(parts, desc.feature_dim, device), lock_timeout=lock_timeout,
                   on_wait=say) as writer:
        done = writer.existing()
        done_skipped = writer.existing_skipped()
        todo = [i for i in range(len(src))
                if done.get(ids[i]) != fps[i]
                and done_skipped.get(ids[i], ("", ""))[0] != fps[i]]
        size = shard_size or default_shard_size(batch_size)
        planned = plan_shards(todo, ids, fps, size)
        shards = [(name, part) for name, part in planned if not writer.shard_done(name)]
        n_pending = sum(len(p) for _, p in shards)
        if n_pending:
            bb = loaded_backbone or load_backbone(desc.spec)
            writer.attrs["dim"] = bb.feature_dim
            job = EmbedJob(src, bb, policy, device, precision, dtype, batch_size, on_error,
                           ids, fps, decoder)
            compute(job, shards, writer)
        order = [(ids[i], fps[i], int(src.samples[i].label)) for i in range(len(src))]
        result = writer.commit(order, src.class_names, drop_missing=drop_missing,
                               drop_other_entries=other_entries == "replace")
    info = fs.info(key)
    seconds = time.perf_counter() - t0
    return EmbedReport(
        store=str(fs.path), key=key, backbone=desc.spec.name, n_total=len(src),
        n_rows=result.n_rows, n_computed=n_pending, n_reused=result.n_reused,
        n_skipped=result.n_skipped, n_dropped=result.n_dropped,
        skipped=[(d["id"], d["reason"]) for d in info["skipped"]],
        seconds=seconds, images_per_second=n_pending / seconds if n_pending else 0.0,
        device=str(device), precision=precision, n_resumed=len(todo) - n_pending,
    )


class ShardCollector:
    """Gathers per-image results in any order; writes each shard once its last image is in.

    The local engine feeds it batch by batch in shard order, the Ray engine in whatever order the
    workers finish. Either way a shard file holds exactly the rows of its slice of the plan.
    """

    def __init__(self, job: EmbedJob, shards: list[tuple[str, list[int]]],
                 writer: StoreWriter) -> None:
        self.job, self.writer = job, writer
        self._parts = dict(shards)
        self._left = {name: len(part) for name, part in shards}
        self._shard_of = {i: name for name, part in shards for i in part}
        self._feats: dict[int, np.ndarray] = {}
        self._bad: dict[int, str] = {}

    @property
    def pending(self) -> list[str]:
        """Shards not written yet."""
        return [name for name, left in self._left.items() if left]

    def add(self, indices: Sequence[int], reasons: Sequence[str], features: np.ndarray) -> None:
        """Record one batch: ``features`` holds the rows of the indices whose reason is empty.

        Raises
        ------
        DecodeError
            For the first bad file of the batch when ``on_error="raise"``.
        """
        job = self.job
        for i, r in zip(indices, reasons, strict=True):
            if r and job.on_error == "raise":
                raise DecodeError(job.source.samples[i].path or job.ids[i], r)
        good = iter(features)
        for i, r in zip(indices, reasons, strict=True):
            if r:
                self._bad[i] = r
            else:
                self._feats[i] = next(good).astype(job.np_dtype)
        for name in dict.fromkeys(self._shard_of[i] for i in indices):
            self._left[name] -= sum(1 for i in indices if self._shard_of[i] == name)
            if self._left[name] == 0:
                _write_shard(self.writer, name, self._parts[name], self._feats, self._bad,
                             job.ids, job.fps, job.backbone.feature_dim, job.np_dtype)
                release_free_heap()


def forward_good(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                 reasons: Sequence[str], device: torch.device, precision: str) -> np.ndarray:
    """Features of the images that decoded; bad ones are left out of the batch (every engine)."""
    return start_forward_good(model, x, reasons, device, precision)()


def start_forward_good(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                       reasons: Sequence[str], device: torch.device, precision: str
                       ) -> Callable[[], np.ndarray]:
    """:func:`forward_good`, launched: call the result for the features (:func:`start_forward`)."""
    good = [k for k, r in enumerate(reasons) if not r]
    if not good:
        return lambda: np.zeros((0, 0), dtype=np.float32)
    return start_forward(model, x if len(good) == len(reasons) else x[good], device, precision)


class _DecodeInThreads:
    """Batches decoded by a thread pool in the main process, one batch at a time (eager CPU
    runs; compiled ones run :class:`~featurepipe.cpu_streams.CoreStreams`).

    On a CPU the forward pass already uses every core, and decode worker processes fight it for
    them: each OpenMP region then waits for its slowest, preempted thread. The decoders and
    the resize release the GIL, so here the cores decode a batch together, then run its
    forward pass together; the phases alternate instead of contending. Measured on 2 cores
    (lite0, compiled, 500x375 JPEGs): 109 img/s against 69 with one decode process; decoding
    the next batch during the forward pass (two threads) ran at 180 img/s against 186
    alternating. Each thread writes its crops straight into the batch, and runs torch's ops
    alone (:func:`run_ops_single_threaded`).
    """

    def __init__(self, dataset: _SourceDataset, batches: _ShardBatchSampler, threads: int) -> None:
        self.dataset, self.batches, self.threads = dataset, batches, max(1, threads)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[list[int], torch.Tensor, list[str]]]:
        from concurrent.futures import ThreadPoolExecutor

        ds = self.dataset
        with ThreadPoolExecutor(self.threads, thread_name_prefix="featurepipe-decode",
                                initializer=run_ops_single_threaded) as pool:
            for batch in self.batches:
                # Each thread writes its crops into the batch: no per-image tensor, no stack.
                x = empty_batch(len(batch), ds.input_size, ds.fill_dtype)
                todo: queue.SimpleQueue[int] = queue.SimpleQueue()
                for j in range(len(batch)):
                    todo.put(j)
                done: list[tuple[int, str]] = [(-1, "")] * len(batch)
                for task in [pool.submit(self._drain, todo, batch, x, done)
                             for _ in range(self.threads)]:
                    task.result()
                yield [i for i, _ in done], x, [r for _, r in done]

    def _drain(self, todo: queue.SimpleQueue[int], batch: list[int], x: torch.Tensor,
               done: list[tuple[int, str]]) -> None:
        """Decode the batch's next image until none is left: one task per thread and batch, not
        one per image, whose futures and wake-ups of the waiting thread hold the GIL
        (two threads: 0.65 instead of 0.72 ms per photo)."""
        while True:
            try:
                j = todo.get_nowait()
            except queue.Empty:
                return
            done[j] = self.dataset.decode_into(batch[j], x[j])


def _loader(job: EmbedJob, flat: list[int], shards: list[tuple[str, list[int]]],
            workers: int | None) -> Any:
    """Decode threads on CPU by default (:class:`_DecodeInThreads`); nvjpeg on the GPU when
    asked (:class:`~featurepipe.gpu_decode.GPUDecodeLoader`); else DataLoader processes."""
    dev = job.device
    dataset, batches = job.dataset(flat), _ShardBatchSampler(shards, job.batch_size)
    if job.decoder == "nvjpeg":
        paths = job.source.paths
        return GPUDecodeLoader(dataset, flat, None if paths is None else [paths[i] for i in flat],
                               batches, job.backbone.preprocess, job.policy.max_pixels, dev,
                               workers=default_workers(dev) if workers is None else workers)
    return batch_loader(dataset, batches, dev, workers)


def batch_loader(dataset: _SourceDataset, batches: Any, device: torch.device,
                 workers: int | None) -> Any:
    """``(indices, uint8 batch, reasons)`` over ``batches`` (lists of dataset positions).

    Threads in this process on a CPU when ``workers`` is None (:class:`_DecodeInThreads`),
    else ``workers`` DataLoader processes (default: :func:`default_workers`). Shared by the
    engine and :class:`~featurepipe.estimators.ImageEmbedder`.
    """
    if workers is None and device.type == "cpu":
        return _DecodeInThreads(dataset, batches, torch.get_num_threads())
    n = default_workers(device) if workers is None else workers
    return DataLoader(dataset, batch_sampler=batches, num_workers=n, collate_fn=_collate,
                      pin_memory=device.type == "cuda", persistent_workers=False,
                      prefetch_factor=4 if n else None)


def _run_shards(job: EmbedJob, shards: list[tuple[str, list[int]]], writer: StoreWriter,
                workers: int | None, progress: bool, compile_choice: str = "off"
                ) -> CompiledExtractor | None:
    """Stream batches through the model; write each shard the moment its last batch is done.

    ``workers``: decode processes (None = threads on CPU, processes on accelerators). A compiled
    run on CPU with decode threads runs one stream per core (:mod:`featurepipe.cpu_streams`).
    Returns the compiled forward pass when one was used (see :mod:`featurepipe.compiling`).
    """
    from tqdm.auto import tqdm

    flat = [i for _, part in shards for i in part]
    dev = job.device
    if dev.type == "cpu":
        keep_buffers_in_heap()
    module = prepare_model(job.backbone, dev)
    model: Callable[[torch.Tensor], torch.Tensor] = module
    compiled = None
    collector = ShardCollector(job, shards, writer)
    desc = f"embed {job.backbone.spec.name}"
    bar = tqdm(total=len(flat), unit="img", disable=not progress, dynamic_ncols=True, desc=desc)
    try:
        if should_compile(compile_choice, dev, job.precision, len(flat),
                          job.backbone.preprocess.input_size):
            per_core = dev.type == "cpu" and workers is None
            model = compiled = CompiledExtractor(
                module, STREAM_CHUNK if per_core else job.batch_size, dev, job.precision,
                per_core=per_core)
            if per_core:
                bar.set_description(f"{desc} (compiling, once)")
                compile_for_streams(compiled, job.backbone.preprocess.input_size, dev,
                                    job.precision)
                bar.set_description(desc)
        if compiled is not None and compiled.per_core and compiled.active:
            streams = CoreStreams(
                job.dataset(flat), _ShardBatchSampler(shards, job.batch_size),
                lambda x, reasons: forward_good(model, x, reasons, dev, job.precision),
                torch.get_num_threads(), initializer=run_ops_single_threaded)
            for idx, reasons, feats in streams:
                collector.add(idx, reasons, feats)
                bar.update(len(idx))
        else:
            _run_batches(_loader(job, flat, shards, workers), model, job, collector, bar)
    finally:
        bar.close()
    writer.attrs["compiled"] = compiled is not None and compiled.active
    return compiled


def compile_for_streams(compiled: CompiledExtractor, input_size: tuple[int, int],
                        device: torch.device, precision: str) -> None:
    """Compile before the streams start, in a thread set up like theirs: dynamo guards on the
    thread count, so a graph compiled in this thread would be compiled again in each stream."""
    from concurrent.futures import ThreadPoolExecutor

    x = torch.zeros(1, 3, *input_size, dtype=torch.uint8)
    with ThreadPoolExecutor(1, initializer=run_ops_single_threaded) as pool:
        pool.submit(forward_features, compiled, x, device, precision).result()


def _run_batches(loader: Any, model: Callable[[torch.Tensor], torch.Tensor], job: EmbedJob,
                 collector: ShardCollector, bar: Any) -> None:
    """One batch in flight: launch batch n, then collect batch n-1 while a GPU works."""
    in_flight: tuple[list[int], list[str], Callable[[], np.ndarray]] | None = None
    for idx, x, reasons in loader:
        launched = start_forward_good(model, x, reasons, job.device, job.precision)
        if in_flight is not None:
            collector.add(in_flight[0], in_flight[1], in_flight[2]())
            bar.update(len(in_flight[0]))
        in_flight = (idx, reasons, launched)
    if in_flight is not None:
        collector.add(in_flight[0], in_flight[1], in_flight[2]())
        bar.update(len(in_flight[0]))


def _write_shard(writer: Any, name: str, part: list[int], feats: dict[int, np.ndarray],
                 bad: dict[int, str], ids: list[str], fps: list[str], dim: int,
                 np_dtype: type) -> None:
    good = [i for i in part if i in feats]
    matrix = (np.stack([feats.pop(i) for i in good]) if good
              else np.zeros((0, dim), dtype=np_dtype))
    skipped = [(ids[i], fps[i], bad.pop(i)) for i in part if i in bad]
    writer.write_shard(name, [ids[i] for i in good], [fps[i] for i in good], matrix, skipped)
