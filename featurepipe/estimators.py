"""ImageEmbedder: a scikit-learn transformer from images to cached pretrained features.

* ``GridSearchCV`` and ``cross_val_score`` *clone* the pipeline for every fold and candidate, so a
  cache in fitted attributes would be thrown away each time. Features are memoised per process,
  keyed by (store entry key, image id, fingerprint): clones with the same backbone settings share
  them, and a grid search over the head embeds each image once. With ``cache=PATH`` they also go
  to an HDF5 :class:`~featurepipe.store.FeatureStore`, re-used by other processes and workers.
* Ids are stable across calls: absolute file paths, and for array rows and PIL images a hash of
  the pixels, so one image in two arrays (or lists) is embedded once and two different ones
  never collide.
* The network is loaded once per process and never pickled: a pickled embedder carries only its
  backbone spec and reloads the network on first use.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from PIL import Image
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin, clone
from sklearn.utils.validation import check_is_fitted

from featurepipe.backbones import (
    Backbone,
    BackboneSpec,
    describe_backbone,
    load_backbone,
    load_layers,
    parse_layers,
)
from featurepipe.decode import DecodePolicy, check_image_array
from featurepipe.devices import resolve_device, resolve_precision
from featurepipe.embedding import EmbedOptions, embed_in_memory, resolve_backbone, run_embed
from featurepipe.exceptions import (
    ConfigError,
    DecodeError,
    FeaturePipeWarning,
    SpecMismatchError,
    StoreError,
)
from featurepipe.identity import differing_parts, entry_key, key_parts
from featurepipe.records import SkippedFile
from featurepipe.sources import ImageSource, Sample, open_source, safe_id
from featurepipe.store import FeatureStore

__all__ = ["ON_ERROR", "ImageEmbedder", "clear_caches", "drop_bad"]

#: What ``ImageEmbedder.transform`` may do with an image it cannot embed.
ON_ERROR = ("raise", "zero")

#: Most bytes of features the per-process memo keeps (least recently used rows go first).
MEMORY_CACHE_BYTES = 1 << 30
_MAX_BACKBONES = 2
_SHOWN = 5  # bad files named in one message


class _Memo:
    """LRU map (entry key, id, fingerprint) -> float32 feature row, or the reason it failed."""

    def __init__(self) -> None:
        self.rows: OrderedDict[tuple[str, str, str], np.ndarray | str] = OrderedDict()
        self.nbytes = 0

    def get(self, key: tuple[str, str, str]) -> np.ndarray | str | None:
        if key in self.rows:
            self.rows.move_to_end(key)
        return self.rows.get(key)

    def put(self, key: tuple[str, str, str], value: np.ndarray | str) -> None:
        old = self.rows.pop(key, None)
        self.nbytes -= getattr(old, "nbytes", 0)
        self.rows[key] = value
        self.nbytes += getattr(value, "nbytes", 0)
        while self.nbytes > MEMORY_CACHE_BYTES and len(self.rows) > 1:
            self.nbytes -= getattr(self.rows.popitem(last=False)[1], "nbytes", 0)

    def clear(self) -> None:
        self.rows, self.nbytes = OrderedDict(), 0



_MEMO = _Memo()
_BACKBONES: OrderedDict[tuple[BackboneSpec, ...], Backbone] = OrderedDict()


def clear_caches(features: bool = True, backbones: bool = True) -> None:
    """Forget the features and/or networks that :class:`ImageEmbedder` keeps in this process."""
    if features:
        _MEMO.clear()
    if backbones:
        _BACKBONES.clear()


def _shared_backbone(specs: tuple[BackboneSpec, ...]) -> Backbone:
    """Load a backbone once per process (clones in a grid search share it); several specs
    (layers of one backbone) make one network giving their features side by side."""
    if specs not in _BACKBONES:
        _BACKBONES[specs] = load_backbone(specs[0]) if len(specs) == 1 else load_layers(specs)
        while len(_BACKBONES) > _MAX_BACKBONES:
            _BACKBONES.popitem(last=False)
    _BACKBONES.move_to_end(specs)
    return _BACKBONES[specs]


# --------------------------------------------------------------------------- inputs


def _normalise_input(X: Any) -> Any:
    """Lists, tuples and 1-D string arrays/Series of paths -> list; the rest as is."""
    if isinstance(X, np.ndarray) and X.ndim == 1 and X.dtype.kind in "USO":
        return X.tolist()
    if isinstance(X, (str, os.PathLike, np.ndarray, ImageSource, list, tuple)):
        return X
    if isinstance(X, Iterable):  # pandas Series, generators
        return list(X)
    return X


def _check_images(X: Any) -> None:
    """Cheap check that ``X`` is something transform can read; nothing is opened."""
    X = _normalise_input(X)
    expected = ("ImageEmbedder takes images: a list of image paths or PIL images, a folder, a "
                "CSV manifest, an ImageSource or an image array (N, H, W) / (N, H, W, C)")
    if isinstance(X, np.ndarray):
        if X.ndim not in (3, 4):
            raise ConfigError(f"{expected}; got an array of shape {X.shape} (for a feature "
                              "matrix, fit a classifier on it directly)")
        check_image_array(X, batched=True)
    elif isinstance(X, (list, tuple)):
        if len(X) == 0:
            raise ConfigError(f"{expected}; got an empty list")
        bad = next((x for x in X if not isinstance(x, (str, os.PathLike, np.ndarray,
                                                        Image.Image))), None)
        if bad is not None:
            raise ConfigError(f"{expected}; got a list holding {type(bad).__name__}")
        n_images = sum(isinstance(x, Image.Image) for x in X)
        if 0 < n_images < len(X):
            other = next(x for x in X if not isinstance(x, Image.Image))
            raise ConfigError(f"{expected}; got a list mixing {n_images} PIL images with "
                              f"{type(other).__name__} items (pass one kind per list)")
    elif isinstance(X, Image.Image):
        raise ConfigError(f"{expected}; got one PIL image (pass a list: [image])")
    elif not isinstance(X, (str, os.PathLike, ImageSource)):
        raise ConfigError(f"{expected}; got {type(X).__name__}")


def _keyed_source(X: Any) -> tuple[ImageSource, list[str], np.ndarray]:
    """Unique images of ``X`` with ids stable across calls, their fingerprints, and the map
    from each position of ``X`` to its unique image."""
    src = open_source(_normalise_input(X))
    fps = [src.fingerprint(i) for i in range(len(src))]
    if src.paths is None:  # arrays and PIL images: content-addressed
        prefix = "array" if src.images is None else "image"
        ids = [f"{prefix}:{fp.partition(':')[2]}" for fp in fps]
    else:
        ids = [safe_id(os.path.abspath(s.path or s.id)) for s in src.samples]
    first: dict[str, int] = {}  # id -> first position
    for pos, id_ in enumerate(ids):
        first.setdefault(id_, pos)
    unique_index = {id_: u for u, id_ in enumerate(first)}
    inverse = np.array([unique_index[id_] for id_ in ids], dtype=np.int64)
    keep = list(first.values())
    samples = [Sample(ids[k], -1, src.samples[k].path, src.samples[k].index) for k in keep]
    kind = "paths" if src.paths is not None else "array" if src.images is None else "pil"
    unique = ImageSource(samples, [], root=None, kind=kind, array=src.array, images=src.images)
    return unique, [fps[k] for k in keep], inverse


# --------------------------------------------------------------------------- the estimator


class ImageEmbedder(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Turn images into pretrained CNN features, embedding each image once.

    Parameters
    ----------
    backbone : str or BackboneSpec, default="efficientnet_lite0"
        Backbone name (see :func:`featurepipe.backbones.resolve_spec`), including a folder written
        by fine-tuning.
    weights, layer, image_size
        Backbone options (see :class:`~featurepipe.backbones.BackboneSpec`).
    precision : {"auto", "fp32", "bf16", "fp16"}, default="auto"
        Autocast precision; resolved once in ``fit`` (``"fp32"`` is exact mode).
    batch_size : int, default=64
    device : str, default="auto"
        ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
    workers : int or None, default=None
        Decode worker processes; None: decode threads alternating with the forward pass on a
        CPU, worker processes on a GPU (as the embedding engine does).
    cache : str, PathLike or None, default=None
        An HDF5 feature store the features are read from and written to (shared between
        processes). None: features are only memoised in this process.
    dtype : {"float32", "float16"}, default="float32"
        Precision the features are stored in; ``transform`` always returns float32 (float16
        features are rounded the same way whether they came from the store or not).
    on_error : {"raise", "zero"}, default="raise"
        What ``transform`` does with an image that cannot be decoded: raise a
        :class:`~featurepipe.exceptions.DecodeError` naming it and why, or give it a row of
        zeros and mark it in ``failed_mask_``; see Notes.
    progress : bool, default=False
        Show a progress bar while embedding.
    layers : str, sequence of (str or None), or None, default=None
        Several layers of the backbone side by side, from one decode and one forward per
        image: ``"blocks.4,blocks.5,penultimate"`` or ``["blocks.5", None]`` (None and
        ``"penultimate"`` name the pooled penultimate layer). The columns are each layer's
        features in the order given, unscaled. Excludes ``layer``; not combined with
        ``cache`` (a store keeps one entry per layer: fill it with
        ``featurepipe.embed(..., layers=...)``).

    Attributes
    ----------
    backbone_spec_ : BackboneSpec
    backbone_ : Backbone
        The loaded network; not pickled, reloaded on first use after unpickling.
    precision_ : str
        The resolved precision.
    key_parts_ : dict, or list of dict with ``layers``
        Everything that changes a feature value (see :func:`featurepipe.identity.key_parts`);
        with ``layers``, one per layer in column order.
    key_ : str
        The feature-store entry key of ``key_parts_`` (with ``layers``, a key of the layers'
        keys, which names no store entry).
    layer_dims_ : tuple of int
        Width of each layer's block of columns (one entry without ``layers``).
    feature_dim_, n_features_out_ : int
        Width of the features.
    skipped_ : list of SkippedFile
        ``(id, reason)`` of each distinct image the last ``transform`` could not embed (ids are
        absolute paths, ``"array:<hash>"`` for array rows, ``"image:<hash>"`` for PIL images).
    failed_mask_ : ndarray of bool, shape (n_images,)
        Set by ``transform`` with ``on_error="zero"``: True for the rows of its input that are
        zeros because the image could not be embedded.

    Notes
    -----
    Bad images: by default ``transform`` raises a :class:`~featurepipe.exceptions.DecodeError`
    naming the first bad image (its path, or its position ``X[i]`` for array rows and PIL
    images), why it failed, and how many more there are; a model never silently learns from or
    predicts on a row that is not an image's features. ``transform`` cannot drop rows without
    misaligning ``y`` in a Pipeline, so ``on_error="zero"`` keeps one row per image: a bad
    image becomes a row of zeros, is marked in ``failed_mask_``, listed in ``skipped_`` and
    named in a :class:`~featurepipe.exceptions.FeaturePipeWarning`. To fit on the good images
    only, remove the bad ones first with :func:`drop_bad` or :meth:`valid_mask` (they embed
    once, into the same cache).

    Inputs are images, not 2-D numeric tables: a list of paths (repeats allowed), a list of
    PIL images (any modes and sizes; decoded by :func:`featurepipe.decode.image_to_rgb`, the
    rules files follow), a folder, a CSV manifest, an
    :class:`~featurepipe.sources.ImageSource`, or a uint8/float image array
    ``(N, H, W)`` / ``(N, H, W, C)``. A list mixing PIL images with paths is refused.

    Examples
    --------
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.pipeline import make_pipeline
    >>> clf = make_pipeline(ImageEmbedder(cache="feats.h5"), LogisticRegression())
    >>> clf.fit(train_paths, y_train).score(test_paths, y_test)  # doctest: +SKIP
    """

    def __init__(self, backbone: str | BackboneSpec = "efficientnet_lite0",
                 weights: str | None = None, layer: str | None = None,
                 image_size: int | None = None, precision: str = "auto", batch_size: int = 64,
                 device: str = "auto", workers: int | None = None,
                 cache: str | os.PathLike | None = None, dtype: str = "float32",
                 on_error: str = "raise", progress: bool = False,
                 layers: str | Sequence[str | None] | None = None) -> None:
        self.backbone = backbone
        self.weights = weights
        self.layer = layer
        self.image_size = image_size
        self.precision = precision
        self.batch_size = batch_size
        self.device = device
        self.workers = workers
        self.cache = cache
        self.dtype = dtype
        self.on_error = on_error
        self.progress = progress
        self.layers = layers

    # -- fit -------------------------------------------------------------------------------

    def fit(self, X: Any, y: Any = None) -> ImageEmbedder:
        """Validate the settings and load the backbone (no image is embedded here).

        Parameters
        ----------
        X : images
            Only checked for type (see Notes of the class).
        y : ignored

        Returns
        -------
        self : ImageEmbedder
        """
        _check_images(X)
        self._options()  # validates batch_size, workers, dtype
        if self.on_error not in ON_ERROR:
            raise ConfigError(f"on_error must be 'raise' or 'zero'; got {self.on_error!r} "
                              "(transform keeps one row per image: 'zero' gives a bad image a "
                              "row of zeros, marked in failed_mask_)")
        if self.cache is not None and not isinstance(self.cache, (str, os.PathLike)):
            raise ConfigError(f"cache must be a path to an HDF5 store or None; got "
                              f"{type(self.cache).__name__}")
        if not isinstance(self.progress, (bool, np.bool_)):
            raise ConfigError(f"progress must be True or False; got {self.progress!r}")
        specs = self._specs()
        backbone = _shared_backbone(specs)
        device = resolve_device(self.device)
        self.precision_ = resolve_precision(self.precision, device)
        self.backbone_spec_ = specs[0]
        self.layer_specs_ = specs
        self.backbone_ = backbone
        self.key_parts_ = self._key_parts(backbone)
        self.key_ = (entry_key(self.key_parts_) if isinstance(self.key_parts_, dict)
                     else entry_key({"layers": [entry_key(p) for p in self.key_parts_]}))
        self.feature_dim_ = self.n_features_out_ = int(backbone.feature_dim)
        self.layer_dims_ = tuple(int(d) for d in backbone.layer_dims)
        self.skipped_: list[SkippedFile] = []
        self.__dict__.pop("failed_mask_", None)  # describes a transform of the previous fit
        return self

    def _specs(self) -> tuple[BackboneSpec, ...]:
        """The canonical spec of each layer asked for (one without ``layers``)."""
        if self.layers is None:
            return (resolve_backbone(self.backbone, self.weights, self.layer, self.image_size),)
        if self.layer is not None:
            raise ConfigError(f"give layer= or layers=, not both (layer={self.layer!r}, "
                              f"layers={self.layers!r})")
        if self.cache is not None:
            raise ConfigError("layers= does not take cache=: a feature store keeps one entry "
                              "per layer; fill it with featurepipe.embed(..., layers=...) and "
                              "fit on the store")
        return tuple(resolve_backbone(self.backbone, self.weights, name, self.image_size)
                     for name in parse_layers(self.layers))

    def _key_parts(self, backbone: Backbone) -> dict[str, Any] | list[dict[str, Any]]:
        """Key parts of ``backbone``'s features; per layer (in column order) with ``layers``."""
        if self.layers is None:
            return key_parts(backbone, DecodePolicy(), self.precision_, self.dtype)
        return [key_parts(describe_backbone(spec), DecodePolicy(), self.precision_, self.dtype)
                for spec in self.layer_specs_]

    def _options(self) -> EmbedOptions:
        """The engine settings of this embedder (in memory: eager, never compiled).

        The engine always records bad images (``on_error="skip"``): :meth:`transform` decides
        what they become, after every image of the call is known.
        """
        return EmbedOptions(batch_size=self.batch_size, workers=self.workers, device=self.device,
                            precision=self.precision, compile="off", dtype=self.dtype,
                            on_error="skip", progress=bool(self.progress))

    @property
    def _n_features_out(self) -> int:
        return self.n_features_out_

    # -- transform -------------------------------------------------------------------------

    def transform(self, X: Any) -> np.ndarray:
        """Embed images (each unseen image once; cached ones are looked up).

        Parameters
        ----------
        X : images
            See Notes of the class.

        Returns
        -------
        features : ndarray of shape (n_images, feature_dim_), float32
            With ``on_error="zero"``, zero rows for bad images (marked in ``failed_mask_``).

        Raises
        ------
        DecodeError
            ``on_error="raise"`` (the default) and some images cannot be decoded: names the
            first (path, or ``X[i]`` for array rows and PIL images) and why, and counts the rest.
        """
        features, bad, _ = self.embed_positions(X)
        self.skipped_ = list(dict.fromkeys(SkippedFile(id_, reason) for _, id_, reason in bad))
        if bad and self.on_error != "zero":
            pos, id_, reason = bad[0]
            raise DecodeError(_name(pos, id_), reason + _more(bad[1:]) +
                              "; fix or remove them (drop_bad), or use on_error='zero'")
        if self.on_error == "zero":
            failed = np.zeros(len(features), dtype=bool)
            failed[[pos for pos, _, _ in bad]] = True
            self.failed_mask_ = failed
        if bad:
            warnings.warn(
                f"ImageEmbedder: {len(bad)} of {len(features)} images could not be embedded and "
                f"are rows of zeros: {_describe(bad)}; drop them before fitting with "
                "featurepipe.estimators.drop_bad(X, y, embedder)", FeaturePipeWarning,
                stacklevel=2)
        return features

    def valid_mask(self, X: Any) -> np.ndarray:
        """Boolean mask of the images of ``X`` that embed; the features stay cached for fit.

        An unfitted embedder works on a fitted clone (it shares this process's cache).
        """
        est = self if hasattr(self, "key_") else clone(self).fit(X)
        features, bad, _ = est.embed_positions(X)
        mask = np.ones(len(features), dtype=bool)
        mask[[pos for pos, _, _ in bad]] = False
        return mask

    def embed_positions(self, X: Any) -> tuple[np.ndarray, list[tuple[int, str, str]], list[str]]:
        """Features for every position of X, (position, id, reason) of bad images, and ids.

        What :meth:`transform` computes, without its warning or error for bad images (callers
        such as :class:`~featurepipe.model.ImageClassifier` report them their own way).
        """
        check_is_fitted(self, "key_")
        _check_images(X)
        src, fps, inverse = _keyed_source(X)
        ids = src.ids
        found = {u: hit for u in range(len(src))
                 if (hit := _MEMO.get((self.key_, ids[u], fps[u]))) is not None}
        todo = [u for u in range(len(src)) if u not in found]
        if todo:
            part = src.subset(todo)
            values = (self._compute(part) if self.cache is None
                      else self._from_store(FeatureStore(self.cache), part, [fps[u] for u in todo]))
            for u, value in zip(todo, values, strict=True):
                found[u] = value
                _MEMO.put((self.key_, ids[u], fps[u]), value)
        out = np.zeros((len(inverse), self.feature_dim_), dtype=np.float32)
        bad = []
        for pos, u in enumerate(inverse.tolist()):
            value = found[u]
            if isinstance(value, str):
                bad.append((pos, ids[u], value))
            else:
                out[pos] = value
        return out, bad, [ids[u] for u in inverse.tolist()]

    def _loaded(self) -> Backbone:
        """The network, reloaded after unpickling; refused if its features would differ."""
        backbone = self.__dict__.get("backbone_")
        if backbone is None:
            backbone = _shared_backbone(self.layer_specs_)
            now, then = self._key_parts(backbone), self.key_parts_
            nows = [now] if isinstance(now, dict) else now
            thens = [then] if isinstance(then, dict) else then
            differs = sorted({d for a, b in zip(nows, thens, strict=True)
                              for d in differing_parts(a, b)})
            if differs:
                raise SpecMismatchError(
                    f"backbone {self.backbone_spec_.name} now loads differently from when this "
                    f"embedder was fitted (differs in: {', '.join(differs)}); fit it again")
            self.backbone_ = backbone
        return backbone

    def _rounded(self, rows: np.ndarray) -> np.ndarray:
        if self.dtype == "float16":
            rows = rows.astype(np.float16)
        return rows.astype(np.float32)

    def _compute(self, src: ImageSource) -> list[np.ndarray | str]:
        """Embed every image of ``src`` in memory: a feature row, or why it failed."""
        values = embed_in_memory(src, self._loaded(), self._options(),
                                 device=resolve_device(self.device), precision=self.precision_)
        return [v if isinstance(v, str) else self._rounded(v) for v in values]

    def _from_store(self, store: FeatureStore, src: ImageSource, fps: list[str]
                    ) -> list[np.ndarray | str]:
        """Read rows from the cache store, embedding into it whatever it lacks."""
        known = store.lookup(self.key_)
        ids = src.ids
        need = [k for k in range(len(src)) if known.get(ids[k], (0, None))[1] != fps[k]]
        reasons: dict[str, str] = {}
        if need:
            classes = store.info(self.key_)["classes"] if known else []
            part = src.subset(need)
            part.class_names = list(classes)  # keep a labelled store's class names
            options = dataclasses.replace(self._options(), on_error="skip", drop_missing=False,
                                          compile="auto")
            report = run_embed(part, store, self.backbone_spec_, options,
                               device=resolve_device(self.device), precision=self.precision_,
                               loaded_backbone=self._loaded())
            if report.key != self.key_:
                raise SpecMismatchError(f"{self.cache}: features went to entry {report.key}, "
                                        f"expected {self.key_}; fit the embedder again")
            reasons = dict(report.skipped)
        for _attempt in range(3):
            known = store.lookup(self.key_)
            hits = [k for k in range(len(src)) if known.get(ids[k], (0, None))[1] == fps[k]]
            try:
                rows = store.read_rows(self.key_, [known[ids[k]][0] for k in hits],
                                       expected_ids=[ids[k] for k in hits])
                break
            except StoreError:  # another writer committed in between: look up again
                continue
        else:
            raise StoreError(f"{self.cache} keeps changing under this reader; retry later")
        values: list[np.ndarray | str] = [reasons.get(i, "not in the cache store") for i in ids]
        for k, row in zip(hits, self._rounded(rows), strict=True):
            values[k] = row
        return values

    # -- pickling and tags -----------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("backbone_", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Embedders pickled before ``layers`` existed read as single-layer ones.
        state.setdefault("layers", None)
        if "backbone_spec_" in state:
            state.setdefault("layer_specs_", (state["backbone_spec_"],))
            state.setdefault("layer_dims_", (state.get("feature_dim_"),))
        super().__setstate__(state)

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.requires_fit = True
        tags.target_tags.required = False
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags


def _name(pos: int, id_: str) -> str:
    """A bad image as a user finds it: its file path, or its position in X for array rows and
    PIL images (whose ids are content hashes)."""
    return f"X[{pos}]" if id_.startswith(("array:", "image:")) else id_


def _describe(bad: list[tuple[int, str, str]]) -> str:
    shown = ", ".join(f"{_name(pos, id_)} ({reason})" for pos, id_, reason in bad[:_SHOWN])
    return shown + (f" and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else "")


def _more(rest: list[tuple[int, str, str]]) -> str:
    return f" (and {len(rest)} more bad images: {_describe(rest)})" if rest else ""


# --------------------------------------------------------------------------- drop_bad


def drop_bad(X: Any, y: Any = None, embedder: ImageEmbedder | None = None
             ) -> tuple[Any, np.ndarray | None]:
    """Remove the images that cannot be embedded, keeping ``y`` aligned.

    The good images' features are cached on the way, so fitting afterwards embeds nothing again.

    Parameters
    ----------
    X : images
        A list of paths, a folder, an ImageSource or an image array.
    y : array-like of shape (n_images,), optional
    embedder : ImageEmbedder, optional
        Whose backbone decides (and whose cache is filled); default ``ImageEmbedder()``.

    Returns
    -------
    X_kept : list, ndarray or ImageSource
        Arrays and ImageSources keep their type; paths and folders become a list of paths.
    y_kept : ndarray or None

    Examples
    --------
    >>> X_ok, y_ok = drop_bad(paths, y, pipe[0])  # doctest: +SKIP
    >>> pipe.fit(X_ok, y_ok)  # doctest: +SKIP
    """
    embedder = ImageEmbedder() if embedder is None else embedder
    mask = embedder.valid_mask(X)
    y_kept = None
    if y is not None:
        y_arr = np.asarray(y)
        if len(y_arr) != len(mask):
            raise ConfigError(f"y has {len(y_arr)} labels but X holds {len(mask)} images")
        y_kept = y_arr[mask]
    X = _normalise_input(X)
    if isinstance(X, np.ndarray):
        return X[mask], y_kept
    if isinstance(X, ImageSource):
        return X.subset(mask), y_kept
    if isinstance(X, (list, tuple)):
        return [x for x, ok in zip(X, mask, strict=True) if ok], y_kept
    src = open_source(X)
    return [s.path for s, ok in zip(src.samples, mask, strict=True) if ok], y_kept
