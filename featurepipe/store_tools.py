"""What a feature store holds, entry by entry, and its features written out in other formats.

``featurepipe inspect`` describes every entry of a store and names the settings that differ
between them (an entry is one spec: backbone, weights, layer, preprocessing, precision...).
``featurepipe export`` writes one entry's features, labels and ids as ``.npz`` (numpy), Parquet
or CSV, for tools that do not read HDF5.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np

from featurepipe.exceptions import ConfigError, MissingDependencyError
from featurepipe.store import FeatureStore

__all__ = ["COMPARED", "EXPORT_FORMATS", "describe_store", "export_entry"]

#: Entry settings compared between entries, in the order ``inspect`` prints them.
COMPARED = ("backbone", "spec", "weights_sha256", "layer", "preprocess", "decode_policy",
            "decoder", "precision", "dtype", "dim", "feature_format_version", "n_rows",
            "n_labelled", "classes", "n_skipped", "versions", "created", "updated")
EXPORT_FORMATS = ("npy", "parquet", "csv")


def describe_store(path: str | os.PathLike[str], key: str | None = None) -> dict[str, Any]:
    """Every entry of the store (or only ``key``), and the settings that differ between entries.

    Returns
    -------
    dict
        ``path``; ``entries``: one :meth:`FeatureStore.info` dict per entry, with the entry's
        stored attributes added (``spec``, ``decoder``, ``device``...) and ``skipped`` as
        ``{id, reason}`` dicts (the whole result is JSON-ready); ``differs``:
        ``{setting: {key: value}}`` for each setting in :data:`COMPARED` whose values are not
        all equal (empty with one entry).
    """
    store = FeatureStore(path)
    keys = [store.resolve_key(key)] if key is not None else store.keys()
    entries = []
    for k in keys:
        attrs = store.attrs(k)
        info = store.info(k)
        info.pop("entries", None)
        info["skipped"] = [s.to_dict() for s in info["skipped"]]
        entries.append({**{n: v for n, v in attrs.items() if n not in info}, **info,
                        "decoder": attrs.get("decoder", "pil")})
    differs: dict[str, dict[str, Any]] = {}
    if len(entries) > 1:
        for name in COMPARED:
            values = {e["key"]: e.get(name) for e in entries}
            if len({repr(v) for v in values.values()}) > 1:
                differs[name] = values
    return {"path": str(store.path), "entries": entries, "differs": differs}


def _columns(n_dims: int) -> list[str]:
    return [f"f{i}" for i in range(n_dims)]


def export_entry(path: str | os.PathLike[str], out: str | os.PathLike[str], fmt: str = "npy",
                 key: str | None = None) -> dict[str, Any]:
    """Write one entry's features, labels and ids to ``out``.

    Parameters
    ----------
    path : path
        The feature store.
    out : path
        The file to write.
    fmt : {"npy", "parquet", "csv"}
        ``npy``: a numpy ``.npz`` archive with ``features`` (N x D), ``labels`` (N ints, -1 =
        unlabelled), ``ids`` and ``class_names``. ``parquet``: one row per image with ``id``,
        ``label`` (the class name, empty when unlabelled) and columns ``f0..f{D-1}`` (needs
        pyarrow). ``csv``: the same columns as text.
    key : str, optional
        Entry key or unique prefix; needed when the store holds several entries.

    Returns
    -------
    dict
        ``out``, ``format``, ``key``, ``n_rows``, ``dim``.

    Raises
    ------
    MissingDependencyError
        ``parquet`` without pyarrow (the message names the install command).
    """
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"export format {fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    if fmt == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise MissingDependencyError(
                "export --format parquet needs pyarrow: pip install pyarrow "
                "(or use --format npy or csv)") from None
    fs = FeatureStore(path).load(key)
    names = np.array([fs.class_names[i] if 0 <= i < len(fs.class_names) else ""
                      for i in fs.labels], dtype=object)
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "npy":
        with open(target, "wb") as f:  # np.savez would add ".npz" to a name without it
            np.savez(f, features=fs.features, labels=fs.labels,
                     ids=np.array(fs.ids, dtype=str), class_names=np.array(fs.class_names,
                                                                            dtype=str))
    elif fmt == "parquet":
        columns = {"id": pa.array(fs.ids), "label": pa.array(list(names), type=pa.string())}
        columns.update({c: pa.array(fs.features[:, i]) for i, c in
                        enumerate(_columns(fs.features.shape[1]))})
        pq.write_table(pa.table(columns), target)
    else:
        with open(target, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "label", *_columns(fs.features.shape[1])])
            for i, row in enumerate(fs.features):
                writer.writerow([fs.ids[i], names[i], *(f"{v:.7g}" for v in row)])
    return {"out": str(target), "format": fmt, "key": fs.key, "n_rows": len(fs.ids),
            "dim": int(fs.features.shape[1])}
