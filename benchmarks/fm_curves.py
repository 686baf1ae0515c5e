"""Fashion-MNIST learning curves under benchmarks/protocol.md, section 6 (labelled data).

Reads feature matrices already computed for the 60,000 training and 10,000 test images (one
``.npy`` pair per feature set). For every (size, seed) one stratified draw of ``size`` training
images per class is shared by every arm. Each feature set gets both head families of section 3:

- linear: ``StandardScaler`` + multinomial L2 logistic regression, C in 7 values, fitted with
  :func:`featurepipe.heads.probe.fit_multinomial` (sklearn's lbfgs objective; warm-started along
  increasing C);
- kernel: ``StandardScaler`` + exact ``SVC`` with the RBF kernel, ``gamma = g / n_features``,
  run on the precomputed Gram matrix (the same model as ``SVC(kernel="rbf")``; one distance
  matrix per fold serves every (g, C)).

Everything is chosen by stratified k-fold CV inside the drawn subset, ``k = min(5, size)``:
the hyperparameters of each arm and, within each family (``frozen:*`` sets; ``pixels``/``hog``),
the arm. The test labels are read only by :func:`score`, after every choice is made. Every arm's
test accuracy is reported, losers included.

    python -m benchmarks.fm_curves --features pixels=f/pix_tr.npy:f/pix_te.npy \\
        --features hog=f/hog_tr.npy:f/hog_te.npy \\
        --features frozen:blocks.5@96=f/b5_tr.npy:f/b5_te.npy --blas-threads 1 --out fm_curves
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats
from sklearn.metrics.pairwise import euclidean_distances
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from benchmarks import fm_heads, fm_log
from benchmarks.common import RESULTS, machine
from featurepipe.heads.probe import fit_multinomial
from featurepipe.splits import stratified_subsample

__all__ = ["SIZES", "draw", "fit_point", "labelled_data_verdict", "main", "score", "summarise",
           "t_interval"]

SIZES = (5, 10, 25, 50, 100)
FULL_ROWS = (60_000, 10_000)  # anything less is logged as a small-mode run
TOL = 1e-4


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def family(name: str) -> str:
    """``frozen:*`` sets form the frozen family, ``pixels``/``hog`` the classical one."""
    if name.startswith("frozen:"):
        return "hybrid" if name.endswith("+hog") else "frozen"
    return "classical" if name in ("pixels", "hog") else "other"


def draw(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted positions of ``size`` rows per class (a stratified draw; balanced classes)."""
    n_classes = len(np.unique(labels))
    return stratified_subsample(labels, size * n_classes, seed)


# ------------------------------------------------------------------------------ heads


def _linear_path(X: np.ndarray, y: np.ndarray, n_classes: int,
                 cs: tuple[float, ...] = fm_heads.LINEAR_CS) -> list[tuple[np.ndarray, bool]]:
    """(parameters, converged) at every C of ``cs``, each fit warm-started from the last."""
    out, init = [], None
    for C in cs:
        init, it = fit_multinomial(X, y, n_classes, C, init=init, max_iter=fm_heads.MAX_ITER,
                                   tol=TOL)
        out.append((init, it < fm_heads.MAX_ITER))
    return out


def _linear_predict(X: np.ndarray, params: np.ndarray) -> np.ndarray:
    return np.argmax(X @ params[:, :-1].T + params[:, -1], axis=1)


def _svc(K: np.ndarray, y: np.ndarray, C: float) -> SVC:
    return SVC(kernel="precomputed", C=C).fit(K, y)


def _grid_cv(X: np.ndarray, y: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]],
             n_classes: int) -> dict[str, list[dict[str, Any]]]:
    """Out-of-fold correct counts of every grid point of both heads (standardised per fold)."""
    lin: list[dict[str, Any]] = [{"g": None, "C": C, "correct": 0, "converged": True}
                                 for C in fm_heads.LINEAR_CS]
    ker: list[dict[str, Any]] = [{"g": g, "C": C, "correct": 0, "converged": True}
                                 for g in fm_heads.KERNEL_G for C in fm_heads.KERNEL_CS]
    d = X.shape[1]
    for fit, val in folds:
        sc = StandardScaler().fit(X[fit])
        A, B = sc.transform(X[fit]), sc.transform(X[val])
        for p, (params, ok) in zip(lin, _linear_path(A, y[fit], n_classes), strict=True):
            p["correct"] += int((_linear_predict(B, params) == y[val]).sum())
            p["converged"] &= ok
        D_fit, D_val = euclidean_distances(A, squared=True), euclidean_distances(B, A,
                                                                                squared=True)
        for p in ker:
            g = p["g"] / d
            model = _svc(np.exp(-g * D_fit), y[fit], p["C"])
            p["correct"] += int((model.predict(np.exp(-g * D_val)) == y[val]).sum())
    return {"linear": lin, "kernel": ker}


def _choose(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Best out-of-fold accuracy; ties go to the smaller C, then the smaller g (section 3)."""
    return min(points, key=lambda p: (-p["correct"], p["C"], p["g"] or 0.0))


def _final_predictions(head: str, chosen: dict[str, Any], A: np.ndarray, y: np.ndarray,
                       T: np.ndarray, n_classes: int) -> tuple[np.ndarray, bool]:
    """Test predictions of the chosen point refitted on the whole subset; (pred, converged)."""
    if head == "linear":
        cs = fm_heads.LINEAR_CS  # the CV's path up to the chosen C: the same warm starts
        params, ok = _linear_path(A, y, n_classes, cs[:cs.index(chosen["C"]) + 1])[-1]
        return _linear_predict(T, params), ok
    g = chosen["g"] / A.shape[1]
    model = _svc(np.exp(-g * euclidean_distances(A, squared=True)), y, chosen["C"])
    pred = [model.predict(np.exp(-g * euclidean_distances(T[i:i + 2000], A, squared=True)))
            for i in range(0, len(T), 2000)]  # bounded memory for 10,000 x 6,000 kernels
    return np.concatenate(pred), True


def fit_point(features: dict[str, tuple[np.ndarray, np.ndarray]], y: np.ndarray, size: int,
              seed: int, test_rows: np.ndarray, blas_threads: int | None = None
              ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Every arm at one (size, seed): CV choices and test predictions. No test labels here."""
    from threadpoolctl import threadpool_limits

    t0 = time.perf_counter()
    rows = draw(y, size, seed)
    ys = y[rows]
    n_classes = int(y.max()) + 1
    per_class = np.bincount(ys, minlength=n_classes)
    k = int(min(5, per_class.min()))
    folds = list(StratifiedKFold(k, shuffle=True, random_state=seed).split(rows, ys))
    arms, preds = [], {}
    with threadpool_limits(limits=blas_threads, user_api="blas"):
        for name, (X, T) in features.items():
            Xs = np.asarray(X[rows], dtype=np.float32)
            grids = _grid_cv(Xs, ys, folds, n_classes)
            sc = StandardScaler().fit(Xs)
            A = sc.transform(Xs)
            Ts = sc.transform(np.asarray(T[test_rows], dtype=np.float32))
            for head in ("linear", "kernel"):
                chosen = _choose(grids[head])
                pred, ok = _final_predictions(head, chosen, A, ys, Ts, n_classes)
                arm = f"{name}+{head}"
                preds[arm] = pred
                arms.append({"arm": arm, "features": name, "head": head, "family": family(name),
                             "chosen": {"g": chosen["g"], "C": chosen["C"]},
                             "cv_accuracy": chosen["correct"] / len(rows),
                             "converged": bool(chosen["converged"] and ok),
                             "grid": [{**p, "cv_accuracy": p["correct"] / len(rows)}
                                      for p in grids[head]]})
    chosen_arms = {fam: _family_choice(arms, fam) for fam in ("frozen", "classical", "hybrid")}
    return {"size": size, "seed": seed, "n_train": len(rows), "k": k,
            "draw_sha256": hashlib.sha256(rows.astype(np.int64).tobytes()).hexdigest(),
            "arms": arms, "chosen": {f: a for f, a in chosen_arms.items() if a},
            "seconds": time.perf_counter() - t0}, preds


def _family_choice(arms: list[dict[str, Any]], fam: str) -> str | None:
    """The converged arm of ``fam`` with the best CV accuracy; ties: the one listed first."""
    pool = [a for a in arms if a["family"] == fam and a["converged"]]
    return max(pool, key=lambda a: a["cv_accuracy"])["arm"] if pool else None


def score(point: dict[str, Any], preds: dict[str, np.ndarray], y_test: np.ndarray) -> None:
    """Add test accuracies to ``point`` (every arm; the family choices are already fixed)."""
    for a in point["arms"]:
        a["test_accuracy"] = float((preds[a["arm"]] == y_test).mean())
    acc = {a["arm"]: a for a in point["arms"]}
    point["chosen"] = {f: {"arm": arm, "cv_accuracy": acc[arm]["cv_accuracy"],
                           "test_accuracy": acc[arm]["test_accuracy"]}
                       for f, arm in point["chosen"].items()}


# ------------------------------------------------------------------------------ summary


def t_interval(values: Any, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and ``level`` Student-t interval of the mean (NaN bounds for fewer than 2 values)."""
    v = np.asarray(values, dtype=float)
    mean = float(v.mean())
    if len(v) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return mean, mean - half, mean + half


def labelled_data_verdict(rows: list[dict[str, Any]], max_size: int = 100) -> str:
    """Section 8's labelled-data verdict from per-size paired differences (frozen - classical).

    ``rows``: ``{"size", "diff": [mean, low, high]}``. Supported: mean > 0 and interval above 0
    at every size <= ``max_size``; not supported: mean < 0 and interval below 0 at a majority of
    them; otherwise mixed ("not measured" without such sizes).
    """
    small = [r["diff"] for r in rows if r["size"] <= max_size and r.get("diff")]
    if not small:
        return "not measured"
    if all(m > 0 and lo > 0 for m, lo, _ in small):
        return "supported"
    if sum(m < 0 and hi < 0 for m, _, hi in small) > len(small) / 2:
        return "not supported"
    return "mixed"


def summarise(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per size: mean test accuracy of each family's choice and of every arm, paired difference."""
    out = []
    for size in sorted({p["size"] for p in points}):
        pts = [p for p in points if p["size"] == size]
        row: dict[str, Any] = {"size": size, "seeds": [p["seed"] for p in pts]}
        for fam in ("frozen", "classical"):
            accs = [p["chosen"][fam]["test_accuracy"] for p in pts if fam in p["chosen"]]
            row[fam] = list(t_interval(accs)) if accs else None
        both = [p for p in pts if "frozen" in p["chosen"] and "classical" in p["chosen"]]
        row["diff"] = list(t_interval([p["chosen"]["frozen"]["test_accuracy"]
                                       - p["chosen"]["classical"]["test_accuracy"]
                                       for p in both])) if both else None
        row["arms"] = {a["arm"]: list(t_interval([q["test_accuracy"] for p in pts
                                                  for q in p["arms"] if q["arm"] == a["arm"]]))
                       for a in pts[0]["arms"]}
        out.append(row)
    return out


# ------------------------------------------------------------------------------ report


def _ci(v: list[float] | None) -> str:
    return "-" if not v else f"{v[0]:.4f} [{v[1]:.4f}, {v[2]:.4f}]"


def markdown(res: dict[str, Any]) -> str:
    summ, m = res["summary"], res["machine"]
    lines = [f"# Fashion-MNIST learning curves under benchmarks/protocol.md §6 ({res['mode']} "
             "mode)", "",
             f"Seeds {res['seeds']}; {res['n_test']:,} test images; selection by stratified "
             "k-fold CV (k = min(5, per class)) inside each labelled subset; 95% t-intervals "
             "over seeds. Feature sets: " + ", ".join(
                 f"`{n}` ({f['family']}, {f['dim']}-d)" for n, f in res["features"].items())
             + ".", "",
             "| labels/class | frozen (chosen by CV) | classical (chosen by CV) | "
             "frozen - classical (paired) |", "|---|---|---|---|"]
    lines += [f"| {r['size']} | {_ci(r['frozen'])} | {_ci(r['classical'])} | {_ci(r['diff'])} |"
              for r in summ]
    small = any(r["size"] <= 100 for r in summ)
    lines += ["", (f"**Labelled data (frozen vs classical): {res['verdict']}** (section 8: "
                   "supported needs the paired difference's interval above 0 at every size "
                   "<= 100)." if small else "This run has no size <= 100 per class, the sizes "
                   "section 8's verdict reads; it adds points to the curve in fashion_mnist.md."),
              "", "Every arm (mean test accuracy over seeds at its CV-chosen hyperparameters; "
              "times chosen for its family):", "",
              "| labels/class | arm | test accuracy | chosen |", "|---|---|---|---|"]
    for r in summ:
        pts = [p for p in res["points"] if p["size"] == r["size"]]
        for arm, v in r["arms"].items():
            n = sum(arm == c["arm"] for p in pts for c in p["chosen"].values())
            lines.append(f"| {r['size']} | {arm} | {_ci(v)} | {n}/{len(pts)} |")
    lines += ["", f"Command: `{res['command']}`; wall {res['wall_seconds'] / 60:.1f} min; load "
              f"average at start {res['load_average_start'][0]:.2f}; BLAS threads "
              f"{res['blas_threads']}, jobs {res['n_jobs']}.",
              f"Machine: {m['cpu']} ({m['cores']} cores; flags: "
              f"{', '.join(f for f, on in m['cpu_flags'].items() if on) or 'none'}); "
              f"scikit-learn {m['versions'].get('scikit-learn')}, numpy "
              f"{m['versions'].get('numpy')}; commit {m['git_commit']}; {m['date']}."]
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for fam in ("frozen", "classical"):
        rows = [r for r in res["summary"] if r[fam]]
        mean = np.array([r[fam][0] for r in rows])
        err = np.nan_to_num(np.array([[r[fam][0] - r[fam][1], r[fam][2] - r[fam][0]]
                                      for r in rows]).T.reshape(2, -1))
        ax.errorbar([r["size"] for r in rows], mean, yerr=err, marker="o", capsize=3,
                    label=f"{fam} (chosen by CV)")
    sizes = [r["size"] for r in res["summary"]]
    ax.set(xscale="log", xlabel="labelled images per class", ylabel="test accuracy",
           title=f"Fashion-MNIST learning curve ({res['mode']}): mean, 95% t-interval")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.minorticks_off()
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_entries(res: dict[str, Any]) -> list[dict[str, Any]]:
    m = res["machine"]
    return [{"source": "benchmarks/fm_curves.py", "protocol": res["protocol"],
             "mode": res["mode"], "commit": m["git_commit"], "written": m["date"],
             "stage": "curve", "command": res["command"], "cpu": m["cpu"], "cores": m["cores"],
             "arm": a["arm"], "family": a["family"], "samples_per_class": p["size"],
             "seed": p["seed"], "n_train": p["n_train"], "n_test": res["n_test"],
             "params": a["chosen"], "cv_accuracy": a["cv_accuracy"], "cv_folds": p["k"],
             "accuracy": a["test_accuracy"], "converged": a["converged"],
             "chosen": a["arm"] in {c["arm"] for c in p["chosen"].values()},
             "selected_by": f"{p['k']}-fold stratified CV on the labelled subset"}
            for p in res["points"] for a in p["arms"]]


# ------------------------------------------------------------------------------ run


def _pair(text: str) -> tuple[str, str]:
    """``TRAIN.npy:TEST.npy``, split after ``.npy`` so that names may hold colons."""
    if ".npy:" in text:
        tr, te = text.split(".npy:", 1)
        return tr + ".npy", te
    tr, _, te = text.rpartition(":")
    return tr, te


def _load(args: argparse.Namespace) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]],
                                             np.ndarray, np.ndarray]:
    if args.labels:
        tr, te = _pair(args.labels)
        y, y_test = np.load(tr), np.load(te)
    else:
        from featurepipe.sources import load_fashion_mnist

        y = np.asarray(load_fashion_mnist(args.data, "train").labels)
        y_test = np.asarray(load_fashion_mnist(args.data, "test").labels)
    classes = np.unique(y)  # class codes 0..n-1 for the solvers
    if not np.isin(y_test, classes).all():
        sys.exit("fm_curves: the test labels hold classes the training labels lack")
    feats = {}
    for spec in args.features:
        name, _, paths = spec.partition("=")
        tr, te = _pair(paths)
        if not (name and tr and te):
            sys.exit(f"fm_curves: --features {spec!r} is not NAME=TRAIN.npy:TEST.npy")
        X, T = np.load(tr, mmap_mode="r"), np.load(te, mmap_mode="r")  # rows are drawn later
        if len(X) != len(y) or len(T) != len(y_test) or X.shape[1:] != T.shape[1:]:
            sys.exit(f"fm_curves: {name}: shapes {X.shape} / {T.shape} do not match "
                     f"{len(y)} training / {len(y_test)} test labels")
        feats[name] = (X, T)
    return feats, np.searchsorted(classes, y), np.searchsorted(classes, y_test)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from joblib import Parallel, delayed

    from benchmarks.fm_protocol import cpu_flags

    t_start = time.perf_counter()
    facts = {**machine(), "cpu_flags": cpu_flags()}
    load_start = list(os.getloadavg())
    feats, y, y_test = _load(args)
    te = (stratified_subsample(y_test, args.max_test, 0) if args.max_test
          else np.arange(len(y_test)))
    log(f"{len(feats)} feature sets, {len(y)} training rows, {len(te)} test rows")
    jobs = [(s, k) for s in args.sizes for k in args.seeds]
    done = Parallel(n_jobs=args.n_jobs)(
        delayed(fit_point)(feats, y, s, k, te, args.blas_threads) for s, k in jobs)
    points = []
    for point, preds in done:  # test labels are read only here, after every choice is fixed
        score(point, preds, y_test[te])
        points.append(point)
        log(f"size {point['size']} seed {point['seed']}: " + ", ".join(
            f"{f} {c['arm']} cv {c['cv_accuracy']:.3f} test {c['test_accuracy']:.4f}"
            for f, c in point["chosen"].items()) + f" ({point['seconds']:.1f} s)")
    summary = summarise(points)
    full = not args.max_test and (len(y), len(y_test)) == FULL_ROWS
    return {"mode": "full" if full else "small",
            "protocol": "benchmarks/protocol.md (2026-12-07) section 6",
            "command": "python -m benchmarks.fm_curves " + " ".join(sys.argv[1:]),
            "machine": facts, "load_average_start": load_start,
            "features": {n: {"dim": int(X.shape[1]), "family": family(n)}
                         for n, (X, _) in feats.items()},
            "sizes": args.sizes, "seeds": args.seeds, "n_test": len(te),
            "test_positions": te.tolist() if args.max_test else "all",
            "grids": {"linear_C": fm_heads.LINEAR_CS, "kernel_g": fm_heads.KERNEL_G,
                      "kernel_C": fm_heads.KERNEL_CS, "max_iter": fm_heads.MAX_ITER, "tol": TOL},
            "heads": {"linear": "StandardScaler + featurepipe.heads.probe.fit_multinomial",
                      "kernel": "StandardScaler + exact SVC, precomputed RBF Gram matrix"},
            "blas_threads": args.blas_threads, "n_jobs": args.n_jobs, "points": points,
            "summary": summary, "verdict": labelled_data_verdict(summary),
            "wall_seconds": time.perf_counter() - t_start}


def _ints(text: str) -> list[int]:
    if "-" in text and "," not in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from featurepipe.sources import FASHION_MNIST_DIR

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--features", action="append", required=True,
                    help="NAME=TRAIN.npy:TEST.npy (repeat); frozen sets are named frozen:...")
    ap.add_argument("--labels", help="TRAIN.npy:TEST.npy (default: the Fashion-MNIST files)")
    ap.add_argument("--data", default=FASHION_MNIST_DIR)
    ap.add_argument("--sizes", type=_ints, default=list(SIZES), help="per class, e.g. 5,10,600")
    ap.add_argument("--seeds", type=_ints, default=list(range(10)), help="e.g. 0-9 or 0,3")
    ap.add_argument("--max-test", type=int, default=None,
                    help="stratified test subset (small mode); default all test rows")
    ap.add_argument("--blas-threads", type=int, default=None)
    ap.add_argument("--n-jobs", type=int, default=1, help="(size, seed) points in parallel")
    ap.add_argument("--out", default="fm_curves_small", help="<RESULTS_DIR>/<OUT>.json/.md/.png")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    ap.add_argument("--no-log", action="store_true", help="do not append to the results log")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    res = run(args)
    folder, md = args.results_dir, markdown(res)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{args.out}.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    (folder / f"{args.out}.md").write_text(md)
    plot(res, folder / f"{args.out}.png")
    if not args.no_log:
        log(f"appended {fm_log.append(log_entries(res))} entries to {fm_log.LOG}")
    print(md)
    return res


if __name__ == "__main__":
    main()
