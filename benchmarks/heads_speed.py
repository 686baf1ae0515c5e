"""How long the ``logreg`` head preset takes on a realistic feature matrix, against a plain fit.

Data (synthetic, float32, documented so the numbers can be reproduced): 60,000 training rows and
10,000 test rows of 1,280 features (EfficientNet-Lite0's width), 10 balanced classes. Each class is
a Gaussian cluster in a 64-dimensional latent space; rows are projected to 1,280 dimensions by a
fixed random matrix, passed through a ReLU (pooled CNN features are non-negative and sparse-ish)
and get independent noise. Class separation is set so a linear model lands near 90%, not 100%.

Rows measured on the same matrix:

* ``logreg`` preset, real defaults: ``StandardScaler`` + ``LogisticRegressionCV`` over 7 Cs with
  5 stratified folds, then the refit on all rows (``featurepipe.heads.fit_head``).
* ``LogisticRegression().fit`` with sklearn's defaults (no scaling, C=1, max_iter=100).
* ``StandardScaler`` + ``LogisticRegression(C=chosen, max_iter=1000)``: one fit at the C the preset
  picked, i.e. what the search costs on top of a single well-converged fit.

Run: ``python -m benchmarks.heads_speed`` (``--rows N`` for a quick smoke run; results are only
written for the full size unless ``--write`` is given).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_info, threadpool_limits

from benchmarks.common import machine, write_results
from featurepipe.heads import LOGREG_CS, chosen_params, fit_head, make_head
from featurepipe.report import markdown_table

N_TRAIN, N_TEST, DIM, CLASSES, LATENT = 60_000, 10_000, 1_280, 10, 64


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


def timed(label: str, fn: Any) -> tuple[Any, float, list[str]]:
    """Run fn once; return its result, wall seconds and the warning categories it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
    cats = sorted({w.category.__name__ for w in caught})
    print(f"{label}: {seconds:.1f} s {cats or ''}", flush=True)
    return out, seconds, cats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=N_TRAIN)
    parser.add_argument("--write", action="store_true", help="write results for a smaller run")
    parser.add_argument("--blas-threads", type=int, default=1,
                        help="BLAS threads (default 1: on small shared machines more threads "
                             "spin and measured 8x slower); 0 = library default")
    args = parser.parse_args(argv)
    if args.blas_threads:
        with threadpool_limits(limits=args.blas_threads, user_api="blas"):
            run(args)
    else:
        run(args)


def run(args: argparse.Namespace) -> None:
    load_start = os.getloadavg()
    X, y = make_features(args.rows, seed=0)
    X_test, y_test = make_features(N_TEST, seed=1)
    print(f"X {X.shape} {X.dtype}, {CLASSES} classes", flush=True)

    (preset, info), t_preset, w_preset = timed(
        "logreg preset (7 Cs x 5 folds + refit)", lambda: fit_head(make_head("logreg"), X, y))
    chosen = chosen_params(preset)["C"]
    plain, t_plain, w_plain = timed("LogisticRegression().fit",
                                    lambda: LogisticRegression().fit(X, y))
    single, t_single, w_single = timed(
        f"StandardScaler + LogisticRegression(C={chosen:g}, max_iter=1000)",
        lambda: make_pipeline(StandardScaler(),
                              LogisticRegression(C=chosen, max_iter=1000)).fit(X, y))

    search = preset[-1]
    load_end = os.getloadavg()
    at_edge = chosen in (min(LOGREG_CS), max(LOGREG_CS))
    rows = [
        {"model": "logreg preset: StandardScaler + LogisticRegressionCV (7 Cs, 5 folds) + refit",
         "fit_s": t_preset, "test_accuracy": preset.score(X_test, y_test), "C": chosen,
         "n_iter_max": int(np.max(search.n_iter_)), "coef_dtype": str(search.coef_.dtype),
         "warnings": ", ".join(w_preset) or "-"},
        {"model": "LogisticRegression() (sklearn defaults: no scaling, C=1, max_iter=100)",
         "fit_s": t_plain, "test_accuracy": plain.score(X_test, y_test), "C": 1.0,
         "n_iter_max": int(np.max(plain.n_iter_)), "coef_dtype": str(plain.coef_.dtype),
         "warnings": ", ".join(w_plain) or "-"},
        {"model": f"StandardScaler + LogisticRegression(C={chosen:g}, max_iter=1000)",
         "fit_s": t_single, "test_accuracy": single.score(X_test, y_test), "C": chosen,
         "n_iter_max": int(np.max(single[-1].n_iter_)), "coef_dtype": str(single[-1].coef_.dtype),
         "warnings": ", ".join(w_single) or "-"},
    ]
    payload = {
        "machine": machine(),
        "data": {"n_train": args.rows, "n_test": N_TEST, "dim": DIM, "classes": CLASSES,
                 "dtype": str(X.dtype), "generator": "benchmarks.heads_speed.make_features"},
        "preset_defaults": {"Cs": list(LOGREG_CS), "folds": 5, "solver": "lbfgs",
                            "max_iter": int(search.max_iter)},
        "blas_threads_limit": args.blas_threads or None,
        "blas": [{k: lib.get(k) for k in ("internal_api", "num_threads", "version")}
                 for lib in threadpool_info()],
        "fit_head_warnings": info["warnings"],
        "load_average_1_5_15min": {"start": load_start, "end": load_end},
        "chosen_C_at_grid_edge": at_edge,
        "rows": rows,
        "ratio_preset_to_plain": t_preset / t_plain,
        "ratio_preset_to_single_fit": t_preset / t_single,
    }
    md = (f"# logreg head preset vs a plain fit ({args.rows:,} x {DIM:,} float32, {CLASSES} "
          "classes)\n\nSynthetic clustered ReLU features (see `benchmarks/heads_speed.py`); "
          f"test accuracy on {N_TEST:,} more rows from the same distribution. One run each, "
          f"wall-clock, BLAS threads: {args.blas_threads or 'library default'}.\n\n"
          + markdown_table(rows) +
          f"\n\nThe preset costs {t_preset / t_plain:.1f}x a default `LogisticRegression().fit` "
          f"and {t_preset / t_single:.1f}x one scaled fit at the chosen C: it runs 35 fits "
          "(7 Cs x 5 folds, warm-started along the C path) plus the refit. "
          "`LogisticRegressionCV` converts X to float64 internally (2x the memory of the float32 "
          "matrix); the plain `LogisticRegression` keeps float32."
          f"\n\nMachine load average (1/5/15 min) {load_start[0]:.1f}/{load_start[1]:.1f}/"
          f"{load_start[2]:.1f} at the start and {load_end[0]:.1f}/{load_end[1]:.1f}/"
          f"{load_end[2]:.1f} at the end, on {os.cpu_count()} cores: other jobs shared the CPU, "
          "so absolute times are inflated and the ratios move with the load too."
          + (f" The chosen C ({chosen:g}) is at the edge of the preset's grid." if at_edge
             else ""))
    if args.rows == N_TRAIN or args.write:
        write_results("heads_speed", payload, md)
    print(md)


if __name__ == "__main__":
    warnings.simplefilter("ignore", ConvergenceWarning)
    main()
