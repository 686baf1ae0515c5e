"""Data side of fine-tuning: labels, the up-front decode check, the stratified split, datasets.

Bad images are found once, before training, by decoding every sample (:func:`scan_decodable`):
dropping them later, inside an epoch, would change batch composition between epochs and make the
train/validation split depend on which files happen to fail.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from featurepipe.exceptions import ConfigError, DecodeError, FeaturePipeWarning
from featurepipe.splits import stratified_split

__all__ = [
    "ImageDataset",
    "classifier_targets",
    "data_fingerprint",
    "scan_decodable",
    "split_indices",
]


class ImageDataset(Dataset):
    """``(tensor, label)`` pairs of source rows ``indices`` through ``transform``. Picklable."""

    def __init__(self, source: Any, indices: Sequence[int], labels: Sequence[int] | np.ndarray,
                 transform: Callable, policy: Any, target_size: int | None = None) -> None:
        self.source = source
        self.indices = [int(i) for i in indices]
        self.labels = [int(v) for v in labels]
        self.transform = transform
        self.policy = policy
        self.target_size = target_size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        image = self.source.load(self.indices[k], self.policy, target_size=self.target_size)
        return self.transform(image), self.labels[k]


class _Probe(Dataset):
    """Decodes one sample and returns ``(index, reason)``; reason ``""`` means it decoded."""

    def __init__(self, source: Any, indices: Sequence[int], policy: Any,
                 target_size: int | None) -> None:
        self.source, self.indices = source, list(indices)
        self.policy, self.target_size = policy, target_size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[int, str]:
        i = self.indices[k]
        try:
            self.source.load(i, self.policy, target_size=self.target_size)
        except DecodeError as exc:
            return i, exc.reason
        return i, ""


def _sample_path(source: Any, i: int) -> str:
    s = source.samples[i]
    return str(s.path or s.id)


def scan_decodable(source: Any, indices: Sequence[int], policy: Any, target_size: int | None,
                   on_error: str = "skip", num_workers: int = 0) -> tuple[list[int], list[dict]]:
    """Decode every sample once; return the good indices and ``{path, reason}`` of the bad ones.

    ``on_error="raise"`` raises the first :class:`DecodeError`; ``"skip"`` warns once
    (:class:`FeaturePipeWarning`) listing every skipped file with its reason.
    """
    loader = DataLoader(_Probe(source, indices, policy, target_size), batch_size=64,
                        num_workers=num_workers, collate_fn=list)
    good: list[int] = []
    bad: list[dict] = []
    for batch in loader:
        for i, reason in batch:
            if not reason:
                good.append(i)
                continue
            if on_error == "raise":
                raise DecodeError(_sample_path(source, i), reason)
            bad.append({"path": _sample_path(source, i), "reason": reason})
    if bad:
        listing = "; ".join(f"{b['path']}: {b['reason']}" for b in bad[:20])
        more = f" (and {len(bad) - 20} more)" if len(bad) > 20 else ""
        warnings.warn(f"skipped {len(bad)} image(s) that cannot be decoded: {listing}{more}",
                      FeaturePipeWarning, stacklevel=3)
    return good, bad


def classifier_targets(source: Any, y: Any | None) -> tuple[np.ndarray, np.ndarray]:
    """``(classes, encoded)``: class labels as the user knows them and int codes per source row.

    Not :func:`featurepipe.sources.encode_labels`: with ``y`` the classes keep ``y``'s own values
    and dtype (scikit-learn's ``classes_`` contract), where a source turns labels into class-name
    strings.

    With ``y`` the classes are ``np.unique(y)``; without, the source's own labels (folder names,
    manifest labels) are used and unlabelled rows are an error.
    """
    n = len(source)
    if y is not None:
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != n:
            raise ConfigError(f"y has shape {y.shape}; expected one label per image ({n},)")
        classes, codes = np.unique(y, return_inverse=True)
    else:
        codes = np.asarray(source.labels, dtype=np.int64)
        if len(codes) != n or (codes < 0).any():
            raise ConfigError(
                "the images have no labels; pass y, a folder with one subfolder per class, or a "
                "manifest CSV with a label column"
            )
        names = list(source.class_names or [])
        if names and codes.max() < len(names):
            classes = np.asarray(names)
        else:
            classes, codes = np.unique(codes, return_inverse=True)
    if len(classes) < 2:
        raise ConfigError(f"need at least 2 classes to train a classifier; got {list(classes)}")
    return classes, codes.astype(np.int64)


def split_indices(indices: Sequence[int], codes: np.ndarray, val_size: float | int | None,
                  random_state: int) -> tuple[list[int], list[int]]:
    """Stratified train/validation split of ``indices`` (codes aligned with ``indices``).

    The validation part only steers training (early stopping, the best epoch), so when a class
    has fewer than 2 images or the validation set is smaller than the number of classes the split
    falls back to an unstratified one with a :class:`FeaturePipeWarning`
    (:func:`featurepipe.splits.stratified_split` with ``fallback="random"``).
    """
    indices = list(indices)
    if not val_size:
        return indices, []
    train, val = stratified_split(codes, val_size, seed=random_state, fallback="random",
                                  what="validation split")
    return sorted(indices[i] for i in train.tolist()), sorted(indices[i] for i in val.tolist())


def data_fingerprint(source: Any, indices: Sequence[int], codes: Sequence[int] | np.ndarray) -> str:
    """sha256 of the training rows' ids and labels: a resume must see the same data."""
    h = hashlib.sha256()
    for i, c in zip(indices, codes, strict=True):
        h.update(f"{source.samples[i].id}\t{int(c)}\n".encode())
    return h.hexdigest()
