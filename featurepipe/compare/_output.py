"""Report files of a comparison and of a learning curve: Markdown, JSON and PNG."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featurepipe.atomic import atomic_write_text
from featurepipe.report import markdown_table, new_figure, save_figure

TABLE_COLUMNS = ("arm", "accuracy", "macro_f1", "accuracy_95ci", "val_accuracy", "n_train",
                 "n_val", "train_seconds", "fit_seconds", "predict_ms_per_image", "peak_mib",
                 "params")
_FAMILY_STYLE = {"classical": ("tab:gray", "s"), "frozen": ("tab:blue", "o"),
                 "finetune": ("tab:red", "^")}


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Indented JSON, written to a temporary name and renamed (never half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    return str(value)


def format_params(params: Mapping[str, Any] | None) -> str:
    """``{"C": 0.01, "gamma_scale": 1.0}`` -> ``"C=0.01, gamma_scale=1"`` for tables."""
    if not params:
        return ""
    parts = []
    for k, v in params.items():
        v = f"{v:.3g}" if isinstance(v, float) else v
        parts.append(f"{k}={v}")
    return ", ".join(parts)


def compare_markdown(rows: Sequence[Mapping[str, Any]], embedding: Sequence[Mapping[str, Any]],
                     split: Mapping[str, Any]) -> str:
    """The comparison table plus the shared embedding cost and what the columns mean."""
    shown = [{**r, "params": format_params(r.get("params")),
              "accuracy_95ci": _interval(r.get("accuracy_ci95")),
              "arm": r["arm"] + ("" if r.get("converged", True) else " (not converged)")}
             for r in rows]
    lines = [markdown_table(shown, TABLE_COLUMNS), ""]
    for e in embedding:
        ips = e.get("computed_images_per_second")
        cost = f"{ips:.1f} img/s when computed" if ips else "throughput not recorded"
        how = "re-used from the cache" if e["cached"] else f"computed {e['n_computed']}"
        name = e.get("features", e["backbone"])
        lines.append(f"- embedding {name} ({e['role']}): {e['n_rows']} images, {how} "
                     f"in {e['seconds']:.1f} s ({cost}; {e['device']}, {e['precision']}); "
                     f"{e['n_skipped']} skipped")
    held = (f" ({split['n_val']} of them held out as validation rows, shared by every arm and "
            "never fitted on; their accuracy, val_accuracy, picks the headline arms)"
            if split.get("n_val") else "")
    lines += [
        f"- split: {split['n_train']} train{held} / {split['n_test']} test images, "
        f"{split['how']}, seed {split['seed']}; {split['n_skipped']} unreadable images "
        "dropped for every arm",
        "- accuracy_95ci: Wilson score interval of the test accuracy",
        "- train_seconds = fit_seconds (hyperparameter search included) + the cost of making "
        "the training images' features (embedding or pixel/HOG extraction, per image); "
        "predict_ms_per_image includes making the test image's features",
        "- peak_mib: " + _memory_note(rows),
    ]
    return "\n".join(lines) + "\n"


def _interval(ci: Sequence[float] | None) -> str:
    return f"{ci[0]:.4f}-{ci[1]:.4f}" if ci else ""


def _memory_note(rows: Sequence[Mapping[str, Any]]) -> str:
    methods = {r.get("memory_method") for r in rows}
    if methods == {"tracemalloc_peak"}:
        return "peak of Python-tracked allocations during the arm (tracemalloc)"
    return ("rise of the process's peak resident set (Linux VmHWM, reset before each arm) over "
            "its resident set at the arm's start, during fit and predict")


def plot_compare(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                 title: str = "") -> str:
    """Write :func:`compare_figure` of ``rows`` to a PNG; returns the path."""
    return save_figure(compare_figure(rows, title), path)


def compare_figure(rows: Sequence[Mapping[str, Any]], title: str = "") -> Any:
    """Test accuracy (with its 95% interval) and training time (log x) per arm, one row each.

    Arm names are the y tick labels of two panels that share them, wrapped at separators to
    :data:`LABEL_WIDTH` characters, and the figure grows with the number of arms and label lines,
    so long names (``timm:...+svm-rbf``) stay readable however many arms there are; markers
    are coloured by family.

    Returns
    -------
    matplotlib.figure.Figure
        On the Agg backend, constrained layout; draw or save it.
    """
    labels = [wrap_label(f"{r['arm']} (n={r['n_train']})") for r in rows]
    lines = max((label.count("\n") + 1 for label in labels), default=1)
    row_inches = 0.12 + 0.16 * lines  # one 8-pt line is about 0.13 in with its spacing
    fig = new_figure(9.0, 1.6 + row_inches * max(len(rows), 1))
    ax_acc, ax_time = fig.subplots(1, 2, sharey=True, width_ratios=[3, 2])
    y = np.arange(len(rows))[::-1]  # first arm on top, as in the table
    for yi, r in zip(y, rows, strict=True):
        color, marker = _FAMILY_STYLE.get(r["family"], ("black", "x"))
        ci = r.get("accuracy_ci95")
        if ci:
            ax_acc.plot(ci, [yi, yi], color=color, lw=1.5, alpha=0.6)
        ax_acc.scatter([r["accuracy"]], [yi], color=color, marker=marker, s=36, zorder=3)
        seconds = max(float(r["train_seconds"]), 1e-3)
        ax_time.scatter([seconds], [yi], color=color, marker=marker, s=36, zorder=3)
    ax_acc.set_yticks(y, labels, fontsize=8)
    ax_acc.set_ylim(-0.6, len(rows) - 0.4)
    ax_acc.set_xlabel("test accuracy (line: 95% interval)")
    _log_seconds_axis(ax_time, [max(float(r["train_seconds"]), 1e-3) for r in rows])
    ax_time.set_xlabel("training time, s (log scale)\nfit + making the training features")
    ax_time.tick_params(axis="y", left=False)
    for ax in (ax_acc, ax_time):
        ax.grid(True, axis="x", which="major", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)
    handles = [ax_acc.scatter([], [], color=color, marker=marker, label=family)
               for family, (color, marker) in _FAMILY_STYLE.items()
               if any(r["family"] == family for r in rows)]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8)
    fig.suptitle(title or "accuracy and training time per arm")
    return fig


def _log_seconds_axis(ax: Any, seconds: Sequence[float]) -> None:
    """A log x axis of seconds with a few plain-number ticks (``0.5``, ``20``, ``1000``).

    Matplotlib labels minor ticks in ``3 x 10^1`` form when no decade falls in view, and those
    labels collide; the limits are padded by 2x each side so a 1-2-5 tick always falls in view,
    and spans over two decades are labelled at decades only.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lo, hi = min(seconds, default=1.0) / 2, max(seconds, default=1.0) * 2
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    subs = (1.0, 2.0, 5.0) if np.log10(hi / lo) <= 2 else (1.0,)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs, numticks=6))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


#: Characters per line of an arm's label in :func:`compare_figure`.
LABEL_WIDTH = 34
_LABEL_PIECES = re.compile(r"[^+:/_.\-\s]*(?:[+:/_.\-]|\s+|$)")


def wrap_label(text: str, width: int = LABEL_WIDTH) -> str:
    """Break ``text`` into lines of at most ``width`` characters, after a separator
    (``+ : / _ . -`` or a space) where one is near, inside a longer piece otherwise.

    Examples
    --------
    >>> print(wrap_label("timm:convnext_tiny.fb_in22k_ft_in1k+svm-rbf (n=400)", 20))
    timm:convnext_tiny.
    fb_in22k_ft_in1k+
    svm-rbf (n=400)
    """
    lines: list[str] = []
    line = ""
    for piece in _LABEL_PIECES.findall(text):
        if line and len(line) + len(piece.rstrip()) > width:
            lines.append(line)
            line = ""
        line += piece
        while len(line.rstrip()) > width:  # one piece longer than a line: cut it
            lines.append(line[:width])
            line = line[width:]
    lines.append(line)
    return "\n".join(part.strip() for part in lines if part.strip())


def curve_markdown(arms: Sequence[str], sizes: Sequence[int], acc: np.ndarray) -> str:
    """Rows = arms, columns = samples per class, cells = mean ± std test accuracy over seeds."""
    rows = []
    for a, name in enumerate(arms):
        row: dict[str, Any] = {"arm": name}
        for s, size in enumerate(sizes):
            vals = acc[a, s]
            row[str(size)] = f"{np.nanmean(vals):.3f} ± {np.nanstd(vals):.3f}"
        rows.append(row)
    return markdown_table(rows, ["arm", *[str(s) for s in sizes]])


def plot_curve(arms: Sequence[str], sizes: Sequence[int], acc: np.ndarray,
               path: str | os.PathLike, title: str = "") -> str:
    """Accuracy against labelled samples per class (log x): mean line, min-max band per arm."""
    fig = new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    x = np.asarray(sizes, dtype=float)
    for a, name in enumerate(arms):
        mean = np.nanmean(acc[a], axis=1)
        ax.plot(x, mean, marker="o", label=name)
        ax.fill_between(x, np.nanmin(acc[a], axis=1), np.nanmax(acc[a], axis=1), alpha=0.2)
    ax.set_xscale("log")
    ax.set_xticks(x, [str(s) for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("labelled training images per class (log scale)")
    ax.set_ylabel("test accuracy (mean; band = min..max over seeds)")
    ax.set_title(title or "learning curve")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)
