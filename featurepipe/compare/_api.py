"""``compare()``: every arm under one protocol, and the report it writes."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featurepipe.compare._arms import (
    FINETUNE_STRATEGIES,
    ArmContext,
    ArmSpec,
    build_arms,
    max_train_for,
    run_arm,
)
from featurepipe.compare._data import HOG, PIXELS, Part
from featurepipe.compare._output import compare_markdown, plot_compare, write_json
from featurepipe.compare._pixels import PixelSpec
from featurepipe.compare._prepare import Prepared, prepare
from featurepipe.compare._protocol import (
    check_same_caps,
    headline,
    headline_comparisons,
    headline_markdown,
    validation_split,
)
from featurepipe.exceptions import ConfigError

DEFAULT_HEADS = ("logreg", "linear-svm", "svm-rbf", "knn")
#: Raw pixels and HOG, each with the linear and the kernel head family the frozen arms also get.
DEFAULT_CLASSICAL = ("pixels+logreg", "pixels+svm-rbf", "hog+logreg", "hog+svm-rbf")


@dataclass
class CompareResult:
    """What :func:`compare` measured and wrote.

    Attributes
    ----------
    rows : list of dict
        One per arm: ``arm, family, accuracy, accuracy_ci95, val_accuracy, macro_f1, n_train,
        n_val, n_test, converged, fit_seconds, extraction_seconds, train_seconds,
        predict_ms_per_image, peak_mib, memory_method, params, warnings, train_ids_sha256,
        test_ids_sha256`` (+ fine-tuning details).
    comparisons : list of dict
        The headline arm of each family (best validation accuracy) against the others on the
        same test images: accuracies, difference, exact McNemar ``pvalue``.
    embedding : list of dict
        Embedding cost per backbone and source role, reported once (shared by its frozen arms).
    split : dict
        How the data was split, sizes, seed, digests of the train and test ids.
    settings : dict
        The arguments that shaped the run.
    out_dir : Path
    paths : dict
        ``json``, ``markdown``, ``png``, ``split``, ``predictions`` file paths
        (``predictions.npz``: ``y_test`` and each arm's test predictions, in test order).
    table : str
        The Markdown report.
    """

    rows: list[dict[str, Any]]
    embedding: list[dict[str, Any]]
    split: dict[str, Any]
    settings: dict[str, Any]
    out_dir: Path
    paths: dict[str, str] = field(default_factory=dict)
    table: str = ""
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    comparisons: list[dict[str, Any]] = field(default_factory=list)

    def row(self, arm: str) -> dict[str, Any]:
        """The row of ``arm`` (KeyError naming the arms there are)."""
        for r in self.rows:
            if r["arm"] == arm:
                return r
        raise KeyError(f"no arm {arm!r}; arms: {[r['arm'] for r in self.rows]}")

    def best(self, family: str | None = None) -> dict[str, Any]:
        """The headline row (of one ``family``: classical, frozen or finetune).

        The row with the best *validation* accuracy (the holdout of the training rows every arm
        shares); the test accuracy never chooses it.
        """
        return dict(headline(self.rows, family))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (what ``compare.json`` holds)."""
        return {"rows": self.rows, "comparisons": self.comparisons, "embedding": self.embedding,
                "split": self.split, "skipped": self.skipped, "settings": self.settings,
                "seconds": self.seconds, "out_dir": str(self.out_dir),
                "paths": dict(self.paths)}


def _tuple(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return tuple(value)


def compare(
    source: Any,
    out_dir: str | os.PathLike[str],
    *,
    labels: Sequence[Any] | None = None,
    test_source: Any | None = None,
    test_size: float | int = 0.2,
    val_size: float | int | None = 0.1,
    seed: int = 0,
    backbones: str | Sequence[str] = ("efficientnet_lite0",),
    weights: str | None = None,
    image_size: int | None = None,
    layer: str | None = None,
    layers: str | Sequence[str | None] | None = None,
    heads: str | Sequence[str] | None = DEFAULT_HEADS,
    classical: str | Sequence[str] | None = DEFAULT_CLASSICAL,
    finetune: str | Sequence[str] | None = FINETUNE_STRATEGIES,
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
) -> CompareResult:
    """Compare classical ML, frozen pretrained features + heads, and fine-tuning, fairly.

    One protocol for every arm (benchmarks/protocol.md): the same images (unreadable ones
    dropped for all), the same stratified split and seed, every arm fitted on the same training
    rows with the same cross-validation budget, hyperparameters chosen by cross-validation on
    those rows only (fine-tuning: early stopping on a split of them). A stratified validation
    holdout of the training split, shared by every arm and never fitted on, scores each arm;
    that score picks the headline arm of each family (:meth:`CompareResult.best`). The test
    rows are scored once per arm: accuracy with a 95% Wilson interval, and the headline arms
    compared pairwise by an exact McNemar test. Features are cached in
    ``out_dir/features.h5``: a rerun embeds nothing.

    Parameters
    ----------
    source : folder, manifest CSV, list of paths, array, IDX file or ImageSource
        Labelled images (anything :func:`featurepipe.sources.open_source` accepts).
    out_dir : str or path
        Where the store, ``compare.json``, ``compare.md``, ``compare.png`` and ``split.json`` go.
    labels : sequence, optional
        Labels when ``source`` carries none (arrays, path lists).
    test_source : optional
        A fixed, labelled test set (e.g. Fashion-MNIST's t10k); then ``source`` is all training
        data and ``test_size`` is not used.
    test_size : float or int, default=0.2
        Fraction (or count) of ``source`` held out for testing, stratified.
    val_size : float, int or None, default=0.1
        Fraction (or count, at least one image per class) of the training split held out as the
        validation rows that select headline arms; arms are fitted on the rest. ``0`` or
        ``None``: no holdout, every arm fits on the whole training split, and no headline arm
        is named (:meth:`CompareResult.best` raises ``KeyError``; fine-tuning still early-stops
        on its own split).
    seed : int, default=0
        Split, CV folds, subsamples and fine-tuning share it.
    backbones : str or sequence of str
        Frozen-feature arms run for each ("which pretrained model should I choose?").
    weights, image_size : optional
        Backbone weights and input size (all backbones and fine-tuning).
    layer : str, optional
        Named layer whose globally pooled output the frozen arms use (e.g. ``blocks.5``; an
        unknown name lists the known ones); default: the pooled penultimate layer.
        Intermediate layers often transfer better to images far from ImageNet. Fine-tuning
        always trains the whole network.
    layers : str or sequence, optional
        Several layers (``"blocks.4,blocks.5,penultimate"``; ``penultimate`` or None is the
        pooled penultimate layer) instead of ``layer``: frozen arms per layer and head
        (``efficientnet_lite0@blocks.5+logreg``) and, for several layers, per head on all of
        them side by side, each layer standardised to the same total variance
        (``efficientnet_lite0@blocks.4,blocks.5,penultimate+logreg``). Every arm trains on the
        same rows with the same search; the validation accuracy picks the headline arm among
        them like among any others.
    heads : str, sequence of str or None
        Head presets (:data:`featurepipe.heads.HEAD_PRESETS`) trained on each backbone's features
        (``None`` or ``()``: no frozen arms).
    classical : str, sequence of str or None
        From-scratch arms (:data:`~featurepipe.compare.CLASSICAL_ARMS`): raw pixels or HOG with
        a head preset, e.g. ``pixels+logreg``, ``hog+svm-rbf`` (``None`` or ``()``: none).
    finetune : str, sequence of str or None, default=("head", "full")
        Fine-tuning strategies of the first backbone; ``None`` or ``()`` disables fine-tuning.
    finetune_epochs : int, default=5
    finetune_params : mapping, optional
        More :class:`~featurepipe.finetune.FineTuneClassifier` parameters (``lr``,
        ``batch_size``, ``image_size``, ``val_size``, ...), plus ``max_minutes``: stop after the
        epoch in which that many minutes of training have passed.
    max_train : int or mapping of str to int, optional
        Train every arm on one stratified subsample of ``n`` fit rows (kernel SVMs are quadratic
        in the number of samples). A mapping ``{fnmatch pattern: n}`` is accepted when it gives
        every arm the same cap (e.g. ``{"*": 10000}``); caps that differ between arms are
        refused, since arms trained on different rows are not comparable. Recorded in each row.
    pixel_size, pixel_mode, hog_size, hog_cell
        Raw-pixel and HOG features (see :class:`~featurepipe.compare.PixelSpec`).
    cv : int, default=5
        Folds of the heads' hyperparameter searches.
    n_jobs : int, optional
        Parallel jobs of the searches.
    batch_size, workers, device, precision
        Embedding engine settings (``workers``: decode processes, None = auto).
    progress : bool
        Progress bars while embedding.
    log : callable, optional
        Receives one-line progress messages.
    on_fit : callable, optional
        ``on_fit(arm_name, train_part)`` before each arm trains (protocol checks in tests).

    Returns
    -------
    CompareResult

    Examples
    --------
    >>> res = compare("photos/", "report/", heads="logreg", finetune=None)  # doctest: +SKIP
    >>> print(res.table)                                                    # doctest: +SKIP
    """
    start = time.perf_counter()
    say = log or (lambda _m: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bbs, head_list = _tuple(backbones), _tuple(heads)
    classical_list, strategies = _tuple(classical), _tuple(finetune)
    if not bbs:
        raise ConfigError("backbones is empty; give at least one (e.g. efficientnet_lite0)")
    layer_list = _layer_list(layer, layers)
    arms = build_arms(classical_list, bbs, head_list, strategies, bbs[0], layers=layer_list)
    if not arms:
        raise ConfigError("no arms to compare: give heads, classical arms or finetune strategies")
    caps = same_caps(arms, max_train)
    settings = _settings(locals())
    prep = _prepare(source, out, labels, test_source, test_size, seed, bbs, weights, image_size,
                    layer, batch_size, workers, device, precision, progress, arms, settings, say,
                    layers=layer_list)
    fit_rows, val_rows = (validation_split(prep.train, val_size, seed) if val_size
                          else (prep.train, None))
    prep.split.update({"n_fit": len(fit_rows), "n_val": 0 if val_rows is None else len(val_rows),
                       "val_size": val_size, "fit_ids_sha256": fit_rows.digest(),
                       "val_ids_sha256": val_rows.digest() if val_rows is not None else None})
    predictions: dict[str, Any] = {}
    ctx = ArmContext(seed=seed, cv=cv, n_jobs=n_jobs, max_train=caps,
                     finetune_params=_finetune_params(finetune_epochs, finetune_params, weights,
                                                      image_size, device, precision),
                     feature_seconds_per_image=prep.seconds_per_image, log=say, on_fit=on_fit,
                     progress=progress, predictions=predictions)
    rows = []
    partial = out / "compare.partial.json"  # finished arms survive a killed long run
    bar = arm_bar(len(arms), progress)
    for arm in arms:
        bar.set_postfix_str(arm.name)
        rows.append(run_arm(arm, fit_rows, prep.test, ctx, val=val_rows))
        write_json({"rows": rows, "split": prep.split}, partial)
        bar.update()
    bar.close()
    comparisons = headline_comparisons(rows, predictions, prep.test.labels)
    # Per-image test predictions: a later run (another machine, a GPU) can be paired with these.
    arrays: dict[str, Any] = {"y_test": prep.test.labels, **predictions}
    np.savez_compressed(out / "predictions.npz", **arrays)
    result = _write(rows, prep, settings, out, time.perf_counter() - start, comparisons,
                    (fit_rows.ids, val_rows.ids if val_rows is not None else []))
    partial.unlink(missing_ok=True)
    return result


def arm_bar(total: int, progress: bool) -> Any:
    """One tqdm bar (stderr) over the arms: a search or a fine-tune can run for minutes."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="compare arms", unit="arm", disable=not progress)


def _layer_list(layer: str | None, layers: str | Sequence[str | None] | None
                ) -> tuple[str | None, ...] | None:
    """The parsed layer list, or None when only ``layer`` (one layer, as before) is given."""
    from featurepipe.layer_entries import parse_layers

    if layers is None:
        return None
    if layer is not None:
        raise ConfigError(f"give layer={layer!r} or layers={layers!r}, not both")
    return parse_layers(layers)


def same_caps(arms: Sequence[ArmSpec], max_train: int | Mapping[str, int] | None
              ) -> dict[str, int]:
    """``max_train`` as a pattern mapping that gives every arm the same cap (or none)."""
    if max_train is None:
        return {}
    if isinstance(max_train, int):
        if isinstance(max_train, bool) or max_train < 1:
            raise ConfigError(f"max_train must be an integer >= 1; got {max_train!r}")
        return {"*": max_train}
    caps = dict(max_train)
    names = [a.name for a in arms]
    cap = check_same_caps(names, {n: max_train_for(n, caps) for n in names})
    return {} if cap is None else {"*": cap}


def _settings(args: dict[str, Any]) -> dict[str, Any]:
    keep = ("test_size", "val_size", "seed", "backbones", "weights", "image_size", "layer",
            "layers", "heads",
            "classical", "finetune", "finetune_epochs", "finetune_params", "max_train",
            "pixel_size", "pixel_mode", "hog_size", "hog_cell", "cv", "n_jobs", "batch_size",
            "workers", "device", "precision")
    out = {k: args.get(k) for k in keep}  # learning curves have no val_size
    for k in ("backbones", "heads", "classical", "finetune"):
        out[k] = list(_tuple(out[k]))
    out["finetune_params"] = dict(out["finetune_params"] or {})
    out["max_train"] = (out["max_train"] if isinstance(out["max_train"], int)
                        else dict(out["max_train"] or {}))
    out["test_source"] = args["test_source"] is not None
    if out["layers"] is not None:
        from featurepipe.layer_entries import layer_name, parse_layers

        out["layers"] = [layer_name(x) for x in parse_layers(out["layers"])]
    return out


def _prepare(source: Any, out: Path, labels: Any, test_source: Any, test_size: float | int,
             seed: int, bbs: tuple[str, ...], weights: str | None, image_size: int | None,
             layer: str | None, batch_size: int, workers: int | None, device: str,
             precision: str, progress: bool,
             arms: list[ArmSpec], settings: dict[str, Any],
             say: Callable[[str], None],
             layers: tuple[str | None, ...] | None = None) -> Prepared:
    needs = {a.features for a in arms} | {a.backbone for a in arms if a.family == "frozen"}
    spec = None
    if needs & {PIXELS, HOG}:
        spec = PixelSpec(settings["pixel_size"], settings["pixel_mode"], settings["hog_size"],
                         settings["hog_cell"]).validate()
    frozen = [bb for bb in bbs if bb in needs]
    # Fine-tuning alone still embeds its backbone once: the store's skipped list is what keeps
    # every arm on the same readable images.
    embed_bbs = frozen or [bbs[0]]
    embed_kwargs = {"weights": weights, "image_size": image_size, "layer": layer,
                    "batch_size": batch_size,
                    "workers": workers, "device": device, "precision": precision,
                    "progress": progress}
    return prepare(source, out, labels=labels, test_source=test_source, test_size=test_size,
                   seed=seed, backbones=embed_bbs, embed_kwargs=embed_kwargs, pixel_spec=spec,
                   with_hog=HOG in needs, say=say, layers=layers)


def _finetune_params(epochs: int, extra: Mapping[str, Any] | None, weights: str | None,
                     image_size: int | None, device: str, precision: str) -> dict[str, Any]:
    params: dict[str, Any] = {"epochs": epochs, "weights": weights, "image_size": image_size,
                              "device": device, "precision": precision}
    params.update(extra or {})
    return params


def _write(rows: list[dict[str, Any]], prep: Prepared, settings: dict[str, Any], out: Path,
           seconds: float, comparisons: list[dict[str, Any]] | None = None,
           fit_val_ids: tuple[list[str], list[str]] = ([], [])) -> CompareResult:
    split = {**prep.split, "classes": prep.classes, "pixel_mode": prep.pixel_mode}
    write_json({"train_ids": prep.train.ids, "fit_ids": fit_val_ids[0],
                "val_ids": fit_val_ids[1], "test_ids": prep.test.ids, **split},
               out / "split.json")
    table = compare_markdown(rows, prep.embedding, split)
    if comparisons:
        table += "\n" + headline_markdown(comparisons)
    result = CompareResult(rows, prep.embedding, split, settings, out, table=table,
                           skipped=prep.skipped, seconds=seconds,
                           comparisons=list(comparisons or []))
    result.paths = {"json": str(out / "compare.json"), "markdown": str(out / "compare.md"),
                    "png": str(out / "compare.png"), "split": str(out / "split.json"),
                    "predictions": str(out / "predictions.npz")}
    plot_compare(rows, result.paths["png"])
    (out / "compare.md").write_text("# Comparison\n\n" + table, encoding="utf-8")
    write_json(result.to_dict(), result.paths["json"])
    return result
