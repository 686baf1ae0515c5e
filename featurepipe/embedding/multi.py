"""Several layers in one pass: one decode and one forward per image, one store entry per layer.

Each layer's entry is keyed, planned, sharded and committed exactly as a single-layer run of
that layer (:func:`~featurepipe.embedding.engine.run_embed`) would, so either kind of run
reuses what the other stored. All entries are built under one store lock
(:meth:`featurepipe.store.StoreWriter.sibling`); each commit is atomic on its own, so a killed
run leaves whole entries and shards, never a half-valid entry. The runner is unchanged: it
sees the joint extractor of :func:`featurepipe.backbones.load_layers`, whose rows are the
layers' features side by side, and the driver hands each layer's columns to that layer's sink.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from featurepipe.backbones import Backbone, BackboneSpec, describe_backbone, load_layers
from featurepipe.devices import resolve_device, resolve_precision
from featurepipe.embedding.choose import choose_runner, make_runner
from featurepipe.embedding.engine import (
    make_work,
    refuse_other_specs,
    source_identity,
    store_attrs,
)
from featurepipe.embedding.memory import keep_buffers_in_heap, release_free_heap
from featurepipe.embedding.options import EmbedOptions, EmbedReport
from featurepipe.embedding.plan import Plan, make_plan
from featurepipe.embedding.runners.base import Provenance, Runner
from featurepipe.embedding.sink import ShardSink
from featurepipe.exceptions import ConfigError, StoreError
from featurepipe.gpu_decode import check_decoder
from featurepipe.identity import entry_key, key_parts
from featurepipe.sources import open_source
from featurepipe.store import FeatureStore

__all__ = ["joint_batches", "run_embed_layers", "split_batch"]


def joint_batches(plans: Sequence[Plan]) -> list[list[int]]:
    """The pending batches of several plans, each image once.

    An image comes in its batch of the first plan that has it pending. Plans that agree (every
    layer as far along as the others, the usual case) give exactly one plan's batches, so the
    features equal those of a single-layer run, batch for batch.
    """
    seen: set[int] = set()
    batches = []
    for plan in plans:
        for batch in plan.batches():
            fresh = [i for i in batch if i not in seen]
            if fresh:
                batches.append(fresh)
                seen.update(fresh)
    return batches


def split_batch(indices: Sequence[int], reasons: Sequence[str], features: np.ndarray,
                sinks: Sequence[ShardSink], dims: Sequence[int]) -> None:
    """Give each sink its images of one finished batch and its layer's columns of their rows.

    ``features`` holds one row per image whose reason is empty, the layers' blocks of
    ``dims`` columns side by side (the joint extractor's output).
    """
    row_of: dict[int, int] = {}
    for k, reason in enumerate(reasons):
        if not reason:
            row_of[k] = len(row_of)
    start = 0
    for sink, dim in zip(sinks, dims, strict=True):
        keep = [k for k, i in enumerate(indices) if sink.wants(i)]
        rows = [row_of[k] for k in keep if k in row_of]
        block = (features[rows, start:start + dim] if rows
                 else np.zeros((0, dim), dtype=np.float32))
        if keep:
            sink.add([indices[k] for k in keep], [reasons[k] for k in keep], block)
        start += dim


def run_embed_layers(source: Any, store: str | os.PathLike | FeatureStore,
                     specs: Sequence[BackboneSpec], options: EmbedOptions, *,
                     labels: Sequence | np.ndarray | None = None, runner: Runner | None = None,
                     device: torch.device | None = None, precision: str | None = None,
                     log: Callable[[str], None] | None = None,
                     load: Callable[[Sequence[BackboneSpec]], Backbone] = load_layers
                     ) -> list[EmbedReport]:
    """Embed ``source`` into one entry per spec of ``specs`` (canonical single-layer specs of
    one backbone) from one pass; see :func:`featurepipe.embed.embed` (``layers=``).

    Layers whose entry is complete are not computed; when none needs work, ``load`` (which
    builds the joint network) is never called. Returns one report per spec, in order.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    opts = options
    dev = device if device is not None else resolve_device(opts.device)
    prec = precision if precision is not None else resolve_precision(opts.precision, dev)
    check_decoder(opts.decoder, dev)
    fs = store if isinstance(store, FeatureStore) else FeatureStore(store)
    fs.check_writable()  # before scanning the source or loading anything
    src = open_source(source, labels=labels)
    src.require_unique_ids()
    descs = [describe_backbone(spec) for spec in specs]
    parts = [key_parts(d, opts.decode_policy, prec, opts.dtype, opts.decoder) for d in descs]
    keys = [entry_key(p) for p in parts]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"the layers {[s.layer for s in specs]} name one store entry twice")
    if opts.other_entries == "error":
        refuse_other_specs(fs, keys[0], parts[0], keys[1:])

    ids = [s.id for s in src.samples]
    fps = [src.fingerprint(i, content_hash=opts.content_hash) for i in range(len(src))]
    origin = source_identity(source, src)
    attrs = [{**store_attrs(p, d.feature_dim, dev), "source": origin}
             for p, d in zip(parts, descs, strict=True)]
    extras: list[dict[str, Any]] = [{} for _ in specs]
    prov: Provenance | None = None
    with fs.writer(keys[0], attrs[0], lock_timeout=opts.lock_timeout,
                   on_wait=log or (lambda _m: None),
                   replace=opts.other_entries == "replace") as first:
        writers = [first, *(first.sibling(k, a) for k, a in zip(keys[1:], attrs[1:],
                                                               strict=True))]
        plans = []
        for writer in writers:
            writer.check_source(zip(ids, fps, strict=True), drop_missing=opts.drop_missing)
            plans.append(make_plan(ids, fps, writer.existing(), writer.existing_skipped(),
                                   opts.batch_size, opts.shard_size, writer.shard_done))
        todo = [n for n, plan in enumerate(plans) if plan.pending]
        if todo:
            bb = load([descs[n].spec for n in todo])
            dims = bb.layer_dims
            # Until the last commit, every layer's shards and a store file holding every
            # layer exist beside the old file: check_space counts rows x width, so give it
            # the sum of rows x width over the layers as rows of width one.
            first.check_space(sum((len(src) + plans[n].n_pending) * dim
                                  for n, dim in zip(todo, dims, strict=True)), 0, 1)
            names = [s.path for s in src.samples]
            sinks = [ShardSink(plans[n].pending, writers[n], ids, fps, dim, opts.dtype,
                               opts.on_error, names,
                               after_shard=release_free_heap if k == 0 else _nothing)
                     for k, (n, dim) in enumerate(zip(todo, dims, strict=True))]
            batches = joint_batches([plans[n] for n in todo])
            name = f"embed {bb.spec.name} ({len(todo)} layer{'s' if len(todo) > 1 else ''})"
            bar = tqdm(total=sum(len(b) for b in batches), unit="img",
                       disable=not opts.progress, dynamic_ncols=True, desc=name)

            def status(text: str) -> None:
                bar.set_description(f"{name} ({text})" if text else name)

            work, choice = make_work(src, bb, opts, dev, prec, batches, status)
            runner = runner or make_runner(choose_runner(choice))
            if dev.type == "cpu":
                keep_buffers_in_heap()
            try:
                for idx, reasons, feats in runner.run(work):
                    split_batch(idx, reasons, feats, sinks, dims)
                    bar.update(len(idx))
            finally:
                bar.close()
            unfinished = [shard for sink in sinks for shard in sink.pending]
            if unfinished:
                raise StoreError(f"internal: runner {runner.name} returned no rows for shards "
                                 f"{unfinished[:3]}; rerun embed to resume")
            prov = runner.provenance()
            for n, dim in zip(todo, dims, strict=True):
                extras[n] = {**prov.store_attrs(), "dim": dim}
        order = [(ids[i], fps[i], int(src.samples[i].label)) for i in range(len(src))]
        results = [writer.commit(order, src.class_names, drop_missing=opts.drop_missing,
                                 drop_other_entries=opts.other_entries == "replace",
                                 extra_attrs=extra)
                   for writer, extra in zip(writers, extras, strict=True)]
    seconds = time.perf_counter() - t0
    reports = []
    for n, (spec, key, plan, result) in enumerate(zip(specs, keys, plans, results, strict=True)):
        computed = n in todo
        reports.append(EmbedReport(
            store=str(fs.path), key=key, backbone=spec.name, layer=spec.layer,
            n_total=len(src), n_rows=result.n_rows, n_computed=plan.n_pending,
            n_reused=result.n_reused, n_skipped=result.n_skipped, n_dropped=result.n_dropped,
            skipped=list(fs.info(key)["skipped"]), seconds=seconds,
            images_per_second=plan.n_pending / seconds if plan.n_pending else 0.0,
            device=str(dev), precision=prec, n_resumed=plan.n_todo - plan.n_pending,
            compiled=bool(extras[n].get("compiled", False)),
            compile_seconds=prov.compile_seconds if prov and computed else 0.0,
            runner=prov.runner if prov and computed else "",
        ))
    return reports


def _nothing() -> None:
    """After a shard of a second layer: the first layer's sink already trimmed the heap."""
