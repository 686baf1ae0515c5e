"""HDF5 feature store: cached image features, keyed by everything that changes them.

One file holds one group per entry under ``/entries/<key>``. The main file is never modified in
place: a commit writes a complete new file next to it and ``os.replace``-s it over the old one, so
readers (h5py, ``h5dump``) only ever see a complete file and a SIGKILL at any instant leaves either
the old or the new store. Work in progress lives in ``<path>.parts/<key>/*.npz`` shards, each
written atomically, so a killed run resumes where it stopped. A ``filelock`` on ``<path>.lock``
keeps writers apart. See ``docs/architecture.md`` ("Feature store").

HDF5 file locking is switched off (``locking=False``) everywhere: the main file is only ever opened
read-only and temp files are private to the writer holding our own lock, so HDF5's locks would add
nothing but failures on filesystems without ``flock`` (NFS, some container mounts).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import filelock
import h5py
import numpy as np

from featurepipe.atomic import TEMP_NAME_PATTERN, atomic_path, atomic_write
from featurepipe.exceptions import ConfigError, StoreError, StoreLockedError
from featurepipe.identity import FEATURE_FORMAT_VERSION, entry_key, featurepipe_version
from featurepipe.records import SkippedFile
from featurepipe.store_checks import (
    NON_FINITE_REASON,
    diagnose,
    non_finite_error,
    non_finite_rows,
    reserve,
    write_error,
)

__all__ = [
    "FEATURE_FORMAT_VERSION",
    "STORE_FORMAT_VERSION",
    "CommitResult",
    "FeatureChunk",
    "FeatureSet",
    "FeatureStore",
    "StoreWriter",
    "entry_key",
]

STORE_FORMAT_VERSION: int = 1

_STR = h5py.string_dtype("utf-8")
_DTYPES = ("float16", "float32")
_WRITE_BLOCK = 1024  # rows per output block in commit
_READ_BLOCK = 4096  # sorted rows per fancy read
_SHARD_CACHE = 2  # shards held in memory while merging
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")
_TMP_SUFFIX_RE = TEMP_NAME_PATTERN
_JSON_ATTRS = "json_attrs"  # entry attribute listing which attributes hold JSON text


@dataclass
class FeatureSet:
    """Everything one entry holds, in memory (see :meth:`FeatureStore.load`)."""

    features: np.ndarray
    labels: np.ndarray
    ids: list[str]
    class_names: list[str]
    skipped: list[SkippedFile]
    key: str
    attrs: dict = field(default_factory=dict)


@dataclass
class FeatureChunk:
    """A slice of rows ``start : start + len(ids)`` (see :meth:`FeatureStore.iter_chunks`)."""

    features: np.ndarray
    labels: np.ndarray
    ids: list[str]
    start: int


@dataclass
class CommitResult:
    """What :meth:`StoreWriter.commit` did.

    ``n_new`` rows came from shards, ``n_reused`` were copied from the old entry, ``n_dropped``
    old rows are gone (file deleted, or now skipped); ``changed=False``: file not rewritten.
    """

    n_rows: int
    n_new: int
    n_reused: int
    n_dropped: int
    n_skipped: int
    changed: bool


# --------------------------------------------------------------------------------------------
# small helpers


def _utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check_name(what: str, name: str) -> str:
    """Keys and shard names become HDF5 names and file names: keep them to a safe alphabet."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(
            f"{what} {name!r} is not valid: use letters, digits, '_', '-', '.' (not first)"
        )
    return name


def _encode_attrs(attrs: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Scalars stay HDF5 scalars; None, dicts and lists become JSON text ``h5dump -A`` shows."""
    out: dict[str, Any] = {}
    json_names: list[str] = []
    for name, value in attrs.items():
        if value is None or isinstance(value, (dict, list, tuple)):
            try:
                out[name] = json.dumps(value, sort_keys=True)
            except (TypeError, ValueError) as exc:
                msg = f"store attribute {name!r} is not JSON-serialisable: {exc}"
                raise ConfigError(msg) from exc
            json_names.append(name)
        elif isinstance(value, (str, bool, int, float, np.generic)):
            out[name] = value
        else:
            raise ConfigError(
                f"store attribute {name!r} has type {type(value).__name__}; "
                "expected str, number, bool, None, dict or list"
            )
    return out, json_names


def _decode_attrs(attrs: h5py.AttributeManager) -> dict[str, Any]:
    """Inverse of :func:`_encode_attrs`: JSON text parsed, numpy scalars made plain Python."""
    raw = {name: attrs[name] for name in attrs}
    json_names = set(json.loads(raw.pop(_JSON_ATTRS, "[]")))
    out: dict[str, Any] = {}
    for name, value in raw.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        if name in json_names and isinstance(value, str):
            value = json.loads(value)
        elif isinstance(value, np.generic):
            value = value.item()
        elif isinstance(value, np.ndarray):
            value = value.tolist()
        out[name] = value
    return out


def _normalise_attr(value: Any) -> Any:
    """The value an attribute reads back as, to compare new attributes with stored ones."""
    if value is None or isinstance(value, (dict, list, tuple)):
        return json.loads(json.dumps(value, sort_keys=True))
    return value.item() if isinstance(value, np.generic) else value


def _read_strings(ds: h5py.Dataset, sel: Any = ()) -> list[str]:
    return ds.asstr()[sel].tolist()


def _write_strings(group: h5py.Group, name: str, values: Sequence[str]) -> None:
    ds = group.create_dataset(name, shape=(len(values),), dtype=_STR)
    if len(values):
        ds[...] = np.array(values, dtype=object)


def _read_sorted(ds: h5py.Dataset, rows: np.ndarray, dtype: Any) -> np.ndarray:
    """Read sorted unique rows: one slice when they are dense, else an HDF5 point selection."""
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    if hi - lo <= 2 * len(rows) + 64:
        return np.asarray(ds[lo:hi][rows - lo], dtype=dtype)
    return np.asarray(ds[rows], dtype=dtype)


def _gather(ds: h5py.Dataset, rows: np.ndarray, dtype: Any) -> np.ndarray:
    """Rows in any order, duplicates allowed (h5py wants increasing unique indices)."""
    uniq, inverse = np.unique(rows, return_inverse=True)
    out = np.empty((len(uniq), ds.shape[1]), dtype=dtype)
    for start in range(0, len(uniq), _READ_BLOCK):
        part = uniq[start : start + _READ_BLOCK]
        out[start : start + len(part)] = _read_sorted(ds, part, dtype)
    return out[inverse.reshape(-1)]


def _check_dtype(dtype: Any) -> str:
    name = np.dtype(dtype).name if dtype is not None else ""
    if name not in _DTYPES:
        raise ConfigError(f"store dtype must be one of {', '.join(_DTYPES)}; got {dtype!r}")
    return name


# --------------------------------------------------------------------------------------------
# the committed entry, as an index


@dataclass
class _Entry:
    """Index of a committed entry (ids, fingerprints, labels, skipped); features stay on disk."""

    ids: list[str]
    fps: list[str]
    labels: np.ndarray
    class_names: list[str]
    skipped: list[tuple[str, str, str]]  # (id, fingerprint, reason)
    dim: int
    attrs: dict[str, Any]

    @classmethod
    def read(cls, group: h5py.Group) -> _Entry:
        skipped = zip(
            _read_strings(group["skipped_ids"]),
            _read_strings(group["skipped_fingerprints"]),
            _read_strings(group["skipped_reasons"]),
            strict=True,
        )
        return cls(
            ids=_read_strings(group["ids"]),
            fps=_read_strings(group["fingerprints"]),
            labels=group["labels"][()].astype(np.int64),
            class_names=_read_strings(group["class_names"]),
            skipped=list(skipped),
            dim=int(group["features"].shape[1]),
            attrs=_decode_attrs(group.attrs),
        )


# --------------------------------------------------------------------------------------------
# source, disk space, damaged files (the checks themselves are in store_checks)

_SOURCE_ATTR = "source"  # entry attribute: where the rows came from (see StoreWriter.check_source)
_SPACE_SLACK = 1 << 18  # bytes added to a commit's size estimate for HDF5's own metadata


class _UnreadableStoreError(StoreError):
    """The file cannot be opened; ``ours`` says whether it is a damaged featurepipe store."""

    def __init__(self, message: str, *, ours: bool) -> None:
        super().__init__(message)
        self.ours = ours


# --------------------------------------------------------------------------------------------
# reader


class FeatureStore:
    """An HDF5 file of cached features; reading is lock-free, writing goes through :meth:`writer`.

    Parameters
    ----------
    path : str or os.PathLike
        The store file (conventionally ``*.h5``). Nothing is read or created here.

    Examples
    --------
    >>> store = FeatureStore("photos.h5")
    >>> store.exists()
    False
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r})"

    @property
    def parts_path(self) -> Path:
        """Folder of uncommitted shards, ``<path>.parts``."""
        return self.path.with_name(self.path.name + ".parts")

    @property
    def lock_path(self) -> Path:
        """Writer lock file, ``<path>.lock``."""
        return self.path.with_name(self.path.name + ".lock")

    # -- opening ---------------------------------------------------------------------------

    @contextmanager
    def _open(self) -> Iterator[h5py.File]:
        """Open read-only and check it is a store this version can read."""
        if not self.path.exists():
            raise StoreError(f"no feature store at {self.path}")
        try:
            fh = h5py.File(self.path, "r", locking=False)
        except OSError as exc:
            diagnosis = diagnose(self.path, exc)
            raise _UnreadableStoreError(diagnosis.message, ours=diagnosis.ours) from exc
        with fh:
            version = fh.attrs.get("featurepipe_store_version")
            if version is None:
                raise StoreError(
                    f"{self.path} is not a featurepipe store "
                    "(HDF5 file without a featurepipe_store_version attribute)"
                )
            if int(version) > STORE_FORMAT_VERSION:
                raise StoreError(
                    f"{self.path} was written by a newer featurepipe (store format {int(version)}; "
                    f"this version reads up to {STORE_FORMAT_VERSION}); upgrade featurepipe"
                )
            try:
                yield fh
            except KeyError as exc:  # only this module's code runs inside: a dataset is missing
                raise StoreError(
                    f"{self.path} is damaged: {exc.args[0] if exc.args else exc}"
                ) from exc

    def _resolve(self, fh: h5py.File, key: str | None) -> str:
        entries = fh.get("entries")
        keys = sorted(entries) if entries is not None else []
        if not keys:
            raise StoreError(f"store {self.path} is empty (no entries)")
        if key is None:
            if len(keys) == 1:
                return keys[0]
            listing = "; ".join(
                f"{k} ({entries[k].attrs.get('backbone', '?')}, "
                f"{entries[k]['features'].shape[0]} rows)"
                for k in keys
            )
            raise StoreError(
                f"store {self.path} holds {len(keys)} entries; pick one by key: {listing}"
            )
        if key in keys:
            return key
        matches = [k for k in keys if k.startswith(key)] if key else []
        if len(matches) == 1:
            return matches[0]
        raise StoreError(
            f"store {self.path} has no entry {key!r}"
            + (" (ambiguous prefix)" if matches else "")
            + f"; entries: {', '.join(keys)}"
        )

    # -- public reading API ----------------------------------------------------------------

    def exists(self) -> bool:
        """Whether a file is at :attr:`path` (it may still turn out not to be a store)."""
        return self.path.is_file()

    def keys(self) -> list[str]:
        """Sorted entry keys.

        Raises
        ------
        StoreError
            If the file is missing or is not a featurepipe store.
        """
        with self._open() as fh:
            entries = fh.get("entries")
            return sorted(entries) if entries is not None else []

    def resolve_key(self, key: str | None = None) -> str:
        """Turn ``key`` (None, a full key or a unique prefix) into a full entry key.

        Parameters
        ----------
        key : str or None
            None picks the only entry.

        Returns
        -------
        str

        Raises
        ------
        StoreError
            Store empty, several entries and ``key`` None (the message lists them), or no match.
        """
        with self._open() as fh:
            return self._resolve(fh, key)

    def attrs(self, key: str | None = None) -> dict:
        """Decoded attributes of an entry (JSON attributes parsed into dicts/lists)."""
        with self._open() as fh:
            return _decode_attrs(fh["entries"][self._resolve(fh, key)].attrs)

    def load(self, key: str | None = None, dtype: Any = np.float32) -> FeatureSet:
        """Read a whole entry into memory.

        Parameters
        ----------
        key : str or None
            Entry key (see :meth:`resolve_key`).
        dtype : numpy dtype or None
            Feature dtype returned; None keeps the stored one.

        Returns
        -------
        FeatureSet

        Raises
        ------
        StoreError
            The entry holds non-finite rows (a store written before embedding skipped them):
            the message names the store, the entry and the first ids.
        """
        with self._open() as fh:
            key = self._resolve(fh, key)
            group = fh["entries"][key]
            ds = group["features"]
            features = np.empty(ds.shape, dtype=ds.dtype if dtype is None else dtype)
            bad = np.zeros(ds.shape[0], dtype=bool)
            for start in range(0, ds.shape[0], _READ_BLOCK):
                block = features[start : start + _READ_BLOCK]
                block[...] = ds[start : start + _READ_BLOCK]
                bad[start : start + len(block)] = non_finite_rows(block)
            if bad.any():
                rows = np.flatnonzero(bad)
                ids = _read_strings(group["ids"], rows[:3])
                raise non_finite_error(self.path, key, ids, len(rows))
            skipped = map(SkippedFile._make, zip(
                _read_strings(group["skipped_ids"]),
                _read_strings(group["skipped_reasons"]),
                strict=True,
            ))
            return FeatureSet(
                features=features,
                labels=group["labels"][()].astype(np.int64),
                ids=_read_strings(group["ids"]),
                class_names=_read_strings(group["class_names"]),
                skipped=list(skipped),
                key=key,
                attrs=_decode_attrs(group.attrs),
            )

    def iter_chunks(
        self, key: str | None = None, chunk_rows: int = 4096, dtype: Any = np.float32
    ) -> Iterator[FeatureChunk]:
        """Yield consecutive row slices, for out-of-core heads.

        The file stays open while iterating, so a commit that replaces it meanwhile does not
        disturb the iteration: it keeps reading the snapshot it started on.

        Parameters
        ----------
        key : str or None
            Entry key (see :meth:`resolve_key`).
        chunk_rows : int
            Rows per chunk (the last one may be shorter).
        dtype : numpy dtype
            Feature dtype returned.

        Returns
        -------
        Iterator[FeatureChunk]
            Lazy: the file is opened (and a missing store reported) on the first ``next()``.
            A chunk with non-finite rows raises :class:`StoreError` naming them (see
            :meth:`load`).
        """
        if int(chunk_rows) < 1:
            raise ConfigError(f"chunk_rows must be a positive integer; got {chunk_rows!r}")
        return self._iter_chunks(key, int(chunk_rows), dtype)

    def _iter_chunks(self, key: str | None, chunk_rows: int, dtype: Any) -> Iterator[FeatureChunk]:
        with self._open() as fh:
            key = self._resolve(fh, key)
            group = fh["entries"][key]
            ds, n = group["features"], group["features"].shape[0]
            for start in range(0, n, chunk_rows):
                stop = min(n, start + chunk_rows)
                features = np.asarray(ds[start:stop], dtype=dtype)
                ids = _read_strings(group["ids"], np.s_[start:stop])
                bad = non_finite_rows(features)
                if bad.any():
                    rows = np.flatnonzero(bad)
                    raise non_finite_error(self.path, key, [ids[r] for r in rows], len(rows))
                yield FeatureChunk(
                    features=features,
                    labels=group["labels"][start:stop].astype(np.int64),
                    ids=ids,
                    start=start,
                )

    def lookup(self, key: str) -> dict[str, tuple[int, str]]:
        """Map id -> (row, fingerprint) for the committed rows of ``key``.

        Returns an empty dict when the file or the entry does not exist yet, so a cache can
        plan without special cases. Pair with :meth:`read_rows`.
        """
        _check_name("entry key", key)
        if not self.path.exists():
            return {}
        with self._open() as fh:
            group = fh.get(f"entries/{key}")
            if group is None:
                return {}
            ids, fps = _read_strings(group["ids"]), _read_strings(group["fingerprints"])
        return {id_: (row, fp) for row, (id_, fp) in enumerate(zip(ids, fps, strict=True))}

    def read_rows(
        self,
        key: str,
        rows: Sequence[int],
        dtype: Any = np.float32,
        *,
        expected_ids: Sequence[str] | None = None,
    ) -> np.ndarray:
        """Read feature rows by index, in any order, duplicates allowed.

        Parameters
        ----------
        key : str
            Entry key.
        rows : sequence of int
            Row numbers, e.g. from :meth:`lookup`.
        dtype : numpy dtype
            Feature dtype returned.
        expected_ids : sequence of str, optional
            The ids these rows had at :meth:`lookup` time. A commit between ``lookup`` and
            ``read_rows`` may move rows; with this the change raises instead of returning
            other images' features.

        Returns
        -------
        numpy.ndarray
            ``(len(rows), dim)``.
        """
        idx = np.asarray(rows, dtype=np.int64).reshape(-1)
        with self._open() as fh:
            group = fh["entries"][self._resolve(fh, key)]
            ds = group["features"]
            if idx.size and (idx.min() < 0 or idx.max() >= ds.shape[0]):
                raise StoreError(
                    f"rows out of range for entry {key} in {self.path} ({ds.shape[0]} rows); "
                    "the store changed since lookup(): look up again"
                )
            if expected_ids is not None:
                self._check_ids(group, idx, expected_ids, key)
            if not idx.size:
                return np.empty((0, ds.shape[1]), dtype=dtype)
            out = _gather(ds, idx, dtype)
            bad = non_finite_rows(out)
            if bad.any():
                bad_rows = np.unique(idx[bad])
                ids = _read_strings(group["ids"], bad_rows[:3])
                raise non_finite_error(self.path, key, ids, len(bad_rows))
            return out

    def _check_ids(
        self, group: h5py.Group, idx: np.ndarray, expected: Sequence[str], key: str
    ) -> None:
        uniq, inverse = np.unique(idx, return_inverse=True)
        found = np.array(_read_strings(group["ids"], uniq), dtype=object)[inverse.reshape(-1)]
        if len(expected) != len(idx) or list(found) != [str(e) for e in expected]:
            raise StoreError(
                f"entry {key} in {self.path} changed since lookup(): rows no longer hold the "
                "expected ids; look up again"
            )

    def info(self, key: str | None = None) -> dict:
        """Summary of one entry and the file, for ``featurepipe inspect``.

        Returns
        -------
        dict
            ``path, key, n_rows, dim, dtype, backbone, weights_sha256, layer, precision,
            n_skipped, skipped`` (list of :class:`~featurepipe.records.SkippedFile`; its
            ``to_dict()`` gives the ``{id, reason}`` JSON form), ``classes`` (class names),
            ``class_counts`` ({name: rows}), ``n_labelled, created, updated, versions,
            preprocess, decode_policy, entries`` (list of ``{key, backbone, n_rows}``).
        """
        with self._open() as fh:
            key = self._resolve(fh, key)
            group = fh["entries"][key]
            attrs = _decode_attrs(group.attrs)
            labels = group["labels"][()]
            classes = _read_strings(group["class_names"])
            counts = np.bincount(labels[labels >= 0], minlength=len(classes))
            skipped = [
                SkippedFile(i, r)
                for i, r in zip(
                    _read_strings(group["skipped_ids"]),
                    _read_strings(group["skipped_reasons"]),
                    strict=True,
                )
            ]
            entries = [
                {
                    "key": k,
                    "backbone": _decode_attrs(g.attrs).get("backbone"),
                    "n_rows": int(g["features"].shape[0]),
                }
                for k, g in sorted(fh["entries"].items())
            ]
            ds = group["features"]
            return {
                "path": str(self.path),
                "key": key,
                "n_rows": int(ds.shape[0]),
                "dim": int(ds.shape[1]),
                "dtype": ds.dtype.name,
                **{
                    name: attrs.get(name)
                    for name in ("backbone", "weights_sha256", "layer", "precision")
                },
                "n_skipped": len(skipped),
                "skipped": skipped,
                "classes": classes,
                "class_counts": {
                    (classes[i] if i < len(classes) else str(i)): int(c)
                    for i, c in enumerate(counts)
                },
                "n_labelled": int((labels >= 0).sum()),
                **{
                    name: attrs.get(name)
                    for name in (
                        "created",
                        "updated",
                        "versions",
                        "preprocess",
                        "decode_policy",
                        "source",
                    )
                },
                "entries": entries,
            }

    # -- writing ---------------------------------------------------------------------------

    def check_writable(self) -> None:
        """Fail at once when the store's folder or lock file cannot be written.

        :meth:`writer` calls it; call it earlier to fail before any other work. filelock treats
        a lock file it cannot create like one held by another process and waits for it, so
        without this an unwritable place would look like a busy store forever.

        Raises
        ------
        StoreError
            Naming the folder or the lock file and why.
        """
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise StoreError(f"cannot create the folder {folder} for {self.path}: {why}") from exc
        try:
            os.close(os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644))
        except OSError as exc:
            raise StoreError(
                f"cannot create the lock file {self.lock_path} ({exc.strerror or exc}); "
                f"is {folder} a writable folder?"
            ) from exc
        if not os.access(folder, os.W_OK | os.X_OK):
            raise StoreError(f"cannot write the store {self.path}: {folder} is not writable")

    def writer(
        self,
        key: str,
        attrs: Mapping[str, Any],
        *,
        lock_timeout: float = 3600.0,
        on_wait: Callable[[str], None] | None = None,
        replace: bool = False,
    ) -> StoreWriter:
        """A context manager that holds the store's write lock.

        Parameters
        ----------
        key : str
            Entry key (usually :func:`entry_key` of ``attrs``' key parts).
        attrs : mapping
            Entry attributes: ``dtype`` ("float16" or "float32", default "float32"), optional
            ``dim``, and the readable key parts (``backbone``, ``spec``, ``preprocess`` ...).
        lock_timeout : float
            Seconds to wait for another writer; 0 fails at once, negative waits forever.
        on_wait : callable, optional
            Called once with a message when the lock is busy and we start waiting.
        replace : bool
            Allow what ``embed --replace`` allows: rebuild a damaged store (only one
            recognisably written by featurepipe; any other file is still refused) and let
            :meth:`StoreWriter.commit` drop rows recorded from another source.

        Returns
        -------
        StoreWriter

        Examples
        --------
        >>> with FeatureStore("f.h5").writer("k1", {"dtype": "float32"}) as w:  # doctest: +SKIP
        ...     w.write_shard("shard-0", ["a"], ["fp"], np.zeros((1, 4), np.float32))
        ...     w.commit([("a", "fp", -1)], [])
        """
        return StoreWriter(
            self, key, attrs, lock_timeout=lock_timeout, on_wait=on_wait, replace=replace
        )


# --------------------------------------------------------------------------------------------
# writer


@dataclass
class _Shards:
    """Index of the uncommitted shards of one key: (id, fingerprint) -> where its data is."""

    paths: list[Path]
    dims: list[int]
    rows: dict[tuple[str, str], tuple[int, int]]  # -> (shard number, row in shard)
    skipped: dict[tuple[str, str], str]  # -> reason

    @classmethod
    def scan(cls, folder: Path) -> _Shards:
        """Oldest first, so newer shards overwrite older records of the same (id, fingerprint)."""
        paths = sorted(folder.glob("*.npz"), key=lambda p: (p.stat().st_mtime_ns, p.name))
        shards = cls(paths=paths, dims=[], rows={}, skipped={})
        for number, path in enumerate(paths):
            with _open_shard(path) as z:
                ids, fps = z["ids"].tolist(), z["fingerprints"].tolist()
                sk = list(
                    zip(z["skipped_ids"].tolist(), z["skipped_fingerprints"].tolist(), strict=True)
                )
                reasons = z["skipped_reasons"].tolist()
                shards.dims.append(int(z["dim"]))
            for row, id_fp in enumerate(zip(ids, fps, strict=True)):
                shards.rows[id_fp] = (number, row)
            for id_fp, reason in zip(sk, reasons, strict=True):
                shards.skipped[id_fp] = reason
        return shards


@contextmanager
def _open_shard(path: Path) -> Iterator[Any]:
    """Open a shard's npz; a damaged one is named so the user can delete it."""
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise StoreError(f"unreadable shard {path} ({exc}); delete it and rerun embed") from exc
    try:
        yield z
    except (KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise StoreError(f"unreadable shard {path} ({exc}); delete it and rerun embed") from exc
    finally:
        z.close()


class _ShardCache:
    """Features of the last few shards used: output is in source order, so each is loaded once."""

    def __init__(self, paths: list[Path], size: int = _SHARD_CACHE) -> None:
        self._paths, self._size = paths, size
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def features(self, number: int) -> np.ndarray:
        if number not in self._cache:
            with _open_shard(self._paths[number]) as z:
                self._cache[number] = z["features"]
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(number)
        return self._cache[number]


@dataclass
class _Plan:
    """Where each output row comes from: ``src`` -1 = old entry, k >= 0 = shard k."""

    ids: list[str] = field(default_factory=list)
    fps: list[str] = field(default_factory=list)
    labels: array = field(default_factory=lambda: array("q"))  # 8 bytes a row, not a PyObject
    src: array = field(default_factory=lambda: array("q"))
    row: array = field(default_factory=lambda: array("q"))
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    n_new: int = 0
    n_reused: int = 0
    n_replaced: int = 0  # old ids whose row now comes from a shard

    def add_row(self, id_: str, fp: str, label: int, src: int, row: int) -> None:
        self.ids.append(id_)
        self.fps.append(fp)
        self.labels.append(label)
        self.src.append(src)
        self.row.append(row)
        if src < 0:
            self.n_reused += 1
        else:
            self.n_new += 1

    def same_as(self, old: _Entry, class_names: list[str]) -> bool:
        """True when rewriting would reproduce ``old`` row for row."""
        return (
            self.n_new == 0
            and np.array_equal(np.frombuffer(self.row, np.int64), np.arange(len(old.ids)))
            and np.array_equal(np.frombuffer(self.labels, np.int64), old.labels)
            and class_names == old.class_names
            and self.skipped == old.skipped
        )


def _order_item(item: Sequence[Any], n_classes: int) -> tuple[str, str, int]:
    try:
        id_, fp, label = item
        label = int(label)
    except (TypeError, ValueError) as exc:
        msg = f"commit order items must be (id, fingerprint, label); got {item!r}"
        raise ConfigError(msg) from exc
    if label < -1 or (n_classes and label >= n_classes):
        raise ConfigError(
            f"label {label} of {id_!r} is out of range: expected -1 (unlabelled) "
            f"or 0..{n_classes - 1} for {n_classes} class names"
        )
    return str(id_), str(fp), label


def _make_plan(
    order: Sequence[tuple[str, str, int]],
    n_classes: int,
    shards: _Shards,
    old: _Entry | None,
    drop_missing: bool,
    where: Path,
) -> _Plan:
    """Resolve every id to a shard row, an old row or a skipped record, in source order."""
    plan = _Plan()
    old_row = {id_: r for r, id_ in enumerate(old.ids)} if old else {}
    old_skip = {id_: (fp, reason) for id_, fp, reason in old.skipped} if old else {}
    seen: set[str] = set()
    for item in order:
        id_, fp, label = _order_item(item, n_classes)
        if id_ in seen:
            raise ConfigError(f"id {id_!r} appears twice in the commit order for {where}")
        seen.add(id_)
        hit = shards.rows.get((id_, fp))
        if hit is not None:
            plan.add_row(id_, fp, label, *hit)
            plan.n_replaced += id_ in old_row
            continue
        row = old_row.get(id_)
        if row is not None and old is not None and old.fps[row] == fp:
            plan.add_row(id_, fp, label, -1, row)
            continue
        reason = shards.skipped.get((id_, fp))
        if reason is None and old_skip.get(id_, ("", ""))[0] == fp:
            reason = old_skip[id_][1]
        if reason is None:
            raise StoreError(
                f"internal: no features for id {id_!r} (fingerprint {fp}) in {where}; rerun embed"
            )
        plan.skipped.append((id_, fp, reason))
    if old is not None and not drop_missing:
        for row, id_ in enumerate(old.ids):
            if id_ not in seen:
                plan.add_row(id_, old.fps[row], int(old.labels[row]), -1, row)
        plan.skipped.extend(s for s in old.skipped if s[0] not in seen)
    return plan


class StoreWriter:
    """Holds the write lock of one store and builds one entry; see :meth:`FeatureStore.writer`.

    Typical use: ``existing()`` to plan, ``write_shard()`` per finished slice (skipping those
    ``shard_done()``), then ``commit()``. Leaving the ``with`` block without committing keeps
    the shards, so the next run resumes from them.
    """

    def __init__(
        self,
        store: FeatureStore,
        key: str,
        attrs: Mapping[str, Any],
        *,
        lock_timeout: float = 3600.0,
        on_wait: Callable[[str], None] | None = None,
        replace: bool = False,
    ) -> None:
        self.store = store
        self.key = _check_name("entry key", key)
        self.attrs = dict(attrs)
        self.dtype = self.attrs["dtype"] = _check_dtype(self.attrs.get("dtype", "float32"))
        _encode_attrs(self.attrs)  # fail early on attributes HDF5 cannot hold
        self._lock_timeout = float(lock_timeout)
        self._on_wait = on_wait
        self._replace = bool(replace)
        self._damaged = False  # the file is a damaged store that commit() rebuilds
        self._old: tuple[_Entry | None] | None = None  # cached by _old_entry() until commit
        self._lock: filelock.BaseFileLock | None = None
        self._group = {self.key}  # entries built under this lock (see sibling())

    @property
    def parts_dir(self) -> Path:
        """Folder of this key's uncommitted shards."""
        return self.store.parts_path / self.key

    # -- lock ------------------------------------------------------------------------------

    def sibling(self, key: str, attrs: Mapping[str, Any]) -> StoreWriter:
        """A writer of another entry of this store, under this writer's lock.

        One pass that builds several entries (one per layer) writes their shards side by side;
        each entry still commits on its own, atomically, and ``drop_other_entries`` never
        drops a sibling's entry or shards. Use it inside this writer's ``with`` block, not as
        a context manager of its own (the lock stays this writer's).
        """
        self._require_lock()
        other = StoreWriter(self.store, key, attrs, lock_timeout=self._lock_timeout,
                            replace=self._replace)
        other._lock, other._damaged, other._group = self._lock, self._damaged, self._group
        self._group.add(other.key)
        return other

    def __enter__(self) -> StoreWriter:
        self.store.check_writable()
        self._old = None
        # Not thread-local: the writer object owns the lock, whichever thread ends the block.
        lock = filelock.FileLock(str(self.store.lock_path), thread_local=False)
        self._acquire(lock)
        try:
            self._damaged = self._check_existing()
            self._remove_stale_tmp()
        except BaseException:
            lock.release()
            raise
        self._lock = lock
        return self

    def _check_existing(self, quiet: bool = False) -> bool:
        """Refuse to overwrite a file that is not a store; True for a damaged store to rebuild."""
        if not self.store.path.exists():
            return False
        try:
            with self.store._open():
                return False
        except _UnreadableStoreError as exc:
            if not (self._replace and exc.ours):
                raise
        if self._on_wait is not None and not quiet:
            self._on_wait(f"{self.store.path} is a damaged store; rebuilding it (replace)")
        return True

    def __exit__(self, *exc: object) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _acquire(self, lock: filelock.BaseFileLock) -> None:
        path, timeout = self.store.path, self._lock_timeout
        try:
            lock.acquire(blocking=False)
            return
        except filelock.Timeout:
            if timeout == 0:
                raise StoreLockedError(
                    f"feature store {path} is being written by another process "
                    f"(lock {self.store.lock_path}); lock_timeout=0, not waiting"
                ) from None
        if self._on_wait is not None:
            self._on_wait(f"waiting for another writer to finish with {path}")
        try:
            lock.acquire(timeout=timeout)
        except filelock.Timeout:
            raise StoreLockedError(
                f"feature store {path} is still being written by another process after "
                f"{timeout:g} s (lock {self.store.lock_path}); retry later or raise the timeout"
            ) from None

    def _remove_stale_tmp(self) -> None:
        """Temp files of killed writers. We hold the lock, so no live writer owns any of them."""
        main = self.store.path
        pattern = re.compile(re.escape(main.name) + _TMP_SUFFIX_RE + "$")
        for path in main.parent.iterdir():
            if pattern.match(path.name):
                path.unlink(missing_ok=True)
        if self.store.parts_path.is_dir():
            for path in self.store.parts_path.glob("*/*.tmp-*"):
                if re.search(_TMP_SUFFIX_RE + "$", path.name):
                    path.unlink(missing_ok=True)

    def _require_lock(self) -> None:
        if self._lock is None:
            raise StoreError(
                f"writer for {self.store.path} is not open; use `with store.writer(...) as w:`"
            )

    # -- planning --------------------------------------------------------------------------

    def _old_entry(self) -> _Entry | None:
        """The committed entry, read once: only this writer's commit changes it under the lock."""
        if self._old is None:
            self._old = (self._read_old_entry(),)
        return self._old[0]

    def _read_old_entry(self) -> _Entry | None:
        if self._damaged or not self.store.path.exists():
            return None
        with self.store._open() as fh:
            group = fh.get(f"entries/{self.key}")
            return _Entry.read(group) if group is not None else None

    def existing(self) -> dict[str, str]:
        """Committed rows of this entry: id -> fingerprint."""
        self._require_lock()
        old = self._old_entry()
        return dict(zip(old.ids, old.fps, strict=True)) if old else {}

    def existing_skipped(self) -> dict[str, tuple[str, str]]:
        """Committed skipped files of this entry: id -> (fingerprint, reason)."""
        self._require_lock()
        old = self._old_entry()
        return {id_: (fp, reason) for id_, fp, reason in old.skipped} if old else {}

    def check_source(self, rows: Iterable[tuple[str, str]], *, drop_missing: bool = True) -> None:
        """Refuse to drop rows that another source put in this entry; call before computing.

        The entry records its source (the ``source`` attribute, e.g. ``folder:/abs/photos``).
        A commit from the same source drops the rows of deleted files, as it should; one from
        a different source would silently turn the entry into a copy of the new folder, so it
        is refused unless the writer was opened with ``replace=True``. Entries without a
        recorded source, or writers without one, are not checked.

        Parameters
        ----------
        rows : iterable of (id, fingerprint)
            The whole new source.
        drop_missing : bool
            As in :meth:`commit`: whether old ids missing from ``rows`` would be dropped.

        Raises
        ------
        StoreError
            Naming how many rows would be lost, both sources, and ``--replace``.
        """
        self._require_lock()
        self._refuse_lost_rows(self._old_entry(), rows, drop_missing, self.attrs)

    def _refuse_lost_rows(
        self,
        old: _Entry | None,
        rows: Iterable[tuple[str, str]],
        drop_missing: bool,
        attrs: Mapping[str, Any],
    ) -> None:
        theirs, ours = (old.attrs.get(_SOURCE_ATTR) if old else None), attrs.get(_SOURCE_ATTR)
        if self._replace or old is None or not theirs or not ours or theirs == ours:
            return
        new = dict(rows)
        # lost: dropped (missing from the new source) or replaced (same id, other content)
        lost = sum(
            new.get(id_, None if drop_missing else fp) != fp
            for id_, fp in zip(old.ids, old.fps, strict=True)
        )
        if lost:
            raise StoreError(
                f"entry {self.key} in {self.store.path} holds {lost} row(s) from {theirs} that "
                f"{ours} does not have; committing would drop them. Rerun with --replace "
                "(other_entries='replace') to drop them, or embed into another --out to keep both"
            )

    def check_space(self, n_rows: int, n_new: int, dim: int | None = None) -> None:
        """Refuse to start work that clearly cannot be committed for lack of disk space.

        Until the commit ends, the shards of the ``n_new`` rows to compute and the new store
        file of ``n_rows`` rows exist beside the old file. Only their features are counted (a
        lower bound), so a disk this refuses is certainly too full; the commit checks again
        with the exact size. ``dim`` defaults to ``attrs["dim"]``; nothing is checked while
        the width is unknown.

        Raises
        ------
        StoreError
            "no space left on device", naming the store, the space needed and the space free.
        """
        self._require_lock()
        dim = self.attrs.get("dim") if dim is None else dim
        if dim is None:
            return
        need = (int(n_rows) + int(n_new)) * int(dim) * np.dtype(self.dtype).itemsize
        free = shutil.disk_usage(self.store.path.parent).free
        if need > free:
            raise StoreError(
                f"cannot write store {self.store.path}: no space left on device (the features "
                f"alone need {need / 2**20:.1f} MiB in {self.store.path.parent}, "
                f"{free / 2**20:.1f} MiB free); free some space or choose another --out"
            )

    def shard_done(self, name: str) -> bool:
        """Whether shard ``name`` is already on disk (from this run or a killed earlier one)."""
        return (self.parts_dir / f"{_check_name('shard name', name)}.npz").is_file()

    # -- shards ----------------------------------------------------------------------------

    def write_shard(
        self,
        name: str,
        ids: Sequence[str],
        fingerprints: Sequence[str],
        features: np.ndarray,
        skipped: Sequence[tuple[str, str, str]] = (),
    ) -> None:
        """Persist one finished slice of work atomically; it survives a crash until commit.

        Parameters
        ----------
        name : str
            Deterministic shard name (e.g. ``shard-00012-<digest>``); a rerun skips it.
        ids, fingerprints : sequence of str
            One per feature row.
        features : numpy.ndarray
            ``(len(ids), dim)``; cast to the store dtype here.
        skipped : sequence of (id, fingerprint, reason)
            Files of this slice that could not be embedded.

        Notes
        -----
        Rows holding a NaN or an infinity after the cast to the store dtype (a broken weights
        file, or float16 overflow) are not stored: they become skipped records with the reason
        ``"non-finite features"``, so no engine can put them where a head would fit on them.

        Raises
        ------
        StoreError
            The shard cannot be written (the message names it; "no space left on device").
        """
        self._require_lock()
        _check_name("shard name", name)
        ids, fps = [str(i) for i in ids], [str(f) for f in fingerprints]
        feats = np.asarray(features)
        if feats.ndim != 2 or feats.shape[0] != len(ids) or len(fps) != len(ids):
            raise ConfigError(
                f"shard {name}: expected features (n, dim) with n = len(ids) = len(fingerprints); "
                f"got features {feats.shape}, {len(ids)} ids, {len(fps)} fingerprints"
            )
        dim = self.attrs.get("dim")
        if dim is not None and ids and feats.shape[1] != int(dim):
            raise ConfigError(f"shard {name}: features have dim {feats.shape[1]}, attrs say {dim}")
        skips = [(str(i), str(f), str(r)) for i, f, r in skipped]
        with np.errstate(over="ignore"):  # float16 overflow gives inf, caught just below
            feats = feats.astype(self.dtype, copy=False)
        bad = non_finite_rows(feats)
        if bad.any():
            skips += [(ids[r], fps[r], NON_FINITE_REASON) for r in np.flatnonzero(bad)]
            keep = np.flatnonzero(~bad)
            ids, fps, feats = [ids[r] for r in keep], [fps[r] for r in keep], feats[keep]
        arrays = {
            "features": feats,
            "dim": np.int64(feats.shape[1]),
            "ids": np.array(ids, dtype=str),
            "fingerprints": np.array(fps, dtype=str),
            "skipped_ids": np.array([s[0] for s in skips], dtype=str),
            "skipped_fingerprints": np.array([s[1] for s in skips], dtype=str),
            "skipped_reasons": np.array([s[2] for s in skips], dtype=str),
        }
        target = self.parts_dir / f"{name}.npz"
        try:
            self.parts_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(target, lambda fh: np.savez(fh, **arrays))
        except OSError as exc:  # the temp file is gone; earlier shards stay for a rerun
            raise write_error("shard", target, exc) from exc

    def discard_parts(self) -> None:
        """Delete this key's uncommitted shards (and the parts folder once empty)."""
        self._require_lock()
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        try:
            self.store.parts_path.rmdir()
        except OSError:
            pass  # missing, or other keys still have parts

    # -- commit ----------------------------------------------------------------------------

    def commit(
        self,
        order: Sequence[tuple[str, str, int]],
        class_names: Sequence[str],
        *,
        drop_missing: bool = True,
        extra_attrs: Mapping[str, Any] | None = None,
        drop_other_entries: bool = False,
    ) -> CommitResult:
        """Merge committed rows and shards into a new store file and swap it in atomically.

        Parameters
        ----------
        order : sequence of (id, fingerprint, label)
            The whole source, in source order. Each id takes, by priority: a shard row with the
            same fingerprint (newest shard first), the old row with the same fingerprint, a
            skipped record with the same fingerprint. Labels come from here, not from the cache.
        class_names : sequence of str
            Names for label indices.
        drop_missing : bool
            True drops old rows and skipped records whose ids are not in ``order`` (deleted
            files); False keeps them after the others, in their old order.
        extra_attrs : mapping, optional
            More entry attributes (override those given to :meth:`FeatureStore.writer`).
        drop_other_entries : bool
            True leaves only this entry in the file (``embed --replace``) and deletes the
            uncommitted shards of other keys; False copies other entries unchanged.

        Returns
        -------
        CommitResult
            ``changed=False`` when the entry would come out identical; the file is untouched.

        Raises
        ------
        StoreError
            An id has neither features nor a skipped record with its fingerprint (a bug in
            the caller's planning), or shards are unreadable or of different widths.
        """
        self._require_lock()
        names = [str(c) for c in class_names]
        extra = dict(extra_attrs or {})
        _encode_attrs(extra)
        shards = _Shards.scan(self.parts_dir)
        source = {**self.attrs, **extra}.get(_SOURCE_ATTR)
        if self._damaged and len(self._group) > 1:  # a sibling's commit may have rebuilt it
            self._damaged = self._check_existing(quiet=True)
        with ExitStack() as stack:
            readable = self.store.path.exists() and not self._damaged
            src = stack.enter_context(self.store._open()) if readable else None
            old_group = src.get(f"entries/{self.key}") if src is not None else None
            old = _Entry.read(old_group) if old_group is not None else None
            plan = _make_plan(order, len(names), shards, old, drop_missing, self.store.path)
            pairs = ((str(item[0]), str(item[1])) for item in order)  # valid: planned above
            self._refuse_lost_rows(old, pairs, drop_missing, {**self.attrs, **extra})
            others = [k for k in src.get("entries", {}) if k != self.key] if src else []
            keep = set(others) if not drop_other_entries else set(others) & self._group
            changed = not (
                old is not None
                and len(keep) == len(others)
                and not shards.paths
                and plan.same_as(old, names)
                and all(old.attrs.get(k) == _normalise_attr(v) for k, v in extra.items())
                and (source is None or old.attrs.get(_SOURCE_ATTR) == source)
            )
            if changed:
                old_ds = old_group["features"] if old_group is not None else None
                self._write_file(src, keep, old_ds, old, plan, shards, names, extra)
        self._old = None
        if drop_other_entries:
            for folder in self.store.parts_path.glob("*"):
                if folder.name in self._group:
                    continue
                if folder.is_dir():
                    shutil.rmtree(folder, ignore_errors=True)
                else:
                    folder.unlink(missing_ok=True)
        self.discard_parts()
        n_old = len(old.ids) if old else 0
        return CommitResult(
            n_rows=len(plan.ids),
            n_new=plan.n_new,
            n_reused=plan.n_reused,
            n_dropped=n_old - plan.n_reused - plan.n_replaced,
            n_skipped=len(plan.skipped),
            changed=changed,
        )

    def _write_file(
        self,
        src: h5py.File | None,
        keep: set[str],
        old_ds: h5py.Dataset | None,
        old: _Entry | None,
        plan: _Plan,
        shards: _Shards,
        class_names: list[str],
        extra: dict[str, Any],
    ) -> None:
        """Write a complete new file beside the old one, fsync it, then ``os.replace`` it."""
        path = self.store.path
        dim = self._output_dim(plan, shards, old)
        need = self._estimate_bytes(src, keep, old_ds, plan, dim)
        try:
            # h5py needs a file name and has no fsync: atomic_path fsyncs the closed file.
            with atomic_path(path) as tmp:
                with h5py.File(tmp, "w-", locking=False):
                    pass
                reserve(tmp, need)
                # No chunk cache: each block reaches the OS when written, so a failed write
                # raises right there and the file still closes cleanly (store_checks.reserve).
                with h5py.File(tmp, "r+", locking=False, rdcc_nbytes=0) as dst:
                    if src is not None:
                        _copy_store(src, dst, keep)
                    dst.attrs["featurepipe_store_version"] = STORE_FORMAT_VERSION
                    dst.attrs["featurepipe_version"] = featurepipe_version()
                    group = dst.require_group("entries").create_group(self.key)
                    _write_features(group, plan, dim, self.dtype, old_ds, shards.paths)
                    _write_index(group, plan, class_names)
                    self._write_attrs(group, old, len(plan.ids), dim, extra)
                    dst.flush()
        except StoreError:
            raise
        except (OSError, RuntimeError) as exc:  # h5py reports failed writes as either
            error = write_error("store", path, exc)
            if "no space left" in str(error):
                free = shutil.disk_usage(path.parent).free
                error = StoreError(
                    f"{error} (needs about {need / 2**20:.1f} MiB in {path.parent}, "
                    f"{free / 2**20:.1f} MiB free); the old store is unchanged"
                )
            raise error from exc

    def _estimate_bytes(
        self,
        src: h5py.File | None,
        keep: set[str],
        old_ds: h5py.Dataset | None,
        plan: _Plan,
        dim: int,
    ) -> int:
        """An upper bound of the new file's size: its rows, its index, the entries it copies."""
        n = len(plan.ids)
        chunk = min(n, 512) or 1  # as _write_features lays the rows out
        features = -(-n // chunk) * chunk * dim * np.dtype(self.dtype).itemsize
        # a variable-length string: a 16-byte reference plus a 16-byte heap header, 8-aligned
        strings = [*plan.ids, *plan.fps, *(text for record in plan.skipped for text in record)]
        index = 8 * n + sum(40 + len(text.encode("utf-8")) for text in strings)
        copied = 0
        if src is not None and keep:
            ours = old_ds.id.get_storage_size() if old_ds is not None else 0
            copied = max(0, self.store.path.stat().st_size - ours)
        return int(1.1 * (features + index + copied)) + _SPACE_SLACK

    def _output_dim(self, plan: _Plan, shards: _Shards, old: _Entry | None) -> int:
        """Feature width: from the rows used; from attrs["dim"] when there are no rows."""
        used = np.unique(np.frombuffer(plan.src, np.int64)).tolist()
        dims = {shards.dims[s] for s in used if s >= 0}
        if -1 in used and old is not None:
            dims.add(old.dim)
        if self.attrs.get("dim") is not None:
            dims.add(int(self.attrs["dim"]))
        if len(dims) > 1 and plan.ids:
            raise StoreError(
                f"entry {self.key} in {self.store.path}: rows of different widths {sorted(dims)}; "
                "discard the parts (or delete the entry) and re-embed"
            )
        if not plan.ids:
            dim = self.attrs.get("dim")
            return int(dim) if dim is not None else (old.dim if old else 0)
        return dims.pop()

    def _write_attrs(
        self, group: h5py.Group, old: _Entry | None, n_rows: int, dim: int, extra: dict
    ) -> None:
        now = _utcnow()
        ours = {
            "key": self.key,
            "n_rows": n_rows,
            "dim": dim,
            "created": old.attrs.get("created", now) if old else now,
            "updated": now,
            "feature_format_version": FEATURE_FORMAT_VERSION,
        }
        # a writer that knows no source (a path list) leaves the recorded one in place
        kept = {}
        if old is not None and {**self.attrs, **extra}.get(_SOURCE_ATTR) is None:
            kept = {_SOURCE_ATTR: old.attrs.get(_SOURCE_ATTR)}
        values, json_names = _encode_attrs({**self.attrs, **kept, **extra, **ours})
        values[_JSON_ATTRS] = json.dumps(sorted(json_names))
        for name, value in values.items():
            group.attrs[name] = value


def _copy_store(src: h5py.File, dst: h5py.File, keep: set[str]) -> None:
    """Copy root attributes, root members and the entries in ``keep``, untouched (H5Ocopy)."""
    for name, value in src.attrs.items():
        dst.attrs[name] = value
    for name, obj in src.items():
        if name != "entries":
            src.copy(obj, dst, name=name)
    entries = dst.create_group("entries")
    for name, obj in src.get("entries", {}).items():
        if name in keep:
            src.copy(obj, entries, name=name)


def _write_features(
    group: h5py.Group,
    plan: _Plan,
    dim: int,
    dtype: str,
    old_ds: h5py.Dataset | None,
    shard_paths: list[Path],
) -> None:
    """Fill ``features`` block by block from old rows (sorted reads) and shards (LRU of 2)."""
    n = len(plan.ids)
    layout: dict[str, Any] = {}
    if dim > 0:  # a chunk dimension must be >= 1 and <= a fixed max dimension
        layout = {"chunks": (min(n, 512) or 1, dim), "maxshape": (None, dim)}
    ds = group.create_dataset("features", shape=(n, dim), dtype=dtype, **layout)
    src, row = np.frombuffer(plan.src, np.int64), np.frombuffer(plan.row, np.int64)
    cache = _ShardCache(shard_paths)
    for start in range(0, n, _WRITE_BLOCK):
        s, r = src[start : start + _WRITE_BLOCK], row[start : start + _WRITE_BLOCK]
        block = np.empty((len(s), dim), dtype=dtype)
        from_old = s < 0
        if from_old.any() and old_ds is not None:
            block[from_old] = _gather(old_ds, r[from_old], dtype)
        for number in np.unique(s[~from_old]):
            mask = s == number
            block[mask] = cache.features(int(number))[r[mask]]
        ds[start : start + len(s)] = block


def _write_index(group: h5py.Group, plan: _Plan, class_names: list[str]) -> None:
    _write_strings(group, "ids", plan.ids)
    _write_strings(group, "fingerprints", plan.fps)
    group.create_dataset("labels", shape=(len(plan.labels),), dtype=np.int64)
    if len(plan.labels):
        group["labels"][...] = np.frombuffer(plan.labels, np.int64)
    _write_strings(group, "class_names", class_names)
    _write_strings(group, "skipped_ids", [s[0] for s in plan.skipped])
    _write_strings(group, "skipped_fingerprints", [s[1] for s in plan.skipped])
    _write_strings(group, "skipped_reasons", [s[2] for s in plan.skipped])
