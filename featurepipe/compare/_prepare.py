"""Turn the user's inputs into the two aligned ``Part``s every arm is trained and scored on."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featurepipe.compare._data import (
    HOG,
    PIXELS,
    EmbedLog,
    Part,
    embed_for_compare,
    embed_layers_for_compare,
    layer_features,
)
from featurepipe.compare._pixels import PixelSpec, pixel_features
from featurepipe.exceptions import ConfigError
from featurepipe.sources import ImageSource, open_source
from featurepipe.splits import stratified_split


@dataclass
class Prepared:
    """Train and test parts plus what it cost to get them."""

    train: Part
    test: Part
    classes: list[str]
    embedding: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds_per_image: dict[str, float | None] = field(default_factory=dict)
    split: dict[str, Any] = field(default_factory=dict)
    pixel_mode: str | None = None


@dataclass
class _Side:
    """One source and its features before the split (positions = source positions)."""

    role: str
    source: ImageSource
    bad: dict[int, str] = field(default_factory=dict)
    rows: dict[str, tuple[np.ndarray, dict[str, int]]] = field(default_factory=dict)
    pixels: Any = None


def labelled_source(obj: Any, labels: Sequence[Any] | None, what: str) -> ImageSource:
    """Open a source and insist on labels for every image."""
    src = open_source(obj, labels=labels)
    if len(src) == 0 or (src.labels < 0).any():
        n = int((src.labels < 0).sum())
        raise ConfigError(
            f"{what} has {n} unlabelled image(s) of {len(src)}; compare needs a label for every "
            "image (a folder with one subfolder per class, a manifest with labels, or labels=)")
    if len(np.unique(src.labels)) < 2:
        raise ConfigError(f"{what} has a single class; compare needs at least 2")
    return src


def prepare(source: Any, out_dir: Path, *, labels: Sequence[Any] | None,
            test_source: Any | None, test_size: float | int, seed: int,
            backbones: Sequence[str], embed_kwargs: dict[str, Any],
            pixel_spec: PixelSpec | None, with_hog: bool,
            say: Callable[[str], None],
            layers: Sequence[str | None] | None = None) -> Prepared:
    """Embed every backbone, drop unreadable images for all arms, extract pixels, split.

    With ``layers``, every backbone is embedded at each layer; the features are named by
    :func:`~featurepipe.compare._data.layer_features` (a layer list's concatenation is built
    by the arm that reads it).
    """
    sides = [_Side("train" if test_source is not None else "all",
                   labelled_source(source, labels, "the source"))]
    if test_source is not None:
        sides.append(_Side("test", labelled_source(test_source, None, "the test source")))
    log_file = EmbedLog(out_dir)
    embedding = []
    for side in sides:
        store = out_dir / ("features.h5" if side.role != "test" else "features-test.h5")
        for bb in backbones:
            say(f"embedding {side.role} images with {bb} (store {store})")
            results = ([embed_for_compare(side.source, store, bb, log_file, embed_kwargs, say)]
                       if layers is None else
                       embed_layers_for_compare(side.source, store, bb, layers, log_file,
                                                embed_kwargs, say))
            pos = {id_: i for i, id_ in enumerate(side.source.ids)}
            for feats, rows, skipped_ids, record in results:
                embedding.append({**record, "role": side.role})
                side.rows[record["features"]] = (feats, rows)
                side.bad.update({pos[i]: why for i, why in skipped_ids.items() if i in pos})
        if pixel_spec is not None:
            good = [i for i in range(len(side.source)) if i not in side.bad]
            side.pixels = pixel_features(side.source, good, pixel_spec, with_hog=with_hog,
                                         cache_dir=out_dir, log=say)
            side.bad.update(side.pixels.bad)
    train, test, how = _split(sides, test_size, seed)
    n_pixel_images = sum(len(s.pixels.indices) for s in sides if s.pixels is not None)
    pixel_seconds = sum(s.pixels.seconds for s in sides if s.pixels is not None)
    per_image: dict[str, float | None] = {}
    if n_pixel_images:
        per_image[PIXELS] = per_image[HOG] = pixel_seconds / n_pixel_images
    for name in dict.fromkeys(e["features"] for e in embedding):
        ips = [e["computed_images_per_second"] for e in embedding if e["features"] == name]
        per_image[name] = 1.0 / ips[0] if ips and ips[0] else None
    for bb in backbones if layers is not None and len(layers) > 1 else ():
        *alone, (both, _) = layer_features(bb, layers or ())
        costs = [per_image.get(name) for name, _ in alone]
        # Every layer comes out of the same pass (one decode, one forward), so side by side
        # they cost that one pass, not the sum of the layers' (equal) shares.
        per_image[both] = (None if any(c is None for c in costs)
                           else max(c for c in costs if c is not None))
    skipped = [{"role": s.role, "id": s.source.ids[i], "reason": why}
               for s in sides for i, why in sorted(s.bad.items())]
    first = sides[0].source
    classes = first.class_names or [str(c) for c in np.unique(first.labels)]
    split = {"how": how, "seed": seed, "test_size": None if test_source is not None else test_size,
             "n_train": len(train), "n_test": len(test), "n_skipped": len(skipped),
             "train_ids_sha256": train.digest(), "test_ids_sha256": test.digest()}
    mode = next((s.pixels.mode for s in sides if s.pixels is not None), None)
    return Prepared(train, test, list(classes), embedding, skipped, per_image, split, mode)


def _split(sides: list[_Side], test_size: float | int, seed: int) -> tuple[Part, Part, str]:
    parts = [_part(side) for side in sides]
    if len(parts) == 2:
        return parts[0], parts[1], "fixed test source"
    whole = parts[0]
    tr, te = stratified_split(
        whole.labels, test_size, seed=seed,
        hint="use more images per class, another test_size, or a separate test source")
    return whole.take(tr), whole.take(te), f"stratified {_fraction(test_size)} test split"


def _fraction(test_size: float | int) -> str:
    return f"{test_size:.0%}" if isinstance(test_size, float) else f"{test_size}-image"


def _part(side: _Side) -> Part:
    """Rows of ``side`` that every feature kind has, features gathered in source order."""
    src = side.source
    keep = np.asarray([i for i in range(len(src)) if i not in side.bad], dtype=np.int64)
    ids = src.ids
    kept_ids = [ids[i] for i in keep.tolist()]
    features: dict[str, np.ndarray] = {}
    for bb, (matrix, rows) in side.rows.items():
        features[bb] = matrix[np.asarray([rows[i] for i in kept_ids], dtype=np.int64)]
    if side.pixels is not None:
        at = {int(i): k for k, i in enumerate(side.pixels.indices.tolist())}
        take = np.asarray([at[int(i)] for i in keep], dtype=np.int64)
        features[PIXELS] = side.pixels.pixels[take]
        if side.pixels.hog is not None:
            features[HOG] = side.pixels.hog[take]
    return Part(src, keep, np.asarray(src.labels)[keep].copy(), kept_ids, features)
