"""The driver: plan against the store, run a runner, sink its batches into shards, commit.

Only the driver opens the store writer and commits. The runner's provenance (compiled or not,
device, runner) is returned by the runner and passed to the commit as entry attributes; the key
is computed from the spec alone (a cached rerun never builds the network). The same runners
serve :func:`embed_in_memory`, the path of :class:`~featurepipe.estimators.ImageEmbedder` and
:class:`~featurepipe.model.ImageClassifier`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np
import torch

from featurepipe.backbones import (
    Backbone,
    BackboneDescription,
    BackboneSpec,
    describe_backbone,
    load_backbone,
    resolve_spec,
)
from featurepipe.compiling import should_compile
from featurepipe.devices import resolve_device, resolve_precision
from featurepipe.embedding.choose import RunnerChoice, choose_runner, make_runner
from featurepipe.embedding.memory import keep_buffers_in_heap, release_free_heap
from featurepipe.embedding.options import EmbedOptions, EmbedReport
from featurepipe.embedding.pixels import Pixels
from featurepipe.embedding.plan import make_plan
from featurepipe.embedding.runners.base import Provenance, Runner, Work
from featurepipe.embedding.sink import ShardSink
from featurepipe.exceptions import SpecMismatchError, StoreError
from featurepipe.gpu_decode import check_decoder
from featurepipe.identity import closest_entry, entry_key, key_parts, library_versions
from featurepipe.sources import ImageSource, open_source
from featurepipe.store import FeatureStore

__all__ = ["canonical_spec", "embed_in_memory", "make_work", "refuse_other_specs",
           "resolve_backbone", "run_embed", "source_identity", "store_attrs"]


def canonical_spec(spec: BackboneSpec) -> BackboneSpec:
    """``spec`` with an ``image_size`` equal to the backbone's default written as None, so
    both spellings of one spec name one store entry (and keep the keys of existing stores)."""
    if spec.image_size is None:
        return spec
    default = dataclasses.replace(spec, image_size=None)
    size = describe_backbone(default).preprocess.input_size
    return default if tuple(size) == (spec.image_size, spec.image_size) else spec


def resolve_backbone(backbone: str | BackboneSpec, weights: str | None = None,
                     layer: str | None = None, image_size: int | None = None) -> BackboneSpec:
    """The canonical spec of a backbone request (see :func:`canonical_spec`)."""
    spec = backbone if isinstance(backbone, BackboneSpec) else resolve_spec(
        backbone, weights=weights, layer=layer, image_size=image_size)
    return canonical_spec(spec)


def store_attrs(parts: dict, dim: int | None, device: torch.device) -> dict:
    """Readable attributes for the store entry: the key's parts plus provenance."""
    return {**parts, "dim": dim, "device": str(device), "versions": library_versions()}


def refuse_other_specs(fs: FeatureStore, key: str, parts: dict,
                       siblings: Collection[str] = ()) -> None:
    """Stop when the store holds only entries of other specs, naming what differs from the
    closest of them. ``siblings`` are the keys of the other layers of the same run: a store
    holding any of ``key`` and ``siblings`` already has this run's features."""
    if not fs.exists():
        return
    ours = {key, *siblings}
    present = fs.keys()
    if ours & set(present):
        return
    others = {k: fs.attrs(k) for k in present}
    closest = closest_entry(parts, others)
    if closest is None:
        return
    other, differs = closest
    raise SpecMismatchError(
        f"{fs.path} holds features made with another spec (backbone "
        f"{others[other].get('backbone', '?')}; differs in: {', '.join(differs) or 'key'}); "
        "use --replace to recompute, --add-entry to keep both, or another --out")


def source_identity(given: Any, src: ImageSource) -> str | None:
    """What the store records as the rows' origin: ``kind:resolved path`` of a folder or file.

    Path lists and arrays have none (a path list's ids are the paths themselves).
    """
    if isinstance(given, (str, os.PathLike)):
        return f"{src.kind}:{os.path.realpath(os.fspath(given))}"
    return f"{src.kind}:{src.root}" if src.root else None


def make_work(source: ImageSource, backbone: Backbone, opts: EmbedOptions, device: torch.device,
              precision: str, batches: Sequence[Sequence[int]], status: Callable[[str], None]
              ) -> tuple[Work, RunnerChoice]:
    """What a runner computes for ``batches``, and the facts that choose the runner."""
    compile_now = should_compile(opts.compile, device, precision,
                                 sum(len(b) for b in batches), backbone.preprocess.input_size)
    work = Work(Pixels.for_backbone(source, backbone, opts.decode_policy), batches, backbone,
                device, precision, opts.batch_size, opts.workers, compile_now, status)
    return work, RunnerChoice(device.type, opts.workers, opts.decoder, compile_now)


def run_embed(source: Any, store: str | os.PathLike | FeatureStore, backbone: BackboneSpec,
              options: EmbedOptions, *, labels: Sequence | np.ndarray | None = None,
              runner: Runner | None = None, device: torch.device | None = None,
              precision: str | None = None, loaded_backbone: Backbone | None = None,
              log: Callable[[str], None] | None = None,
              load: Callable[[BackboneSpec], Backbone] = load_backbone) -> EmbedReport:
    """Embed ``source`` into ``store``, computing only what the store lacks; see
    :func:`featurepipe.embed.embed`. ``runner`` overrides :func:`choose_runner` (Ray, tests);
    ``device`` and ``precision``, when given, are the resolved values the runner uses;
    ``load`` builds the network when there is work (only then)."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    opts = options
    dev = device if device is not None else resolve_device(opts.device)
    prec = precision if precision is not None else resolve_precision(opts.precision, dev)
    check_decoder(opts.decoder, dev)
    fs = store if isinstance(store, FeatureStore) else FeatureStore(store)
    fs.check_writable()  # before scanning the source or loading anything
    src = open_source(source, labels=labels)
    src.require_unique_ids()  # before any work: the commit keeps one row per id
    desc: Backbone | BackboneDescription = (
        loaded_backbone if loaded_backbone is not None else describe_backbone(backbone))
    parts = key_parts(desc, opts.decode_policy, prec, opts.dtype, opts.decoder)
    key = entry_key(parts)
    if opts.other_entries == "error":
        refuse_other_specs(fs, key, parts)

    ids = [s.id for s in src.samples]
    fps = [src.fingerprint(i, content_hash=opts.content_hash) for i in range(len(src))]
    extra: dict[str, Any] = {}
    prov: Provenance | None = None
    attrs = {**store_attrs(parts, desc.feature_dim, dev), "source": source_identity(source, src)}
    with fs.writer(key, attrs, lock_timeout=opts.lock_timeout, on_wait=log or (lambda _m: None),
                   replace=opts.other_entries == "replace") as writer:
        writer.check_source(zip(ids, fps, strict=True), drop_missing=opts.drop_missing)
        plan = make_plan(ids, fps, writer.existing(), writer.existing_skipped(),
                         opts.batch_size, opts.shard_size, writer.shard_done)
        if plan.pending:
            bb = loaded_backbone or load(desc.spec)
            writer.check_space(len(src), plan.n_pending, bb.feature_dim)
            sink = ShardSink(plan.pending, writer, ids, fps, bb.feature_dim, opts.dtype,
                             opts.on_error, [s.path for s in src.samples])
            name = f"embed {bb.spec.name}"
            bar = tqdm(total=plan.n_pending, unit="img", disable=not opts.progress,
                       dynamic_ncols=True, desc=name)

            def status(text: str) -> None:
                bar.set_description(f"{name} ({text})" if text else name)

            work, choice = make_work(src, bb, opts, dev, prec, plan.batches(), status)
            runner = runner or make_runner(choose_runner(choice))
            if dev.type == "cpu":
                keep_buffers_in_heap()
            try:
                for idx, reasons, feats in runner.run(work):
                    sink.add(idx, reasons, feats)
                    bar.update(len(idx))
            finally:
                bar.close()
            if sink.pending:
                raise StoreError(f"internal: runner {runner.name} returned no rows for shards "
                                 f"{sink.pending[:3]}; rerun embed to resume")
            prov = runner.provenance()
            extra = {**prov.store_attrs(), "dim": bb.feature_dim}
        order = [(ids[i], fps[i], int(src.samples[i].label)) for i in range(len(src))]
        result = writer.commit(order, src.class_names, drop_missing=opts.drop_missing,
                               drop_other_entries=opts.other_entries == "replace",
                               extra_attrs=extra)
    info = fs.info(key)
    seconds = time.perf_counter() - t0
    n_pending = plan.n_pending
    return EmbedReport(
        store=str(fs.path), key=key, backbone=desc.spec.name, layer=desc.spec.layer,
        n_total=len(src),
        n_rows=result.n_rows, n_computed=n_pending, n_reused=result.n_reused,
        n_skipped=result.n_skipped, n_dropped=result.n_dropped,
        skipped=list(info["skipped"]),
        seconds=seconds, images_per_second=n_pending / seconds if n_pending else 0.0,
        device=str(dev), precision=prec, n_resumed=plan.n_todo - n_pending,
        compiled=bool(extra.get("compiled", False)),
        compile_seconds=prov.compile_seconds if prov else 0.0,
        runner=prov.runner if prov else "",
    )


def embed_in_memory(source: ImageSource, backbone: Backbone, options: EmbedOptions, *,
                    device: torch.device, precision: str, runner: Runner | None = None
                    ) -> list[np.ndarray | str]:
    """Every image of ``source`` embedded in memory: a float32 feature row, or why it failed.

    The runners of :func:`run_embed` without a store (no plan against entries, no shards);
    batches are consecutive slices of ``options.batch_size``.
    """
    from tqdm.auto import tqdm

    n = len(source)
    batches = [list(range(s, min(s + options.batch_size, n)))
               for s in range(0, n, options.batch_size)]
    work, choice = make_work(source, backbone, options, device, precision, batches,
                         lambda _text: None)
    runner = runner or make_runner(choose_runner(choice))
    if device.type == "cpu":
        keep_buffers_in_heap()
    values: list[np.ndarray | str] = [""] * n
    with tqdm(total=n, unit="img", disable=not options.progress,
              desc=f"embed {backbone.spec.name}") as bar:
        for idx, reasons, feats in runner.run(work):
            good = iter(feats)
            for i, reason in zip(idx, reasons, strict=True):
                values[i] = reason if reason else next(good)
            bar.update(len(idx))
    release_free_heap()
    return values
