"""Several layers of one backbone in a feature store: find their entries, align their rows.

``featurepipe embed --layers`` stores one entry per layer, each keyed exactly like a single-layer
run. A head on a *layer list* needs the entries of those layers made with one backbone, weights,
preprocessing and decode policy (everything but the layer the same), and the rows every one of
them holds, in one order. Entries are matched on their recorded key parts rather than by
recomputing keys, so a store written by any featurepipe version that recorded them works.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from featurepipe.backbones import parse_layers
from featurepipe.exceptions import ConfigError
from featurepipe.identity import canonical, key_parts_from_attrs
from featurepipe.store import FeatureSet, FeatureStore

__all__ = ["LayerData", "find_layer_entries", "layer_name", "load_layer_data", "parse_layers"]

PENULTIMATE = "penultimate"


def layer_name(layer: str | None) -> str:
    """How a layer is shown: its name, or ``"penultimate"`` for ``None``."""
    return PENULTIMATE if layer is None else str(layer)


def _base(parts: Mapping[str, Any]) -> str:
    """The key parts with the layer left out: equal for the layers of one embedding setup."""
    rest = {k: v for k, v in parts.items() if k != "layer"}
    if isinstance(rest.get("spec"), Mapping):
        rest["spec"] = {k: v for k, v in rest["spec"].items() if k != "layer"}
    return canonical(rest)


def find_layer_entries(fs: FeatureStore, layers: Sequence[str | None] | None, *,
                       key: str | None = None) -> tuple[list[str], tuple[str | None, ...]]:
    """The entry key of each layer, all of one backbone setup, and the layers found.

    Parameters
    ----------
    fs : FeatureStore
    layers : sequence of (str or None), or None
        ``None``: every layer the store holds for that setup (in the store's key order).
    key : str, optional
        An entry (or unique prefix) of the wanted setup, when the store holds several.

    Raises
    ------
    ConfigError
        A layer has no entry (naming it and the ``featurepipe embed`` command that makes it),
        or several setups hold the layers and ``key`` does not say which.
    """
    entries = {k: key_parts_from_attrs(fs.attrs(k)) for k in fs.keys()}
    groups: dict[str, dict[str | None, str]] = {}
    for k, parts in entries.items():
        groups.setdefault(_base(parts), {}).setdefault(parts.get("layer"), k)
    if key is not None:
        chosen = [_base(entries[fs.resolve_key(key)])]
    else:
        chosen = [g for g, found in groups.items()
                  if layers is None or all(layer in found for layer in layers)]
        if not chosen:  # report against the setup that has the most of them
            chosen = [max(groups, key=lambda g: sum(layer in groups[g] for layer in layers or ()))]
        if len(chosen) > 1:
            raise ConfigError(
                f"{fs.path} holds these layers for {len(chosen)} backbone setups (entries "
                f"{', '.join(groups[g][next(iter(groups[g]))] for g in chosen)}); pass --key "
                "with one entry of the setup to use")
    found = groups[chosen[0]]
    wanted = _ordered(found) if layers is None else tuple(layers)
    for layer in wanted:
        if layer not in found:
            raise ConfigError(_missing(fs, entries[next(iter(found.values()))], layer, wanted,
                                       found))
    return [found[layer] for layer in wanted], wanted


def _ordered(layers: Iterable[str | None]) -> tuple[str | None, ...]:
    """Named layers in name order, the penultimate last (the order ``auto`` tries them in)."""
    return tuple(sorted(layers, key=lambda x: (x is None, str(x))))


def _missing(fs: FeatureStore, parts: Mapping[str, Any], layer: str | None,
             wanted: Sequence[str | None], found: Mapping[str | None, str]) -> str:
    source = str(fs.attrs(next(iter(found.values()))).get("source") or "SRC")
    source = source.split(":", 1)[1] if source.startswith(("folder:", "manifest:")) else source
    spec: Mapping[str, Any] = parts.get("spec") or {}
    options = f" --backbone {parts.get('backbone')}"
    if spec.get("weights"):
        options += f" --weights {spec['weights']}"
    if spec.get("image_size"):
        options += f" --image-size {spec['image_size']}"
    held = ", ".join(layer_name(x) for x in _ordered(found))
    names = ",".join(layer_name(x) for x in wanted)
    return (f"{fs.path} has no entry of layer {layer_name(layer)} (it holds {held}); make it "
            f"with `featurepipe embed {source}{options} --layers {names} --out {fs.path}`")


@dataclass
class LayerData:
    """Rows every layer holds, features side by side in layer order (one block per layer)."""

    features: np.ndarray
    labels: np.ndarray
    ids: list[str]
    class_names: list[str]
    keys: list[str]
    layers: tuple[str | None, ...]
    block_dims: tuple[int, ...]
    key_parts: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)

    def block(self, index: int) -> np.ndarray:
        """The columns of layer ``index``."""
        start = sum(self.block_dims[:index])
        return self.features[:, start : start + self.block_dims[index]]

    def select(self, blocks: Sequence[int]) -> LayerData:
        """The same rows with only the layers at positions ``blocks``."""
        cols = np.concatenate([np.arange(sum(self.block_dims[:b]),
                                         sum(self.block_dims[: b + 1])) for b in blocks])
        return LayerData(self.features[:, cols], self.labels, self.ids, self.class_names,
                         [self.keys[b] for b in blocks], tuple(self.layers[b] for b in blocks),
                         tuple(self.block_dims[b] for b in blocks),
                         [self.key_parts[b] for b in blocks], list(self.notes))

    def as_feature_set(self) -> FeatureSet:
        return FeatureSet(self.features, self.labels, self.ids, self.class_names, [],
                          self.keys[0])


def load_layer_data(fs: FeatureStore, keys: Sequence[str],
                    layers: Sequence[str | None]) -> LayerData:
    """Load the entries ``keys`` and keep the rows (by id) that all of them hold.

    Rows missing from, or skipped in, any layer are dropped for every layer, with one note; so
    are rows whose file fingerprint differs between the layers (the file changed between runs).

    Raises
    ------
    ConfigError
        The entries disagree on a row's label or on the class names.
    """
    sets = [fs.load(k) for k in keys]
    first = sets[0]
    common = set(first.ids)
    prints = [fs.lookup(k) for k in keys]
    changed = {i for i in common for p in prints[1:] if i in p and p[i][1] != prints[0][i][1]}
    for s in sets[1:]:
        common &= set(s.ids)
        if s.class_names != first.class_names:
            raise ConfigError(f"{fs.path}: entries {keys[0]} and {s.key} have different class "
                              f"names; embed the layers from one source in one run")
    common -= changed  # a file edited between the layers' runs: its rows describe two images
    ids = [i for i in first.ids if i in common]
    blocks, dims = [], []
    labels = None
    for s in sets:
        at = {id_: r for r, id_ in enumerate(s.ids)}
        rows = np.asarray([at[i] for i in ids], dtype=np.int64)
        blocks.append(s.features[rows])
        dims.append(int(s.features.shape[1]))
        if labels is None:
            labels = s.labels[rows]
        elif not np.array_equal(labels, s.labels[rows]):
            raise ConfigError(f"{fs.path}: entries {keys[0]} and {s.key} label the same images "
                              "differently; embed the layers from one source in one run")
    every = set().union(*(set(s.ids) for s in sets))
    notes = []
    lost = sorted(every - common - changed)
    if lost:
        notes.append(f"dropped {len(lost)} row(s) that some layer lacks or skipped "
                     f"(e.g. {lost[0]})")
    if changed:
        notes.append(f"dropped {len(changed)} row(s) whose file changed between the layers' "
                     f"embeddings (e.g. {min(changed)}); embed the layers again to keep them")
    return LayerData(np.hstack(blocks) if blocks else np.zeros((0, 0), np.float32),
                     np.asarray(labels if labels is not None else [], dtype=np.int64), ids,
                     list(first.class_names), list(keys), tuple(layers), tuple(dims),
                     [key_parts_from_attrs(s.attrs or fs.attrs(s.key)) for s in sets], notes)
