"""Ray engine: Ray Data actors decode and embed, the driver writes the feature store.

Planning, entry key, shard names and commit are the local engine's (:func:`featurepipe.embed.
run_embed`); only the compute step differs. The pending shards are cut into the same batches the
local engine uses (:func:`featurepipe.embed.shard_batches`), one batch per Ray Data row. Actors
(:class:`_EmbedWorker`) load the backbone once, decode with the source's decode policy and return
``(index, feature, reason)`` rows; the driver collects them in any order and writes each shard the
moment its last row arrives. Because the batches are identical, fp32 features equal the local
engine's, and a killed run resumes from the shards on disk like a local one.

Why the driver writes: a feature row is ``dim * 2`` bytes (float16), hundreds of times smaller
than the image a worker reads, so funnelling rows to the driver costs little (measured in
``benchmarks/ray_overhead.py``), while worker-written shards would need the store on a filesystem
shared by every node and a second writer protocol. See ``docs/ray.md``.

The module imports Ray only when :func:`embed_ray` runs (``pip install "featurepipe[ray]"``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from featurepipe import exceptions
from featurepipe.backbones import BackboneSpec, load_backbone
from featurepipe.decode import DecodePolicy
from featurepipe.embed import (
    EmbedJob,
    EmbedReport,
    ShardCollector,
    _collate,
    _validate,
    forward_good,
    prepare_model,
    resolve_precision,
    run_embed,
    shard_batches,
)
from featurepipe.exceptions import (
    BackboneError,
    ConfigError,
    FeaturePipeError,
    MissingDependencyError,
    StoreError,
)
from featurepipe.sources import ImageSource
from featurepipe.store import FeatureStore, StoreWriter

__all__ = ["RAY_INSTALL", "embed_ray", "import_ray"]

#: The command that installs this engine's dependencies.
RAY_INSTALL = 'pip install "featurepipe[ray]"'

_GPU_WORKER_CPUS = 4.0  # decode threads per GPU actor, so decoding keeps up with the GPU


def import_ray() -> Any:
    """Import Ray and Ray Data, or say how to install them.

    Raises
    ------
    MissingDependencyError
        Ray (or its ``data`` extra) is not installed; the message names :data:`RAY_INSTALL`.
    """
    try:
        import ray
        import ray.data  # noqa: F401 - the Data library is a separate extra
    except ImportError as exc:
        raise MissingDependencyError(
            f"the Ray engine needs Ray Data ({exc}); install it with: {RAY_INSTALL}") from exc
    return ray


# --------------------------------------------------------------------------- worker side


@dataclass(frozen=True)
class _WorkerConfig:
    """What an actor needs to rebuild the driver's job; small, so it pickles cheaply."""

    source_ref: list[Any]  # [ObjectRef of the ImageSource], boxed so Ray does not resolve it
    spec: BackboneSpec
    weights_sha256: str
    preprocess: dict
    policy: DecodePolicy
    device: str
    precision: str
    dtype: str
    batch_size: int
    threads: int
    dim: int


class _EmbedWorker:
    """A Ray Data actor: loads the backbone once, then embeds one planned batch per row.

    Rows hold ``indices`` (source positions of one batch). Each is decoded through
    :meth:`featurepipe.embed.EmbedJob.dataset` (same decode policy and transform as the local
    engine, a bad file gives a reason instead of an exception) and the good images go through
    :func:`featurepipe.embed.forward_good` together, exactly as in the local engine.
    """

    def __init__(self, config: _WorkerConfig) -> None:
        # A featurepipe error here (backbone not loadable on this node, other weights) travels
        # back as data: Ray would hand the driver only its text inside an ActorDiedError, and
        # the CLI should print one clear line.
        self._error, self._config = "", config
        try:
            self._setup(config)
        except FeaturePipeError as exc:
            self._error = f"{type(exc).__name__}\0{exc} (Ray worker on {platform.node()})"

    def _setup(self, config: _WorkerConfig) -> None:
        import ray

        source: ImageSource = ray.get(config.source_ref[0])
        backbone = load_backbone(config.spec)
        if (backbone.weights_sha256 != config.weights_sha256
                or backbone.preprocess.to_dict() != config.preprocess):
            raise BackboneError(
                f"a Ray worker loaded {config.spec.name} with other weights or "
                f"preprocessing than the driver (weights {backbone.weights_sha256} vs "
                f"{config.weights_sha256}); install the same featurepipe, timm and weights on "
                "every node")
        if config.device == "cpu":
            torch.set_num_threads(config.threads)
        device = torch.device(config.device)
        self._job = EmbedJob(source, backbone, config.policy, device, config.precision,
                             config.dtype, config.batch_size, "skip", [], [])
        self._dataset = self._job.dataset(range(len(source)))
        self._model = prepare_model(backbone, device)
        self._pool = ThreadPoolExecutor(config.threads) if config.threads > 1 else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._error:
            cfg = self._config
            return {"index": np.zeros(1, dtype=np.int64),
                    "feature": np.zeros((1, cfg.dim), dtype=cfg.dtype),
                    "reason": np.array([""], dtype=object),
                    "error": np.array([self._error], dtype=object)}
        job, dim = self._job, self._job.backbone.feature_dim
        index: list[int] = []
        features: list[np.ndarray] = []
        reasons: list[str] = []
        for row in batch["indices"]:
            idx = [int(i) for i in row]
            get = self._dataset.__getitem__
            items = list(self._pool.map(get, idx)) if self._pool else [get(i) for i in idx]
            _, x, why = _collate(items)
            good = forward_good(self._model, x, why, job.device, job.precision)
            out: np.ndarray = np.zeros((len(idx), dim), dtype=job.np_dtype)
            if len(good):
                out[[k for k, r in enumerate(why) if not r]] = good.astype(job.np_dtype)
            index.extend(idx)
            features.append(out)
            reasons.extend(why)
        return {
            "index": np.asarray(index, dtype=np.int64),
            "feature": np.concatenate(features) if features else np.zeros((0, dim)),
            "reason": np.asarray(reasons, dtype=object),
            "error": np.full(len(index), "", dtype=object),
        }


def _probe_precision(precision: str, device: str) -> str:
    """Run on a worker: what ``precision`` resolves to on the workers' hardware."""
    return resolve_precision(precision, torch.device(device))


# --------------------------------------------------------------------------- driver side


@dataclass(frozen=True)
class _Resources:
    """How many actors, and what each one asks Ray for."""

    concurrency: int
    cpus: float
    gpus: float


@contextlib.contextmanager
def _ray_session(ray: Any, address: str | None, say: Callable[[str], None]) -> Iterator[None]:
    """Use the caller's Ray connection, or open one (local instance or cluster) and close it.

    A local instance started here belongs to this process: it stops at the end, and the OS
    takes it down with us if we are killed.
    """
    if ray.is_initialized():
        if address is not None:
            say("ray: already connected; ignoring address " + address)
        yield
        return
    options: dict[str, Any] = {"logging_level": logging.WARNING}
    if address is None:  # "local": a new instance even when `ray start` runs on this node
        address, options["include_dashboard"] = "local", False
    try:
        ray.init(address=address, **options)
    except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ...
        what = ("start a local Ray instance" if address == "local"
                else f"join the Ray cluster at {address}")
        raise ConfigError(f"could not {what}: {type(exc).__name__}: {exc}") from exc
    try:
        yield
    finally:
        ray.shutdown()


def _resources(ray: Any, concurrency: int | None, gpus: float, cpus: float | None
               ) -> _Resources:
    """Fill in defaults from the cluster: one actor per CPU, or per ``gpus`` GPUs."""
    total = ray.cluster_resources()
    n_cpu, n_gpu = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    if gpus and n_gpu < gpus:
        raise ConfigError(
            f"gpus_per_worker={gpus:g} but the Ray cluster has {n_gpu:g} GPUs; add GPU nodes "
            "or leave --gpus-per-worker out to embed on CPUs")
    if cpus is None:
        cpus = min(_GPU_WORKER_CPUS, max(1.0, n_cpu)) if gpus else 1.0
    if concurrency is None:
        concurrency = int(n_gpu // gpus) if gpus else int(n_cpu // cpus)
    return _Resources(max(1, concurrency), cpus, gpus)


@contextlib.contextmanager
def _quiet_ray_data(ray: Any, progress: bool) -> Iterator[None]:
    """Our own progress bar replaces Ray Data's; with ``progress=False`` its INFO lines go too."""
    ctx = ray.data.DataContext.get_current()
    logger = logging.getLogger("ray.data")
    saved = ctx.enable_progress_bars, logger.level
    ctx.enable_progress_bars = False
    if not progress:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        ctx.enable_progress_bars = saved[0]
        logger.setLevel(saved[1])


def _worker_error(text: str) -> FeaturePipeError:
    """Rebuild the featurepipe error an actor reported as ``"<class name>\\0<message>"``."""
    name, _, message = text.partition("\0")
    cls = getattr(exceptions, name, None)
    if (isinstance(cls, type) and issubclass(cls, FeaturePipeError)
            and not issubclass(cls, exceptions.DecodeError)):
        return cls(message)
    return FeaturePipeError(f"{name}: {message}")


def _compute_on_ray(ray: Any, job: EmbedJob, shards: list[tuple[str, list[int]]],
                    writer: StoreWriter, res: _Resources, progress: bool,
                    say: Callable[[str], None]) -> None:
    """Send the pending batches through an actor pool; write shards as their rows come back."""
    from tqdm.auto import tqdm

    batches = shard_batches(shards, job.batch_size)
    n_actors = min(res.concurrency, len(batches))
    bb = job.backbone
    config = _WorkerConfig(
        source_ref=[ray.put(job.source)], spec=bb.spec, weights_sha256=bb.weights_sha256,
        preprocess=bb.preprocess.to_dict(), policy=job.policy, device=job.device.type,
        precision=job.precision, dtype=job.dtype, batch_size=job.batch_size,
        threads=max(1, int(res.cpus)), dim=bb.feature_dim)
    say(f"ray: {len(batches)} batches in {len(shards)} shards on {n_actors} workers "
        f"({res.cpus:g} CPU" + (f", {res.gpus:g} GPU" if res.gpus else "") + " each)")
    collector = ShardCollector(job, shards, writer)
    bar = tqdm(total=sum(len(b) for _, b in batches), unit="img", disable=not progress,
               dynamic_ncols=True, desc=f"embed {bb.spec.name} (ray)")
    try:
        with _quiet_ray_data(ray, progress):
            ds = ray.data.from_items([{"indices": idx} for _, idx in batches],
                                     override_num_blocks=len(batches))
            ds = ds.map_batches(
                _EmbedWorker, batch_size=1, fn_constructor_args=(config,),
                compute=ray.data.ActorPoolStrategy(size=n_actors),
                num_cpus=res.cpus, num_gpus=res.gpus or None)
            for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
                failed = [str(e) for e in out["error"] if e]
                if failed:
                    raise _worker_error(failed[0])
                reasons = [str(r) for r in out["reason"]]
                good = np.array([not r for r in reasons], dtype=bool)
                collector.add(out["index"].tolist(), reasons, out["feature"][good])
                bar.update(len(reasons))
    finally:
        bar.close()
    if collector.pending:
        raise StoreError(f"internal: Ray returned no rows for shards {collector.pending[:3]}; "
                         "rerun embed to resume")


def embed_ray(
    source: Any,
    store: str | os.PathLike | FeatureStore,
    backbone: str | BackboneSpec = "efficientnet_lite0",
    *,
    address: str | None = None,
    concurrency: int | None = None,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float | None = None,
    weights: str | None = None,
    layer: str | None = None,
    image_size: int | None = None,
    labels: Sequence | None = None,
    batch_size: int = 64,
    device: str = "auto",
    precision: str = "auto",
    dtype: str = "float16",
    on_error: str = "skip",
    decode_policy: DecodePolicy | None = None,
    content_hash: bool = False,
    drop_missing: bool = True,
    shard_size: int | None = None,
    lock_timeout: float = 3600.0,
    other_entries: str = "keep",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> EmbedReport:
    """Embed a source into a feature store on a Ray cluster, computing only what the store lacks.

    Same store, entry key, shard plan and report as :func:`featurepipe.embed.embed`: either
    engine re-uses and resumes the other's work. The store is written by this process (the
    driver), so it lives on the driver's filesystem; images must be readable by every worker.

    Parameters
    ----------
    source, store, backbone, weights, layer, image_size, labels, batch_size, dtype, on_error,
    decode_policy, content_hash, drop_missing, shard_size, lock_timeout, other_entries, progress
        As in :func:`featurepipe.embed.embed`. Backbone weights given as a file path must exist
        at that path on every node.
    address : str, optional
        None starts a local Ray instance owned by this call (stopped at the end); ``"auto"``
        joins the cluster started with ``ray start`` on this node; ``"HOST:PORT"`` a cluster's
        GCS address; ``"ray://HOST:10001"`` Ray Client. Ignored when Ray is already initialised
        in this process (the current connection is used and left open).
    concurrency : int, optional
        Number of embedding actors (each loads the backbone once). Default: one per
        ``cpus_per_worker`` CPUs of the cluster, or per ``gpus_per_worker`` GPUs.
    gpus_per_worker : float
        GPUs each actor asks for (fractions share a GPU); 0 embeds on CPUs.
    cpus_per_worker : float, optional
        CPUs each actor asks for; also its decode threads (and torch threads on CPU). Default 1
        for CPU actors, 4 for GPU actors (decoding has to keep a GPU busy).
    device : {"auto", "cpu", "cuda"}
        The workers' device; ``auto`` is cuda when ``gpus_per_worker > 0``, else cpu.
    precision : {"auto", "fp32", "bf16", "fp16"}
        ``auto`` is resolved once on a worker (it depends on the workers' hardware, and it is
        part of the entry key); every actor then uses that precision.

    Returns
    -------
    EmbedReport

    Raises
    ------
    MissingDependencyError
        Ray Data is not installed (``pip install "featurepipe[ray]"``).

    Examples
    --------
    >>> from featurepipe.engines.ray import embed_ray
    >>> embed_ray("photos/", "photos.h5", address="auto", gpus_per_worker=1)  # doctest: +SKIP
    """
    _validate(batch_size, dtype, on_error, None)
    gpus, dev = _validate_ray(concurrency, gpus_per_worker, cpus_per_worker, device)
    ray = import_ray()
    say = log or (lambda _msg: None)
    t0 = time.perf_counter()
    with _ray_session(ray, address, say):
        res = _resources(ray, concurrency, gpus, cpus_per_worker)
        if precision == "auto":
            probe = ray.remote(num_cpus=res.cpus, num_gpus=res.gpus or None)(_probe_precision)
            prec = ray.get(probe.remote(precision, dev.type))
        else:
            prec = resolve_precision(precision, dev)

        def compute(job: EmbedJob, shards: list[tuple[str, list[int]]],
                    writer: StoreWriter) -> None:
            _compute_on_ray(ray, job, shards, writer, res, progress, say)

        return run_embed(
            source, store, backbone, compute, device=dev, precision=prec, weights=weights,
            layer=layer, image_size=image_size, labels=labels, batch_size=batch_size,
            dtype=dtype, on_error=on_error, decode_policy=decode_policy,
            content_hash=content_hash, drop_missing=drop_missing, shard_size=shard_size,
            lock_timeout=lock_timeout, other_entries=other_entries, log=log, t0=t0,
        )


def _validate_ray(concurrency: int | None, gpus_per_worker: float, cpus_per_worker: float | None,
                  device: str) -> tuple[float, torch.device]:
    """Check the Ray-only options before connecting; returns (GPUs per actor, worker device)."""
    if concurrency is not None and (not isinstance(concurrency, int) or concurrency < 1):
        raise ConfigError(f"concurrency must be a positive integer; got {concurrency!r}")
    try:
        gpus = float(gpus_per_worker or 0.0)
    except (TypeError, ValueError):
        gpus = -1.0
    if gpus < 0:
        raise ConfigError(f"gpus_per_worker must be a number >= 0; got {gpus_per_worker!r}")
    if cpus_per_worker is not None and not (
            isinstance(cpus_per_worker, (int, float)) and cpus_per_worker > 0):
        raise ConfigError(f"cpus_per_worker must be a number > 0; got {cpus_per_worker!r}")
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(
            f"with the Ray engine, device must be auto, cpu or cuda (Ray assigns each worker "
            f"its GPU); got {device!r}")
    if device == "cuda" and not gpus:
        raise ConfigError("device cuda needs GPUs for the Ray workers: set gpus_per_worker "
                          "(--gpus-per-worker), e.g. 1")
    if device == "cpu" and gpus:
        raise ConfigError(f"device cpu with gpus_per_worker={gpus:g}: drop one of them")
    return gpus, torch.device("cuda" if gpus else "cpu")
