"""Data side of the comparison protocol: embed, drop bad images for everyone, split, align.

Every arm is trained and scored on exactly the same images. A file that fails to decode for any
backbone (the feature store's skipped list) or for the pixel extraction is removed from the
candidate set *before* the split, so no arm sees a sample another arm cannot.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featurepipe.atomic import atomic_write_text
from featurepipe.exceptions import ConfigError
from featurepipe.sources import ImageSource

PIXELS, HOG = "pixels", "hog"


def ids_digest(ids: Sequence[str]) -> str:
    """sha256 of the ids in order: equal digests mean the same samples in the same order."""
    h = hashlib.sha256()
    for i in ids:
        h.update(str(i).encode())
        h.update(b"\n")
    return h.hexdigest()


@dataclass
class Part:
    """One side of the split: rows of one source and every feature matrix aligned to them.

    ``features`` maps ``"pixels"``, ``"hog"`` and backbone names to ``(n, d)`` arrays whose row
    ``k`` belongs to ``source`` position ``indices[k]``.
    """

    source: ImageSource
    indices: np.ndarray
    labels: np.ndarray
    ids: list[str]
    features: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.indices)

    def take(self, rows: Sequence[int] | np.ndarray) -> Part:
        """The sub-part at ``rows`` (positions in this part), features included."""
        rows = np.asarray(rows, dtype=np.int64)
        return Part(self.source, self.indices[rows], self.labels[rows],
                    [self.ids[r] for r in rows.tolist()],
                    {k: v[rows] for k, v in self.features.items()})

    def images(self) -> ImageSource:
        """This part's images as a source of their own (fine-tuning reads them from here)."""
        return self.source.subset(self.indices)

    def digest(self) -> str:
        return ids_digest(self.ids)


def per_class_subsample(labels: np.ndarray, n_per_class: int, seed: int) -> np.ndarray:
    """Positions of ``n_per_class`` random rows of every class (a learning-curve point)."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    if counts.min() < n_per_class:
        short = {int(c): int(n) for c, n in zip(classes, counts, strict=True) if n < n_per_class}
        raise ConfigError(
            f"samples_per_class={n_per_class} but the training split has fewer images in "
            f"classes {short}; the largest size possible is {int(counts.min())}")
    picks = [rng.choice(np.flatnonzero(labels == c), size=n_per_class, replace=False)
             for c in classes]
    return np.sort(np.concatenate(picks))


# ----------------------------------------------------------------------------- embedding log


class EmbedLog:
    """``embed_log.json`` in the compare folder: the cost of computing each store entry.

    A rerun re-uses cached features and computes nothing, but the report should still say what
    embedding those images cost, so the throughput of the run that computed them is kept here,
    keyed by ``<store file name>:<entry key>`` (train and test stores hold entries with the same
    key).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / "embed_log.json"
        self.data: dict[str, dict[str, Any]] = (
            json.loads(self.path.read_text()) if self.path.exists() else {})

    def record(self, key: str, report: Any) -> dict[str, Any]:
        """Store this report's throughput if it computed anything; return the entry's record."""
        if report.n_computed:
            self.data[key] = {
                "n_computed": report.n_computed, "seconds": report.seconds,
                "images_per_second": report.images_per_second, "device": report.device,
                "precision": report.precision,
            }
            atomic_write_text(self.path, json.dumps(self.data, indent=2))
        return self.data.get(key, {})


def layer_features(backbone: str, layers: Sequence[str | None]
                   ) -> list[tuple[str, tuple[str, ...]]]:
    """(feature name, layer names) of each layer alone, then of all of them side by side.

    ``efficientnet_lite0@blocks.5`` names one layer's features,
    ``efficientnet_lite0@blocks.4,blocks.5`` the concatenation (``penultimate`` for None).
    """
    from featurepipe.layer_entries import layer_name

    names = tuple(layer_name(x) for x in layers)
    out: list[tuple[str, tuple[str, ...]]] = [(f"{backbone}@{name}", (name,)) for name in names]
    if len(names) > 1:
        out.append((f"{backbone}@{','.join(names)}", names))
    return out


def _embed_layers(source: ImageSource, store: Path, backbone: str,
                  layers: Sequence[str | None], embed_kwargs: dict[str, Any],
                  say: Callable[[str], None]) -> list[Any]:
    """One EmbedReport per layer, in order, from one pass over the images."""
    from featurepipe.embed import embed

    kwargs = {k: v for k, v in embed_kwargs.items() if k != "layer"}
    return list(embed(source, store, backbone, layers=list(layers), other_entries="keep",
                      log=say, **kwargs))


def embed_layers_for_compare(source: ImageSource, store: Path, backbone: str,
                             layers: Sequence[str | None], log_file: EmbedLog,
                             embed_kwargs: dict[str, Any], say: Callable[[str], None]
                             ) -> list[tuple[np.ndarray, dict[str, int], dict[str, str],
                                             dict[str, Any]]]:
    """:func:`embed_for_compare` for each of ``layers`` (features named by
    :func:`layer_features`)."""
    reports = _embed_layers(source, store, backbone, layers, embed_kwargs, say)
    names = [name for name, _ in layer_features(backbone, layers)]
    return [_loaded(source, store, backbone, report, log_file, name)
            for report, name in zip(reports, names, strict=False)]


def embed_for_compare(source: ImageSource, store: Path, backbone: str, log_file: EmbedLog,
                      embed_kwargs: dict[str, Any], say: Callable[[str], None]
                      ) -> tuple[np.ndarray, dict[str, int], dict[str, str], dict[str, Any]]:
    """Embed (or re-use) ``source``; return features, id -> row, id -> skip reason, a record."""
    from featurepipe.embed import embed

    report = embed(source, store, backbone, other_entries="keep", log=say, **embed_kwargs)
    return _loaded(source, store, backbone, report, log_file, backbone)


def _loaded(source: ImageSource, store: Path, backbone: str, report: Any, log_file: EmbedLog,
            features: str) -> tuple[np.ndarray, dict[str, int], dict[str, str], dict[str, Any]]:
    from featurepipe.store import FeatureStore

    first = log_file.record(f"{Path(store).name}:{report.key}", report)
    fs = FeatureStore(store).load(report.key)
    rows = {id_: r for r, id_ in enumerate(fs.ids)}
    skipped = dict(fs.skipped)
    record = {
        "backbone": backbone, "features": features, "store": str(store), "key": report.key,
        "n_images": len(source),
        "n_rows": report.n_rows, "n_skipped": report.n_skipped,
        "n_computed": report.n_computed, "n_reused": report.n_reused,
        "seconds": report.seconds, "device": report.device, "precision": report.precision,
        "cached": report.n_computed == 0,
        "computed_images_per_second": first.get("images_per_second"),
        "dim": int(fs.features.shape[1]),
    }
    return fs.features, rows, skipped, record
