"""Subprocess helper for tests/test_store.py: writes a store so a test can kill it or race it.

Usage::

    python _store_writer.py loop PATH N DIM SEED   # commit KEY_B once, then KEY_A over and over
    python _store_writer.py stall PATH N DIM SEED  # commit KEY_B, then hang mid-way writing KEY_A
    python _store_writer.py hold PATH KEY  # take the lock, wait for a line on stdin, commit a
                                           # small entry
    python _store_writer.py fill PATH N DIM reserve|noreserve  # commit KEY_B, then KEY_A until
                                                   # the disk is full; "error: ..." and exit 1

Rows are a pure function of (n, dim, seed, variant), so the test can check every row it reads.
"""

from __future__ import annotations

import sys
import time

import numpy as np

import featurepipe.store
from featurepipe.exceptions import FeaturePipeError
from featurepipe.store import CommitResult, FeatureStore

KEY_A = "aaaaaaaaaaaaaaaa"
KEY_B = "bbbbbbbbbbbbbbbb"
ATTRS = {"dtype": "float32", "backbone": "test-net", "spec": {"name": "test-net"}}
CLASSES = ["a", "b", "c"]


def make_ids(n: int) -> list[str]:
    return [f"img{i:06d}.png" for i in range(n)]


def expected(n: int, dim: int, seed: int, variant: int) -> np.ndarray:
    """The features of variant ``variant`` (fingerprint ``v<variant>``) of every id."""
    base = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    return base + np.float32(variant)


def commit_variant(
    path: str, key: str, n: int, dim: int, seed: int, variant: int, announce: bool = False
) -> CommitResult:
    """Embed-like run: write missing shards of the variant, then commit it in source order."""
    ids, fp, shard_rows = make_ids(n), f"v{variant}", 4000
    feats = expected(n, dim, seed, variant)
    with FeatureStore(path).writer(key, ATTRS, lock_timeout=60) as w:
        for start in range(0, n, shard_rows):
            name = f"shard-{start // shard_rows:05d}-{fp}"
            if not w.shard_done(name):
                stop = start + shard_rows
                w.write_shard(name, ids[start:stop], [fp] * len(ids[start:stop]), feats[start:stop])
        order = [(id_, fp, i % len(CLASSES)) for i, id_ in enumerate(ids)]
        if announce:
            print("committing", flush=True)
        return w.commit(order, CLASSES)


def main(argv: list[str]) -> None:
    mode, path = argv[0], argv[1]
    if mode == "loop":
        n, dim, seed = (int(a) for a in argv[2:5])
        commit_variant(path, KEY_B, 100, dim, seed + 1, 0)
        print("ready", flush=True)
        for i in range(10**9):
            commit_variant(path, KEY_A, n, dim, seed, i % 2, announce=True)
            print("committed", flush=True)
    elif mode == "stall":
        n, dim, seed = (int(a) for a in argv[2:5])
        commit_variant(path, KEY_B, 100, dim, seed + 1, 0)
        write_features = featurepipe.store._write_features

        def stall(*args: object, **kwargs: object) -> None:  # features written, index not yet
            write_features(*args, **kwargs)
            print("writing", flush=True)
            time.sleep(600)

        featurepipe.store._write_features = stall
        commit_variant(path, KEY_A, n, dim, seed, 0)
    elif mode == "hold":
        key = argv[2]
        store = FeatureStore(path)
        with store.writer(key, ATTRS, lock_timeout=0) as w:
            print("locked", flush=True)
            sys.stdin.readline()  # until the test says so: no race with its scheduling
            w.write_shard("s0", ["x", "y"], ["1", "1"], np.ones((2, 4), np.float32))
            w.commit([("x", "1", 0), ("y", "1", 1)], ["a", "b"])
        print("done", flush=True)
    elif mode == "fill":
        n, dim = int(argv[2]), int(argv[3])
        if argv[4] == "noreserve":  # let HDF5 itself meet the full disk
            featurepipe.store.reserve = lambda path, nbytes: None
        commit_variant(path, KEY_B, 100, dim, 1, 0)
        print("small committed", flush=True)
        try:
            commit_variant(path, KEY_A, n, dim, 0, 0)
        except FeaturePipeError as exc:  # what the CLI does
            print(f"error: {exc}", flush=True)
            raise SystemExit(1) from None
        print("big committed", flush=True)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
