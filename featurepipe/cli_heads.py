"""``featurepipe fit | predict | evaluate``: heads on cached features, and saved models on images.

:func:`fit_store` is the library call behind ``fit`` (usable from Python too); the command
handlers only parse, call, print and pick the exit code. The ``sgd`` head (or any
:class:`~featurepipe.heads.OutOfCoreSGDClassifier`) streams the store chunk by chunk, so its
features never have to fit in memory; the other heads load the entry whole.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from featurepipe.display import escape
from featurepipe.exceptions import ConfigError, SourceError, SpecMismatchError
from featurepipe.records import SkippedFile
from featurepipe.store import FeatureStore

if TYPE_CHECKING:
    from featurepipe.layer_entries import LayerData

__all__ = ["FitResult", "fit_store", "register"]

#: featurepipe.heads.HEAD_PRESETS, spelled out so building the parser does not import sklearn.
PRESET_NAMES = ("logreg", "linear-svm", "svm-rbf", "knn", "ridge", "sgd")


@dataclass
class FitResult:
    """What :func:`fit_store` did: the fitted head, what it was trained on, and its scores."""

    head: Any
    class_names: list[str]
    store_key: str
    key_parts: dict
    backbone_spec: Any
    params: dict
    fit_seconds: float
    n_train: int
    n_test: int
    metrics: dict | None
    y_true: np.ndarray | None = None
    y_pred: np.ndarray | None = None
    warnings: list[str] = field(default_factory=list)
    #: Rows the returned head was trained on (all labelled rows after a refit).
    n_model_rows: int = 0
    #: Whether the head was refit on every labelled row after the evaluation split.
    refit: bool = False
    #: The layers the head reads, in column order (None: the pooled penultimate layer), their
    #: entry keys, key parts and widths; empty for a plain single-entry fit.
    layers: tuple[str | None, ...] = ()
    layer_keys: list[str] = field(default_factory=list)
    layer_key_parts: list[dict] = field(default_factory=list)
    block_dims: tuple[int, ...] = ()
    #: With a layer choice: ``{"layers": [...], "val_accuracy": ...}`` per candidate, in order.
    layer_scores: list[dict] = field(default_factory=list)


def fit_store(store: str | os.PathLike, head: str = "logreg", *, key: str | None = None,
              cv: int = 5, test_size: float = 0.2, test_store: str | os.PathLike | None = None,
              seed: int = 0, chunk_rows: int = 4096, refit: bool = True,
              progress: bool = False, layers: str | Sequence[str | None] | None = None,
              choose_layers: bool = False) -> FitResult:
    """Fit a head on a feature-store entry and score it on a held-out split or another store.

    Parameters
    ----------
    store : path
        The training feature store; every row must be labelled.
    head : str
        A preset of :data:`featurepipe.heads.HEAD_PRESETS` or ``"module:Class"``.
    key : str, optional
        Entry key (or unique prefix) when the store holds several.
    cv : int
        Folds of the head's hyperparameter search.
    test_size : float
        Fraction held out, stratified by class (0: no evaluation). Ignored with ``test_store``.
    test_store : path, optional
        Score on this store instead; it must hold features of the same spec (refused otherwise)
        and its classes are matched to the training classes by name.
    seed : int
        Seeds the split, the folds and randomized heads.
    chunk_rows : int
        Rows per chunk streamed from the store by out-of-core heads.
    refit : bool
        After scoring on the held-out split, refit the head on every labelled row at the
        hyperparameters it chose (the metrics describe the split-trained model; the returned
        head is the refit one). ``False`` returns the split-trained head.
    progress : bool
        tqdm bars on stderr for the heads' searches.
    layers : str or sequence, optional
        Fit on these layers' entries (``"blocks.4,blocks.5"``; ``"penultimate"`` or None is the
        pooled penultimate layer), all of one backbone setup (``key`` picks the setup when the
        store holds several), on the rows every layer holds, side by side: several layers go
        through a :class:`~featurepipe.heads.BlockStandardScaler`, so each weighs the same
        whatever its width. ``"auto"``: every layer the store holds for the setup, with
        ``choose_layers``.
    choose_layers : bool
        Choose among the candidates (each layer alone, then all of them side by side) by their
        accuracy on a stratified validation split of the *training* rows
        (:data:`CHOICE_VAL_SIZE`), each candidate fitted with the same head on the rest; the
        test rows take no part. The scores are in ``layer_scores``; the model is fitted on the
        winner. Ties go to the earlier candidate.

    Returns
    -------
    FitResult

    Raises
    ------
    ConfigError
        Unlabelled rows, rows with non-finite features (named by id), a split that cannot
        be stratified, or a layer without an entry (naming the embed command that makes it).
    """
    from sklearn.base import clone

    from featurepipe.backbones import BackboneSpec
    from featurepipe.heads import (
        OutOfCoreSGDClassifier,
        block_head,
        chosen_params,
        fit_head,
        fixed_head,
        make_head,
    )
    from featurepipe.model import check_same_spec, classification_metrics, key_parts_from_attrs

    if not 0 <= float(test_size) < 1:
        raise ConfigError(f"test size must be in [0, 1); got {test_size}")
    fs = FeatureStore(store)
    layered = _layer_data(fs, layers, key, choose_layers)
    if layered is not None and len(layered.layers) == 1 and not choose_layers:
        key, layered = layered.keys[0], None  # one layer: exactly a single-entry fit
    key = fs.resolve_key(key if layered is None else layered.keys[0])
    attrs = fs.attrs(key)
    parts = key_parts_from_attrs(attrs)
    estimator = make_head(head, cv=cv, random_state=seed)
    streaming = layered is None and isinstance(estimator, OutOfCoreSGDClassifier)
    data = (layered.as_feature_set() if layered is not None
            else None if streaming else fs.load(key))
    labels = _labels(fs, key, chunk_rows) if data is None else data.labels
    class_names = fs.info(key)["classes"] if data is None else data.class_names
    _refuse_unlabelled(labels, store)  # non-finite rows are refused by the store's readers

    test: tuple[FeatureStore, str] | None = None
    test_layers: LayerData | None = None
    is_train = np.ones(len(labels), dtype=bool)
    if test_store is not None and layered is not None:
        test_layers = _matching_layers(FeatureStore(test_store), layered, test_store)
    elif test_store is not None:
        tfs = FeatureStore(test_store)
        tkey = _matching_key(tfs, key, parts)
        check_same_spec(parts, key_parts_from_attrs(tfs.attrs(tkey)),
                        f"features in test store {test_store}")
        test = (tfs, tkey)
    elif test_size > 0:
        is_train = _split(labels, float(test_size), seed, store)

    notes: list[str] = list(layered.notes) if layered is not None else []
    scores: list[dict] = []
    if layered is not None and choose_layers:
        layered, scores = _choose_layers(layered, head, cv, seed, is_train, store, progress)
        data = layered.as_feature_set()
        key = layered.keys[0]  # the model describes the chosen layers
        attrs = fs.attrs(key)
        parts = key_parts_from_attrs(attrs)
    if layered is not None and len(layered.layers) > 1:
        estimator = block_head(estimator, layered.block_dims)
    if data is None:  # out-of-core: one chunk in memory at a time
        fitted = estimator.set_params(chunk_rows=int(chunk_rows))
        t0 = time.perf_counter()
        fitted.fit_chunks(lambda: _chunks(fs, key, chunk_rows, is_train, store))
        seconds, params = time.perf_counter() - t0, chosen_params(fitted)
    else:
        fitted, info = fit_head(estimator, data.features[is_train], labels[is_train],
                                progress=progress)
        seconds, params = info["fit_seconds"], info["params"]
        notes += info["warnings"]

    y_true: np.ndarray | None = None
    y_pred: np.ndarray | None = None
    metrics = None
    if test_layers is not None and layered is not None:
        y_true, y_pred = _predict_layers(fitted, test_layers.select(
            [test_layers.layers.index(x) for x in layered.layers]), class_names, test_store)
    elif test is not None:
        y_true, y_pred = _predict_store(fitted, test[0], test[1], class_names, chunk_rows,
                                        streaming)
    elif not is_train.all():
        y_true = labels[~is_train]
        y_pred = (fitted.predict(data.features[~is_train]) if data is not None else
                  _predict_chunks(fitted, fs, key, chunk_rows, ~is_train)[1])
    if y_true is not None and y_pred is not None:
        metrics = classification_metrics(y_true, y_pred, class_names)
    refit = bool(refit and not is_train.all())
    if refit and data is None:  # out-of-core: stream every row once more
        fitted = clone(fitted).fit_chunks(
            lambda: _chunks(fs, key, chunk_rows, np.ones(len(labels), dtype=bool), store))
    elif refit and data is not None:
        fitted, _ = fit_head(fixed_head(fitted), data.features, labels, progress=progress)
    return FitResult(
        head=fitted, class_names=list(class_names), store_key=key, key_parts=parts,
        backbone_spec=BackboneSpec.from_dict(attrs["spec"]), params=params, fit_seconds=seconds,
        n_train=int(is_train.sum()), n_test=0 if y_true is None else len(y_true),
        metrics=metrics, y_true=y_true, y_pred=y_pred, warnings=list(notes),
        n_model_rows=len(labels) if refit else int(is_train.sum()), refit=refit,
        layers=() if layered is None else layered.layers,
        layer_keys=[] if layered is None else list(layered.keys),
        layer_key_parts=[] if layered is None else list(layered.key_parts),
        block_dims=() if layered is None else layered.block_dims, layer_scores=scores)


#: Fraction of the training rows held out to choose among layer candidates.
CHOICE_VAL_SIZE = 0.2


def _layer_data(fs: FeatureStore, layers: str | Sequence[str | None] | None, key: str | None,
                choose: bool) -> LayerData | None:
    """The requested layers' rows side by side (None: no layer list, a plain entry fit)."""
    from featurepipe.layer_entries import find_layer_entries, load_layer_data, parse_layers

    if layers is None:
        if choose:
            raise ConfigError("choosing layers needs a layer list: give layers (or 'auto')")
        return None
    auto = isinstance(layers, str) and layers.strip() == "auto"
    if auto and not choose:
        raise ConfigError("layers='auto' chooses among the stored layers: pass "
                          "choose_layers=True (the CLI's --layers auto does)")
    keys, found = find_layer_entries(fs, None if auto else parse_layers(layers), key=key)
    return load_layer_data(fs, keys, found)


def _choose_layers(data: LayerData, head: str, cv: int, seed: int, is_train: np.ndarray,
                   store: Any, progress: bool) -> tuple[LayerData, list[dict]]:
    """The candidate with the best accuracy on a validation split of the training rows.

    Only rows where ``is_train`` is True are read: the test rows choose nothing.
    """
    from sklearn.metrics import accuracy_score

    from featurepipe.heads import block_head, fit_head, make_head
    from featurepipe.layer_entries import layer_name
    from featurepipe.splits import stratified_split

    rows = np.flatnonzero(is_train)
    labels = data.labels[rows]
    count = max(int(np.ceil(CHOICE_VAL_SIZE * len(rows))), len(np.unique(labels)))
    try:
        fit_pos, val_pos = stratified_split(labels, count, seed=seed,
                                            what="layer-choice validation split")
    except ConfigError as exc:
        raise ConfigError(f"{store}: too few training rows to choose a layer ({exc}); name "
                          "the layers instead of choosing") from None
    fit_rows, val_rows = rows[fit_pos], rows[val_pos]
    n = len(data.layers)
    candidates = [[b] for b in range(n)] + ([list(range(n))] if n > 1 else [])
    scores: list[dict[str, Any]] = []
    accuracies: list[float] = []
    for blocks in candidates:
        sub = data.select(blocks)
        estimator = make_head(head, cv=cv, random_state=seed)
        if len(blocks) > 1:
            estimator = block_head(estimator, sub.block_dims)
        fitted, _ = fit_head(estimator, sub.features[fit_rows], labels[fit_pos],
                             progress=progress)
        acc = float(accuracy_score(labels[val_pos], fitted.predict(sub.features[val_rows])))
        scores.append({"layers": [layer_name(x) for x in sub.layers], "val_accuracy": acc,
                       "n_fit": len(fit_rows), "n_val": len(val_rows)})
        accuracies.append(acc)
    best = int(np.argmax(accuracies))  # the first of equals
    for c, score in enumerate(scores):
        score["chosen"] = c == best
    return data.select(candidates[best]), scores


def _matching_layers(tfs: FeatureStore, train: LayerData, test_store: Any) -> LayerData:
    """The test store's entries of the training layers (same spec each), rows aligned."""
    from featurepipe.layer_entries import load_layer_data
    from featurepipe.model import check_same_spec, key_parts_from_attrs

    keys = []
    for key, parts in zip(train.keys, train.key_parts, strict=True):
        tkey = _matching_key(tfs, key, parts)
        check_same_spec(parts, key_parts_from_attrs(tfs.attrs(tkey)),
                        f"features in test store {test_store}")
        keys.append(tkey)
    return load_layer_data(tfs, keys, train.layers)


def _predict_layers(head: Any, test: LayerData, class_names: list[str], test_store: Any
                    ) -> tuple[np.ndarray, np.ndarray]:
    unknown = sorted(set(test.class_names) - set(class_names))
    if unknown:
        raise ConfigError(f"test store {test_store} has classes {unknown} that the training "
                          f"store lacks (training classes: {class_names})")
    _refuse_unlabelled(test.labels, test_store)
    mapping = np.array([class_names.index(name) for name in test.class_names], dtype=np.int64)
    return mapping[test.labels], head.predict(test.features)


def _labels(fs: FeatureStore, key: str, chunk_rows: int) -> np.ndarray:
    parts = [chunk.labels for chunk in fs.iter_chunks(key, chunk_rows)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _refuse_unlabelled(labels: np.ndarray, store: Any) -> None:
    if len(labels) == 0:
        raise ConfigError(f"{store}: the entry has no rows to fit on")
    n = int((labels < 0).sum())
    if n:
        raise ConfigError(
            f"{store}: {n} of {len(labels)} rows are unlabelled (label -1); fit needs every row "
            "labelled: embed a class-per-subfolder folder or a manifest with a label column")


def _split(labels: np.ndarray, test_size: float, seed: int, store: Any) -> np.ndarray:
    from featurepipe.splits import stratified_split

    try:
        _, test_rows = stratified_split(labels, test_size, seed=seed)
    except ConfigError as exc:
        raise ConfigError(f"{store}: cannot hold out a stratified {test_size:g} test split "
                          f"({exc}); use another --test-size, --test STORE2, or "
                          "--test-size 0") from None
    is_train = np.ones(len(labels), dtype=bool)
    is_train[test_rows] = False
    return is_train


def _matching_key(fs: FeatureStore, key: str, parts: dict) -> str:
    """The test store's entry with the training key, its only entry, or one of the same spec."""
    from featurepipe.model import key_parts_from_attrs, spec_differences

    keys = fs.keys()
    if key in keys or len(keys) < 2:
        return key if key in keys else fs.resolve_key(None)
    same = [k for k in keys if not spec_differences(parts, key_parts_from_attrs(fs.attrs(k)))]
    if not same:
        raise SpecMismatchError(f"test store {fs.path} holds {len(keys)} entries, none made with "
                                f"the training spec (backbone {parts.get('backbone')})")
    return same[0]


def _chunks(fs: FeatureStore, key: str, chunk_rows: int, keep: np.ndarray, store: Any
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for chunk in fs.iter_chunks(key, chunk_rows):
        sel = keep[chunk.start : chunk.start + len(chunk.ids)]
        yield chunk.features[sel], chunk.labels[sel]


def _predict_chunks(head: Any, fs: FeatureStore, key: str, chunk_rows: int,
                    keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(labels, predictions) of the kept rows, one chunk in memory at a time."""
    labels, preds = [], []
    for chunk in fs.iter_chunks(key, chunk_rows):
        sel = (slice(None) if keep is None
               else keep[chunk.start : chunk.start + len(chunk.ids)])
        if len(chunk.labels[sel]):
            labels.append(chunk.labels[sel])
            preds.append(head.predict(chunk.features[sel]))
    return np.concatenate(labels), np.concatenate(preds)


def _predict_store(head: Any, fs: FeatureStore, key: str, class_names: list[str],
                   chunk_rows: int, streaming: bool) -> tuple[np.ndarray, np.ndarray]:
    """Labels (mapped to the training classes by name) and predictions of a test store."""
    theirs = fs.info(key)["classes"]
    unknown = sorted(set(theirs) - set(class_names))
    if unknown:
        raise ConfigError(f"test store {fs.path} has classes {unknown} that the training store "
                          f"lacks (training classes: {class_names})")
    if streaming:
        y, pred = _predict_chunks(head, fs, key, chunk_rows)
    else:
        data = fs.load(key)
        y, pred = data.labels, head.predict(data.features)
    _refuse_unlabelled(y, fs.path)
    mapping = np.array([class_names.index(name) for name in theirs], dtype=np.int64)
    return mapping[y], pred


# --------------------------------------------------------------------------- printing


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


def _print_metrics(metrics: dict) -> None:
    from featurepipe.report import markdown_table

    print(f"accuracy {metrics['accuracy']:.4f}  balanced accuracy "
          f"{metrics['balanced_accuracy']:.4f}  macro-F1 {metrics['macro_f1']:.4f}")
    rows = [{"class": name, "precision": v["precision"], "recall": v["recall"],
             "f1": v["f1-score"], "support": v["support"]}
            for name, v in metrics["per_class"].items()]
    print(markdown_table(rows))


def _plot_confusion(folder: str, y_true: np.ndarray, y_pred: np.ndarray,
                    class_names: list[str]) -> str:
    from sklearn.metrics import ConfusionMatrixDisplay

    from featurepipe.report import new_figure, save_figure

    size = max(4.0, 0.45 * len(class_names) + 2.5)
    fig = new_figure(size, size)
    ConfusionMatrixDisplay.from_predictions(
        y_true, y_pred, labels=list(range(len(class_names))), display_labels=class_names,
        ax=fig.add_subplot(), xticks_rotation="vertical", colorbar=False)
    return save_figure(fig, os.path.join(folder, "confusion_matrix.png"))


def _json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


# --------------------------------------------------------------------------- handlers


def check_writable(path: str) -> None:
    """Refuse, before any work, an output file whose folder is missing or not writable."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {path}: folder {folder} is not writable")
    if os.path.isdir(path):
        raise ConfigError(f"cannot write {path}: it is a folder")


def cmd_fit(args: argparse.Namespace) -> int:
    from featurepipe.model import save_model

    check_writable(args.out)
    from featurepipe.layer_entries import layer_name

    auto = args.layers is not None and args.layers.strip() == "auto"
    result = fit_store(args.store, args.head, key=args.key, cv=args.cv,
                       test_size=args.test_size, test_store=args.test, seed=args.seed,
                       chunk_rows=args.chunk_rows, refit=not args.no_refit,
                       progress=not args.quiet, layers=args.layers,
                       choose_layers=auto or args.choose_layers)
    metrics = result.metrics or {}
    layers = [layer_name(x) for x in result.layers]
    summary = {
        "store": args.store, "key": result.store_key, "head": args.head,
        **({"layers": layers, "layer_keys": result.layer_keys,
            "block_dims": list(result.block_dims)} if layers else {}),
        **({"layer_scores": result.layer_scores} if result.layer_scores else {}),
        "params": result.params, "fit_seconds": result.fit_seconds,
        "n_train": result.n_train, "n_test": result.n_test, "classes": result.class_names,
        "test": args.test or (f"stratified split {args.test_size:g}" if args.test_size else None),
        **{k: metrics.get(k) for k in ("accuracy", "balanced_accuracy", "macro_f1",
                                       "per_class")},
        "warnings": result.warnings, "model": args.out,
        "model_rows": result.n_model_rows, "refit_on_all_rows": result.refit,
    }
    save_model(args.out, result.head, result.backbone_spec, result.class_names,
               result.store_key, result.key_parts,
               metrics={k: v for k, v in summary.items() if k != "model"},
               layers=[{"key": k, "key_parts": p, "dim": d} for k, p, d in
                       zip(result.layer_keys, result.layer_key_parts, result.block_dims,
                           strict=True)])
    if args.plots and result.y_true is not None and result.y_pred is not None:
        summary["plots"] = [_plot_confusion(args.plots, result.y_true, result.y_pred,
                                            result.class_names)]
    if args.json:
        _json(summary)
        return 0
    for note in result.warnings:
        _say(f"featurepipe: note: {note}")
    for score in result.layer_scores:
        print(f"layer candidate {'+'.join(score['layers'])}: validation accuracy "
              f"{score['val_accuracy']:.4f} ({score['n_val']} of the training rows)"
              f"{'  <- chosen' if score['chosen'] else ''}")
    where = (f"layers {', '.join(layers)}" if layers else f"entry {result.store_key}")
    print(f"fit {args.head} on {args.store} ({where}): {result.n_train} train "
          f"/ {result.n_test} test rows, {len(result.class_names)} classes, "
          f"{result.fit_seconds:.2f} s")
    print("chosen: " + (", ".join(f"{k}={v}" for k, v in result.params.items()) or "-"))
    if result.metrics:
        _print_metrics(result.metrics)
    for path in summary.get("plots", []):
        print(f"plot: {path}")
    if result.refit:
        print(f"saved {args.out}: refit on all {result.n_model_rows} labelled rows at the chosen "
              "parameters (the scores above are from the model trained without the test rows)")
    elif result.n_test and not args.test:
        print(f"saved {args.out}: trained on the {result.n_model_rows} training rows only "
              "(--no-refit); the held-out rows were not used")
    else:
        print(f"saved {args.out}: trained on {result.n_model_rows} rows")
    return 0


def _expand(items: list[str]) -> tuple[list[str], list[str]]:
    """(paths to embed, names to show): folders expand to their images, files stay as given."""
    from featurepipe.sources import open_source

    paths, shown = [], []
    for item in items:
        if os.path.isdir(item):
            try:
                samples = open_source(item).samples
            except SourceError as exc:  # an empty folder must not cost the other files
                _say(f"featurepipe: warning: skipped {escape(item)}: {escape(exc)}")
                continue
            for sample in samples:
                paths.append(sample.path or sample.id)
                shown.append(os.path.join(item, sample.id))
        else:
            paths.append(item)
            shown.append(item)
    return paths, shown


def _load(args: argparse.Namespace) -> Any:
    from featurepipe.model import load_model

    return load_model(args.model, device=args.device, precision=args.precision,
                      batch_size=args.batch_size,
                      workers=args.workers, cache=args.cache, progress=not args.quiet)


def cmd_predict(args: argparse.Namespace) -> int:
    model = _load(args)
    paths, shown = _expand(args.images)
    emb = model.embed(paths)
    top = (model.top_k_features(emb.features[emb.valid], args.top_k)
           if emb.valid.any() else [])
    rows = [{"file": shown[pos], "label": best[0][0], "score": best[0][1],
             "top_k": [{"label": name, "score": s} for name, s in best]}
            for pos, best in zip(np.flatnonzero(emb.valid).tolist(), top, strict=True)]
    # Skipped images are named as the user gave them (a folder's images under the folder).
    skipped = [SkippedFile(shown[pos], s.reason)
               for pos, s in zip(emb.skipped_positions, emb.skipped, strict=True)]
    if args.json:
        # predict's JSON names every image "file", the skipped ones too.
        _json({"model": args.model, "score_kind": model.score_kind, "predictions": rows,
               "skipped": [{"file": s.id, "reason": s.reason} for s in skipped]})
    else:
        from featurepipe.report import markdown_table

        kind = model.score_kind
        table = [{"file": escape(r["file"]), "label": r["label"], kind: r["score"],
                  f"top-{args.top_k}": ", ".join(f"{t['label']} {t['score']:.3f}"
                                                 for t in r["top_k"])} for r in rows]
        if table:
            print(markdown_table(table))
        if kind == "decision":
            print("(scores are decision-function values: this head has no probabilities)")
        for s in skipped:
            print(f"skipped {escape(s.id)}: {escape(s.reason)}")
    if not rows:
        _say(f"featurepipe: error: none of the {len(paths)} images could be embedded")
        return 1
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    model = _load(args)
    result = model.evaluate(args.source)
    y_true, y_pred = result.pop("y_true"), result.pop("y_pred")
    if args.plots:
        result["plots"] = [_plot_confusion(args.plots, y_true, y_pred, model.class_names)]
    if args.json:
        _json({"model": args.model, "source": args.source, **result,
               "skipped": [s.to_dict() for s in result["skipped"]]})
        return 0
    print(f"evaluate {args.model} on {args.source}: {result['n_test']} images")
    _print_metrics(result)
    for s in result["skipped"]:
        print(f"skipped {s.id}: {s.reason}")
    for path in result.get("plots", []):
        print(f"plot: {path}")
    return 0


# --------------------------------------------------------------------------- parser


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto = bf16 where the hardware has it; fp32 = exact mode")
    p.add_argument("--workers", type=int, default=None, help="decode workers (default: auto)")
    p.add_argument("--cache", default=None,
                   help="HDF5 store to cache the new images' features in (default: none)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars on stderr")


def register(sub: Any) -> None:
    """Add ``fit``, ``predict`` and ``evaluate`` to the CLI's subparsers."""
    p = sub.add_parser("fit", help="train a classifier head on a feature store")
    p.add_argument("store", help="feature store (.h5) with labelled rows")
    p.add_argument("--head", default="logreg",
                   help=f"{', '.join(PRESET_NAMES)}, or a scikit-learn classifier "
                        "as module:Class (default: logreg)")
    p.add_argument("--cv", type=int, default=5, help="folds of the head's search (default 5)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--test-size", type=float, default=0.2,
                       help="stratified held-out fraction (default 0.2; 0 = no test)")
    group.add_argument("--test", default=None, help="score on this feature store instead")
    p.add_argument("--key", default=None, help="entry key when the store holds several")
    p.add_argument("--layers", default=None,
                   help="fit on these layers side by side, each standardised to the same total "
                        "variance (e.g. blocks.4,blocks.5,penultimate; entries made by `embed "
                        "--layers`); 'auto': choose among every stored layer of the backbone")
    p.add_argument("--choose-layers", action="store_true",
                   help="choose among the --layers (each alone, then all together) by "
                        "validation accuracy on the training rows only; the scores are printed")
    p.add_argument("--out", required=True, help="model file (.joblib, or .skops: no pickle)")
    p.add_argument("--plots", default=None, help="folder for a confusion-matrix PNG")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the search")
    p.add_argument("--chunk-rows", type=int, default=4096,
                   help="rows per chunk streamed from the store by the sgd head")
    p.add_argument("--no-refit", action="store_true",
                   help="save the model trained without the held-out rows (default: refit on "
                        "every labelled row at the chosen parameters after scoring)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars on stderr")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("predict", help="classify image files with a saved model")
    p.add_argument("model", help="model file from `featurepipe fit`, or a `featurepipe finetune` "
                                 "output folder")
    p.add_argument("images", nargs="+", help="image files and/or folders")
    p.add_argument("--top-k", type=int, default=3, help="labels shown per image")
    _add_model_args(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="score a saved model on a labelled folder or manifest")
    p.add_argument("model", help="model file from `featurepipe fit`, or a `featurepipe finetune` "
                                 "output folder")
    p.add_argument("source", help="class-per-subfolder folder or CSV manifest with labels")
    p.add_argument("--plots", default=None, help="folder for a confusion-matrix PNG")
    _add_model_args(p)
    p.set_defaults(func=cmd_evaluate)
