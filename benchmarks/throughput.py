"""Embedding throughput from JPEG files: featurepipe vs the naive tutorial loop vs the ceiling.

For each backbone, in one run, at the same resolution and batch size:

- naive: ``torchvision.datasets.ImageFolder`` + ``DataLoader`` (defaults) + fp32 NCHW model under
  ``torch.no_grad`` -- the loop most tutorials show;
- eager: ``featurepipe.embed(compile="off")`` end to end (decode threads, uint8 batches,
  autocast, channels_last, store commit; no ``torch.compile``);
- featurepipe: ``featurepipe.embed(compile=--compile)``, end to end into a fresh HDF5 store
  (backbone load, fingerprints, decode, any ``torch.compile`` on a cold inductor cache, store
  commit all included); ``steady`` is the same run without the first batch's compile time;
- ceiling: featurepipe's forward pass alone (same precision, layout and compile) on random uint8
  batches already in memory; on CPU, compiled, the faster of one batch at a time over all cores
  and one single-threaded stream per core (what the engine runs);
- cache: the same ``embed`` call again (everything re-used).

Features are compared with the naive fp32 ones (cosine similarity per image).

    python -m benchmarks.throughput --n-images 2048 --compile on \
        --backbones efficientnet_lite0,torchvision:resnet50
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

import featurepipe.embed as fp_embed
from benchmarks.common import machine, make_photo_folder, write_results
from featurepipe.backbones import load_backbone, resolve_spec
from featurepipe.report import markdown_table
from featurepipe.store import FeatureStore


def naive_loop(root: Path, name: str, weights: str | None, batch_size: int) -> tuple[float, dict]:
    """The tutorial: ImageFolder + DataLoader(batch_size) + fp32 NCHW model (on the GPU when
    there is one), no tricks."""
    from torchvision import datasets
    from torchvision import transforms as T

    bb = load_backbone(resolve_spec(name, weights=weights))
    p = bb.preprocess
    interp = T.InterpolationMode(p.interpolation)
    tf = T.Compose([T.Resize(p.resize_size, interpolation=interp), T.CenterCrop(p.input_size),
                    T.ToTensor(), T.Normalize(p.mean, p.std)])
    ds = datasets.ImageFolder(str(root), transform=tf)
    loader = DataLoader(ds, batch_size=batch_size)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = bb.extractor.eval().to(dev)
    t0 = time.perf_counter()
    outs = []
    with torch.no_grad():
        for x, _ in loader:
            outs.append(model(x.to(dev)).cpu())
    seconds = time.perf_counter() - t0
    feats = torch.cat(outs).numpy()
    ids = [Path(path).relative_to(root).as_posix() for path, _ in ds.samples]
    return seconds, dict(zip(ids, feats, strict=True))


def ceiling(name: str, weights: str | None, batch_size: int, n: int, precision: str,
            compiled: bool, on_device: bool = False, streams: int = 1) -> float:
    """Forward-only images/s on uint8 batches already in memory, as featurepipe runs them.

    ``on_device``: the batch already sits in GPU memory (no host-to-device copy per batch).
    ``streams`` > 1 (CPU, compiled): that many threads, each running the forward pass alone on
    its own batch, in chunks, as the engine's streams do (:mod:`featurepipe.cpu_streams`).
    """
    from featurepipe.compiling import CompiledExtractor
    from featurepipe.cpu_streams import STREAM_CHUNK
    from featurepipe.embedding.forward import compile_for_streams

    bb = load_backbone(resolve_spec(name, weights=weights))
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module = fp_embed.prepare_model(bb, dev)
    per_core = streams > 1 and compiled and dev.type == "cpu"
    model: Any = module
    if compiled:
        model = CompiledExtractor(module, STREAM_CHUNK if per_core else batch_size, dev,
                                  precision, per_core=per_core)
    x = torch.randint(0, 256, (batch_size, 3, *bb.preprocess.input_size), dtype=torch.uint8)
    x = x.contiguous(memory_format=torch.channels_last)
    if on_device:
        x = x.to(dev)
    batches = max(1, n // batch_size)
    if not per_core:
        for _ in range(2):  # warm-up (and compile)
            fp_embed.forward_features(model, x, dev, precision)
        t0 = time.perf_counter()
        for _ in range(batches):
            fp_embed.forward_features(model, x, dev, precision)
        return batches * batch_size / (time.perf_counter() - t0)
    compile_for_streams(model, bb.preprocess.input_size, dev, precision)
    per_stream = max(1, batches // streams)

    def run(k: int) -> None:
        for _ in range(k):
            fp_embed.forward_features(model, x, dev, precision)

    with ThreadPoolExecutor(streams, initializer=fp_embed.run_ops_single_threaded) as pool:
        list(pool.map(run, [1] * streams))  # warm-up
        t0 = time.perf_counter()
        list(pool.map(run, [per_stream] * streams))
        return streams * per_stream * batch_size / (time.perf_counter() - t0)


def timed_embed(root: Path, store: Path, name: str, weights: str | None, batch_size: int,
                workers: int | None, compile_choice: str, decoder: str = "pil"
                ) -> tuple[float, fp_embed.EmbedReport]:
    t0 = time.perf_counter()
    report = fp_embed.embed(root, store, name, weights=weights, batch_size=batch_size,
                            workers=workers, compile=compile_choice, decoder=decoder,
                            progress=False)
    return time.perf_counter() - t0, report


def bench_backbone(root: Path, name: str, weights: str | None, n: int, batch_size: int,
                   workers: int | None, compile_choice: str = "auto",
                   naive: tuple[float, dict] | None = None) -> dict:
    naive_s, naive_feats = naive or naive_loop(root, name, weights, batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        eager_s, _ = timed_embed(root, Path(tmp) / "eager.h5", name, weights, batch_size,
                                 workers, "off")
        store = Path(tmp) / "bench.h5"
        first_s, report = timed_embed(root, store, name, weights, batch_size, workers,
                                      compile_choice)
        cached_s, _ = timed_embed(root, store, name, weights, batch_size, workers,
                                  compile_choice)
        fs = FeatureStore(store).load()
        gpu = {}
        if torch.cuda.is_available():  # JPEGs decoded on the GPU (nvjpeg), same everything else
            nv_store = Path(tmp) / "nvjpeg.h5"
            nv_s, _ = timed_embed(root, nv_store, name, weights, batch_size, workers, "off",
                                  "nvjpeg")
            nv = FeatureStore(nv_store).load()
            gpu = {"nvjpeg_img_s": n / nv_s,
                   "nvjpeg_steady_img_s": nvjpeg_steady(root, Path(tmp), name, weights,
                                                        batch_size, workers),
                   "nvjpeg_cosine_min": float(cosine(nv.features, naive_feats, nv.ids).min())}
    cos = cosine(fs.features, naive_feats, fs.ids)
    timed = min(n, 4096 if torch.cuda.is_available() else 1024)
    ceil = ceil_team = ceiling(name, weights, batch_size, timed, report.precision,
                               report.compiled)
    streams = {}
    if report.device == "cpu" and report.compiled:  # the engine ran one stream per core
        streams["ceiling_team_img_s"] = ceil_team
        streams["ceiling_streams_img_s"] = ceiling(name, weights, batch_size, timed,
                                                   report.precision, True,
                                                   streams=torch.get_num_threads())
        ceil = max(ceil_team, streams["ceiling_streams_img_s"])
    steady_s = first_s - report.compile_seconds
    if gpu:
        gpu["ceiling_on_device_img_s"] = ceiling(name, weights, batch_size, timed,
                                                 report.precision, report.compiled, True)
        gpu["nvjpeg_steady_fraction_of_ceiling"] = gpu["nvjpeg_steady_img_s"] / ceil
        gpu["nvjpeg_steady_fraction_of_device_ceiling"] = (gpu["nvjpeg_steady_img_s"]
                                                           / gpu["ceiling_on_device_img_s"])
        gpu["nvjpeg_fraction_of_device_ceiling"] = (gpu["nvjpeg_img_s"]
                                                    / gpu["ceiling_on_device_img_s"])
    return {
        "backbone": name, "weights": weights or "pretrained", "n_images": n,
        "batch_size": batch_size, "precision": report.precision, "device": report.device,
        "compiled": report.compiled, "compile_seconds": report.compile_seconds,
        "naive_img_s": n / naive_s, "eager_img_s": n / eager_s, "featurepipe_img_s": n / first_s,
        "steady_img_s": n / steady_s, "ceiling_img_s": ceil,
        "speedup_vs_naive": naive_s / first_s, "steady_speedup_vs_naive": naive_s / steady_s,
        "fraction_of_ceiling": (n / steady_s) / ceil,
        "cached_rerun_seconds": cached_s, "first_run_seconds": first_s,
        "cache_speedup": first_s / cached_s,
        "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()), **streams, **gpu,
    }


def nvjpeg_steady(root: Path, tmp: Path, name: str, weights: str | None, batch_size: int,
                  workers: int | None, reps: int = 3) -> float:
    """The nvjpeg path's rate once running: whole runs over all the files and over their first
    quarter, each into a fresh store; the difference of the two times cancels what every run
    pays once (backbone load, worker start-up, first batch, store commit). Median of ``reps``."""
    paths = sorted(str(p) for p in root.rglob("*.jpg"))
    part = len(paths) // 4
    rates = []
    for rep in range(reps):
        times = []
        for k, subset in enumerate((paths[:part], paths)):
            t0 = time.perf_counter()
            fp_embed.embed(subset, tmp / f"steady-{rep}-{k}.h5", name, weights=weights,
                           batch_size=batch_size, workers=workers, compile="off",
                           decoder="nvjpeg", progress=False)
            times.append(time.perf_counter() - t0)
        rates.append((len(paths) - part) / (times[1] - times[0]))
    return float(np.median(rates))


def cosine(features: np.ndarray, reference: dict, ids: list[str]) -> np.ndarray:
    """Per-image cosine similarity of ``features`` with the naive fp32 ones of the same files."""
    ours = features.astype(np.float32)
    ref = np.stack([reference[i] for i in ids])
    return np.sum(ours * ref, 1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-images", type=int, default=3072)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--backbones", default="efficientnet_lite0,torchvision:resnet50")
    ap.add_argument("--random-weights-for", default="torchvision:resnet50",
                    help="backbones timed with random weights (no download; speed is the same)")
    ap.add_argument("--images", default=None, help="image folder to use/keep (default: temp)")
    ap.add_argument("--name", default=None,
                    help="result file name (default throughput-gpu or throughput-cpu)")
    ap.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                    help="featurepipe's compile setting for the featurepipe column (auto compiles "
                         "from 6,000 images at 224 px; 'on' shows a long run's speed on fewer)")
    ap.add_argument("--warm-compile-cache", action="store_true",
                    help="keep inductor's on-disk cache (default: a fresh one, so the timed "
                         "compile is a first-ever, cold one)")
    args = ap.parse_args()
    args.name = args.name or ("throughput-gpu" if torch.cuda.is_available() else "throughput-cpu")
    if not args.warm_compile_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cold-")

    tmp = None
    root = Path(args.images) if args.images else Path(tmp := tempfile.mkdtemp()) / "images"
    make_photo_folder(root, args.n_images)
    random_for = set(filter(None, args.random_weights_for.split(",")))
    rows = []
    names = args.backbones.split(",")
    try:
        # Every naive loop runs before featurepipe does: featurepipe tunes the process's malloc
        # on CPU (embed.keep_buffers_in_heap), which would speed up a naive loop run after it.
        naive = {name: naive_loop(root, name, "random" if name in random_for else None,
                                  args.batch_size) for name in names}
        for name in names:
            row = bench_backbone(root, name, "random" if name in random_for else None,
                                 args.n_images, args.batch_size, args.workers, args.compile,
                                 naive[name])
            rows.append(row)
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    cols = ["backbone", "weights", "precision", "naive_img_s", "eager_img_s",
            "featurepipe_img_s", "compile_seconds", "steady_img_s", "ceiling_img_s",
            "speedup_vs_naive", "steady_speedup_vs_naive", "fraction_of_ceiling",
            "cache_speedup", "cosine_min"]
    if any("ceiling_streams_img_s" in row for row in rows):
        cols[cols.index("ceiling_img_s") + 1:cols.index("ceiling_img_s") + 1] = [
            "ceiling_team_img_s", "ceiling_streams_img_s"]
    if torch.cuda.is_available():
        cols += ["nvjpeg_img_s", "nvjpeg_steady_img_s", "ceiling_on_device_img_s",
                 "nvjpeg_steady_fraction_of_ceiling", "nvjpeg_steady_fraction_of_device_ceiling",
                 "nvjpeg_cosine_min"]
    md = (f"# Embedding throughput ({args.n_images} JPEG files, 500x375, "
          f"batch {args.batch_size})\n\n"
          + markdown_table(rows, cols)
          + "\n\nimg/s, all from files on disk except the ceiling. naive = ImageFolder + "
            "DataLoader + fp32 NCHW model; eager = `featurepipe.embed(compile=\"off\")`; "
            f"featurepipe = `featurepipe.embed(compile=\"{args.compile}\")`, everything "
            "included (backbone load, the torch.compile on a "
            + ("warm" if args.warm_compile_cache else "cold, empty")
            + " inductor cache: `compile_seconds`, store commit); steady = the same run less the "
            "compile; ceiling = featurepipe's forward pass alone (same precision and compile) on "
            "uint8 batches in memory; on CPU, compiled, the faster of two ways to run it: "
            "ceiling_team = one batch at a time over all cores, ceiling_streams = one "
            "single-threaded stream per core (what the engine runs, "
            "`featurepipe.cpu_streams`); fraction_of_ceiling = steady / ceiling; cosine = "
            "featurepipe features vs naive fp32 features of the same files."
          + (" On the GPU: nvjpeg = `featurepipe.embed(decoder=\"nvjpeg\")` (JPEGs decoded "
             "and resized on the GPU), everything included; nvjpeg_steady = its rate once "
             "running: (n - n/4) / (time of a whole run over n files - time of one over the "
             "first n/4), median of 3 (what every run pays once cancels); ceiling_on_device = "
             "the forward pass on a uint8 batch already in GPU memory (no host-to-device copy)."
             if torch.cuda.is_available()
             else ""))
    write_results(args.name, {"machine": machine(), "args": vars(args), "rows": rows}, md)
    print(md)


if __name__ == "__main__":
    main()
