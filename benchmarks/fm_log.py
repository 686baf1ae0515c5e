"""The Fashion-MNIST results log: one JSON line per configuration ever run, never rewritten.

``benchmarks/results/fashion_mnist_log.jsonl`` only grows: :func:`append` adds lines, nothing
edits or removes one. Losing configurations are logged like winning ones, so a reader can see
how many configurations were tried before a headline (benchmarks/protocol.md).

    python -m benchmarks.fm_log seed     # once: every configuration of the committed runs

``seed`` reads the committed ``fashion_mnist*.json`` files at every commit that changed them
(from git history) and logs each configuration as recorded there, with that commit and its date.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS

__all__ = ["LOG", "append", "committed_entries", "read"]

LOG = RESULTS / "fashion_mnist_log.jsonl"
_OLD = "pre-protocol (before benchmarks/protocol.md of 2026-12-07)"


def read(path: Path = LOG) -> list[dict[str, Any]]:
    """Every logged entry, oldest first."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append(entries: Iterable[dict[str, Any]], path: Path = LOG) -> int:
    """Append ``entries`` (one JSON line each); return how many were written."""
    lines = [json.dumps(e, sort_keys=True, default=str) for e in entries]
    if lines:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return len(lines)


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parent.parent).stdout


def _versions(rel: str) -> list[tuple[str, str]]:
    """(commit, ISO date) of every commit that changed ``rel``, oldest first."""
    out = _git("log", "--reverse", "--format=%h %aI", "--", rel)
    return [tuple(line.split(" ", 1)) for line in out.splitlines() if line]  # type: ignore[misc]


def _base(commit: str, date: str, machine: dict[str, Any] | None, stage: str) -> dict[str, Any]:
    """Where an entry comes from: ``commit`` first recorded it; ``written`` is the date stamped
    on the report (or, for a fine-tuning run, on the run itself)."""
    m = machine or {}
    return {"source": "committed result", "protocol": _OLD, "commit": commit,
            "commit_date": date, "written": m.get("date"), "stage": stage,
            "cpu": m.get("cpu"), "cores": m.get("cores"), "gpu": m.get("gpu"),
            "measured_at_commit": m.get("git_commit")}


def _compare_rows(stage: str, data: dict[str, Any] | None, base: dict[str, Any]
                  ) -> Iterator[dict[str, Any]]:
    if not data:
        return
    settings = data.get("settings", {})
    for r in data.get("rows", []):
        yield {**base, "stage": stage, "arm": r["arm"], "family": r["family"],
               "n_train": r["n_train"], "n_test": r["n_test"], "max_train": r.get("max_train"),
               "image_size": data.get("image_size"), "layer": data.get("layer"),
               "cv": settings.get("cv"), "params": r.get("params"),
               "accuracy": r["accuracy"], "val_accuracy": r.get("best_val_acc"),
               "selected_by": ("early-stopping validation split" if r["family"] == "finetune"
                               else f"{settings.get('cv')}-fold CV on the training rows"),
               "fit_seconds": r.get("fit_seconds"), "train_seconds": r.get("train_seconds"),
               "warnings": r.get("warnings") or [],
               "finetune": {k: r.get(k) for k in ("epochs_run", "best_epoch", "device")}
               if r["family"] == "finetune" else None}


def _entries(commit: str, date: str, doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    machine = doc.get("machine")
    probe = doc.get("probe")
    if probe:
        for r in probe["rows"]:
            yield {**_base(commit, date, machine, "probe"), "arm": "efficientnet_lite0+logreg",
                   "family": "frozen", "image_size": r["image_size"],
                   "layer": r.get("layer", "penultimate"), "n_train": r["n_images"],
                   "cv": 3, "cv_accuracy": r["cv_accuracy"], "accuracy": None,
                   "fit_seconds": r.get("head_seconds"), "embed_seconds": r.get("embed_seconds"),
                   "selected_by": "3-fold CV on training images (probe)",
                   "chosen": (r["image_size"] == probe["chosen_image_size"]
                              and r.get("layer", "penultimate")
                              == probe.get("chosen_layer", "penultimate"))}
    yield from _compare_rows("compare", doc.get("compare"), _base(commit, date, machine, ""))
    yield from _compare_rows("finetune-cpu", doc.get("finetune"),
                             _base(commit, date, machine, ""))
    for run in doc.get("finetune_full_runs") or []:
        ft = run["settings"]["finetune_params"]
        for e in _compare_rows("finetune-full", run, _base(commit, date, run.get("machine"), "")):
            yield {**e, "finetune_params": ft, "epochs": run["settings"].get("finetune_epochs"),
                   "command": run.get("command")}
    curve = doc.get("curve")
    if curve and curve.get("accuracy"):
        for a, arm in enumerate(curve["arms"]):
            for s, size in enumerate(curve["samples_per_class"]):
                for k, seed in enumerate(curve["seeds"]):
                    yield {**_base(commit, date, machine, "curve"), "arm": arm,
                           "samples_per_class": size, "seed": seed,
                           "image_size": curve.get("image_size"), "layer": curve.get("layer"),
                           "accuracy": curve["accuracy"][a][s][k],
                           "selected_by": "CV on the labelled subset (probe labels not counted)"}


def _key(e: dict[str, Any]) -> tuple[Any, ...]:
    """A configuration measured once but carried through several commits is logged once.

    Rewriting a report re-stamps its date, so the key is what was measured, not when it was
    written (``fit_seconds`` tells apart two runs that happen to share an accuracy).
    """
    return (e["stage"], e.get("arm"), e.get("n_train"), e.get("image_size"), e.get("layer"),
            e.get("samples_per_class"), e.get("seed"), e.get("accuracy"), e.get("cv_accuracy"),
            e.get("fit_seconds"))


def committed_entries() -> list[dict[str, Any]]:
    """Every configuration in every committed version of the Fashion-MNIST result files."""
    seen: set[tuple[Any, ...]] = set()
    out = []
    for rel in ("benchmarks/results/fashion_mnist_runs.json",):
        for commit, date in _versions(rel):
            doc = json.loads(_git("show", f"{commit}:{rel}"))
            for e in _entries(commit, date, doc):
                if _key(e) not in seen:
                    seen.add(_key(e))
                    out.append(e)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("action", choices=["seed", "show"])
    args = ap.parse_args(argv)
    if args.action == "seed":
        if read():
            sys.exit(f"{LOG} already has entries; the log is append-only, seed it once")
        n = append(committed_entries())
        print(f"logged {n} committed configurations to {LOG}")
    else:
        for e in read():
            print(e["commit" if "commit" in e else "logged"], e["stage"], e.get("arm"),
                  e.get("accuracy"))


if __name__ == "__main__":
    main()
