"""Inputs to samples: folders, CSV manifests, path lists, arrays, PIL images and IDX files as one
ImageSource.

An :class:`ImageSource` is an ordered list of :class:`Sample` (a stable ``id`` that keys the
feature store, an int ``label`` with ``-1`` for unlabelled, a file ``path`` or an array ``index``)
plus the class names. It opens nothing until :meth:`ImageSource.load` is called, holds no file
handles, and pickles as a few flat columns, so DataLoader workers and Ray tasks get it cheaply.

Label rules (shared by every kind of source):

* string labels -> ``class_names`` = sorted unique strings, labels = their positions;
* int labels without ``class_names`` -> ``class_names`` = ``[str(c) for c in sorted unique]``;
  the values stay as they are when they already are ``0..K-1``, otherwise they are mapped to
  their positions (``{1, 2, 5}`` -> ``0, 1, 2`` named ``"1", "2", "5"``);
* with ``class_names`` given, strings must be among them and ints must index them, so two sources
  (train and test folders, say) get the same mapping even when one lacks a class;
* ``-1`` (or an empty manifest cell) means unlabelled.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import os
import posixpath
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from featurepipe.decode import (
    IMAGE_EXTENSIONS,
    DecodePolicy,
    array_to_image,
    check_image_array,
    decode_image,
    decode_image_tensor,
    image_to_rgb,
)
from featurepipe.display import escape
from featurepipe.exceptions import ConfigError, SourceError

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "KINDS",
    "ImageSource",
    "Sample",
    "encode_labels",
    "load_fashion_mnist",
    "open_source",
    "read_idx",
    "safe_id",
]

KINDS = ("folder", "flat", "manifest", "paths", "array", "idx", "pil")

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot"]
#: Where the Debian package ``dataset-fashion-mnist`` installs the IDX files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist/"

# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/ format).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_NAME = re.compile(r"-ubyte(\.gz)?$", re.IGNORECASE)
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class Sample:
    """One image of a source.

    ``id`` is the stable key in the feature store: the POSIX path relative to the source root,
    the path as given (path lists) or ``<name>[<i>]`` (array and IDX rows, PIL images). ``label``
    is an int (``-1`` = unlabelled). Exactly one of ``path`` (absolute file path) and ``index``
    (row in the source's array, or position in its list of PIL images) is set.
    """

    id: str
    label: int = -1
    path: str | None = None
    index: int | None = None


class ImageSource:
    """An ordered, labelled collection of images that opens nothing until asked.

    Parameters
    ----------
    samples : iterable of Sample
        In source order. File samples need ``path``; array samples need ``index`` and ``array``.
    class_names : sequence of str, optional
        Names of labels ``0..K-1``.
    root : str, optional
        The folder ids are relative to (None for path lists and arrays).
    kind : {"folder", "flat", "manifest", "paths", "array", "idx", "pil"}
        Where the samples came from.
    array : numpy.ndarray, optional
        ``(N, H, W)`` or ``(N, H, W, C)`` pixels for array/IDX samples.
    images : sequence of PIL.Image.Image, optional
        In-memory images (any mode and size) for ``"pil"`` samples, whose ``index`` points
        into it. Decoded by :func:`~featurepipe.decode.image_to_rgb`, the file rules.

    Notes
    -----
    Stored as flat columns (ids, labels, paths or row indices); :attr:`samples` is built on first
    use. Pickling sends the columns only, so a worker that just calls :meth:`load` never builds
    a million Sample objects.
    """

    def __init__(
        self,
        samples: Iterable[Sample],
        class_names: Sequence[str] | None = None,
        *,
        root: str | None = None,
        kind: str = "paths",
        array: np.ndarray | None = None,
        images: Sequence[Image.Image] | None = None,
    ) -> None:
        samples = list(samples)
        if kind not in KINDS:
            raise ConfigError(f"ImageSource kind must be one of {', '.join(KINDS)}; got {kind!r}")
        self.class_names = [] if class_names is None else [str(c) for c in class_names]
        self.root = root
        self.kind = kind
        self._array = array
        self._images = None if images is None else list(images)
        self._ids = [s.id for s in samples]
        self._labels = np.fromiter((s.label for s in samples), dtype=np.int64, count=len(samples))
        if array is None and images is None:
            self._paths: list[str] | None = [_need(s.path, s, "path") for s in samples]
            self._rows: np.ndarray | None = None
        else:
            self._paths = None
            self._rows = np.fromiter((_need(s.index, s, "index") for s in samples),
                                     dtype=np.int64, count=len(samples))
        self._samples: list[Sample] | None = samples

    # -- columns ---------------------------------------------------------------------------

    @property
    def paths(self) -> list[str] | None:
        """File path of every sample, or None for array sources."""
        return self._paths

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return (f"ImageSource(kind={self.kind!r}, n={len(self)}, "
                f"classes={len(self.class_names)}, root={self.root!r})")

    @property
    def samples(self) -> list[Sample]:
        """The samples in source order (built on first access; treat as read-only)."""
        if self._samples is None:
            labels = self._labels.tolist()
            if self._paths is not None:
                self._samples = [Sample(i, lab, p, None)
                                 for i, lab, p in zip(self._ids, labels, self._paths, strict=True)]
            else:
                rows = self._rows.tolist() if self._rows is not None else []
                self._samples = [Sample(i, lab, None, r)
                                 for i, lab, r in zip(self._ids, labels, rows, strict=True)]
        return self._samples

    @property
    def ids(self) -> list[str]:
        """Sample ids in source order (the feature-store keys)."""
        return list(self._ids)

    @property
    def labels(self) -> np.ndarray:
        """Labels as a read-only int64 array (``-1`` = unlabelled)."""
        view = self._labels.view()
        view.flags.writeable = False
        return view

    @property
    def array(self) -> np.ndarray | None:
        """The pixel array of array/IDX sources (None for file sources)."""
        return self._array

    @property
    def images(self) -> list[Image.Image] | None:
        """The PIL images of a ``"pil"`` source (None for the other kinds)."""
        return self._images

    # -- per sample ------------------------------------------------------------------------

    def load(self, i: int, policy: DecodePolicy | None = None,
             target_size: int | Sequence[int] | None = None) -> Image.Image:
        """Sample ``i`` as an RGB image.

        Parameters
        ----------
        i : int
            Position in the source.
        policy : DecodePolicy, optional
            Passed to :func:`~featurepipe.decode.decode_image` (arrays use its background).
        target_size : int, optional
            Shorter side the caller will resize to (lets JPEGs decode at reduced scale).

        Returns
        -------
        PIL.Image.Image
            Mode ``"RGB"``.

        Raises
        ------
        DecodeError
            When a file is missing or cannot be decoded.
        """
        if self._paths is not None:
            return decode_image(self._paths[i], policy, target_size)
        if self._images is not None:
            return image_to_rgb(self._image(i), policy, self._ids[i])
        return array_to_image(self._row(i), policy)

    def load_tensor(self, i: int, policy: DecodePolicy | None = None,
                    target_size: int | Sequence[int] | None = None) -> Any:
        """Sample ``i`` as a uint8 tensor ``(3, H, W)``: the pixels of :meth:`load`.

        Files go through :func:`~featurepipe.decode.decode_image_tensor`, which decodes plain
        JPEGs without Pillow (the embedding engines' hot path).
        """
        if self._paths is not None:
            return decode_image_tensor(self._paths[i], policy, target_size)
        from torchvision.transforms.v2.functional import pil_to_tensor

        return pil_to_tensor(self.load(i, policy))

    def fingerprint(self, i: int, content_hash: bool = False) -> str:
        """What identifies the current content of sample ``i``; a change means re-embed.

        Parameters
        ----------
        i : int
            Position in the source.
        content_hash : bool, default False
            Files: hash the bytes (``"sha256:<hex>"``) instead of the cheap ``"size:mtime_ns"``.
            Array rows and PIL images are always hashed.

        Returns
        -------
        str
            ``"size:mtime_ns"``, ``"sha256:<hex>"``, ``"missing"`` for a file that is gone,
            ``"unreadable"`` for one that cannot be read, or ``"blake2b:<16 hex>"`` of an array
            row's bytes, shape and dtype (of a PIL image's pixels, mode, size, palette,
            transparency and orientation).
        """
        if self._images is not None:
            return _image_fingerprint(self._image(i))
        if self._paths is None:
            return _row_fingerprint(self._row(i))
        path = self._paths[i]
        try:
            if content_hash:
                return "sha256:" + _sha256_file(path)
            st = os.stat(path)
        except FileNotFoundError:
            return "missing"
        except OSError:
            return "unreadable"
        return f"{st.st_size}:{st.st_mtime_ns}"

    def require_unique_ids(self) -> None:
        """Raise SourceError naming the first id listed twice.

        A feature store keeps one row per id, so whatever writes one calls this before any work
        (a folder scan and a CSV manifest give unique ids already; a path list may repeat a
        path, which is fine for prediction or resampling but not for a store).

        Raises
        ------
        SourceError
            Naming the id (the path as given) and both positions.
        """
        first: dict[str, int] = {}
        for pos, id_ in enumerate(self._ids):
            other = first.setdefault(id_, pos)
            if other != pos:
                raise SourceError(f"{escape(id_)} is listed twice (items {other} and {pos}); "
                                  "a feature store keeps one row per image, so list each once")

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageSource:
        """A new source with the samples at ``indices`` (ints or a boolean mask), in that order.

        Array sources share the same pixel array (no copy).
        """
        idx = np.asarray(indices)
        if idx.dtype == np.bool_:
            if idx.shape != (len(self),):
                raise ConfigError(f"boolean mask has shape {idx.shape}; expected ({len(self)},)")
            idx = np.flatnonzero(idx)
        elif idx.size and idx.dtype.kind not in "iu":
            raise ConfigError(f"subset indices must be ints or a boolean mask; got {idx.dtype}")
        picks = idx.astype(np.int64).ravel().tolist()
        new = ImageSource.__new__(ImageSource)
        new.__dict__.update(self.__dict__)
        new._ids = [self._ids[k] for k in picks]
        new._labels = self._labels[picks]
        new._paths = None if self._paths is None else [self._paths[k] for k in picks]
        new._rows = None if self._rows is None else self._rows[picks]
        new.class_names = list(self.class_names)
        new._samples = None
        return new

    def _row(self, i: int) -> np.ndarray:
        if self._array is None or self._rows is None:
            raise ConfigError(f"{self!r} has no array rows")
        return self._array[int(self._rows[i])]

    def _image(self, i: int) -> Image.Image:
        if self._images is None or self._rows is None:
            raise ConfigError(f"{self!r} has no PIL images")
        return self._images[int(self._rows[i])]

    # -- pickling: columns only ------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_samples"] = None
        return state


def _need(value: Any, sample: Sample, what: str) -> Any:
    if value is None:
        raise ConfigError(f"sample {sample.id!r} has no {what}; file sources need paths, "
                          f"array sources need row indices")
    return value


def safe_id(name: str) -> str:
    """A sample id that any UTF-8 store can hold, made from a file name or path.

    Linux file names are bytes; one that is not valid UTF-8 reaches Python with each bad byte
    as a lone surrogate (:func:`os.fsdecode`), which HDF5's UTF-8 strings cannot hold. Such a
    byte becomes the four characters ``\\xNN`` in the id (the file's ``path`` keeps the real
    name); every valid UTF-8 name is its own id, unchanged.

    Examples
    --------
    >>> safe_id("cat/a.jpg")
    'cat/a.jpg'
    >>> safe_id(os.fsdecode(b"cat/caf\\xe9.jpg"))
    'cat/caf\\\\xe9.jpg'
    """
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")
    return name


def _row_fingerprint(row: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=8)
    h.update(np.ascontiguousarray(row).data)
    h.update(repr((row.shape, row.dtype.str)).encode())
    return "blake2b:" + h.hexdigest()


def _image_fingerprint(img: Image.Image) -> str:
    """What decides a PIL image's pixels: its pixel bytes plus what :func:`image_to_rgb` reads
    beside them. An image that cannot be loaded (opened lazily from a file cut short) is hashed
    from its header and the error, so it keeps one id and fails again with its reason."""
    h = hashlib.blake2b(digest_size=8)
    h.update(repr((img.mode, img.size, img.format)).encode())
    try:
        h.update(img.tobytes())
        h.update(bytes(img.getpalette(rawmode=None) or b""))
        h.update(repr((img.info.get("transparency"), img.getexif().get(0x0112))).encode())
    except Exception as exc:  # noqa: BLE001 - decoding reports it; the id must still exist
        h.update(f"unreadable: {type(exc).__name__}: {exc}".encode())
    return "blake2b:" + h.hexdigest()


def _sha256_file(path: str) -> str:
    """The file's sha256; OSError for anything but a regular file, which is never opened (a
    FIFO would block the open)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(f"{path}: not a regular file")
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


# -- open_source ---------------------------------------------------------------------------


def open_source(
    obj: Any,
    labels: Sequence[Any] | np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
) -> ImageSource:
    """Turn anything featurepipe accepts as images into an :class:`ImageSource`.

    Parameters
    ----------
    obj : str, PathLike, sequence of paths or PIL images, numpy.ndarray or ImageSource
        * a folder with one subfolder per class (class names = sorted subfolder names, images
          found recursively, ids ``"cat/001.jpg"``), or a folder of images only (``"flat"``,
          unlabelled). Only names with a suffix in ``IMAGE_EXTENSIONS`` count (whatever they
          are: a FIFO or a broken link named ``x.jpg`` is kept and skipped with its reason when
          decoded); hidden files and folders (leading ``.``) are ignored. Symlinks, to files
          and to folders, are followed, with two guards: a folder link back to a folder being
          scanned (a loop) is not entered again, and one file reached through two paths (say
          ``cat/dogs -> ../dog``, which would give the dog images a second, wrong label) is a
          SourceError naming both. A name that is not valid UTF-8 gets an id by
          :func:`safe_id`.
        * a ``.csv`` manifest with a ``path`` column and an optional ``label`` column; absolute
          paths are used as they are, relative ones are joined to the CSV's folder (``../``
          included: a manifest may point beside its folder, as a shell path would); ids are
          the paths as written (POSIX-normalised).
        * an IDX file (``*-idx3-ubyte[.gz]``); labels come from the matching ``*-labels-idx1-*``
          file next to it when present; ids ``"<file name without .gz>[<i>]"``, so a
          decompressed copy keeps the same ids.
        * a single image file, or a list/tuple of image paths (ids = the paths as given, by
          :func:`safe_id`; a path may repeat, see :meth:`ImageSource.require_unique_ids`).
        * an array ``(N, H, W)`` or ``(N, H, W, C)``, C in 1, 3, 4 (ids ``"array[<i>]"``;
          fingerprints hash the row contents, so a different array is never mistaken for it).
        * a list/tuple of PIL images, any modes and sizes (kind ``"pil"``, ids ``"image[<i>]"``,
          fingerprints hash the pixels as for arrays); a list mixing them with paths or arrays
          is refused.
        * an ImageSource, returned as is (relabelled when ``labels``/``class_names`` are given).
    labels : sequence of int or str, optional
        One label per sample; overrides labels found in the source. See the module docstring.
    class_names : sequence of str, optional
        Fixes the label order (see the module docstring).

    Returns
    -------
    ImageSource

    Raises
    ------
    SourceError
        Missing path, folder without images, malformed manifest or IDX file.
    ConfigError
        Unsupported object type, array shape/dtype, or labels that do not fit.

    Examples
    --------
    >>> import numpy as np
    >>> src = open_source(np.zeros((2, 8, 8), dtype=np.uint8), labels=["b", "a"])
    >>> src.kind, src.class_names, src.labels.tolist(), src.samples[0].id
    ('array', ['a', 'b'], [1, 0], 'array[0]')
    """
    if isinstance(obj, ImageSource):
        if labels is None and class_names is None:
            return obj
        return _relabel(obj, _named_labels(obj) if labels is None else labels, class_names)
    if isinstance(obj, np.ndarray):
        source = _from_array(obj)
    elif isinstance(obj, (str, os.PathLike)):
        source = _from_path(os.fspath(obj), class_names)
    elif isinstance(obj, (list, tuple)):
        source = _from_sequence(obj)
    else:
        hint = " (one PIL image? pass a list: [image])" if isinstance(obj, Image.Image) else ""
        raise ConfigError(f"cannot open {type(obj).__name__} as an image source; pass a folder, "
                          "a .csv manifest, an IDX file, a list of paths or PIL images or a numpy "
                          f"array{hint}")
    if labels is not None:
        return _relabel(source, labels, class_names)
    return _name_classes(source, class_names)


def _from_path(path: str, class_names: Sequence[str] | None) -> ImageSource:
    """Folder, manifest or IDX file; each applies ``class_names`` to the labels it finds."""
    if not os.path.exists(path):
        raise SourceError(f"no such file or directory: {path}")
    if os.path.isdir(path):
        return _from_folder(path, class_names)
    if not os.path.isfile(path):  # reading a FIFO to sniff its kind would block
        raise SourceError(f"{escape(path)}: not a folder or a regular file")
    if path.lower().endswith(".csv"):
        return _from_manifest(path, class_names)
    if _is_idx(path):
        return _from_idx(path, class_names)
    if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS:
        return _from_sequence([path])
    raise SourceError(f"{path}: not a folder, .csv manifest, IDX file or image file "
                      f"(image suffixes: {_ext_list()})")


def _name_classes(source: ImageSource, class_names: Sequence[str] | None) -> ImageSource:
    """Give an unlabelled source its class names (labels stay -1); no-op for None."""
    if class_names is None or list(class_names) == source.class_names:
        return source
    return _relabel(source, source.labels, class_names)


def _named_labels(source: ImageSource) -> list[Any]:
    """Labels as class-name strings (or -1), so a given ``class_names`` can remap them."""
    names = source.class_names
    return [names[v] if 0 <= v < len(names) else -1 for v in source.labels.tolist()]


def _relabel(source: ImageSource, labels: Any, class_names: Sequence[str] | None) -> ImageSource:
    values = _as_label_list(labels)
    if len(values) != len(source):
        raise ConfigError(f"labels has {len(values)} entries but the source has "
                          f"{len(source)} samples")
    codes, names = encode_labels(values, class_names)
    new = source.subset(np.arange(len(source)))
    new._labels = codes
    new.class_names = names
    return new


def _as_label_list(labels: Any) -> list[Any]:
    if isinstance(labels, (str, bytes)):
        raise ConfigError("labels must be a sequence with one label per sample, not a string")
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ConfigError(f"labels must be one-dimensional; got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ConfigError("float labels must be whole numbers; pass ints or class-name strings")
        arr = arr.astype(np.int64)
    if arr.dtype.kind == "b":
        arr = arr.astype(np.int64)
    return arr.tolist()


def encode_labels(values: Sequence[Any],
                  class_names: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Map labels (ints or strings, ``-1``/``None``/``""`` = unlabelled) to int codes and names.

    Parameters
    ----------
    values : sequence of int or str
        One label per sample.
    class_names : sequence of str, optional
        Fixed class order; otherwise derived as described in the module docstring.

    Returns
    -------
    codes : numpy.ndarray of int64
    class_names : list of str
    """
    present = [v for v in values if not _unlabelled(v)]
    if any(isinstance(v, str) for v in present):
        if not all(isinstance(v, str) for v in present):
            raise ConfigError("labels mix strings and numbers; use one or the other")
        return _encode_strings(values, sorted(set(present)) if class_names is None
                               else [str(c) for c in class_names])
    bad = next((v for v in present if not _is_intlike(v)), None)
    if bad is not None:
        raise ConfigError(f"labels must be ints or strings; got {type(bad).__name__} {bad!r}")
    ints = np.asarray([-1 if _unlabelled(v) else int(v) for v in values], dtype=np.int64)
    return _encode_ints(ints.reshape(-1), class_names)


def _unlabelled(v: Any) -> bool:
    return v is None or (isinstance(v, str) and v == "") or (_is_intlike(v) and int(v) == -1)


def _encode_strings(values: Sequence[Any], names: list[str]) -> tuple[np.ndarray, list[str]]:
    lookup = {n: k for k, n in enumerate(names)}
    unknown = sorted({v for v in values if not _unlabelled(v) and v not in lookup})
    if unknown:
        raise ConfigError(f"labels not in class_names {names}: {unknown[:5]}")
    codes = [-1 if _unlabelled(v) else lookup[v] for v in values]
    return np.asarray(codes, dtype=np.int64).reshape(-1), names


def _encode_ints(ints: np.ndarray,
                 class_names: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    if class_names is not None:
        names = [str(c) for c in class_names]
        bad = ints[(ints < -1) | (ints >= len(names))]
        if bad.size:
            raise ConfigError(f"int labels must lie in 0..{len(names) - 1} to index "
                              f"class_names; got {bad[0]}")
        return ints, names
    uniq = np.unique(ints[ints != -1])
    names = [str(c) for c in uniq.tolist()]
    if np.array_equal(uniq, np.arange(len(uniq))):
        return ints, names
    return np.where(ints == -1, -1, np.searchsorted(uniq, ints)).astype(np.int64), names


def _is_intlike(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


# -- folders -------------------------------------------------------------------------------


def _from_folder(root: str, class_names: Sequence[str] | None = None) -> ImageSource:
    root = os.path.abspath(root)
    subdirs, loose = _list_dir(root)
    classes = [(name, files) for name in subdirs
               if (files := _scan_images(os.path.join(root, name), {_dir_key(root)}))]
    if classes and loose:
        shown = ", ".join(escape(name) for name, _ in classes[:5])
        raise SourceError(
            f"{escape(root)}: {len(loose)} image(s) (e.g. {escape(loose[0].rel)}) lie directly "
            f"in the folder next to class folders ({shown}); move them into a class folder, or "
            "pass a CSV manifest or a list of paths")
    if classes:
        # Class names go into the store like ids, so a folder name that is not UTF-8 is made safe.
        names = ([safe_id(name) for name, _ in classes] if class_names is None
                 else list(class_names))
        code = {name: k for k, name in enumerate(names)}
        unknown = [safe_id(name) for name, _ in classes if safe_id(name) not in code]
        if unknown:
            raise SourceError(f"{escape(root)}: class folders {unknown[:5]} are not in "
                              f"class_names {names}")
        found = [(f"{name}/{f.rel}", code[safe_id(name)], f)
                 for name, files in classes for f in files]
        _refuse_reached_twice(root, [(sid, f.real) for sid, _, f in found])
        samples = [Sample(safe_id(sid), label, os.path.join(root, *sid.split("/")))
                   for sid, label, _ in found]
        return ImageSource(samples, names, root=root, kind="folder")
    if loose:
        _refuse_reached_twice(root, [(f.rel, f.real) for f in loose])
        samples = [Sample(safe_id(f.rel), -1, os.path.join(root, f.rel)) for f in loose]
        return ImageSource(samples, class_names, root=root, kind="flat")
    raise SourceError(f"no images found in {root} (looked for {_ext_list()}, case-insensitive, "
                      "in the folder and its subfolders; hidden files are ignored)")


@dataclass(frozen=True)
class _Found:
    """An image file found by a folder scan: its path relative to the scanned folder and where
    it really lives (real folder's device and inode, file name; None when that cannot be told,
    e.g. a symlink loop, which decoding then reports)."""

    rel: str
    real: tuple[int, int, str] | None


def _list_dir(folder: str) -> tuple[list[str], list[_Found]]:
    """Sorted visible subfolder names and image-named entries directly in ``folder``.

    Every image-named entry that is not a folder counts, whatever it is (FIFO, dangling or
    looping symlink, device): decoding then skips it with a reason the user sees, rather than
    the scan dropping it unseen.
    """
    dirs: list[str] = []
    files: list[_Found] = []
    try:
        folder_key = _dir_key(folder)
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                try:
                    is_dir = entry.is_dir()
                except OSError:  # a symlink loop: not a folder we can enter
                    is_dir = False
                if is_dir:
                    dirs.append(entry.name)
                elif _is_image_name(entry.name):
                    real = (*folder_key, entry.name)
                    files.append(_Found(entry.name, _real_file(entry.path)
                                        if entry.is_symlink() else real))
    except OSError as exc:
        raise SourceError(f"{escape(folder)}: cannot list folder: {exc.strerror or exc}") from None
    return sorted(dirs), sorted(files, key=lambda f: f.rel)


def _real_file(path: str) -> tuple[int, int, str] | None:
    """Where a symlinked file really lives, as (folder device, folder inode, name)."""
    try:
        real = os.path.realpath(path, strict=True)  # strict: a loop or dangling link raises
        return (*_dir_key(os.path.dirname(real)), os.path.basename(real))
    except (OSError, SourceError):
        return None


def _scan_images(folder: str, seen: set[tuple[int, int]]) -> list[_Found]:
    """Image files under ``folder``, recursively, sorted by their POSIX path relative to it.

    Symlinked folders are followed; ``seen`` holds the device/inode pairs of the folders on the
    way down, so a link back to one of them (a loop) is not entered again.
    """
    key = _dir_key(folder)
    if key in seen:
        return []
    seen = seen | {key}
    dirs, files = _list_dir(folder)
    found = list(files)
    for name in dirs:
        found.extend(_Found(f"{name}/{f.rel}", f.real)
                     for f in _scan_images(os.path.join(folder, name), seen))
    return sorted(found, key=lambda f: f.rel)


def _refuse_reached_twice(root: str, found: Sequence[tuple[str, tuple[int, int, str] | None]]
                          ) -> None:
    """SourceError naming both paths when one file is reached twice (through a symlink).

    In a class folder that would embed the same image twice, and under a second label when the
    link crosses into another class (``cat/dogs -> ../dog``).
    """
    first: dict[tuple[int, int, str], str] = {}
    for rel, real in found:
        if real is None:
            continue
        other = first.setdefault(real, rel)
        if other != rel:
            raise SourceError(
                f"{escape(root)}: {escape(other)} and {escape(rel)} are the same file (reached "
                "twice through a symlink); remove the link, or pass a CSV manifest or a list "
                "of paths")


def _dir_key(folder: str) -> tuple[int, int]:
    try:
        st = os.stat(folder)
    except OSError as exc:
        raise SourceError(f"{escape(folder)}: cannot open folder: {exc.strerror or exc}") from None
    return st.st_dev, st.st_ino


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _ext_list() -> str:
    return " ".join(sorted(IMAGE_EXTENSIONS))


# -- manifests -----------------------------------------------------------------------------


def _from_manifest(csv_path: str, class_names: Sequence[str] | None = None) -> ImageSource:
    csv_path = os.path.abspath(csv_path)
    folder = os.path.dirname(csv_path)
    rows = _read_manifest(csv_path)
    samples = [Sample(rel, -1, rel if posixpath.isabs(rel)
                      else os.path.join(folder, *rel.split("/"))) for _, rel, _ in rows]
    source = ImageSource(samples, [], root=folder, kind="manifest")
    texts = [label for _, _, label in rows]
    if not any(texts):
        return _name_classes(source, class_names)
    try:
        return _relabel(source, _parse_labels(texts), class_names)
    except ConfigError as exc:
        raise SourceError(f"{csv_path}: {exc}") from None


def _read_manifest(csv_path: str) -> list[tuple[int, str, str]]:
    """(line number, normalised POSIX path, label text) per data row; SourceError if malformed."""
    rows: list[tuple[int, str, str]] = []
    first_line: dict[str, int] = {}
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise SourceError(f"{csv_path}: empty manifest; "
                                  "expected a header line 'path,label'")
            cols = [h.strip().lower() for h in header]
            if "path" not in cols:
                raise SourceError(f"{csv_path}, line 1: no 'path' column in header {header}; "
                                  "expected 'path' and optionally 'label'")
            p_col = cols.index("path")
            l_col = cols.index("label") if "label" in cols else None
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue  # blank line
                line = reader.line_num
                raw = row[p_col].strip() if p_col < len(row) else ""
                if not raw:
                    raise SourceError(f"{csv_path}, line {line}: empty path")
                rel = posixpath.normpath(raw.replace("\\", "/"))
                if rel in first_line:
                    raise SourceError(f"{csv_path}, line {line}: {raw!r} already listed on "
                                      f"line {first_line[rel]}")
                first_line[rel] = line
                label = row[l_col].strip() if l_col is not None and l_col < len(row) else ""
                rows.append((line, rel, label))
    except UnicodeDecodeError:
        raise SourceError(f"{csv_path}: not UTF-8 text") from None
    except csv.Error as exc:
        raise SourceError(f"{csv_path}: malformed CSV: {exc}") from None
    if not rows:
        raise SourceError(f"{csv_path}: no rows after the header")
    return rows


def _parse_labels(texts: list[str]) -> list[int | str]:
    """Manifest cells are text: all whole numbers -> ints, otherwise all are class names.

    Empty cells stay ``""`` (unlabelled) either way.
    """
    try:
        return [int(t) if t else "" for t in texts]
    except ValueError:
        return list(texts)


# -- path lists and arrays -----------------------------------------------------------------


def _from_sequence(items: Sequence[Any]) -> ImageSource:
    if len(items) == 0:
        raise SourceError("empty list of images")
    if all(isinstance(x, np.ndarray) for x in items):
        shapes = {x.shape for x in items}
        if len(shapes) > 1:
            raise ConfigError(f"a list of arrays must share one shape to be stacked; got "
                              f"{sorted(shapes)[:3]}")
        return _from_array(np.stack(items))
    if any(isinstance(x, Image.Image) for x in items):
        return _from_images(items)
    bad = next((x for x in items if not isinstance(x, (str, os.PathLike))), None)
    if bad is not None:
        raise ConfigError(f"a list source must hold file paths (str or PathLike); found "
                          f"{type(bad).__name__}")
    samples = [Sample(safe_id(os.fspath(p)), -1, os.path.abspath(p)) for p in items]
    return ImageSource(samples, [], root=None, kind="paths")


def _from_images(items: Sequence[Any]) -> ImageSource:
    other = next((k for k, x in enumerate(items) if not isinstance(x, Image.Image)), None)
    if other is not None:
        raise ConfigError(f"a list of PIL images holds a {type(items[other]).__name__} at "
                          f"position {other}; pass one kind per list (all PIL images, all paths "
                          "or all arrays)")
    samples = [Sample(f"image[{i}]", -1, None, i) for i in range(len(items))]
    return ImageSource(samples, [], root=None, kind="pil", images=items)


def _from_array(arr: np.ndarray) -> ImageSource:
    if arr.ndim not in (3, 4) or len(arr) == 0:
        hint = " (one image? add a leading axis: arr[None])" if arr.ndim == 2 else ""
        raise ConfigError(f"an array source must be (N, H, W) or (N, H, W, C) with N >= 1; "
                          f"got shape {arr.shape} dtype {arr.dtype}{hint}")
    check_image_array(arr, batched=True)
    samples = [Sample(f"array[{i}]", -1, None, i) for i in range(len(arr))]
    return ImageSource(samples, [], root=None, kind="array", array=arr)


# -- IDX -----------------------------------------------------------------------------------


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (the MNIST / Fashion-MNIST format), gzipped or not.

    Parameters
    ----------
    path : str or PathLike
        The file; gzip is detected from its first bytes, not its name.

    Returns
    -------
    numpy.ndarray
        In native byte order, shaped by the header's dimensions.

    Raises
    ------
    SourceError
        Naming the file, for a bad magic number, an unknown type code, or too little/much data.
    """
    path = os.fspath(path)
    data = _read_maybe_gzip(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise SourceError(f"{path}: not an IDX file (bad magic number {data[:4].hex() or 'none'}; "
                          "expected 0000 followed by a type code and the number of dimensions)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise SourceError(f"{path}: IDX header too short for {ndim} dimensions")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - header != expected:
        raise SourceError(f"{path}: IDX data holds {len(data) - header} bytes; the header "
                          f"{dims} of {dtype.name} needs {expected}")
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=False)


def _read_maybe_gzip(path: str) -> bytearray:
    try:
        with open(path, "rb") as fh:
            gzipped = fh.read(2) == b"\x1f\x8b"
        opener = gzip.open if gzipped else open
        with opener(path, "rb") as fh:
            return bytearray(fh.read())
    except (OSError, EOFError) as exc:
        raise SourceError(f"{path}: cannot read IDX data: {exc}") from None


def _is_idx(path: str) -> bool:
    """An IDX file by name (``*-idx3-ubyte``, ``*-ubyte.gz``) or by its magic number."""
    if _IDX_NAME.search(os.path.basename(path)):
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return len(head) == 4 and head[:2] == b"\0\0" and head[2] in _IDX_DTYPES and 1 <= head[3] <= 4


def _labels_file(images_path: str) -> str | None:
    """The labels file next to an images file, Fashion-MNIST naming, gzipped or not."""
    folder, name = os.path.split(images_path)
    base = name[:-3] if name.lower().endswith(".gz") else name
    if "images" not in base:
        return None
    stem = re.sub(r"idx\d+", "idx1", base.replace("images", "labels"))
    for candidate in (stem, stem + ".gz"):
        full = os.path.join(folder, candidate)
        if os.path.isfile(full):
            return full
    return None


def _from_idx(path: str, class_names: Sequence[str] | None = None) -> ImageSource:
    path = os.path.abspath(path)
    images = read_idx(path)
    if images.ndim not in (3, 4):
        raise SourceError(f"{path}: IDX file holds shape {images.shape}, not images (N, H, W); "
                          "is it a labels file?")
    try:
        check_image_array(images, batched=True)
    except ConfigError as exc:
        raise SourceError(f"{path}: {exc}") from None
    name = os.path.basename(path)
    name = name[:-3] if name.lower().endswith(".gz") else name
    samples = [Sample(f"{name}[{i}]", -1, None, i) for i in range(len(images))]
    source = ImageSource(samples, [], root=os.path.dirname(path), kind="idx", array=images)
    labels_path = _labels_file(path)
    if labels_path is None:
        return _name_classes(source, class_names)
    labels = read_idx(labels_path)
    if labels.shape != (len(images),):
        raise SourceError(f"{labels_path}: holds shape {labels.shape}; expected "
                          f"({len(images)},) labels for {path}")
    return _relabel(source, labels, class_names)


def load_fashion_mnist(folder: str | os.PathLike[str] = FASHION_MNIST_DIR,
                       split: str = "train") -> ImageSource:
    """Fashion-MNIST from its IDX files, with the dataset's class names.

    Parameters
    ----------
    folder : str or PathLike, default ``FASHION_MNIST_DIR``
        Holds ``train-images-idx3-ubyte(.gz)``, ``t10k-images-idx3-ubyte(.gz)`` and the
        matching ``*-labels-idx1-ubyte(.gz)``; the Debian package ``dataset-fashion-mnist``
        installs them in the default folder.
    split : {"train", "test"}
        ``"test"`` (or ``"t10k"``) reads the 10,000-image test files.

    Returns
    -------
    ImageSource
        Kind ``"idx"``, uint8 images (N, 28, 28), labels 0..9, ``FASHION_MNIST_CLASSES``.

    Raises
    ------
    SourceError
        When the files are missing (names the package to install) or malformed.
    """
    prefixes = {"train": "train", "test": "t10k", "t10k": "t10k"}
    if split not in prefixes:
        raise ConfigError(f"split must be 'train' or 'test'; got {split!r}")
    folder = os.fspath(folder)
    name = f"{prefixes[split]}-images-idx3-ubyte"
    images = next((os.path.join(folder, n) for n in (name, name + ".gz")
                   if os.path.isfile(os.path.join(folder, n))), None)
    if images is None or _labels_file(images) is None:
        raise SourceError(
            f"Fashion-MNIST {split} files not found in {folder} (need {name}[.gz] and "
            f"{name.replace('images', 'labels').replace('idx3', 'idx1')}[.gz]); install the "
            "Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or "
            "pass the folder holding them")
    return _from_idx(images, FASHION_MNIST_CLASSES)
