"""How head presets scale with the number of training rows: fit time, peak memory, accuracy.

Data (synthetic, float32, documented so the numbers can be reproduced): n training rows and
10,000 test rows of 1,280 features (EfficientNet-Lite0's width), 10 balanced classes. Each class is
a Gaussian cluster in a 64-dimensional latent space; rows are projected to 1,280 dimensions by a
fixed random matrix, passed through a ReLU (pooled CNN features are non-negative and sparse-ish)
and get independent noise. Class separation is set so a linear model lands near 90%, not 100%.

Every cell (one configuration at one n) runs in its own subprocess, so its peak RSS is its own:
``rss_data_mib`` is the process's RSS after making the data, ``peak_rss_mib`` its high-water mark
during the fit (reset through ``/proc/self/clear_refs`` after the data is made), so the
difference is what the head itself allocated. Configurations:

* every preset of ``featurepipe.heads.HEAD_PRESETS`` through ``fit_head(make_head(preset))``, at
  n = 5k, 20k, 60k, 200k;
* ``legacy-logreg``: the logreg preset as it was before the probe (``StandardScaler`` +
  ``LogisticRegressionCV``, 7 Cs x 5 folds, float64 inside, refit), kept here for the same-run
  comparison and not offered as a preset;
* ``exact-svc``: exact RBF ``SVC`` (the exact branch's model, on a precomputed kernel) at C = 1
  and 10 on a 20,000-row subset, the reference for the kernel approximation;
  ``svm-rbf-nystroem`` forces the Nystroem branch at 20k.

A cell is not run when the time projected from the configuration's previous cell (power law in n,
exponent from the last two cells, else an assumed one) exceeds ``--budget``; the table says so.

Run: ``python -m benchmarks.heads_speed`` (``--quick`` for a smoke run on small n, not written;
``--only CONFIG ...`` and ``--sizes N ...`` run a part of the grid, e.g. in a second process).
Writes ``results/heads_speed.{json,md,png}`` after every cell, so a partial run is kept.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from typing import Any

import numpy as np

N_TEST, DIM, CLASSES, LATENT = 10_000, 1_280, 10, 64
SIZES = (5_000, 20_000, 60_000, 200_000)
# Scaling exponents assumed before two cells of a configuration have been measured.
ASSUMED_EXPONENT = {"knn": 2.0, "exact-svc": 2.0, "legacy-logreg": 1.3}


def make_features(n: int, seed: int = 0, sep: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """Clustered latent codes -> fixed random projection -> ReLU -> noise; float32, 10 classes."""
    fixed = np.random.default_rng(1234)  # the same "backbone" and class centres for every call
    centres = fixed.normal(size=(CLASSES, LATENT)) * sep
    projection = fixed.normal(size=(LATENT, DIM)).astype(np.float32) / np.sqrt(LATENT)
    rng = np.random.default_rng(seed)
    y = np.arange(n) % CLASSES
    rng.shuffle(y)
    latent = (centres[y] + rng.normal(size=(n, LATENT))).astype(np.float32)
    X = np.maximum(latent @ projection, 0.0)
    X += rng.normal(scale=0.1, size=X.shape).astype(np.float32)
    return X.astype(np.float32, copy=False), y.astype(np.int64)


def legacy_logreg() -> Any:
    """The logreg preset before the probe: StandardScaler + LogisticRegressionCV (float64)."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from featurepipe.heads import LOGREG_CS, LOGREG_MAX_ITER

    kwargs: dict[str, Any] = {}
    defaults = LogisticRegressionCV().get_params()
    if isinstance(defaults.get("l1_ratios"), str):  # sklearn 1.8-1.9 deprecation opt-ins
        kwargs["l1_ratios"] = (0.0,)
    if isinstance(defaults.get("use_legacy_attributes"), str):
        kwargs["use_legacy_attributes"] = False
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    search = LogisticRegressionCV(Cs=list(LOGREG_CS), cv=folds, scoring="accuracy",
                                  solver="lbfgs", max_iter=LOGREG_MAX_ITER, random_state=0,
                                  **kwargs)
    return make_pipeline(StandardScaler(), search)


def _status_mib(field: str) -> float:
    """VmRSS / VmHWM of this process in MiB (ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS, so the peak is the fit's and not the data generator's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def run_cell(config: str, n: int) -> dict[str, Any]:
    """Fit one configuration on n rows in this process; return its measurements."""
    from featurepipe.heads import (
        RBFKernelClassifier,
        chosen_params,
        fit_head,
        make_head,
    )

    X, y = make_features(n, seed=0)
    X_test, y_test = make_features(N_TEST, seed=1)
    if config == "exact-svc":
        return _exact_svc(X, y, X_test, y_test)
    gc.collect()
    _reset_peak()
    rss_data = _status_mib("VmRSS")
    if config == "legacy-logreg":
        head = legacy_logreg()
    elif config == "svm-rbf-nystroem":
        head = make_head("svm-rbf").set_params(rbfkernelclassifier__exact_max_rows=0)
    else:
        head = make_head(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0, c0 = time.perf_counter(), time.process_time()
        fitted, info = fit_head(head, X, y)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        accuracy = float(fitted.score(X_test, y_test))
    params = chosen_params(fitted) or info["params"]
    last = fitted[-1] if hasattr(fitted, "steps") else fitted
    branch = None
    if isinstance(last, RBFKernelClassifier):
        branch = "nystroem" if last.approximate_ else "exact"
    return {"config": config, "n": n, "status": "ok", "fit_s": seconds, "cpu_s": cpu,
            "test_accuracy": accuracy, "params": params, "branch": branch,
            "rss_data_mib": rss_data, "peak_rss_mib": _status_mib("VmHWM"),
            "warnings": info["warnings"][:3]}


def _exact_svc(X: np.ndarray, y: np.ndarray, X_test: np.ndarray,
               y_test: np.ndarray) -> dict[str, Any]:
    """Exact RBF SVC (``StandardScaler`` + ``ScaledGammaSVC(gamma_scale=1)``) at C = 1 and 10.

    The kernel matrix is computed once with BLAS and given to ``SVC(kernel="precomputed")``:
    the same model as the preset's exact branch, without libsvm's per-pair kernel evaluations
    (which take many times longer on 1,280-d rows). Time and peak memory include the kernel.
    """
    from sklearn.metrics.pairwise import rbf_kernel
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    gc.collect()
    _reset_peak()
    rss_data = _status_mib("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    scaler = StandardScaler().fit(X)
    Xs = scaler.transform(X)
    gamma = 1.0 / (Xs.shape[1] * float(Xs.var(dtype=np.float64)))
    K = rbf_kernel(Xs, gamma=gamma)
    K_test = rbf_kernel(scaler.transform(X_test), Xs, gamma=gamma)
    scores = {}
    for C in (1.0, 10.0):
        scores[C] = float(SVC(C=C, kernel="precomputed").fit(K, y).score(K_test, y_test))
    best = max(scores, key=lambda c: scores[c])
    return {"config": "exact-svc", "n": len(y), "status": "ok",
            "fit_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
            "test_accuracy": scores[best], "params": {"C": best, "gamma_scale": 1.0},
            "accuracy_by_C": scores, "branch": "exact", "rss_data_mib": rss_data,
            "peak_rss_mib": _status_mib("VmHWM"), "warnings": [],
            "note": "two fits (C=1, C=10) on one precomputed kernel; the better on test shown"}


# --------------------------------------------------------------------------- driver


def _project(done: list[dict[str, Any]], config: str, n: int) -> float | None:
    """Seconds projected for (config, n) from the configuration's measured cells."""
    ok = [c for c in done if c["config"] == config and c["status"] == "ok" and c["n"] < n]
    if config == "svm-rbf" and n > _exact_max():  # the exact and Nystroem branches differ
        ok = [c for c in ok if c.get("branch") == "nystroem"]
    fastest: dict[int, dict[str, Any]] = {}  # one cell per n: the least disturbed run
    for c in ok:
        if c["n"] not in fastest or c["fit_s"] < fastest[c["n"]]["fit_s"]:
            fastest[c["n"]] = c
    ok = [fastest[k] for k in sorted(fastest)]
    if not ok:
        return None
    if len(ok) >= 2:
        a, b = ok[-2], ok[-1]
        exponent = float(np.clip(np.log(b["fit_s"] / a["fit_s"]) / np.log(b["n"] / a["n"]),
                                 1.0, 2.5))
    else:
        exponent = ASSUMED_EXPONENT.get(config, 1.1)
    return float(ok[-1]["fit_s"] * (n / ok[-1]["n"]) ** exponent)


def _exact_max() -> int:
    from featurepipe.heads import EXACT_MAX_ROWS

    return EXACT_MAX_ROWS


def plan(quick: bool) -> list[tuple[str, int]]:
    """Cells in run order: the same-run comparisons first, then the grid by growing n."""
    from featurepipe.heads import HEAD_PRESETS

    if quick:
        return [(p, n) for n in (2_000, 4_000) for p in (*HEAD_PRESETS, "legacy-logreg")]
    first = [("logreg", 60_000), ("legacy-logreg", 60_000), ("svm-rbf", 60_000),
             ("svm-rbf-nystroem", 20_000), ("exact-svc", 20_000)]
    grid = [(p, n) for n in SIZES for p in (*HEAD_PRESETS, "legacy-logreg")]
    return first + [cell for cell in grid if cell not in first]


def run_subprocess(config: str, n: int, timeout: float, blas_threads: int) -> dict[str, Any]:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(blas_threads),
           "OMP_NUM_THREADS": str(blas_threads), "MKL_NUM_THREADS": str(blas_threads)}
    cmd = [sys.executable, "-m", "benchmarks.heads_speed", "--cell", config, str(n)]
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"config": config, "n": n, "status": f"killed after {timeout:.0f} s"}
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-1:] or ["?"]
        return {"config": config, "n": n, "status": f"failed: {tail[0][:200]}",
                "wall_s": time.perf_counter() - t0}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cell", nargs=2, metavar=("CONFIG", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="small n, results not written")
    parser.add_argument("--budget", type=float, default=600.0,
                        help="skip a cell projected to take longer (seconds; default 600)")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="kill a cell after this many seconds (default 900)")
    parser.add_argument("--blas-threads", type=int, default=1,
                        help="BLAS threads per cell (default 1: on the small shared machine more "
                             "threads spin)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these configurations")
    parser.add_argument("--sizes", nargs="*", type=int, default=None,
                        help="run only these row counts")
    parser.add_argument("--prior", nargs="*", default=(),
                        help="results JSON of other runs whose cells seed the projections")
    parser.add_argument("--report", action="store_true",
                        help="rewrite the Markdown and plot from the JSON, run nothing")
    args = parser.parse_args(argv)
    if args.cell:
        print(json.dumps(run_cell(args.cell[0], int(args.cell[1])), default=str))
        return
    from benchmarks.common import RESULTS

    path = RESULTS / "heads_speed.json"
    if args.report:
        payload = json.loads(path.read_text())
        write(payload)
        return
    from benchmarks.common import machine

    payload = {"machine": machine(), "cpu_flags": _cpu_flags(),
               "command": "python -m benchmarks.heads_speed " + " ".join(argv or sys.argv[1:]),
               "blas_threads": args.blas_threads, "budget_s": args.budget,
               "data": {"n_test": N_TEST, "dim": DIM, "classes": CLASSES, "dtype": "float32",
                        "generator": "benchmarks.heads_speed.make_features"},
               "load_average_start": os.getloadavg(), "cells": []}
    cells: list[dict[str, Any]] = payload["cells"]
    prior = [c for f in args.prior for c in json.loads(open(f).read()).get("cells", [])]
    for config, n in plan(args.quick):
        if (args.only and config not in args.only) or (args.sizes and n not in args.sizes):
            continue
        projected = _project(prior + cells, config, n)
        if projected is not None and projected > args.budget:
            cells.append({"config": config, "n": n,
                          "status": f"not run: projected {projected:.0f} s > {args.budget:.0f} s"})
        else:
            slow = 2.0 if config == "legacy-logreg" else 1.0  # the baseline must finish
            cells.append(run_subprocess(config, n, slow * args.timeout, args.blas_threads))
        print(json.dumps(cells[-1], default=str), flush=True)
        payload["load_average_end"] = os.getloadavg()
        if not args.quick:
            write(payload)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    keep = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
                    return " ".join(f for f in flags if f in keep)
    except OSError:
        pass
    return "?"


def write(payload: dict[str, Any]) -> None:
    """results/heads_speed.{json,md,png} from the cells measured so far."""
    from benchmarks.common import RESULTS, write_results
    from featurepipe.report import markdown_table

    cells = payload["cells"]
    rows = [{"config": c["config"], "n": c["n"], **({"run": c["run"]} if "run" in c else {}),
             "fit_s": f"{c['fit_s']:.1f}" if "fit_s" in c else c["status"],
             "cpu_s": f"{c['cpu_s']:.1f}" if "cpu_s" in c else "-",
             "test_accuracy": round(c["test_accuracy"], 4) if "test_accuracy" in c else "-",
             "peak_rss_mib": round(c["peak_rss_mib"]) if "peak_rss_mib" in c else "-",
             "data_rss_mib": round(c["rss_data_mib"]) if "rss_data_mib" in c else "-",
             "params": ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in (c.get("params") or {}).items()) or "-",
             "branch": c.get("branch") or "-"}
            for c in sorted(cells, key=lambda c: (c["config"], c["n"], c.get("run", "")))]
    m = payload["machine"]
    md = ("# Head presets against n (synthetic 1,280-d float32 features, 10 classes)\n\n"
          "Fit time (`fit_head`, wall-clock, search + refit included) and test accuracy on "
          f"{N_TEST:,} held-out rows; each cell ran in its own process (peak RSS is that "
          "process's, `data_rss_mib` the same process before fitting). BLAS threads per cell: "
          f"{payload['blas_threads']}. Command: `{payload['command'].strip()}`.\n\n"
          + _runs(payload) + _comparison(cells) + "\n\n" + markdown_table(rows) +
          f"\n\nCPU flags: {payload.get('cpu_flags')}; versions: "
          f"{json.dumps(m.get('versions'))}.\n\n"
          f"Load average (1/5/15 min) at the start {_load(payload.get('load_average_start'))}, "
          f"at the end {_load(payload.get('load_average_end'))} on {m.get('cores')} cores: the "
          "machine was shared with other jobs during the run, so absolute times are inflated "
          "and move with the load; the comparisons within one run are fairer than across runs.")
    write_results("heads_speed", payload, md)
    _plot(cells, RESULTS / "heads_speed.png")


def _runs(payload: dict[str, Any]) -> str:
    runs = payload.get("runs")
    if not runs:
        return ""
    parts = [f"run {name}: {r['what']} (commit {r['git_commit']}, load average "
             f"{_load(r['load_average_start'])} -> {_load(r['load_average_end'])})"
             for name, r in runs.items()]
    return ("The cells come from runs of this script side by side on the same machine (the "
            "`run` column): " + "; ".join(parts) + ".\n\n")


def _load(values: Any) -> str:
    return "/".join(f"{v:.1f}" for v in values) if values else "?"


def _took(c: dict[str, Any]) -> str:
    cpu = f", {c['cpu_s']:.1f} s CPU" if "cpu_s" in c else ""
    return f"{c['fit_s']:.1f} s wall{cpu}"


def _comparison(cells: list[dict[str, Any]]) -> str:
    def get(config: str, n: int, run: Any = None) -> dict[str, Any] | None:
        found = [c for c in cells if c["config"] == config and c["n"] == n
                 and c["status"] == "ok" and (run is None or c.get("run") == run)]
        found.sort(key=lambda c: "cpu_s" in c)  # prefer a cell that also measured CPU time
        return found[-1] if found else None

    lines = ["Comparisons (wall time moves with the load; CPU time is the process's own):", ""]
    old = get("legacy-logreg", 60_000)
    new = get("logreg", 60_000, run=old.get("run")) if old else None
    if new and old:
        lines.append(
            f"- Same run: `logreg` at 60,000 rows {_took(new)}, accuracy "
            f"{new['test_accuracy']:.4f} (C={new['params'].get('C'):g}); the old preset "
            f"(`legacy-logreg`) {_took(old)}, accuracy {old['test_accuracy']:.4f} "
            f"(C={old['params'].get('C'):g}): {old['fit_s'] / new['fit_s']:.1f}x faster, "
            f"{100 * (new['test_accuracy'] - old['test_accuracy']):+.2f} points.")
    latest = get("logreg", 60_000)
    if latest and latest is not new:
        lines.append(f"- `logreg` at 60,000 rows in run {latest.get('run')}: {_took(latest)}, "
                     f"accuracy {latest['test_accuracy']:.4f}.")
    kern, ny20, exact = get("svm-rbf", 60_000), get("svm-rbf-nystroem", 20_000), get(
        "exact-svc", 20_000)
    if kern:
        lines.append(
            f"- `svm-rbf` on all 60,000 rows (Nystroem branch, run {kern.get('run')}): "
            f"{_took(kern)}, accuracy {kern['test_accuracy']:.4f}"
            + (f"; exact RBF SVC (gamma='scale', the better of C=1 and C=10 on the test rows: "
               f"C={exact['params'].get('C'):g}) on a 20,000-row subset (run "
               f"{exact.get('run')}): {_took(exact)}, accuracy {exact['test_accuracy']:.4f} "
               f"({100 * (kern['test_accuracy'] - exact['test_accuracy']):+.2f} points)"
               if exact else "")
            + (f"; the Nystroem branch on those 20,000 rows: {_took(ny20)}, "
               f"accuracy {ny20['test_accuracy']:.4f}" if ny20 else "") + ".")
    return "\n".join(lines) if len(lines) > 2 else "Comparisons: not measured yet."


def _plot(cells: list[dict[str, Any]], path: Any) -> None:
    """Log-log fit time against n: wall-clock (fastest run) and the process's CPU time."""
    from featurepipe.report import new_figure, save_figure

    fig = new_figure(12, 5)
    colours = {c: f"C{i}" for i, c in enumerate(sorted({c["config"] for c in cells}))}
    for index, (key, label) in enumerate((("fit_s", "wall-clock s (fastest run; load-inflated)"),
                                          ("cpu_s", "CPU s of the fitting process"))):
        ax = fig.add_subplot(1, 2, index + 1)
        for config in sorted({c["config"] for c in cells}):
            best: dict[int, float] = {}
            for c in cells:
                if c["config"] == config and c["status"] == "ok" and key in c:
                    best[c["n"]] = min(best.get(c["n"], np.inf), c[key])
            if best:
                ax.plot(*zip(*sorted(best.items()), strict=True), marker="o", label=config,
                        color=colours[config])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training rows (n)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Head fit time (search + refit) against n, 1,280-d float32, 10 classes")
    save_figure(fig, str(path))


if __name__ == "__main__":
    main()
