"""Where features go: shards of the store, each written once its last image is in.

The sink takes batches in any order (the local runners give them in plan order, Ray as workers
finish) and writes each shard through the store writer the moment it is complete, so a shard
file holds exactly the rows of its slice of the plan. It never commits: the driver does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from featurepipe.embedding.memory import release_free_heap
from featurepipe.embedding.plan import Shard
from featurepipe.exceptions import DecodeError

__all__ = ["ShardSink", "ShardWriter"]


class ShardWriter(Protocol):
    """What the sink needs of :class:`featurepipe.store.StoreWriter`."""

    def write_shard(self, name: str, ids: Sequence[str], fingerprints: Sequence[str],
                    features: np.ndarray, skipped: Sequence[tuple[str, str, str]] = ...
                    ) -> None: ...


class ShardSink:
    """Gathers per-image results; writes each shard once complete, then ``after_shard()``.

    ``after_shard`` defaults to :func:`~featurepipe.embedding.memory.release_free_heap` (the
    freed activations of a shard go back to the OS).
    """

    def __init__(self, shards: Sequence[Shard], writer: ShardWriter, ids: Sequence[str],
                 fps: Sequence[str], dim: int, dtype: str, on_error: str = "skip",
                 names: Sequence[str | None] | None = None,
                 after_shard: Callable[[], Any] = release_free_heap) -> None:
        self.writer, self.ids, self.fps, self.dim = writer, ids, fps, dim
        self.np_dtype = np.float16 if dtype == "float16" else np.float32
        self.on_error, self.names, self.after_shard = on_error, names, after_shard
        self._parts = {s.name: s.indices for s in shards}
        self._left = {s.name: len(s.indices) for s in shards}
        self._shard_of = {i: s.name for s in shards for i in s.indices}
        self._feats: dict[int, np.ndarray] = {}
        self._bad: dict[int, str] = {}

    @property
    def pending(self) -> list[str]:
        """Shards not written yet."""
        return [name for name, left in self._left.items() if left]

    def wants(self, index: int) -> bool:
        """Whether source index ``index`` belongs to one of this sink's shards."""
        return index in self._shard_of

    def add(self, indices: Sequence[int], reasons: Sequence[str], features: np.ndarray) -> None:
        """Record one batch: ``features`` holds the rows of the indices whose reason is empty.

        Raises
        ------
        DecodeError
            For the first bad file of the batch when ``on_error="raise"``.
        """
        for i, r in zip(indices, reasons, strict=True):
            if r and self.on_error == "raise":
                raise DecodeError((self.names[i] if self.names else None) or self.ids[i], r)
        good = iter(features)
        for i, r in zip(indices, reasons, strict=True):
            if r:
                self._bad[i] = r
            else:
                self._feats[i] = next(good).astype(self.np_dtype)
        for name in dict.fromkeys(self._shard_of[i] for i in indices):
            self._left[name] -= sum(1 for i in indices if self._shard_of[i] == name)
            if self._left[name] == 0:
                self._write(name)
                self.after_shard()

    def _write(self, name: str) -> None:
        part, ids, fps = self._parts[name], self.ids, self.fps
        good = [i for i in part if i in self._feats]
        matrix = (np.stack([self._feats.pop(i) for i in good]) if good
                  else np.zeros((0, self.dim), dtype=self.np_dtype))
        skipped = [(ids[i], fps[i], self._bad.pop(i)) for i in part if i in self._bad]
        self.writer.write_shard(name, [ids[i] for i in good], [fps[i] for i in good], matrix,
                                skipped)
