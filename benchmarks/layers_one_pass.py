"""Several layers in one pass against one layer alone, on all 70,000 Fashion-MNIST images.

``featurepipe embed --layers`` decodes each image once and runs the network once, keeping the
pooled output of every named layer. Its cost should be close to a single-layer run of the
deepest layer named (which needs the same forward), not to the sum of one run per layer. This
script times both on the same images, alternating their order between repeats so that a slow
phase of a shared machine does not always hit the same side, and checks that the one-pass
features of the reference layer equal the single-layer run's.

    python -m benchmarks.layers_one_pass --size 96 --repeats 2

Results: ``benchmarks/results/layers_one_pass.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import machine, write_results
from featurepipe.embed import embed
from featurepipe.sources import FASHION_MNIST_DIR, load_fashion_mnist
from featurepipe.store import FeatureStore

BACKBONE = "efficientnet_lite0"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _layer(name: str) -> str | None:
    return None if name == "penultimate" else name


def images(folder: str, n: int | None) -> np.ndarray:
    """The training and test images as one (N, 28, 28) uint8 array (the first ``n``)."""
    parts = [load_fashion_mnist(folder, split).array for split in ("train", "test")]
    arr = np.concatenate([np.asarray(p) for p in parts])
    return arr if n is None else arr[:n]


def run_once(arr: np.ndarray, store: Path, layers: list[str], size: int
             ) -> tuple[float, dict[str, Any]]:
    """Seconds to embed ``arr`` at ``size`` px into a fresh ``store`` for ``layers`` (one
    pass), and the features of each layer."""
    store.unlink(missing_ok=True)
    t0 = time.perf_counter()
    reports = embed(arr, store, BACKBONE, image_size=size, progress=False,
                    **({"layers": [_layer(x) for x in layers]} if len(layers) > 1
                       else {"layer": _layer(layers[0])}))
    seconds = time.perf_counter() - t0
    reports = reports if isinstance(reports, list) else [reports]
    fs = FeatureStore(store)
    feats = {name: np.asarray(fs.load(rep.key).features)
             for name, rep in zip(layers, reports, strict=True)}
    store.unlink(missing_ok=True)
    return seconds, feats



def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default="blocks.4,blocks.5,penultimate")
    ap.add_argument("--single", default="penultimate",
                    help="the reference layer run alone (the deepest of --layers)")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--n", type=int, default=None, help="first N images (default all 70,000)")
    ap.add_argument("--data", default=FASHION_MNIST_DIR)
    ap.add_argument("--work", default=None, help="folder for the temporary stores")
    ap.add_argument("--out", default="layers_one_pass")
    args = ap.parse_args(argv)
    layers = [x.strip() for x in args.layers.split(",") if x.strip()]
    if args.single not in layers:
        raise SystemExit(f"layers_one_pass: --single {args.single!r} is not one of {layers}")
    arr = images(args.data, args.n)
    log(f"{len(arr)} images at {args.size} px; layers {layers}; reference {args.single}")
    work = Path(args.work or tempfile.mkdtemp(prefix="layers-one-pass-"))
    work.mkdir(parents=True, exist_ok=True)
    for what in ("one_pass", "single"):  # imports and weights load once, untimed
        run_once(arr[:64], work / "warm.h5", layers if what == "one_pass" else [args.single],
                 args.size)
    t_start = time.time()
    times: dict[str, list[float]] = {"one_pass": [], "single": []}
    loads: dict[str, list[float]] = {"one_pass": [], "single": []}
    max_diff = 0.0
    for r in range(args.repeats):
        order = ["one_pass", "single"] if r % 2 == 0 else ["single", "one_pass"]
        got: dict[str, dict[str, Any]] = {}
        for what in order:
            loads[what].append(os.getloadavg()[0])
            seconds, feats = run_once(arr, work / f"{what}.h5",
                                      layers if what == "one_pass" else [args.single],
                                      args.size)
            times[what].append(seconds)
            got[what] = feats
            log(f"repeat {r + 1}: {what} {seconds:.1f} s (load before {loads[what][-1]:.2f})")
        diff = float(np.max(np.abs(got["one_pass"][args.single] - got["single"][args.single])))
        max_diff = max(max_diff, diff)
    one, single = statistics.median(times["one_pass"]), statistics.median(times["single"])
    res = {
        "command": "python -m benchmarks.layers_one_pass " + " ".join(sys.argv[1:]),
        "machine": machine(), "n_images": len(arr), "image_size": args.size, "layers": layers,
        "single": args.single, "repeats": args.repeats, "seconds": times,
        "load_before": loads, "median_seconds": {"one_pass": one, "single": single},
        "ratio_one_pass_to_single": one / single,
        "sum_of_single_runs_avoided": len(layers),
        "max_abs_diff_reference_layer": max_diff,
        "wall_seconds": time.time() - t_start,
    }
    write_results(args.out, res, markdown(res))
    log(f"one pass {one:.1f} s, {args.single} alone {single:.1f} s: ratio {one / single:.3f}; "
        f"max |diff| of {args.single} features {max_diff:g}")


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    rows = "\n".join(
        f"| {k + 1} | {a:.1f} | {b:.1f} | {la:.2f} / {lb:.2f} |"
        for k, (a, b, la, lb) in enumerate(zip(res["seconds"]["one_pass"], res["seconds"]["single"],
                                               res["load_before"]["one_pass"],
                                               res["load_before"]["single"], strict=True)))
    names = ", ".join(f"`{x}`" for x in res["layers"])
    return f"""# Several layers in one pass vs one layer alone

{res['n_images']:,} Fashion-MNIST images (training and test sets as one array) embedded with
`{BACKBONE}` at {res['image_size']} px on the CPU: layers {names}
in one pass (one decode and one forward per image, one store entry per layer) against
`{res['single']}` alone. Repeats alternate which run goes first.

| repeat | one pass (s) | `{res['single']}` alone (s) | load before (one pass / alone) |
|---|---|---|---|
{rows}

Median: one pass {res['median_seconds']['one_pass']:.1f} s, `{res['single']}` alone
{res['median_seconds']['single']:.1f} s, ratio **{res['ratio_one_pass_to_single']:.3f}**
(one run per layer would decode every image {len(res["layers"])} times). The one-pass features of
`{res['single']}` differ from the single-layer run's by at most
{res['max_abs_diff_reference_layer']:g} (max absolute difference).

CPU: {m.get('cpu')} ({m.get('cores')} cores; native bf16: {m.get('cpu_native_bf16')}); torch
threads {m.get('torch_threads')}. Command: `{res['command']}`; wall
{res['wall_seconds'] / 60:.1f} min.
"""


if __name__ == "__main__":
    main()
