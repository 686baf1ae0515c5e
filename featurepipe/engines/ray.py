"""Ray engine: embed on a Ray cluster; the driver plans, writes and commits the feature store.

Planning, entry key, shard names and commit are the local engine's
(:func:`featurepipe.embedding.run_embed`); only the runner differs
(:class:`featurepipe.embedding.runners.ray.RayRunner`), so a store made by one engine is re-used
and resumed by the other. This module opens the Ray session, sizes the actor pool, resolves the
workers' precision and calls the driver. See ``docs/ray.md``.

The module imports Ray only when :func:`embed_ray` runs (``pip install "featurepipe[ray]"``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from featurepipe.backbones import BackboneSpec
from featurepipe.decode import DecodePolicy
from featurepipe.devices import resolve_precision
from featurepipe.embedding import (
    EmbedOptions,
    EmbedReport,
    RunnerChoice,
    choose_runner,
    make_runner,
    resolve_backbone,
    run_embed,
)
from featurepipe.embedding.runners.ray import RayResources
from featurepipe.exceptions import ConfigError, MissingDependencyError
from featurepipe.store import FeatureStore

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


def _probe_precision(precision: str, device: str) -> str:
    """Run on a worker: what ``precision`` resolves to on the workers' hardware."""
    return resolve_precision(precision, torch.device(device))


# --------------------------------------------------------------------------- driver side


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
               ) -> RayResources:
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
    return RayResources(max(1, concurrency), cpus, gpus)


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
    options = EmbedOptions(
        batch_size=batch_size, device="cpu", dtype=dtype, on_error=on_error,
        decode_policy=decode_policy or DecodePolicy(), content_hash=content_hash,
        drop_missing=drop_missing, shard_size=shard_size, lock_timeout=lock_timeout,
        other_entries=other_entries, progress=progress)
    gpus, dev = _validate_ray(concurrency, gpus_per_worker, cpus_per_worker, device)
    ray = import_ray()
    say = log or (lambda _msg: None)
    with _ray_session(ray, address, say):
        res = _resources(ray, concurrency, gpus, cpus_per_worker)
        if precision == "auto":
            probe = ray.remote(num_cpus=res.cpus, num_gpus=res.gpus or None)(_probe_precision)
            prec = ray.get(probe.remote(precision, dev.type))
        else:
            prec = resolve_precision(precision, dev)
        name = choose_runner(RunnerChoice(dev.type, None, "pil", False, engine="ray"))
        runner = make_runner(name, ray, res, dtype, progress, say)
        return run_embed(source, store, resolve_backbone(backbone, weights, layer, image_size),
                         options, labels=labels, runner=runner, device=dev, precision=prec,
                         log=log)


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
