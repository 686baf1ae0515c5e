"""What to compute: the pure plan of an embedding run (no I/O, no torch).

The plan compares the source with what the store holds, then cuts the work into shards: fixed
slices named by position and content, so a rerun finds the shards an interrupted run left on
disk. Batches are cut here and only here, inside shards (a batch never crosses one), so every
runner, local or Ray, sees the same batches and fp32 features do not depend on the runner.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Plan", "Shard", "default_shard_size", "make_plan", "plan_shards"]


@dataclass(frozen=True)
class Shard:
    """One slice of the work: its file name in the store's parts folder and source indices."""

    name: str
    indices: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    """The outcome of :func:`make_plan`.

    ``new`` and ``changed`` hold source indices to embed (not in the committed entry, or with
    another fingerprint); ``deleted`` the committed ids the source no longer has; ``shards``
    all slices of the work and ``pending`` those not on disk yet.
    """

    new: tuple[int, ...]
    changed: tuple[int, ...]
    deleted: tuple[str, ...]
    shards: tuple[Shard, ...]
    pending: tuple[Shard, ...]
    batch_size: int

    @property
    def n_todo(self) -> int:
        """Images not in the committed entry (computed now or resumed from shards)."""
        return len(self.new) + len(self.changed)

    @property
    def n_pending(self) -> int:
        """Images this run computes."""
        return sum(len(s.indices) for s in self.pending)

    def batches(self) -> list[list[int]]:
        """The pending work as batches of source indices, shard after shard."""
        return [list(s.indices[b:b + self.batch_size])
                for s in self.pending for b in range(0, len(s.indices), self.batch_size)]


def default_shard_size(batch_size: int) -> int:
    """About 1024 rows, a whole number of batches (so batches never cross a shard)."""
    return max(batch_size, 1024 // batch_size * batch_size)


def plan_shards(indices: Sequence[int], ids: Sequence[str], fps: Sequence[str], shard_size: int
                ) -> list[Shard]:
    """Cut the work into fixed slices named by position and content, so a rerun finds them."""
    shards = []
    for n, start in enumerate(range(0, len(indices), shard_size)):
        part = tuple(indices[start:start + shard_size])
        digest = hashlib.blake2b(digest_size=8)
        for i in part:
            digest.update(ids[i].encode())
            digest.update(b"\0")
            digest.update(fps[i].encode())
            digest.update(b"\n")
        shards.append(Shard(f"{n:06d}-{digest.hexdigest()}", part))
    return shards


def make_plan(ids: Sequence[str], fps: Sequence[str], committed: Mapping[str, str],
              committed_skipped: Mapping[str, tuple[str, str]], batch_size: int,
              shard_size: int | None = None,
              shard_done: Callable[[str], bool] = lambda _name: False) -> Plan:
    """Plan a run from the source's ids and fingerprints and what the store holds.

    Parameters
    ----------
    ids, fps : sequence of str
        One per source sample.
    committed : mapping id -> fingerprint
        Rows of the committed entry.
    committed_skipped : mapping id -> (fingerprint, reason)
        Files the committed entry records as bad; unchanged ones are not tried again.
    batch_size, shard_size : int
        ``shard_size`` defaults to :func:`default_shard_size`.
    shard_done : callable
        True for a shard name already on disk (written by an interrupted run).
    """
    new: list[int] = []
    changed: list[int] = []
    for i, (id_, fp) in enumerate(zip(ids, fps, strict=True)):
        if committed.get(id_) == fp or committed_skipped.get(id_, ("", ""))[0] == fp:
            continue
        (changed if id_ in committed or id_ in committed_skipped else new).append(i)
    todo = sorted(new + changed)
    present = set(ids)
    deleted = tuple(sorted(i for i in committed if i not in present))
    shards = plan_shards(todo, ids, fps, shard_size or default_shard_size(batch_size))
    return Plan(tuple(new), tuple(changed), deleted, tuple(shards),
                tuple(s for s in shards if not shard_done(s.name)), batch_size)
