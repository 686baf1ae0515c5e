"""Saved models: a fitted head plus the backbone spec it needs, predicting straight from images.

A model file holds the fitted scikit-learn head, the backbone *spec* (name, weights, layer,
image size; never the network weights), the class names, the feature-store entry key and key
parts the head was trained on, the metrics of its evaluation and the library versions. Loading it
rebuilds the backbone from the spec, so features of new images are made exactly as in training;
a head is refused (:class:`~featurepipe.exceptions.SpecMismatchError`) when offered features of
another backbone, weights, layer, preprocessing or decode policy. A head on several layers side
by side (``featurepipe fit --layers``) records each layer's key parts and width; its model
embeds images at every layer and concatenates them in that order.

Trust model
-----------
``.joblib`` files (the default) are pickles: **loading one runs code chosen by whoever wrote
it**. Only load model files you made yourself or got from someone you trust, over a channel you
trust. For files you cannot vouch for, save and share ``.skops`` files instead
(skops is installed with featurepipe): :mod:`skops.io` rebuilds objects without pickle and
refuses any type not on a trusted list. :func:`load_model` trusts scikit-learn's defaults plus
:data:`SKOPS_TRUSTED` (the head presets' own types) and names anything else it finds; pass
``trusted=[...]`` only after checking those names. All head presets round-trip through skops.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from featurepipe.atomic import atomic_path
from featurepipe.backbones import BackboneSpec
from featurepipe.exceptions import (
    ConfigError,
    DecodeError,
    FeaturePipeWarning,
    MissingDependencyError,
    SpecMismatchError,
)
from featurepipe.identity import (
    KEY_PART_NAMES,
    SPEC_PARTS,
    canonical,
    check_same_spec,
    differing_parts,
    key_parts_from_attrs,
    library_versions,
)
from featurepipe.records import SkippedFile

#: Key parts of one store entry, or of each layer of a model on several layers.
KeyParts = Mapping[str, Any] | Sequence[Mapping[str, Any]]

__all__ = ["KEY_PART_NAMES", "SKOPS_TRUSTED", "SPEC_PARTS", "Embedded", "ImageClassifier",
           "check_same_spec", "classification_metrics", "key_parts_from_attrs", "load_model",
           "save_model", "spec_differences"]

MODEL_FORMAT = "featurepipe-model"
#: The newest format this featurepipe reads: 2 adds layer lists (a head on several layers).
MODEL_FORMAT_VERSION = 2
#: Versions compared on load (a difference warns).
CHECKED_PACKAGES = ("featurepipe", "scikit-learn", "numpy", "torch", "torchvision", "timm")
#: Types beyond skops' defaults that the head presets need (all plain data holders).
SKOPS_TRUSTED = (
    "featurepipe.heads.OutOfCoreSGDClassifier",
    "featurepipe.heads.ScaledGammaSVC",
    "featurepipe.heads.blocks.BlockStandardScaler",
    "featurepipe.heads.kernel.RBFKernelClassifier",
    "featurepipe.heads.probe.LogisticProbeCV",
    "sklearn.metrics._scorer._PassthroughScorer",
    "sklearn.model_selection._split.StratifiedKFold",
)


# --------------------------------------------------------------------------- spec comparison


def spec_differences(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    """Names of the :data:`SPEC_PARTS` on which two sets of key parts disagree."""
    return differing_parts(expected, actual, SPEC_PARTS)


# --------------------------------------------------------------------------- metrics


def classification_metrics(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
                           class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1 and per-class precision/recall/F1/support.

    Labels are class indices into ``class_names``; every class is reported, present or not.
    """
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        classification_report,
        f1_score,
    )

    labels = list(range(len(class_names)))
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    report = classification_report(y_true, y_pred, labels=labels, target_names=list(class_names),
                                   output_dict=True, zero_division=0)
    with warnings.catch_warnings():  # classes absent from y_true: recall is undefined, not news
        warnings.simplefilter("ignore", UserWarning)
        balanced = balanced_accuracy_score(y_true, y_pred)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro",
                                   zero_division=0)),
        "per_class": {name: {k: float(v) if k != "support" else int(v)
                             for k, v in report[name].items()}
                      for name in class_names},
    }


# --------------------------------------------------------------------------- the model


@dataclass
class Embedded:
    """Features of images: ``features[valid]`` are real, the other rows are zeros.

    ``skipped`` holds one :class:`~featurepipe.records.SkippedFile` per invalid row, in row
    order, so ``skipped[i]`` is the image at ``skipped_positions[i]``.
    """

    features: np.ndarray
    ids: list[str]
    valid: np.ndarray
    skipped: list[SkippedFile] = field(default_factory=list)

    @property
    def skipped_positions(self) -> list[int]:
        """Row of each ``skipped`` record (the positions where ``valid`` is False)."""
        return np.flatnonzero(~self.valid).tolist()


class ImageClassifier:
    """A fitted head with the backbone spec it needs: predicts from image files or arrays.

    Usually obtained from :func:`load_model`. Embedding settings (``device``, ``precision``,
    ``batch_size``, ``workers``, ``cache``, ``progress``) only change speed, never which
    features the head gets.

    Parameters
    ----------
    head : BaseEstimator
        Fitted classifier; its labels are indices into ``class_names`` (or the names).
    backbone_spec : BackboneSpec
        How features were made (a fine-tuned export folder works like any other name).
    class_names : sequence of str
    store_key : str or None
        Feature-store entry the head was trained on.
    key_parts : mapping
        Key parts of that entry (see :func:`featurepipe.identity.key_parts`).
    metrics, versions : dict, optional
        Evaluation and library versions recorded at save time.
    layers : sequence of mapping, optional
        For a head on several layers side by side: one ``{"layer", "key", "key_parts",
        "dim"}`` record per layer, in column order (``key_parts`` and ``backbone_spec`` then
        describe the first). Images are embedded at every layer and the blocks concatenated in
        this order.
    device, precision, batch_size, workers, cache, progress
        Passed to :class:`~featurepipe.estimators.ImageEmbedder`.

    Attributes
    ----------
    classes_ : ndarray of str
        Class names in the column order of :meth:`predict_proba`.
    score_kind : str
        ``"probability"`` when the head has ``predict_proba``, else ``"decision"``.
    """

    def __init__(self, head: BaseEstimator, backbone_spec: BackboneSpec,
                 class_names: Sequence[str], *, store_key: str | None = None,
                 key_parts: Mapping[str, Any] | None = None, metrics: dict | None = None,
                 versions: dict | None = None, layers: Sequence[Mapping[str, Any]] | None = None,
                 device: str = "auto", precision: str = "auto",
                 batch_size: int = 64, workers: int | None = None,
                 cache: str | os.PathLike | None = None, progress: bool = False) -> None:
        check_is_fitted(head)
        self.head = head
        self.backbone_spec = backbone_spec
        self.class_names = [str(c) for c in class_names]
        self.store_key = store_key
        self.key_parts = dict(key_parts or {})
        self.metrics = metrics
        self.versions = versions or {}
        self.layers = [dict(layer) for layer in layers or ()]
        self.embed_options: dict[str, Any] = {
            "device": device, "precision": precision, "batch_size": batch_size,
            "workers": workers, "cache": cache, "progress": progress}
        self.classes_ = _class_names_of(head, self.class_names)
        self._embedder: Any = None

    def __repr__(self) -> str:
        return (f"ImageClassifier(backbone={self.backbone_spec.name!r}, "
                f"head={type(self.head).__name__}, classes={len(self.classes_)})")

    @property
    def layer_names(self) -> list[str | None]:
        """The layers the head reads, in column order (None: the pooled penultimate layer)."""
        return ([layer.get("layer") for layer in self.layers] if self.layers
                else [self.backbone_spec.layer])

    @property
    def block_dims(self) -> tuple[int, ...]:
        """Width of each layer's block of columns (one block for a single-layer model)."""
        if self.layers:
            return tuple(int(layer["dim"]) for layer in self.layers)
        width = getattr(self.head, "n_features_in_", None)
        return () if width is None else (int(width),)

    @property
    def score_kind(self) -> str:
        return "probability" if hasattr(self.head, "predict_proba") else "decision"

    # -- features --------------------------------------------------------------------------

    def embed(self, X: Any) -> Embedded:
        """Features of images with the model's own backbone; bad images are listed, not raised."""
        from featurepipe.estimators import ImageEmbedder

        if self.layers:
            features, bad, ids = _embed_layers(self, X)
            valid = np.ones(len(features), dtype=bool)
            valid[[pos for pos, _, _ in bad]] = False
            return Embedded(features, ids, valid,
                            [SkippedFile(id_, reason) for _, id_, reason in sorted(bad)])
        if self._embedder is None:
            spec = self.backbone_spec
            embedder = ImageEmbedder(
                spec.name, weights=spec.weights, layer=spec.layer, image_size=spec.image_size,
                dtype=self.key_parts.get("dtype") or "float32", on_error="zero",
                **self.embed_options).fit(X)
            if self.key_parts and isinstance(embedder.key_parts_, dict):
                check_same_spec(self.key_parts, embedder.key_parts_,
                                f"features of backbone {spec.name} as loaded now")
            self._embedder = embedder
        features, bad, ids = self._embedder.embed_positions(X)
        valid = np.ones(len(features), dtype=bool)
        valid[[pos for pos, _, _ in bad]] = False
        return Embedded(features, ids, valid,
                        [SkippedFile(id_, reason) for _, id_, reason in sorted(bad)])

    def _features(self, X: Any) -> np.ndarray:
        emb = self.embed(X)
        if emb.skipped:
            first = emb.skipped[0]
            more = f" (and {len(emb.skipped) - 1} more bad images)" if len(emb.skipped) > 1 else ""
            raise DecodeError(first.id, f"{first.reason}{more}; use embed() to get the good "
                              "images' features and the list of bad ones")
        return emb.features

    def _checked(self, F: Any, key_parts: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None
                 ) -> np.ndarray:
        if key_parts is not None:
            _check_layer_parts(self, key_parts)
        F = np.asarray(F, dtype=np.float32)
        width = getattr(self.head, "n_features_in_", None)
        if F.ndim != 2 or (width is not None and F.shape[1] != width):
            raise SpecMismatchError(
                f"features have shape {F.shape}; the head expects (n, {width}) features of "
                f"backbone {self.backbone_spec.name}")
        return F

    # -- on features -----------------------------------------------------------------------

    def predict_features(self, F: Any, *, key_parts: KeyParts | None = None) -> np.ndarray:
        """Class names for a feature matrix; ``key_parts`` (of the store) are checked first.

        A model on several layers takes their columns side by side, in :attr:`layer_names`
        order, and ``key_parts`` as one mapping per layer.
        """
        return self._names(self.head.predict(self._checked(F, key_parts)))

    def scores_features(self, F: Any, *, key_parts: KeyParts | None = None) -> np.ndarray:
        """(n, n_classes) probabilities, or decision scores (see :attr:`score_kind`)."""
        F = self._checked(F, key_parts)
        if self.score_kind == "probability":
            return np.asarray(self.head.predict_proba(F))
        scores = np.asarray(self.head.decision_function(F))
        return np.column_stack([-scores, scores]) if scores.ndim == 1 else scores

    def top_k_features(self, F: Any, k: int = 5, *, key_parts: KeyParts | None = None
                       ) -> list[list[tuple[str, float]]]:
        """The ``k`` best (class name, score) pairs per row, best first."""
        scores = self.scores_features(F, key_parts=key_parts)
        k = max(1, min(int(k), scores.shape[1]))
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return [[(str(self.classes_[j]), float(row[j])) for j in idx]
                for row, idx in zip(scores, order, strict=True)]

    # -- on images -------------------------------------------------------------------------

    def predict(self, X: Any) -> np.ndarray:
        """Class names of images (paths, a folder or an image array)."""
        return self.predict_features(self._features(X))

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities of images, columns in :attr:`classes_` order."""
        if self.score_kind != "probability":
            raise ConfigError(f"head {type(self.head).__name__} has no predict_proba; use "
                              "decision_function")
        return self.scores_features(self._features(X))

    def decision_function(self, X: Any) -> np.ndarray:
        """Decision scores of images (heads that have ``decision_function``)."""
        if not hasattr(self.head, "decision_function"):
            raise ConfigError(f"head {type(self.head).__name__} has no decision_function; use "
                              "predict_proba")
        return np.asarray(self.head.decision_function(self._features(X)))

    def top_k(self, X: Any, k: int = 5) -> list[list[tuple[str, float]]]:
        """The ``k`` best (class name, score) pairs per image."""
        return self.top_k_features(self._features(X), k)

    def evaluate(self, X: Any) -> dict[str, Any]:
        """Metrics on a labelled folder or manifest; its classes are matched to the model's by name.

        Bad images are left out and listed under ``skipped``
        (:class:`~featurepipe.records.SkippedFile` records).
        """
        from featurepipe.sources import open_source

        src = open_source(X)
        if not src.class_names or (src.labels < 0).all():
            raise ConfigError(f"{X}: no labels; evaluate needs a class-per-subfolder folder or a "
                              "manifest with a label column")
        unknown = sorted(set(src.class_names) - set(self.classes_.tolist()))
        if unknown:
            raise ConfigError(f"{X}: classes {unknown} are not among the model's classes "
                              f"{self.classes_.tolist()}")
        emb = self.embed(src)
        keep = emb.valid & (src.labels >= 0)
        if not keep.any():
            raise ConfigError(f"{X}: no image could be embedded; nothing to evaluate")
        index = {name: i for i, name in enumerate(self.class_names)}
        y_true = np.array([index[src.class_names[lab]] for lab in src.labels[keep]])
        pred = self.predict_features(emb.features[keep])
        y_pred = np.array([index[name] for name in pred])
        result = classification_metrics(y_true, y_pred, self.class_names)
        result.update(n_test=int(keep.sum()), y_true=y_true, y_pred=y_pred,
                      skipped=list(emb.skipped))
        return result

    def _names(self, labels: np.ndarray) -> np.ndarray:
        lookup = dict(zip(np.asarray(self.head.classes_).tolist(), self.classes_.tolist(),
                          strict=True))
        return np.array([lookup[label] for label in np.asarray(labels).tolist()], dtype=object)


def _check_layer_parts(model: ImageClassifier, key_parts: KeyParts) -> None:
    """Refuse features whose key parts (one mapping per layer) differ from the model's."""
    if not model.layers:
        if not isinstance(key_parts, Mapping):
            raise ConfigError("this model reads one layer; pass its key parts as one mapping")
        check_same_spec(model.key_parts, key_parts, "these features")
        return
    if isinstance(key_parts, Mapping) or len(key_parts) != len(model.layers):
        raise ConfigError(f"this model reads {len(model.layers)} layers side by side; pass "
                          "key_parts as one mapping per layer, in layer order")
    for layer, parts in zip(model.layers, key_parts, strict=True):
        check_same_spec(layer["key_parts"], parts, "these features")


def _embed_layers(model: ImageClassifier, X: Any
                  ) -> tuple[np.ndarray, list[tuple[int, str, str]], list[str]]:
    """Features of every layer of ``model`` side by side, bad images, ids.

    Without a cache store: one :class:`~featurepipe.estimators.ImageEmbedder` on all the
    layers, one decode and one forward per image. With ``cache``, one embedder per layer, each
    reading and filling that layer's own store entry (an image the store already holds is not
    embedded again); an image bad at any layer is bad for all.
    """
    from featurepipe.estimators import ImageEmbedder

    if model._embedder is None:
        specs = [BackboneSpec.from_dict(layer["key_parts"]["spec"]) for layer in model.layers]
        dtype = model.layers[0]["key_parts"].get("dtype") or "float32"
        groups = ([specs] if model.embed_options.get("cache") is None
                  else [[spec] for spec in specs])
        embedders = []
        for group in groups:
            first = group[0]
            names = {"layers": [spec.layer for spec in group]} if len(group) > 1 else {
                "layer": first.layer}
            embedders.append(ImageEmbedder(
                first.name, weights=first.weights, image_size=first.image_size, dtype=dtype,
                on_error="zero", **names, **model.embed_options).fit(X))
        now = [parts for e in embedders
               for parts in ([e.key_parts_] if isinstance(e.key_parts_, dict) else e.key_parts_)]
        for layer, parts, spec in zip(model.layers, now, specs, strict=True):
            check_same_spec(layer["key_parts"], parts,
                            f"features of backbone {spec.name} layer {spec.layer} as loaded now")
        model._embedder = embedders
    blocks, bad, ids = [], {}, []
    for embedder in model._embedder:
        features, bad_here, ids = embedder.embed_positions(X)
        blocks.append(features)
        bad.update({pos: (pos, id_, reason) for pos, id_, reason in bad_here})
    features = np.hstack(blocks)
    features[list(bad)] = 0.0
    return features, list(bad.values()), ids


def _class_names_of(head: BaseEstimator, class_names: list[str]) -> np.ndarray:
    """Names of ``head.classes_``: ints index ``class_names``; strings must be among them."""
    labels = np.asarray(head.classes_).tolist()
    if all(isinstance(c, (int, np.integer)) and 0 <= c < len(class_names) for c in labels):
        return np.array([class_names[c] for c in labels], dtype=object)
    if all(str(c) in class_names for c in labels):
        return np.array([str(c) for c in labels], dtype=object)
    raise ConfigError(f"head classes {labels[:10]} are neither indices into nor members of "
                      f"class_names {class_names[:10]}")


# --------------------------------------------------------------------------- save / load


def save_model(path: str | os.PathLike, head: BaseEstimator,
               backbone_spec: BackboneSpec | Mapping[str, Any] | str,
               class_names: Sequence[str], store_key: str | None,
               key_parts: Mapping[str, Any], metrics: dict | None = None, *,
               layers: Sequence[Mapping[str, Any]] | None = None) -> str:
    """Write a fitted head and what it needs to predict from images to one file.

    Parameters
    ----------
    path : str or PathLike
        ``*.skops`` is written with skops (no pickle); anything else with joblib (pickle).
    head : BaseEstimator
        A fitted classifier on the features described by ``key_parts``.
    backbone_spec : BackboneSpec, dict or str
        The spec (``to_dict()`` form is stored; weights stay where they are).
    class_names : sequence of str
    store_key : str or None
    key_parts : mapping
        The training entry's key parts (``key_parts_from_attrs(store.attrs(key))``).
    metrics : dict, optional
        JSON-able evaluation results kept for reference.
    layers : sequence of mapping, optional
        A head on several layers side by side: ``{"layer", "key", "key_parts", "dim"}`` per
        layer in column order (see :class:`ImageClassifier`). Such a file needs a featurepipe
        that reads layer lists (model format 2); single-layer files stay format 1.

    Returns
    -------
    str
        The path written (atomically: a crash leaves the old file or none).
    """
    check_is_fitted(head)
    spec = backbone_spec if isinstance(backbone_spec, BackboneSpec) else (
        BackboneSpec.from_dict(backbone_spec) if isinstance(backbone_spec, Mapping)
        else BackboneSpec(str(backbone_spec)))
    names = [str(c) for c in class_names]
    _class_names_of(head, names)
    missing = [name for name in SPEC_PARTS if name not in key_parts]
    if missing:
        raise ConfigError(f"key_parts lack {missing}; pass the training store entry's key parts "
                          "(featurepipe.model.key_parts_from_attrs(store.attrs(key)))")
    records = _layer_records(layers or (), getattr(head, "n_features_in_", None))
    payload = {
        "format": MODEL_FORMAT, "format_version": 2 if records else 1,
        **({"layers": records} if records else {}),
        "head": head, "backbone_spec": spec.to_dict(), "class_names": names,
        "store_key": store_key, "key_parts": json.loads(canonical(dict(key_parts))),
        "metrics": json.loads(json.dumps(metrics, default=_jsonable)) if metrics else None,
        "versions": library_versions(),
    }
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with atomic_path(path) as tmp:
        if path.endswith(".skops"):
            _skops().dump(payload, tmp)
        else:
            import joblib

            joblib.dump(payload, tmp, compress=3)
    return path


def load_model(path: str | os.PathLike, *, trusted: Sequence[str] = (),
               **embed_options: Any) -> ImageClassifier:
    """Load a model written by :func:`save_model` (read the module's trust model first).

    Parameters
    ----------
    path : str or PathLike
        A ``.joblib`` (pickle: runs code from the file) or ``.skops`` file, or a folder written
        by ``featurepipe finetune`` (served by :mod:`featurepipe.finetuned`).
    trusted : sequence of str
        Extra type names to trust in a ``.skops`` file, beyond :data:`SKOPS_TRUSTED`.
    **embed_options
        ``device``, ``precision``, ``batch_size``, ``workers``, ``cache``, ``progress``.

    Returns
    -------
    ImageClassifier

    Warns
    -----
    FeaturePipeWarning
        When a package in :data:`CHECKED_PACKAGES` differs from the version that saved the file.
    """
    path = os.fspath(path)
    if os.path.isdir(path):  # `featurepipe finetune --out DIR` output, or its model/ export
        from featurepipe.finetuned import load_finetuned

        head, spec, names = load_finetuned(path)
        return ImageClassifier(head, spec, names, **embed_options)
    if not os.path.isfile(path):
        raise ConfigError(f"no model file at {path}; write one with `featurepipe fit ... --out`")
    try:
        if path.endswith(".skops"):
            sio = _skops()
            untrusted = [t for t in sio.get_untrusted_types(file=path)
                         if t not in SKOPS_TRUSTED and t not in trusted]
            if untrusted:
                raise ConfigError(f"{path} holds types that are not trusted: {untrusted}; check "
                                  "them and pass load_model(..., trusted=[...]) if they are safe")
            payload = sio.load(path, trusted=[*SKOPS_TRUSTED, *trusted])
        else:
            import joblib

            payload = joblib.load(path)
    except (ConfigError, MissingDependencyError):
        raise
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a model file"
        raise ConfigError(f"{path} is not a readable featurepipe model "
                          f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ConfigError(f"{path} is not a featurepipe model file")
    if int(payload.get("format_version", 0)) > MODEL_FORMAT_VERSION:
        raise ConfigError(f"{path} was written by a newer featurepipe (model format "
                          f"{payload['format_version']}); upgrade featurepipe")
    missing = [name for name in _REQUIRED_FIELDS if name not in payload]
    if missing:
        raise ConfigError(f"{path} is a damaged featurepipe model file: it lacks "
                          f"{', '.join(missing)}; fit and save the model again")
    try:
        spec = BackboneSpec.from_dict(payload["backbone_spec"])
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ConfigError(f"{path} is a damaged featurepipe model file: its backbone_spec "
                          f"cannot be read ({type(exc).__name__}: {exc})") from exc
    _warn_versions(path, payload.get("versions") or {})
    return ImageClassifier(
        payload["head"], spec, payload["class_names"], store_key=payload.get("store_key"),
        key_parts=payload.get("key_parts"), metrics=payload.get("metrics"),
        versions=payload.get("versions"), layers=payload.get("layers"), **embed_options)


def _layer_records(layers: Sequence[Mapping[str, Any]], width: int | None
                   ) -> list[dict[str, Any]]:
    """Checked, JSON-able layer records; [] for a single-layer head."""
    if len(layers) < 2:
        return []
    records = []
    for layer in layers:
        missing = [name for name in ("key_parts", "dim") if name not in layer]
        parts = layer.get("key_parts") or {}
        missing += [f"key_parts[{name!r}]" for name in SPEC_PARTS if name not in parts]
        if missing:
            raise ConfigError(f"layer record {dict(layer).get('layer')!r} lacks {missing}")
        records.append({"layer": parts.get("layer"), "key": layer.get("key"),
                        "key_parts": json.loads(canonical(dict(parts))), "dim": int(layer["dim"])})
    if width is not None and sum(r["dim"] for r in records) != width:
        raise ConfigError(f"the layers' widths {[r['dim'] for r in records]} add up to "
                          f"{sum(r['dim'] for r in records)}, but the head takes {width} features")
    return records


#: What every model file holds besides its format marker (see :func:`save_model`).
_REQUIRED_FIELDS = ("head", "backbone_spec", "class_names")


def _warn_versions(path: str, saved: Mapping[str, str]) -> None:
    now = library_versions()
    for package in CHECKED_PACKAGES:
        if package in saved and saved[package] != now.get(package):
            warnings.warn(
                f"{path} was saved with {package} {saved[package]}, but {package} "
                f"{now.get(package)} is installed; predictions may differ: re-fit the model, or "
                f"install {package}=={saved[package]}", FeaturePipeWarning, stacklevel=3)


def _skops() -> Any:
    try:
        import skops.io as sio
    except ImportError as exc:
        raise MissingDependencyError(
            "saving or loading .skops models needs skops (a featurepipe dependency): "
            "pip install 'skops>=0.10'"
        ) from exc
    return sio


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    return str(value)
