"""Fashion-MNIST under benchmarks/protocol.md: every feature set, the same heads and budget.

Feature sets: raw pixels, HOG (9 orientations, 4x4 pixels per cell, 2x2 cells per block), and
optionally frozen ``efficientnet_lite0`` layers (``--frozen blocks.5@128``) and their
concatenation with HOG. Each gets the linear and the kernel head of :mod:`benchmarks.fm_heads`:
a grid search fitted on the fit rows and scored on a stratified 10% validation holdout of the
training rows, then one final fit of the chosen point on all training rows, scored once on the
test images (accuracy with a 95% Wilson interval). The headline arm of each family is the one
with the best validation accuracy; headline arms are compared by an exact McNemar test.
Extraction, search and final fit are timed separately, ``--repeats`` times each.

Small mode (a smoke test of the code; its numbers are logged as ``mode: small``)::

    python -m benchmarks.fm_protocol --n-train 2000 --n-test 1000 --repeats 1

Full size (all 60,000 training and 10,000 test images; the exact commands and their estimated
time are in benchmarks/protocol.md, section 9)::

    python -m benchmarks.fm_protocol --repeats 3 --out fashion_mnist_protocol_classical
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import fm_heads, fm_log
from benchmarks.common import RESULTS, machine
from featurepipe.compare import paired_comparison, wilson_interval
from featurepipe.exceptions import FeaturePipeError
from featurepipe.report import markdown_table
from featurepipe.sources import FASHION_MNIST_DIR, ImageSource, load_fashion_mnist

BACKBONE = "efficientnet_lite0"
PUBLISHED = {"pixels+kernel": 0.897, "hog+kernel": 0.926}
FROZEN_GOAL = 0.926
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cpu_flags() -> dict[str, bool]:
    """The ISA extensions that decide how fast the heads and the embedding run."""
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines()
                    if x.startswith("flags"))
        present = set(line.split(":", 1)[1].split())
    except (OSError, StopIteration):
        present = set()
    return {f: f in present for f in FLAGS}


def stratified(labels: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """Sorted positions of a stratified subset of ``n`` (all when ``n`` is None or too big)."""
    from sklearn.model_selection import train_test_split

    if n is None or n >= len(labels):
        return np.arange(len(labels))
    keep, _ = train_test_split(np.arange(len(labels)), train_size=n, stratify=labels,
                               random_state=seed)
    return np.sort(keep)


# ------------------------------------------------------------------------------ features


def pixels(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def hog(images: np.ndarray) -> np.ndarray:
    from skimage.feature import hog as sk_hog

    return np.stack([sk_hog(im.astype(np.float32) / 255.0, orientations=9,
                            pixels_per_cell=(4, 4), cells_per_block=(2, 2),
                            block_norm="L2-Hys", feature_vector=True) for im in images]
                    ).astype(np.float32)


def frozen_layers(source: ImageSource, work: Path, layers: list[str], size: int, role: str
                  ) -> Callable[[], dict[str, np.ndarray]]:
    """A function embedding ``source`` at ``size`` px for every layer of ``layers`` in one
    pass (one decode, one forward; one store entry per layer). No cache: timed each call."""
    def run() -> dict[str, np.ndarray]:
        from featurepipe.embed import embed
        from featurepipe.store import FeatureStore

        store = work / f"frozen-{role}-{size}.h5"
        store.unlink(missing_ok=True)
        reports = embed(source, store, BACKBONE, image_size=size, progress=False,
                        layers=[None if name == "penultimate" else name for name in layers])
        fs = FeatureStore(store)
        return {name: np.asarray(fs.load(rep.key).features, dtype=np.float32)
                for name, rep in zip(layers, reports, strict=True)}
    return run


def frozen_single(source: ImageSource, work: Path, layer: str, size: int) -> float:
    """Seconds to embed ``source`` for one layer alone (the reference for the one-pass run)."""
    from featurepipe.embed import embed

    store = work / f"single-{layer}-{size}.h5"
    store.unlink(missing_ok=True)
    t0 = time.perf_counter()
    embed(source, store, BACKBONE, image_size=size, progress=False,
          layer=None if layer == "penultimate" else layer)
    seconds = time.perf_counter() - t0
    store.unlink(missing_ok=True)
    return seconds


def _groups(specs: list[str]) -> dict[int, list[str]]:
    """``LAYER@SIZE`` specs grouped by size: each size is one pass over the images."""
    groups: dict[int, list[str]] = {}
    for spec in specs:
        layer, _, size = spec.partition("@")
        if not layer or not size.isdigit():
            raise SystemExit(f"fm_protocol: frozen set {spec!r} is not LAYER@SIZE")
        groups.setdefault(int(size), []).append(layer)
    return groups


def timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, list[float]]:
    """``fn()``'s result (first call) and the wall time of each of ``repeats`` calls."""
    out, times = None, []
    for k in range(repeats):
        LOADS.append(os.getloadavg()[0])
        t0 = time.perf_counter()
        res = fn()
        times.append(time.perf_counter() - t0)
        if k == 0:
            out = res
    return out, times


#: 1-minute load average before each timed repeat (protocol: timings on an idle machine).
LOADS: list[float] = []


def summary(times: list[float]) -> dict[str, Any]:
    """Median, range and count of repeated timings, with the load before each repeat."""
    return {"median": statistics.median(times), "min": min(times), "max": max(times),
            "repeats": len(times), "load_before": LOADS[-len(times):]}


# ------------------------------------------------------------------------------ run


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    facts = {**machine(), "cpu_flags": cpu_flags(), "machine": platform.machine()}  # the commit run
    try:
        train_src = load_fashion_mnist(args.data, "train")
        test_src = load_fashion_mnist(args.data, "test")
    except FeaturePipeError as exc:
        sys.exit(f"fm_protocol: {exc}")
    assert train_src.array is not None and test_src.array is not None
    tr = stratified(train_src.labels, args.n_train, args.seed)
    te = stratified(test_src.labels, args.n_test, args.seed)
    X_img, y = train_src.array[tr], np.asarray(train_src.labels)[tr]
    T_img, y_test = test_src.array[te], np.asarray(test_src.labels)[te]
    fit, val = _holdout(y, args.val_size, args.seed)
    log(f"{len(y)} training rows ({len(fit)} fit + {len(val)} validation), "
        f"{len(y_test)} test rows; load average {os.getloadavg()[0]:.1f}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    extractors: dict[str, tuple[Callable[[], np.ndarray], Callable[[], np.ndarray]]] = {
        "pixels": (lambda: pixels(X_img), lambda: pixels(T_img)),
        "hog": (lambda: hog(X_img), lambda: hog(T_img)),
    }
    cache = work / "features"
    cache.mkdir(exist_ok=True)
    features: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    extraction: dict[str, dict[str, Any]] = {}
    wanted = [*args.features, *(f"frozen:{s}" for s in args.frozen)]
    for name in wanted:
        if args.cached and _cached(cache, name):
            features[name] = _cached(cache, name)  # type: ignore[assignment]
            extraction[name] = {"train_seconds": "cached (measured by the run that made it)",
                                "dim": int(features[name][0].shape[1])}
            log(f"{name}: {features[name][0].shape[1]}-d, from {cache}")
    for name, (f_train, f_test) in extractors.items():
        if name not in args.features or name in features:
            continue
        X, times = timed(f_train, args.repeats)
        T = f_test()
        features[name] = (X, T)
        extraction[name] = {"train_seconds": summary(times), "dim": int(X.shape[1])}
        log(f"{name}: {X.shape[1]}-d, training-image extraction {statistics.median(times):.1f} s")
    passes = []
    todo = [s for s in args.frozen if f"frozen:{s}" not in features]
    for size, layers in _groups(todo).items():
        log(f"frozen {','.join(layers)} at {size} px: one pass over "
            f"{len(X_img) + len(T_img)} images")
        got, times = timed(frozen_layers(train_src.subset(tr), work, layers, size, "train"),
                           args.repeats)
        t0 = time.perf_counter()
        got_test = frozen_layers(test_src.subset(te), work, layers, size, "test")()
        test_seconds = time.perf_counter() - t0
        one_pass = {"layers": layers, "size": size, "train_seconds": summary(times),
                    "test_seconds": test_seconds}
        if size in args.single_check:
            one_pass["single_layer"] = {
                "layer": layers[-1], "train_seconds":
                frozen_single(train_src.subset(tr), work, layers[-1], size)}
            log(f"  single layer {layers[-1]} alone: "
                f"{one_pass['single_layer']['train_seconds']:.1f} s vs "
                f"{statistics.median(times):.1f} s for {len(layers)} layers in one pass")
        passes.append(one_pass)
        for layer in layers:
            name = f"frozen:{layer}@{size}"
            features[name] = (got[layer], got_test[layer])
            extraction[name] = {"train_seconds": summary(times), "dim": int(got[layer].shape[1]),
                                "one_pass_with": layers}
            log(f"{name}: {got[layer].shape[1]}-d, training-image extraction (the one pass) "
                f"{statistics.median(times):.1f} s")
    for name, (X, T) in features.items():
        _store_cache(cache, name, X, T)
    if args.concat_hog and "hog" in features:
        for name in [n for n in features if n.startswith("frozen:")]:
            X = np.hstack([features[name][0], features["hog"][0]])
            T = np.hstack([features[name][1], features["hog"][1]])
            features[f"{name}+hog"] = (X, T)
            extraction[f"{name}+hog"] = {"dim": int(X.shape[1]),
                                         "train_seconds": "sum of its parts"}

    order = [n for n in wanted if n in features] + [n for n in features if n not in wanted]
    features = {n: features[n] for n in order}
    arms, predictions = [], {}

    def run_arm(name: str, family: str) -> None:
        X, T = features[name]
        arm, pred = _arm(name, family, X, T, y, y_test, fit, val, args)
        arm["extraction"] = extraction[name]
        arms.append(arm)
        predictions[arm["arm"]] = pred
        log(f"{arm['arm']}: val {arm['val_accuracy']:.4f}, test {arm['accuracy']:.4f} "
            f"[{arm['accuracy_ci95'][0]:.4f}, {arm['accuracy_ci95'][1]:.4f}], chosen "
            f"{arm['chosen']}, search {arm['search_seconds']['median']:.1f} s, final fit "
            f"{arm['final_fit_seconds']['median']:.1f} s"
            + ("" if arm["converged"] else " -- NOT CONVERGED (a failure)"))

    deferred = []  # frozen sets' kernel heads: only the best few by linear validation
    for name in [n for n in features if _family(n) in args.families]:
        for family in args.heads:
            if (family == "kernel" and _family(name) == "frozen" and "linear" in args.heads
                    and args.frozen_kernel_top is not None):
                deferred.append(name)
            else:
                run_arm(name, family)
    linear_val = {a["features"]: a["val_accuracy"] for a in arms if a["head"] == "linear"}
    ranked = sorted(deferred, key=lambda n: -linear_val[n])  # stable: ties keep the given order
    kernel_sets = ranked[:args.frozen_kernel_top] if deferred else []
    if deferred:
        log(f"kernel head for the frozen sets with the best linear validation accuracy: "
            f"{', '.join(kernel_sets)}")
    for name in kernel_sets:
        run_arm(name, "kernel")
    headlines = {fam: _headline(arms, fam) for fam in ("classical", "frozen", "hybrid")}
    comparisons = []
    for a, b in (("frozen", "classical"), ("hybrid", "classical"), ("hybrid", "frozen")):
        ha, hb = headlines[a], headlines[b]
        if ha and hb:
            res = paired_comparison(y_test, predictions[ha["arm"]], predictions[hb["arm"]])
            comparisons.append({"a": ha["arm"], "b": hb["arm"], "family_a": a, "family_b": b,
                                **res})
    # Per-image test predictions, so later runs (fine-tuning on a GPU) can be paired with these
    # arms by an exact McNemar test.
    arrays: dict[str, Any] = {"y_test": y_test,
                              **{a: p.astype(np.int16) for a, p in predictions.items()}}
    np.savez_compressed(work / "predictions.npz", **arrays)
    return {
        "mode": "small" if (args.n_train or args.n_test) else "full",
        "protocol": "benchmarks/protocol.md (2026-12-07)",
        "command": "python -m benchmarks.fm_protocol " + " ".join(sys.argv[1:]),
        "machine": facts,
        "load_average_start": list(os.getloadavg()),
        "n_train": len(y), "n_fit": len(fit), "n_val": len(val), "n_test": len(y_test),
        "seed": args.seed, "val_size": args.val_size, "kernel": args.kernel,
        "wide_grid": args.wide_grid,
        "n_components": args.n_components, "repeats": args.repeats,
        "grids": {"linear_C": fm_heads.LINEAR_CS, "kernel_g": fm_heads.KERNEL_G,
                  "kernel_C": fm_heads.KERNEL_CS if args.kernel == "exact" else fm_heads.RIDGE_CS,
                  "max_iter": fm_heads.MAX_ITER, "linear_patience": fm_heads.PATIENCE,
                  "solver": fm_heads.SOLVER},
        "blas_threads": args.blas_threads, "test_positions": te.tolist(),
        "arms": arms, "headlines": {k: v["arm"] if v else None for k, v in headlines.items()},
        "comparisons": comparisons, "frozen_passes": passes,
        "frozen_kernel_sets": kernel_sets, "frozen_kernel_top": args.frozen_kernel_top,
        "wall_seconds": time.perf_counter() - t_start,
    }


def _cache_name(name: str) -> str:
    return name.replace(":", "_").replace("@", "_").replace("+", "_")


def _cached(cache: Path, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    train, test = (cache / f"{_cache_name(name)}.{r}.npy" for r in ("train", "test"))
    if train.exists() and test.exists():
        return np.load(train), np.load(test)
    return None


def _store_cache(cache: Path, name: str, X: np.ndarray, T: np.ndarray) -> None:
    """Features as .npy for later runs (``--cached``) and benchmarks/fm_curves.py."""
    for role, arr in (("train", X), ("test", T)):
        path = cache / f"{_cache_name(name)}.{role}.npy"
        if not path.exists():
            np.save(path, arr)


def _holdout(y: np.ndarray, val_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    fit, val = train_test_split(np.arange(len(y)), test_size=val_size, stratify=y,
                                random_state=seed)
    return np.sort(fit), np.sort(val)


def _family(name: str) -> str:
    if name.endswith("+hog"):
        return "hybrid"
    return "frozen" if name.startswith("frozen:") else "classical"


def _arm(name: str, family: str, X: np.ndarray, T: np.ndarray, y: np.ndarray,
         y_test: np.ndarray, fit: np.ndarray, val: np.ndarray, args: argparse.Namespace
         ) -> tuple[dict[str, Any], np.ndarray]:
    exact = args.kernel == "exact"
    kw = {"exact": exact, "n_components": args.n_components, "seed": args.seed}
    log(f"{name}+{family}: searching on {len(fit)} fit rows, scoring {len(val)} validation rows")
    searches, search_times = [], []
    for _ in range(args.repeats):
        LOADS.append(os.getloadavg()[0])
        t0 = time.perf_counter()
        searches.append(fm_heads.search(family, X[fit], y[fit], X[val], y[val], log=log, **kw))
        search_times.append(time.perf_counter() - t0)
    chosen = searches[0].chosen
    same_choice = all(s.chosen["C"] == chosen["C"] and s.chosen["g"] == chosen["g"]
                      for s in searches)
    fits, fit_times, model = [], [], None
    for k in range(args.repeats):
        LOADS.append(os.getloadavg()[0])
        m, rec = fm_heads.final_fit(family, chosen, X, y, **kw)
        fits.append(rec)
        fit_times.append(rec["seconds"])
        if k == 0:
            model = m
    assert model is not None
    t0 = time.perf_counter()
    pred = model.predict(T)
    predict_s = time.perf_counter() - t0
    correct = int((pred == y_test).sum())
    low, high = wilson_interval(correct, len(y_test))
    converged = bool(chosen["converged"] and fits[0]["converged"])
    head = "kernel" if family == "kernel" else "linear"
    return {
        "arm": f"{name}+{head}", "features": name, "head": head, "family": _family(name),
        "kernel_impl": ("exact SVC" if exact
                        else f"Nystroem {args.n_components} + least squares")
        if family == "kernel" else None,
        "chosen": {k: chosen[k] for k in ("g", "C")}, "val_accuracy": chosen["val_accuracy"],
        "accuracy": correct / len(y_test), "accuracy_ci95": [low, high],
        "n_train": len(y), "n_fit": len(fit), "n_val": len(val), "n_test": len(y_test),
        "converged": converged, "same_choice_every_repeat": same_choice,
        "search_seconds": summary(search_times), "final_fit_seconds": summary(fit_times),
        "predict_seconds": predict_s, "final_fit_warnings": fits[0]["warnings"],
        "search": searches[0].to_dict(),
    }, pred


def _headline(arms: list[dict[str, Any]], family: str) -> dict[str, Any] | None:
    """Best validation accuracy among the converged arms of ``family``; never test accuracy."""
    pool = [a for a in arms if a["family"] == family and a["converged"]]
    return max(pool, key=lambda a: a["val_accuracy"]) if pool else None


# ------------------------------------------------------------------------------ report


def markdown(res: dict[str, Any]) -> str:
    rows = []
    for a in res["arms"]:
        ex = a["extraction"]["train_seconds"]
        rows.append({
            "arm": a["arm"] + ("" if a["converged"] else " (NOT CONVERGED)")
            + (" **(headline)**" if a["arm"] in res["headlines"].values() else ""),
            "val_accuracy": a["val_accuracy"], "test_accuracy": a["accuracy"],
            "95% CI": f"{a['accuracy_ci95'][0]:.4f}-{a['accuracy_ci95'][1]:.4f}",
            "chosen": ", ".join(f"{k}={v:g}" for k, v in a["chosen"].items() if v is not None),
            "extraction_s": ex["median"] if isinstance(ex, dict) else ex,
            "search_s": a["search_seconds"]["median"],
            "final_fit_s": a["final_fit_seconds"]["median"],
        })
    m = res["machine"]
    flags = ", ".join(f for f, on in m["cpu_flags"].items() if on) or "none of " + ", ".join(FLAGS)
    lines = [
        f"# Fashion-MNIST under benchmarks/protocol.md ({res['mode']} mode)", "",
        f"{res['n_train']:,} training rows ({res['n_fit']:,} fit + {res['n_val']:,} validation "
        f"holdout for the searches; final fits on all {res['n_train']:,}), "
        f"{res['n_test']:,} test images. Kernel head: {res['kernel']}"
        + (f", min({res['n_components']}, rows) Nystroem components"
           if res["kernel"] != "exact" else "")
        + f". Times: median of {res['repeats']} repeat(s), seconds.", "",
        markdown_table(rows, list(rows[0])), "",
    ]
    for c in res["comparisons"]:
        lines.append(f"- {c['family_a']} headline `{c['a']}` {c['accuracy_a']:.4f} vs "
                     f"{c['family_b']} headline `{c['b']}` {c['accuracy_b']:.4f}: "
                     f"{c['difference']:+.4f}, exact McNemar p = {c['pvalue']:.3g}")
    for a in res["arms"]:
        key = f"{a['features']}+{a['head']}"
        if key in PUBLISHED and res["mode"] == "full":
            lines.append(f"- {a['arm']}: {a['accuracy']:.4f} vs published {PUBLISHED[key]} "
                         f"({a['accuracy'] - PUBLISHED[key]:+.4f})")
    lines += ["", f"Command: `{res['command']}`; wall {res['wall_seconds'] / 60:.1f} min; "
              f"load average at start {res['load_average_start'][0]:.2f}.",
              f"Machine: {m['cpu']} ({m['cores']} cores; flags: {flags}), GPU "
              f"{m['gpu'] or 'none'}; scikit-learn {m['versions'].get('scikit-learn')}, numpy "
              f"{m['versions'].get('numpy')}, torch {m['versions'].get('torch')}; commit "
              f"{m['git_commit']}; {m['date']}."]
    return "\n".join(lines) + "\n"


def _sensitivity(res: dict[str, Any]) -> bool:
    """Deviation 4's runs: reported beside the headlines, never as one."""
    return bool(res.get("wide_grid")) or res["n_components"] != fm_heads.N_COMPONENTS


def log_entries(res: dict[str, Any]) -> list[dict[str, Any]]:
    m = res["machine"]
    return [{"source": "benchmarks/fm_protocol.py", "protocol": res["protocol"],
             "mode": res["mode"], "commit": m["git_commit"], "written": m["date"],
             "stage": "protocol", "command": res["command"], "cpu": m["cpu"],
             "cores": m["cores"], "arm": a["arm"], "family": a["family"],
             "n_train": a["n_train"], "n_val": a["n_val"], "n_test": a["n_test"],
             "kernel_impl": a["kernel_impl"], "params": a["chosen"],
             "val_accuracy": a["val_accuracy"], "accuracy": a["accuracy"],
             "accuracy_ci95": a["accuracy_ci95"], "converged": a["converged"],
             "headline": a["arm"] in res["headlines"].values() and not _sensitivity(res),
             "role": "sensitivity check" if _sensitivity(res) else "protocol",
             "selected_by": "validation holdout of the training rows",
             "extraction_seconds": a["extraction"]["train_seconds"],
             "search_seconds": a["search_seconds"], "final_fit_seconds": a["final_fit_seconds"],
             "grid_points": [{k: p[k] for k in ("g", "C", "val_accuracy", "converged")}
                             for p in a["search"]["points"]]}
            for a in res["arms"]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=FASHION_MNIST_DIR)
    ap.add_argument("--work", default="runs/fm_protocol", help="frozen feature stores")
    ap.add_argument("--n-train", type=int, default=None,
                    help="stratified training subset (small mode); default all 60,000")
    ap.add_argument("--n-test", type=int, default=None,
                    help="stratified test subset (small mode); default all 10,000")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-size", type=float, default=0.1)
    ap.add_argument("--features", type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
                    default=["pixels", "hog"])
    ap.add_argument("--frozen", type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
                    default=[], help="frozen feature sets LAYER@SIZE, e.g. blocks.5@128")
    ap.add_argument("--single-check", type=lambda t: [int(x) for x in t.split(",") if x.strip()],
                    default=[], help="sizes at which one layer is also embedded alone, timed "
                    "against the one pass over all layers")
    ap.add_argument("--cached", action="store_true",
                    help="reuse WORK/features/*.npy (train and test) where present; their "
                         "extraction time is the run that made them")
    ap.add_argument("--concat-hog", action="store_true",
                    help="also each frozen set concatenated with HOG (the hybrid family)")
    ap.add_argument("--heads", type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
                    default=["linear", "kernel"])
    ap.add_argument("--kernel", choices=["nystroem", "exact"], default="nystroem")
    ap.add_argument("--families", type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
                    default=["classical", "frozen", "hybrid"],
                    help="train the arms of these families only (e.g. hybrid, when the "
                         "classical and frozen arms were run before)")
    ap.add_argument("--wide-grid", action="store_true",
                    help="the kernel head's widened grid (deviation 4's sensitivity check)")
    ap.add_argument("--frozen-kernel-top", type=int, default=None,
                    help="kernel head only for this many frozen sets, those with the best "
                         "linear-head validation accuracy (protocol deviation 2, withdrawn by "
                         "deviation 3); default: every frozen set")
    ap.add_argument("--n-components", type=int, default=fm_heads.N_COMPONENTS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--blas-threads", type=int, default=None,
                    help="BLAS threads for the heads (1 on a machine shared with other jobs: "
                         "busy-waiting BLAS threads oversubscribe it); recorded")
    ap.add_argument("--out", default=None,
                    help="results/<OUT>.json/.md (default: WORK/fm_protocol.* for small runs)")
    ap.add_argument("--no-log", action="store_true", help="do not append to the results log")
    args = ap.parse_args(argv)
    bad = set(args.heads) - {"linear", "kernel"}
    if bad:
        ap.error(f"unknown heads {sorted(bad)}; choose linear, kernel")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from threadpoolctl import threadpool_limits

    if args.wide_grid:  # one switch for the search, the final fit and the recorded grids
        fm_heads.KERNEL_G, fm_heads.RIDGE_CS = fm_heads.KERNEL_G_WIDE, fm_heads.RIDGE_CS_WIDE

    with threadpool_limits(limits=args.blas_threads, user_api="blas"):
        res = run(args)
    md = markdown(res)
    folder = RESULTS if args.out else Path(args.work)
    name = args.out or "fm_protocol"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    (folder / f"{name}.md").write_text(md)
    if args.out:
        (folder / f"{name}.predictions.npz").write_bytes(
            (Path(args.work) / "predictions.npz").read_bytes())
    if not args.no_log:
        n = fm_log.append(log_entries(res))
        log(f"appended {n} entries to {fm_log.LOG}")
    print(md)
    log(f"wrote {folder / name}.json and .md")


if __name__ == "__main__":
    main()
