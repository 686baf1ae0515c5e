"""``learning_curve()``: the comparison repeated over labelled-set sizes and seeds.

The test set is the comparison's test set at every point; only the training split is subsampled
(``n`` random images of every class, a fresh draw per seed). Fine-tuning arms are off by default
here (``finetune=None``): one run per size and seed is expensive on a CPU.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featurepipe.compare._api import (
    _finetune_params,
    _prepare,
    _settings,
    _tuple,
    arm_bar,
    same_caps,
)
from featurepipe.compare._arms import ArmContext, build_arms, run_arm
from featurepipe.compare._data import Part, per_class_subsample
from featurepipe.compare._output import curve_markdown, plot_curve, write_json
from featurepipe.exceptions import ConfigError

#: The same head family as :data:`CURVE_HEADS`, on each classical feature set.
CURVE_CLASSICAL = ("pixels+logreg", "hog+logreg")
CURVE_HEADS = ("logreg",)


@dataclass
class LearningCurveResult:
    """Scores of every arm at every labelled-set size and seed.

    Attributes
    ----------
    arms : list of str
    samples_per_class : list of int
    seeds : list of int
    accuracy, macro_f1, fit_seconds : ndarray of shape (n_arms, n_sizes, n_seeds)
    rows : list of dict
        The full per-run rows (as :func:`compare` reports them) with ``samples_per_class`` and
        ``seed`` added.
    paths : dict
        ``json``, ``markdown``, ``png``.
    table : str
        Markdown: mean ± std accuracy per arm and size.
    """

    arms: list[str]
    samples_per_class: list[int]
    seeds: list[int]
    accuracy: np.ndarray
    macro_f1: np.ndarray
    fit_seconds: np.ndarray
    rows: list[dict[str, Any]] = field(default_factory=list)
    split: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    embedding: list[dict[str, Any]] = field(default_factory=list)
    paths: dict[str, str] = field(default_factory=dict)
    table: str = ""
    seconds: float = 0.0

    def mean(self) -> np.ndarray:
        """Mean accuracy over seeds, shape (n_arms, n_sizes)."""
        return self.accuracy.mean(axis=2)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (what ``learning_curve.json`` holds)."""
        return {
            "arms": self.arms, "samples_per_class": self.samples_per_class, "seeds": self.seeds,
            "accuracy": self.accuracy.tolist(), "macro_f1": self.macro_f1.tolist(),
            "fit_seconds": self.fit_seconds.tolist(),
            "accuracy_mean": self.accuracy.mean(axis=2).tolist(),
            "accuracy_std": self.accuracy.std(axis=2).tolist(),
            "shape": "arms x samples_per_class x seeds", "rows": self.rows,
            "split": self.split, "settings": self.settings, "embedding": self.embedding,
            "seconds": self.seconds, "paths": self.paths,
        }


def learning_curve(
    source: Any,
    out_dir: str | os.PathLike[str],
    samples_per_class: Sequence[int],
    *,
    seeds: int = 3,
    labels: Sequence[Any] | None = None,
    test_source: Any | None = None,
    test_size: float | int = 0.2,
    seed: int = 0,
    backbones: str | Sequence[str] = ("efficientnet_lite0",),
    weights: str | None = None,
    image_size: int | None = None,
    layer: str | None = None,
    heads: str | Sequence[str] = CURVE_HEADS,
    classical: str | Sequence[str] = CURVE_CLASSICAL,
    finetune: str | Sequence[str] | None = None,
    finetune_epochs: int = 5,
    finetune_params: Mapping[str, Any] | None = None,
    max_train: int | Mapping[str, int] | None = None,
    pixel_size: int = 32,
    pixel_mode: str = "auto",
    hog_size: int = 64,
    hog_cell: int = 8,
    cv: int = 5,
    n_jobs: int | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    on_fit: Callable[[str, Part], None] | None = None,
) -> LearningCurveResult:
    """Accuracy of each arm against the number of labelled training images per class.

    Same protocol and arguments as :func:`featurepipe.compare.compare`; the split (and so the
    test set) is made once with ``seed``, then for each size ``n`` in ``samples_per_class`` and
    each of ``seeds`` seeds (``seed, seed + 1, ...``), every arm is trained on ``n`` random
    training images of every class and scored on the whole test set. ``max_train`` caps still
    apply. Writes ``learning_curve.json``, ``.md`` and ``.png`` in ``out_dir``.

    Parameters
    ----------
    samples_per_class : sequence of int
        Labelled-set sizes, e.g. ``(5, 10, 25, 50, 100)``; each must be available in every
        class of the training split.
    seeds : int, default=3
        Repeats per size (different subsamples, CV folds and fine-tuning seeds).
    finetune : str, sequence of str or None, default=None
        Fine-tuning strategies; off by default (expensive per point).

    Returns
    -------
    LearningCurveResult
    """
    start = time.perf_counter()
    say = log or (lambda _m: None)
    sizes = sorted({int(s) for s in samples_per_class})
    if not sizes or sizes[0] < 1:
        raise ConfigError(f"samples_per_class must be positive integers; got {samples_per_class!r}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"seeds must be an integer >= 1; got {seeds!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bbs = _tuple(backbones)
    if not bbs:
        raise ConfigError("backbones is empty; give at least one (e.g. efficientnet_lite0)")
    arms = build_arms(_tuple(classical), bbs, _tuple(heads), _tuple(finetune), bbs[0])
    if not arms:
        raise ConfigError("no arms: give heads, classical arms or finetune strategies")
    caps = same_caps(arms, max_train)
    settings = {**_settings(locals()), "samples_per_class": sizes, "seeds": seeds}
    prep = _prepare(source, out, labels, test_source, test_size, seed, bbs, weights, image_size,
                    layer, batch_size, workers, device, precision, progress, arms, settings, say)
    for n in sizes:  # fail before any training when a size is not available
        per_class_subsample(prep.train.labels, n, seed)
    seed_list = [seed + k for k in range(seeds)]
    shape = (len(arms), len(sizes), len(seed_list))
    acc, f1, fit = np.full(shape, np.nan), np.full(shape, np.nan), np.full(shape, np.nan)
    rows = []
    bar = arm_bar(len(arms) * len(sizes) * len(seed_list), progress)
    for s, n in enumerate(sizes):
        for k, sd in enumerate(seed_list):
            train = prep.train.take(per_class_subsample(prep.train.labels, n, sd))
            ctx = ArmContext(seed=sd, cv=cv, n_jobs=n_jobs, max_train=caps,
                             finetune_params=_finetune_params(finetune_epochs, finetune_params,
                                                              weights, image_size, device,
                                                              precision),
                             feature_seconds_per_image=prep.seconds_per_image, log=say,
                             on_fit=on_fit, progress=progress)
            for a, arm in enumerate(arms):
                bar.set_postfix_str(f"{n}/class, seed {sd}, {arm.name}")
                row = run_arm(arm, train, prep.test, ctx)
                bar.update()
                acc[a, s, k], f1[a, s, k] = row["accuracy"], row["macro_f1"]
                fit[a, s, k] = row["fit_seconds"]
                rows.append({**row, "samples_per_class": n, "seed": sd})
            say(f"{n} per class, seed {sd}: "
                + ", ".join(f"{arm.name} {acc[a, s, k]:.3f}" for a, arm in enumerate(arms)))
    bar.close()
    names = [a.name for a in arms]
    result = LearningCurveResult(names, sizes, seed_list, acc, f1, fit, rows,
                                 {**prep.split, "classes": prep.classes}, settings,
                                 prep.embedding, seconds=time.perf_counter() - start)
    result.table = curve_markdown(names, sizes, acc)
    result.paths = {"json": str(out / "learning_curve.json"),
                    "markdown": str(out / "learning_curve.md"),
                    "png": str(out / "learning_curve.png")}
    plot_curve(names, sizes, acc, result.paths["png"])
    (out / "learning_curve.md").write_text(
        "# Learning curve (test accuracy, mean ± std over seeds)\n\n" + result.table + "\n",
        encoding="utf-8")
    write_json(result.to_dict(), result.paths["json"])
    return result
