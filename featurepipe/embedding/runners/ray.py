"""Ray runner: Ray Data actors decode and embed the planned batches; rows come back to the driver.

One planned batch per Ray Data row. Actors (:class:`EmbedWorker`) load the backbone once, decode
through :class:`~featurepipe.embedding.pixels.Pixels` (the source's decode policy; a bad file
gives a reason) and run the good images through
:func:`~featurepipe.embedding.forward.forward_good` together, as the local runners do, so fp32
features equal theirs. The driver writes the store: a feature row is far smaller than the image a
worker reads (``benchmarks/ray_overhead.py``; ``docs/ray.md``). The session, the resources and
the public :func:`featurepipe.engines.ray.embed_ray` live in :mod:`featurepipe.engines.ray`.
"""

from __future__ import annotations

import contextlib
import logging
import platform
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from featurepipe import exceptions
from featurepipe.backbones import BackboneSpec, load_backbone
from featurepipe.decode import DecodePolicy
from featurepipe.embedding.forward import forward_good, prepare_model
from featurepipe.embedding.pixels import Pixels, collate
from featurepipe.embedding.runners.base import Batch, Runner, Work
from featurepipe.exceptions import BackboneError, FeaturePipeError
from featurepipe.sources import ImageSource

__all__ = ["RayResources", "RayRunner", "WorkerConfig", "EmbedWorker", "worker_error"]


@dataclass(frozen=True)
class RayResources:
    """How many actors, and what each one asks Ray for."""

    concurrency: int
    cpus: float
    gpus: float


@dataclass(frozen=True)
class WorkerConfig:
    """What an actor needs to rebuild the driver's work; small, so it pickles cheaply."""

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


class EmbedWorker:
    """A Ray Data actor: loads the backbone once, then embeds one planned batch per row."""

    def __init__(self, config: WorkerConfig) -> None:
        # A featurepipe error here (backbone not loadable on this node, other weights) travels
        # back as data: Ray would hand the driver only its text inside an ActorDiedError, and
        # the CLI should print one clear line.
        self._error, self._config = "", config
        try:
            self._setup(config)
        except FeaturePipeError as exc:
            self._error = f"{type(exc).__name__}\0{exc} (Ray worker on {platform.node()})"

    def _setup(self, config: WorkerConfig) -> None:
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
        self._device = torch.device(config.device)
        self._pixels = Pixels.for_backbone(source, backbone, config.policy)
        self._model = prepare_model(backbone, self._device)
        self._pool = ThreadPoolExecutor(config.threads) if config.threads > 1 else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cfg = self._config
        if self._error:
            return {"index": np.zeros(1, dtype=np.int64),
                    "feature": np.zeros((1, cfg.dim), dtype=cfg.dtype),
                    "reason": np.array([""], dtype=object),
                    "error": np.array([self._error], dtype=object)}
        index: list[int] = []
        features: list[np.ndarray] = []
        reasons: list[str] = []
        for row in batch["indices"]:
            idx = [int(i) for i in row]
            get = self._pixels.__getitem__
            items = list(self._pool.map(get, idx)) if self._pool else [get(i) for i in idx]
            _, x, why = collate(items)
            good = forward_good(self._model, x, why, self._device, cfg.precision)
            out: np.ndarray = np.zeros((len(idx), cfg.dim), dtype=cfg.dtype)
            if len(good):
                out[[k for k, r in enumerate(why) if not r]] = good.astype(cfg.dtype)
            index.extend(idx)
            features.append(out)
            reasons.extend(why)
        return {
            "index": np.asarray(index, dtype=np.int64),
            "feature": np.concatenate(features) if features else np.zeros((0, cfg.dim)),
            "reason": np.asarray(reasons, dtype=object),
            "error": np.full(len(index), "", dtype=object),
        }


def worker_error(text: str) -> FeaturePipeError:
    """Rebuild the featurepipe error an actor reported as ``"<class name>\\0<message>"``."""
    name, _, message = text.partition("\0")
    cls = getattr(exceptions, name, None)
    if (isinstance(cls, type) and issubclass(cls, FeaturePipeError)
            and not issubclass(cls, exceptions.DecodeError)):
        return cls(message)
    return FeaturePipeError(f"{name}: {message}")


@contextlib.contextmanager
def _quiet_ray_data(ray: Any, progress: bool) -> Iterator[None]:
    """The engine's progress bar replaces Ray Data's; with ``progress=False`` its INFO lines go."""
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


class RayRunner(Runner):
    """Sends the batches through an actor pool on a connected Ray session."""

    name = "ray"

    def __init__(self, ray: Any, resources: RayResources, dtype: str, progress: bool = True,
                 say: Callable[[str], None] = lambda _msg: None) -> None:
        super().__init__()
        self.ray, self.resources, self.dtype = ray, resources, dtype
        self.progress, self.say = progress, say

    def run(self, work: Work) -> Iterator[Batch]:
        ray, res = self.ray, self.resources
        self._device = str(work.device)
        batches = [list(b) for b in work.batches]
        n_actors = min(res.concurrency, len(batches))
        bb = work.backbone
        config = WorkerConfig(
            source_ref=[ray.put(work.pixels.source)], spec=bb.spec,
            weights_sha256=bb.weights_sha256, preprocess=bb.preprocess.to_dict(),
            policy=work.pixels.policy, device=work.device.type, precision=work.precision,
            dtype=self.dtype, batch_size=work.batch_size, threads=max(1, int(res.cpus)),
            dim=bb.feature_dim)
        self.say(f"ray: {len(batches)} batches on {n_actors} workers ({res.cpus:g} CPU"
                 + (f", {res.gpus:g} GPU" if res.gpus else "") + " each)")
        with _quiet_ray_data(ray, self.progress):
            ds = ray.data.from_items([{"indices": idx} for idx in batches],
                                     override_num_blocks=len(batches))
            ds = ds.map_batches(
                EmbedWorker, batch_size=1, fn_constructor_args=(config,),
                compute=ray.data.ActorPoolStrategy(size=n_actors),
                num_cpus=res.cpus, num_gpus=res.gpus or None)
            for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
                failed = [str(e) for e in out["error"] if e]
                if failed:
                    raise worker_error(failed[0])
                reasons = [str(r) for r in out["reason"]]
                good = np.array([not r for r in reasons], dtype=bool)
                yield out["index"].tolist(), reasons, out["feature"][good]


RUNNER = RayRunner
