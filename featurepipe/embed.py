"""Public entry point of the embedding engine: :func:`embed` a source into a feature store.

Only what the store does not already hold is computed. Work is cut into deterministic shards,
each written atomically as it completes, so a killed run resumes where it stopped and ends with
the rows of an uninterrupted run (bit-identical under fp32; under bf16 when both runs pick the
same kernels, see :mod:`featurepipe.compiling`). The engine itself is the package
:mod:`featurepipe.embedding` (plan -> runner -> sink); this module keeps the stable signature.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, overload

import numpy as np

from featurepipe.backbones import Backbone, BackboneSpec, parse_layers
from featurepipe.decode import DecodePolicy
from featurepipe.devices import (
    PRECISIONS,
    autocast_context,
    cpu_has_native_bf16,
    resolve_device,
    resolve_precision,
)
from featurepipe.embedding.engine import resolve_backbone, run_embed
from featurepipe.embedding.forward import (
    NormalizedInput,
    forward_features,
    forward_good,
    prepare_model,
    start_forward,
)
from featurepipe.embedding.memory import (
    default_workers,
    keep_buffers_in_heap,
    release_free_heap,
    run_ops_single_threaded,
)
from featurepipe.embedding.multi import run_embed_layers
from featurepipe.embedding.options import FEATURE_DTYPES, ON_ERROR, EmbedOptions, EmbedReport
from featurepipe.exceptions import ConfigError
from featurepipe.identity import key_parts, library_versions
from featurepipe.store import FeatureStore

__all__ = [
    "FEATURE_DTYPES",
    "ON_ERROR",
    "PRECISIONS",
    "EmbedOptions",
    "EmbedReport",
    "NormalizedInput",
    "autocast_context",
    "cpu_has_native_bf16",
    "default_workers",
    "embed",
    "forward_features",
    "forward_good",
    "keep_buffers_in_heap",
    "key_parts",
    "library_versions",
    "prepare_model",
    "release_free_heap",
    "resolve_device",
    "resolve_precision",
    "run_ops_single_threaded",
    "start_forward",
]


@overload
def embed(source: Any, store: str | os.PathLike | FeatureStore,
          backbone: str | BackboneSpec = ..., *, weights: str | None = ...,
          layer: str | None = ..., layers: None = ..., image_size: int | None = ...,
          labels: Sequence | np.ndarray | None = ..., batch_size: int = ...,
          workers: int | None = ..., device: str = ..., precision: str = ...,
          compile: str = ..., decoder: str = ..., dtype: str = ...,  # noqa: A002
          on_error: str = ..., decode_policy: DecodePolicy | None = ...,
          content_hash: bool = ..., drop_missing: bool = ..., shard_size: int | None = ...,
          lock_timeout: float = ..., other_entries: str = ..., progress: bool = ...,
          loaded_backbone: Backbone | None = ..., log: Callable[[str], None] | None = ...,
          ) -> EmbedReport: ...


@overload
def embed(source: Any, store: str | os.PathLike | FeatureStore,
          backbone: str | BackboneSpec = ..., *, weights: str | None = ...,
          layer: str | None = ..., layers: str | Sequence[str | None], image_size: int | None = ...,
          labels: Sequence | np.ndarray | None = ..., batch_size: int = ...,
          workers: int | None = ..., device: str = ..., precision: str = ...,
          compile: str = ..., decoder: str = ..., dtype: str = ...,  # noqa: A002
          on_error: str = ..., decode_policy: DecodePolicy | None = ...,
          content_hash: bool = ..., drop_missing: bool = ..., shard_size: int | None = ...,
          lock_timeout: float = ..., other_entries: str = ..., progress: bool = ...,
          loaded_backbone: Backbone | None = ..., log: Callable[[str], None] | None = ...,
          ) -> list[EmbedReport]: ...


def embed(
    source: Any,
    store: str | os.PathLike | FeatureStore,
    backbone: str | BackboneSpec = "efficientnet_lite0",
    *,
    weights: str | None = None,
    layer: str | None = None,
    layers: str | Sequence[str | None] | None = None,
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
) -> EmbedReport | list[EmbedReport]:
    """Embed a source into a feature store, computing only what the store lacks.

    Parameters
    ----------
    source : folder, CSV manifest, list of paths, array, IDX file or ImageSource
        Anything :func:`featurepipe.sources.open_source` accepts.
    store : path or FeatureStore
        The HDF5 file. Rows of other specs in it are left alone.
    backbone, weights, layer, image_size
        The backbone spec (see :func:`featurepipe.backbones.resolve_spec`). An ``image_size``
        equal to the backbone's default is the same spec as None (one store entry).
    layers : str or sequence of (str or None), optional
        Several layers from one pass (one decode and one forward per image): one store entry
        per layer, each keyed exactly as a run with ``layer=`` that layer, so either kind of
        run reuses the other's rows. ``"penultimate"`` or None is the default layer; text is
        comma-separated (:func:`featurepipe.backbones.parse_layers`). Layers whose entry is
        complete are not computed. Not with ``layer`` or ``loaded_backbone``.
    batch_size, workers, device, precision
        Engine settings. ``workers=None`` decodes in threads on a CPU and in
        :func:`default_workers` processes elsewhere. ``precision="auto"`` is bf16 on CPUs with
        native bf16 and on CUDA (fp16 where bf16 is missing), fp32 elsewhere; ``"fp32"`` is
        exact mode.
    compile : {"auto", "on", "off"}
        ``torch.compile`` the extractor (see :mod:`featurepipe.compiling`). ``auto`` compiles on
        CPU under bf16 for runs large enough that the one-off compile pays
        (:data:`featurepipe.compiling.AUTO_MIN_IMAGES`); ``on`` under fp32 gives features equal
        to eager within 1e-6. Speeds: ``docs/performance.md``.
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
        What to do when the store already holds features made with another spec: keep them
        beside the new entry, stop with a :class:`~featurepipe.exceptions.SpecMismatchError`
        that says what differs from the closest entry (the CLI's default), or drop them.

    Returns
    -------
    EmbedReport, or a list of them (one per layer, in order) when ``layers`` is given

    Raises
    ------
    ConfigError
        ``layers`` with ``layer`` or ``loaded_backbone``, or an empty or repeated layer.

    Examples
    --------
    >>> from featurepipe.embed import embed
    >>> report = embed("photos/", "photos.h5")  # doctest: +SKIP
    >>> report.n_rows, report.n_skipped  # doctest: +SKIP
    (1200, 3)
    >>> reports = embed("photos/", "photos.h5", layers="blocks.5,penultimate")  # doctest: +SKIP
    >>> [r.layer for r in reports]  # doctest: +SKIP
    ['blocks.5', None]
    """
    options = EmbedOptions(
        batch_size=batch_size, workers=workers, device=device, precision=precision,
        compile=compile, decoder=decoder, dtype=dtype, on_error=on_error,
        decode_policy=decode_policy or DecodePolicy(), content_hash=content_hash,
        drop_missing=drop_missing, shard_size=shard_size, lock_timeout=lock_timeout,
        other_entries=other_entries, progress=progress)
    if layers is not None:
        if layer is not None:
            raise ConfigError(f"give layer ({layer!r}) or layers ({layers!r}), not both")
        if loaded_backbone is not None:
            raise ConfigError("layers builds its own network; leave loaded_backbone out")
        specs = [resolve_backbone(backbone, weights, name, image_size)
                 for name in parse_layers(layers)]
        return run_embed_layers(source, store, specs, options, labels=labels, log=log)
    spec = (loaded_backbone.spec if loaded_backbone is not None
            else resolve_backbone(backbone, weights, layer, image_size))
    return run_embed(source, store, spec, options, labels=labels,
                     loaded_backbone=loaded_backbone, log=log)
