"""FeatureStore: round trip, incremental commits, resume, crash safety, locking, errors."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest

from featurepipe.exceptions import ConfigError, StoreError, StoreLockedError
from featurepipe.records import SkippedFile
from featurepipe.store import (
    FEATURE_FORMAT_VERSION,
    STORE_FORMAT_VERSION,
    FeatureStore,
    entry_key,
)

HELPER = Path(__file__).with_name("_store_writer.py")
_spec = importlib.util.spec_from_file_location("_store_writer", HELPER)
helper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helper)

KEY = "0123456789abcdef"
ATTRS = {
    "dtype": "float32",
    "backbone": "tiny-net",
    "weights_sha256": "ab" * 32,
    "layer": None,
    "precision": "fp32",
    "spec": {"name": "tiny-net", "weights": None},
    "preprocess": {"mean": [0.5, 0.5, 0.5], "input_size": [3, 8, 8]},
    "decode_policy": {"background": [255, 255, 255]},
    "versions": {"featurepipe": "0.1.0"},
}
CLASSES = ["cat", "dog"]


def feats(n: int, dim: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def commit(path, rows, shards=(), attrs=ATTRS, key=KEY, classes=CLASSES, **kwargs):
    """``rows`` = [(id, fp, label)]; ``shards`` = [(name, ids, fps, features, skipped)]."""
    with FeatureStore(path).writer(key, attrs, lock_timeout=0) as w:
        for name, ids, fps, x, skipped in shards:
            w.write_shard(name, ids, fps, x, skipped)
        return w.commit(rows, classes, **kwargs)


@contextmanager
def spawn(*args: str) -> Iterator[subprocess.Popen]:
    """Run the helper; on the way out SIGKILL it (if still running) and close its pipe."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(HELPER), *args]
    with subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                          env=env) as proc:
        try:
            yield proc
        finally:
            proc.send_signal(signal.SIGKILL)


def wait_for(proc: subprocess.Popen, word: str) -> None:
    line = proc.stdout.readline().strip()
    assert line == word, f"helper said {line!r}, expected {word!r} (rc={proc.poll()})"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "store.h5"


@pytest.fixture
def abc(path: Path) -> dict:
    """A store with rows a, b, c (fingerprint 1) and one skipped file."""
    x = feats(3)
    skipped = [("bad.png", "1", "not an image")]
    rows = [("a", "1", 0), ("bad.png", "1", -1), ("b", "1", 1), ("c", "1", 0)]
    commit(path, rows, [("s0", ["a", "b", "c"], ["1"] * 3, x, skipped)])
    return {"a": x[0], "b": x[1], "c": x[2]}


# ---------------------------------------------------------------------------------------------
# keys and round trip


def test_entry_key_is_canonical_short_sha256() -> None:
    key = entry_key({"b": 1, "a": [1, 2]})
    assert key == entry_key({"a": (1, 2), "b": 1})
    assert len(key) == 16 and int(key, 16) >= 0
    assert key != entry_key({"b": 2, "a": [1, 2]})
    with pytest.raises(ConfigError, match="JSON"):
        entry_key({"a": object()})


def test_round_trip_float32_is_exact(path: Path, abc: dict) -> None:
    fs = FeatureStore(path).load()
    assert fs.key == KEY
    assert fs.ids == ["a", "b", "c"]
    assert fs.labels.dtype == np.int64 and fs.labels.tolist() == [0, 1, 0]
    assert fs.class_names == CLASSES
    assert fs.skipped == [("bad.png", "not an image")]
    assert fs.features.dtype == np.float32
    np.testing.assert_array_equal(fs.features, np.stack([abc["a"], abc["b"], abc["c"]]))
    assert fs.attrs["spec"] == ATTRS["spec"] and fs.attrs["layer"] is None
    assert fs.attrs["n_rows"] == 3 and fs.attrs["dim"] == 6
    assert fs.attrs["feature_format_version"] == FEATURE_FORMAT_VERSION


def test_attributes_are_readable_with_plain_h5py(path: Path, abc: dict) -> None:
    with h5py.File(path, "r") as f:
        assert f.attrs["featurepipe_store_version"] == STORE_FORMAT_VERSION
        assert isinstance(f.attrs["featurepipe_version"], str)
        g = f[f"entries/{KEY}"]
        assert json.loads(g.attrs["preprocess"]) == ATTRS["preprocess"]
        assert g.attrs["backbone"] == "tiny-net" and g.attrs["dtype"] == "float32"
        assert g.attrs["n_rows"] == 3 and g.attrs["key"] == KEY
        assert g["features"].chunks == (3, 6) and g["features"].maxshape == (None, 6)
        assert g["features"].compression is None
        assert g["ids"].asstr()[()].tolist() == ["a", "b", "c"]
        assert g["skipped_fingerprints"].asstr()[()].tolist() == ["1"]
        assert g["labels"].dtype == np.int64


def test_round_trip_float16_within_tolerance(path: Path) -> None:
    x = feats(40, dim=16)
    ids = [f"i{k}" for k in range(40)]
    commit(
        path,
        [(i, "f", -1) for i in ids],
        [("s", ids, ["f"] * 40, x, ())],
        attrs={**ATTRS, "dtype": "float16"},
        classes=[],
    )
    store = FeatureStore(path)
    fs = store.load()
    assert fs.features.dtype == np.float32 and fs.labels.tolist() == [-1] * 40
    np.testing.assert_allclose(fs.features, x, rtol=1e-3, atol=1e-3)
    assert store.load(dtype=None).features.dtype == np.float16
    assert store.info()["dtype"] == "float16"


def test_info_fields(path: Path, abc: dict) -> None:
    info = FeatureStore(path).info()
    assert info["path"] == str(path) and info["key"] == KEY
    assert (info["n_rows"], info["dim"], info["dtype"]) == (3, 6, "float32")
    assert info["backbone"] == "tiny-net" and info["weights_sha256"] == "ab" * 32
    assert info["layer"] is None and info["precision"] == "fp32"
    assert info["n_skipped"] == 1
    assert info["skipped"] == [SkippedFile("bad.png", "not an image")]
    assert [s.to_dict() for s in info["skipped"]] == [{"id": "bad.png", "reason": "not an image"}]
    loaded = FeatureStore(path).load()
    assert all(isinstance(s, SkippedFile) for s in loaded.skipped)
    assert info["classes"] == CLASSES and info["class_counts"] == {"cat": 2, "dog": 1}
    assert info["n_labelled"] == 3
    assert info["created"] and info["updated"]
    assert info["versions"] == ATTRS["versions"] and info["preprocess"] == ATTRS["preprocess"]
    assert info["decode_policy"] == ATTRS["decode_policy"]
    assert info["entries"] == [{"key": KEY, "backbone": "tiny-net", "n_rows": 3}]


# ---------------------------------------------------------------------------------------------
# incremental commits


def test_incremental_commit_reuses_replaces_and_drops(path: Path, abc: dict) -> None:
    c2, d = feats(2, seed=9)
    rows = [("b", "1", 0), ("c", "2", 1), ("d", "1", 1)]
    res = commit(path, rows, [("s1", ["c", "d"], ["2", "1"], np.stack([c2, d]), ())])
    assert (res.n_rows, res.n_new, res.n_reused, res.n_dropped) == (3, 2, 1, 1)
    assert res.n_skipped == 0 and res.changed
    fs = FeatureStore(path).load()
    assert fs.ids == ["b", "c", "d"] and fs.labels.tolist() == [0, 1, 1]
    assert fs.features[0].tobytes() == abc["b"].tobytes()  # reused bit for bit
    np.testing.assert_array_equal(fs.features[1:], np.stack([c2, d]))
    assert fs.skipped == []  # bad.png is gone from the source
    assert FeatureStore(path).lookup(KEY)["c"] == (1, "2")


def test_drop_missing_false_keeps_old_rows_after_the_new(path: Path, abc: dict) -> None:
    (d,) = feats(1, seed=9)
    rows = [("d", "1", -1), ("b", "1", 1)]
    res = commit(path, rows, [("s1", ["d"], ["1"], d[None], ())], drop_missing=False)
    assert (res.n_rows, res.n_new, res.n_reused, res.n_dropped, res.n_skipped) == (4, 1, 3, 0, 1)
    fs = FeatureStore(path).load()
    assert fs.ids == ["d", "b", "a", "c"] and fs.labels.tolist() == [-1, 1, 0, 0]
    np.testing.assert_array_equal(fs.features, np.stack([d, abc["b"], abc["a"], abc["c"]]))
    assert fs.skipped == [("bad.png", "not an image")]


def test_unchanged_commit_does_not_rewrite_but_label_change_does(path: Path, abc: dict) -> None:
    rows = [("a", "1", 0), ("bad.png", "1", -1), ("b", "1", 1), ("c", "1", 0)]
    before = path.stat()
    res = commit(path, rows)
    assert not res.changed and (res.n_reused, res.n_new, res.n_dropped) == (3, 0, 0)
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    relabelled = [("a", "1", 1), ("bad.png", "1", -1), ("b", "1", 1), ("c", "1", 0)]
    assert commit(path, relabelled, classes=["x", "y"]).changed
    fs = FeatureStore(path).load()
    assert fs.labels.tolist() == [1, 1, 0] and fs.class_names == ["x", "y"]
    np.testing.assert_array_equal(fs.features, np.stack([abc["a"], abc["b"], abc["c"]]))


def test_writer_existing_reports_committed_rows_and_skips(path: Path, abc: dict) -> None:
    with FeatureStore(path).writer(KEY, ATTRS) as w:
        assert w.existing() == {"a": "1", "b": "1", "c": "1"}
        assert w.existing_skipped() == {"bad.png": ("1", "not an image")}
    with FeatureStore(path).writer("otherkey", ATTRS) as w:
        assert w.existing() == {} and w.existing_skipped() == {}


def test_id_without_features_is_an_internal_error(path: Path, abc: dict) -> None:
    before = path.read_bytes()
    with pytest.raises(StoreError, match="internal: no features for id 'zzz'"):
        commit(path, [("a", "1", 0), ("zzz", "1", 0)])
    with pytest.raises(StoreError, match="internal"):  # same id, other fingerprint
        commit(path, [("a", "2", 0)])
    assert path.read_bytes() == before


def test_all_files_skipped_gives_empty_entry(path: Path) -> None:
    skipped = [("x", "1", "truncated")]
    commit(
        path,
        [("x", "1", -1)],
        [("s", [], [], np.zeros((0, 5), np.float32), skipped)],
        attrs={**ATTRS, "dim": 5},
    )
    fs = FeatureStore(path).load()
    assert fs.features.shape == (0, 5) and fs.ids == [] and fs.skipped == [("x", "truncated")]
    commit(path, [("x", "1", -1)], [("s", [], [], np.zeros((0, 0)), skipped)], key="nodim")
    assert FeatureStore(path).load("nodim").features.shape == (0, 0)
    assert list(FeatureStore(path).iter_chunks("nodim")) == []


# ---------------------------------------------------------------------------------------------
# resume and failure paths


def test_resume_from_shards_of_an_uncommitted_run(path: Path) -> None:
    x = feats(4)
    ids = ["a", "b", "c", "d"]
    with FeatureStore(path).writer(KEY, ATTRS) as w:  # "crash": leave without commit
        w.write_shard("shard-0", ids[:2], ["1", "1"], x[:2])
    assert not path.exists()
    with FeatureStore(path).writer(KEY, ATTRS) as w:
        assert w.shard_done("shard-0") and not w.shard_done("shard-1")
        w.write_shard("shard-1", ids[2:], ["1", "1"], x[2:])
        res = w.commit([(i, "1", 0) for i in ids], CLASSES)
    assert res.n_new == 4 and res.changed
    np.testing.assert_array_equal(FeatureStore(path).load().features, x)
    assert not FeatureStore(path).parts_path.exists()


def test_newest_shard_wins_for_the_same_id_and_fingerprint(path: Path) -> None:
    old, new = feats(2, seed=3)
    with FeatureStore(path).writer(KEY, ATTRS) as w:
        w.write_shard("z-old", ["a"], ["1"], old[None])
        w.write_shard("a-new", ["a"], ["1"], new[None])
        os.utime(w.parts_dir / "z-old.npz", ns=(1_000_000_000, 1_000_000_000))
        w.commit([("a", "1", 0)], CLASSES)
    np.testing.assert_array_equal(FeatureStore(path).load().features[0], new)


def test_failed_replace_keeps_old_store_and_shards(
    path: Path, abc: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    import featurepipe.store as store_mod

    before = path.read_bytes()

    def boom(*args: object) -> None:
        raise OSError("disk full")

    with FeatureStore(path).writer(KEY, ATTRS) as w:
        w.write_shard("s1", ["a"], ["1"], feats(1))
        monkeypatch.setattr(store_mod.os, "replace", boom)
        with pytest.raises(OSError, match="disk full"):
            w.commit([("a", "1", 0)], CLASSES)
        monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "store.h5",
        "store.h5.lock",
        "store.h5.parts",
    ]
    assert (FeatureStore(path).parts_path / KEY / "s1.npz").is_file()


def test_stale_temp_files_are_removed_by_the_next_writer(path: Path, abc: dict) -> None:
    stale = [path.with_name("store.h5.tmp-999999-deadbeef")]
    stale.append(FeatureStore(path).parts_path / KEY / "s.npz.tmp-999999-00ff")
    stale[1].parent.mkdir(parents=True)
    for p in stale:
        p.write_bytes(b"half written")
    keep = path.with_name("store.h5.tmp-notours")
    keep.write_bytes(b"x")
    with FeatureStore(path).writer(KEY, ATTRS):
        pass
    assert not any(p.exists() for p in stale) and keep.exists()


def test_write_shard_validates_input(path: Path) -> None:
    with FeatureStore(path).writer(KEY, {**ATTRS, "dim": 6}) as w:
        with pytest.raises(ConfigError, match="expected features"):
            w.write_shard("s", ["a", "b"], ["1", "1"], feats(3))
        with pytest.raises(ConfigError, match="dim 4"):
            w.write_shard("s", ["a"], ["1"], feats(1, dim=4))
        with pytest.raises(ConfigError, match="shard name"):
            w.write_shard("../evil", ["a"], ["1"], feats(1))
        with pytest.raises(ConfigError, match="twice"):
            w.write_shard("s", ["a"], ["1"], feats(1))
            w.commit([("a", "1", 0), ("a", "1", 0)], CLASSES)
        with pytest.raises(ConfigError, match="out of range"):
            w.commit([("a", "1", 5)], CLASSES)
    with pytest.raises(ConfigError, match="dtype"):
        FeatureStore(path).writer(KEY, {"dtype": "int8"})
    with pytest.raises(ConfigError, match="entry key"):
        FeatureStore(path).writer("a/b", ATTRS)
    with pytest.raises(ConfigError, match="'obj'"):
        FeatureStore(path).writer(KEY, {"obj": object()})
    with pytest.raises(StoreError, match="not open"):
        FeatureStore(path).writer(KEY, ATTRS).existing()


# ---------------------------------------------------------------------------------------------
# several entries, readers


def test_two_entries_are_independent(path: Path, abc: dict) -> None:
    x2 = feats(5, dim=3, seed=1)
    ids = [f"k{i}" for i in range(5)]
    other = "fedcba9876543210"
    commit(path, [(i, "1", -1) for i in ids], [("s", ids, ["1"] * 5, x2, ())], key=other)
    store = FeatureStore(path)
    assert store.keys() == [KEY, other]
    with pytest.raises(StoreError) as err:
        store.resolve_key(None)
    assert KEY in str(err.value) and other in str(err.value) and "tiny-net" in str(err.value)
    assert store.resolve_key("fedc") == other
    with pytest.raises(StoreError, match="no entry"):
        store.resolve_key("nope")

    def snapshot(key: str) -> tuple:
        with h5py.File(path, "r") as f:
            g = f[f"entries/{key}"]
            data = {name: g[name][()].tobytes() for name in ("features", "labels")}
            strings = {n: g[n].asstr()[()].tolist() for n in ("ids", "fingerprints", "class_names")}
            return data, strings, dict(g.attrs), g["features"].chunks

    before = snapshot(KEY)
    (y,) = feats(1, dim=3, seed=2)
    commit(path, [("k0", "2", 0)], [("s", ["k0"], ["2"], y[None], ())], key=other)
    assert snapshot(KEY) == before
    np.testing.assert_array_equal(store.load(other).features, y[None])


def test_drop_other_entries_leaves_only_this_one(path: Path, abc: dict) -> None:
    with FeatureStore(path).writer("stale", ATTRS) as w:  # uncommitted work of another key
        w.write_shard("s", ["a"], ["1"], feats(1))
    rows = [("a", "1", 0), ("bad.png", "1", -1), ("b", "1", 1), ("c", "1", 0)]
    commit(path, [("k", "1", 0)], [("s", ["k"], ["1"], feats(1), ())], key="other")
    assert FeatureStore(path).keys() == [KEY, "other"]
    res = commit(path, rows, drop_other_entries=True)
    assert res.changed and res.n_reused == 3
    assert FeatureStore(path).keys() == [KEY]
    assert not FeatureStore(path).parts_path.exists()


def test_iter_chunks_covers_every_row_once_in_order(path: Path) -> None:
    x = feats(30)
    ids = [f"i{k:02d}" for k in range(30)]
    commit(path, [(i, "f", k % 2) for k, i in enumerate(ids)], [("s", ids, ["f"] * 30, x, ())])
    chunks = list(FeatureStore(path).iter_chunks(chunk_rows=7))
    assert [c.start for c in chunks] == [0, 7, 14, 21, 28]
    assert all(len(c.ids) == len(c.features) == len(c.labels) <= 7 for c in chunks)
    assert sum((c.ids for c in chunks), []) == ids
    np.testing.assert_array_equal(np.concatenate([c.features for c in chunks]), x)
    assert np.concatenate([c.labels for c in chunks]).tolist() == [k % 2 for k in range(30)]
    with pytest.raises(ConfigError, match="chunk_rows"):
        list(FeatureStore(path).iter_chunks(chunk_rows=0))


def test_iter_chunks_keeps_reading_its_snapshot_across_a_commit(path: Path) -> None:
    ids = [f"i{k}" for k in range(10)]
    x, y = feats(10, seed=1), feats(10, seed=2)
    commit(path, [(i, "1", 0) for i in ids], [("s", ids, ["1"] * 10, x, ())])
    chunks = FeatureStore(path).iter_chunks(chunk_rows=4)
    first = next(chunks)
    commit(path, [(i, "2", 0) for i in ids], [("s", ids, ["2"] * 10, y, ())])
    rest = np.concatenate([first.features] + [c.features for c in chunks])
    np.testing.assert_array_equal(rest, x)
    np.testing.assert_array_equal(FeatureStore(path).load().features, y)


def test_lookup_and_read_rows_any_order_with_duplicates(path: Path) -> None:
    x = feats(5000, dim=4)  # past one read block, sparse and dense selections
    ids = [f"i{k}" for k in range(5000)]
    commit(path, [(i, "f", -1) for i in ids], [("s", ids, ["f"] * 5000, x, ())], classes=[])
    store = FeatureStore(path)
    table = store.lookup(KEY)
    assert len(table) == 5000 and table["i42"] == (42, "f")
    want = ["i4999", "i3", "i3", "i0", "i2500", "i4100"]
    rows = [table[i][0] for i in want]
    np.testing.assert_array_equal(store.read_rows(KEY, rows), x[rows])
    np.testing.assert_array_equal(store.read_rows(KEY, list(range(4999, -1, -3))), x[4999::-3])
    assert store.read_rows(KEY, rows, expected_ids=want).shape == (6, 4)
    assert store.read_rows(KEY, []).shape == (0, 4)
    with pytest.raises(StoreError, match="changed since lookup"):
        store.read_rows(KEY, rows, expected_ids=["i1"] * 6)
    with pytest.raises(StoreError, match="out of range"):
        store.read_rows(KEY, [5000])
    assert store.lookup("missing") == {}
    assert FeatureStore(path.with_name("none.h5")).lookup(KEY) == {}


# ---------------------------------------------------------------------------------------------
# errors


def test_missing_store_names_the_path(path: Path) -> None:
    store = FeatureStore(path)
    assert not store.exists()
    for call in (store.load, store.keys, store.info, store.resolve_key):
        with pytest.raises(StoreError, match=str(path)):
            call()


def test_non_store_files_are_refused(path: Path) -> None:
    path.write_text("hello, not HDF5\n")
    with pytest.raises(StoreError, match="not a featurepipe store") as err:
        FeatureStore(path).load()
    assert str(path) in str(err.value)
    with pytest.raises(StoreError, match="not a featurepipe store"):
        FeatureStore(path).writer(KEY, ATTRS).__enter__()
    assert path.read_text() == "hello, not HDF5\n"
    with h5py.File(path, "w") as f:
        f["x"] = 1
    with pytest.raises(StoreError, match="not a featurepipe store"):
        FeatureStore(path).keys()


def test_damaged_store_is_a_store_error(path: Path) -> None:
    with h5py.File(path, "w") as f:
        f.attrs["featurepipe_store_version"] = STORE_FORMAT_VERSION
        f.create_group(f"entries/{KEY}").create_dataset("ids", data=["a"])
    with pytest.raises(StoreError, match="damaged"):
        FeatureStore(path).load()
    with FeatureStore(path).writer(KEY, ATTRS) as w, pytest.raises(StoreError, match="damaged"):
        w.existing()


def test_empty_and_newer_stores(path: Path) -> None:
    with h5py.File(path, "w") as f:
        f.attrs["featurepipe_store_version"] = STORE_FORMAT_VERSION
    with pytest.raises(StoreError, match="empty"):
        FeatureStore(path).load()
    with h5py.File(path, "a") as f:
        f.attrs["featurepipe_store_version"] = STORE_FORMAT_VERSION + 1
    with pytest.raises(StoreError, match="newer featurepipe"):
        FeatureStore(path).keys()


# ---------------------------------------------------------------------------------------------
# processes: locking, readers during commits, SIGKILL


def test_second_writer_in_process_is_refused(path: Path) -> None:
    store = FeatureStore(path)
    with store.writer(KEY, ATTRS):
        with pytest.raises(StoreLockedError, match=str(path)) as err:
            store.writer("other", ATTRS, lock_timeout=0).__enter__()
        assert isinstance(err.value, TimeoutError)
        with pytest.raises(StoreLockedError, match="after 0.1 s"):
            store.writer("other", ATTRS, lock_timeout=0.1).__enter__()


def test_second_process_fails_fast_or_waits(path: Path) -> None:
    with spawn("hold", str(path), "holderkey0000000") as proc:
        wait_for(proc, "locked")  # the holder keeps the lock until told to go on
        with pytest.raises(StoreLockedError, match=str(path)):
            FeatureStore(path).writer(KEY, ATTRS, lock_timeout=0).__enter__()
        waits: list[str] = []

        def release_the_holder(message: str) -> None:  # called once this writer has to wait
            waits.append(message)
            proc.stdin.write("go\n")
            proc.stdin.flush()

        with FeatureStore(path).writer(KEY, ATTRS, lock_timeout=600,
                                       on_wait=release_the_holder) as w:
            assert proc.wait() == 0  # the holder had committed and exited
            w.write_shard("s", ["q"], ["1"], feats(1))
            w.commit([("q", "1", 0)], CLASSES)
        assert len(waits) == 1 and str(path) in waits[0]
    store = FeatureStore(path)
    assert store.keys() == [KEY, "holderkey0000000"]  # nothing lost to the race
    assert store.load("holderkey0000000").ids == ["x", "y"] and store.load(KEY).ids == ["q"]


def _check_store(path: Path, n: int, dim: int, seed: int) -> int:
    """Every entry in the file is complete and holds exactly the rows of one variant."""
    store = FeatureStore(path)
    checked = 0
    for key, n_key, seed_key in ((helper.KEY_A, n, seed), (helper.KEY_B, 100, seed + 1)):
        if key not in store.keys():
            continue
        fs = store.load(key)  # one snapshot; a lookup() now could already see the next commit
        assert fs.attrs["n_rows"] == len(fs.ids) == len(fs.features) == n_key
        assert fs.ids == helper.make_ids(n_key)
        assert any(
            np.array_equal(fs.features, helper.expected(n_key, dim, seed_key, variant))
            for variant in (0, 1)
        )
        checked += 1
    return checked


def test_readers_see_complete_stores_while_a_writer_commits(path: Path) -> None:
    n, dim, seed = 20_000, 16, 5
    with spawn("loop", str(path), str(n), str(dim), str(seed)) as proc:
        for word in ("ready", "committing", "committed"):
            wait_for(proc, word)
        for _ in range(5):  # a count, not a time: each load meets the writer somewhere else
            assert _check_store(path, n, dim, seed) == 2
        assert proc.poll() is None  # the writer commits forever: it was running throughout


def test_sigkill_in_the_middle_of_writing_the_new_file(path: Path) -> None:
    n, dim, seed = 1000, 8, 3
    with spawn("stall", str(path), str(n), str(dim), str(seed)) as proc:
        wait_for(proc, "writing")  # the temp file is half written; SIGKILL now
    (tmp,) = path.parent.glob("store.h5.tmp-*")
    assert tmp.stat().st_size > 0
    assert FeatureStore(path).keys() == [helper.KEY_B]  # the old complete file
    assert _check_store(path, n, dim, seed) == 1
    helper.commit_variant(str(path), helper.KEY_A, n, dim, seed, 1)
    assert not tmp.exists()
    assert _check_store(path, n, dim, seed) == 2


def test_sigkill_at_random_moments_never_breaks_the_store(path: Path) -> None:
    n, dim, seed = 50_000, 16, 7
    rng = random.Random(1234)
    # Anywhere after start-up (shards, commits, between), and three times during a commit
    # that has an old entry to merge (it takes ~0.3-0.6 s here).
    kills = [("ready", rng.uniform(0.0, 0.8)) for _ in range(3)]
    kills += [("committing", rng.uniform(0.0, 0.6)) for _ in range(3)]
    for marker, delay in kills:
        with spawn("loop", str(path), str(n), str(dim), str(seed)) as proc:
            wait_for(proc, "ready")
            if marker == "committing":
                for word in ("committing", "committed", "committing"):
                    wait_for(proc, word)
            time.sleep(delay)  # leaving the block SIGKILLs the writer wherever it is
        assert path.exists()  # KEY_B was committed before "ready"
        assert _check_store(path, n, dim, seed) >= 1
    res = helper.commit_variant(str(path), helper.KEY_A, n, dim, seed, 0)
    assert res.n_rows == n
    assert _check_store(path, n, dim, seed) == 2
    assert FeatureStore(path).lookup(helper.KEY_A)["img000000.png"] == (0, "v0")
    assert sorted(p.name for p in path.parent.iterdir()) == ["store.h5", "store.h5.lock"]


# ---------------------------------------------------------------------------------------------
# rows of another source (issue 19: a second folder's commit dropped every row of the first)

SRC_A = {**ATTRS, "source": "folder:/data/cats"}
SRC_B = {**ATTRS, "source": "folder:/data/dogs"}


def test_commit_from_another_source_refuses_to_drop_its_rows(path: Path, abc: dict) -> None:
    commit(path, [("a", "1", 0), ("b", "1", 1), ("c", "1", 0)], attrs=SRC_A)
    before = path.read_bytes()
    rows = [("d", "1", 0), ("e", "1", 1)]
    with FeatureStore(path).writer(KEY, SRC_B, lock_timeout=0) as w:
        with pytest.raises(StoreError) as err:
            w.check_source([(i, f) for i, f, _ in rows])
        w.write_shard("s1", ["d", "e"], ["1", "1"], feats(2))
        with pytest.raises(StoreError):
            w.commit(rows, CLASSES)
    msg = str(err.value)
    assert "3 row(s)" in msg and "/data/cats" in msg and "/data/dogs" in msg
    assert "--replace" in msg and "--out" in msg and "\n" not in msg
    assert path.read_bytes() == before  # nothing dropped, and the shards wait for a rerun
    assert (FeatureStore(path).parts_path / KEY / "s1.npz").is_file()

    with FeatureStore(path).writer(KEY, SRC_B, lock_timeout=0, replace=True) as w:
        w.check_source([(i, f) for i, f, _ in rows])
        result = w.commit(rows, CLASSES)
    assert (result.n_new, result.n_dropped) == (2, 3)
    assert FeatureStore(path).load().ids == ["d", "e"]
    assert FeatureStore(path).attrs()["source"] == "folder:/data/dogs"


def test_same_source_still_drops_deleted_files(path: Path, abc: dict) -> None:
    commit(path, [("a", "1", 0), ("b", "1", 1), ("c", "1", 0)], attrs=SRC_A)
    result = commit(path, [("a", "1", 0)], attrs=SRC_A)
    assert result.n_dropped == 2 and FeatureStore(path).load().ids == ["a"]


def test_another_source_that_keeps_every_row_is_allowed(path: Path, abc: dict) -> None:
    commit(path, [("a", "1", 0), ("b", "1", 1), ("c", "1", 0)], attrs=SRC_A)
    # a moved folder: same ids and fingerprints, nothing would be lost
    result = commit(path, [("a", "1", 0), ("b", "1", 1), ("c", "1", 0)], attrs=SRC_B)
    assert result.n_dropped == 0 and FeatureStore(path).attrs()["source"] == "folder:/data/dogs"
    # drop_missing=False keeps the other ids, so only a changed row of theirs would be lost
    rows = [("z", "1", 0)]
    result = commit(
        path, rows, [("s", ["z"], ["1"], feats(1), [])], attrs=SRC_A, drop_missing=False
    )
    assert result.n_dropped == 0 and FeatureStore(path).load().ids == ["z", "a", "b", "c"]
    with pytest.raises(StoreError, match="1 row"):
        commit(
            path,
            [("a", "2", 0)],
            [("s", ["a"], ["2"], feats(1), [])],
            attrs=SRC_B,
            drop_missing=False,
        )


# ---------------------------------------------------------------------------------------------
# damaged stores (issue 19: reported as "not a featurepipe store", and --replace refused too)


def _rebuild(path: Path) -> None:
    with FeatureStore(path).writer(KEY, ATTRS, lock_timeout=0, replace=True) as w:
        assert w.existing() == {}
        w.write_shard("s9", ["n"], ["1"], feats(1))
        w.commit([("n", "1", 1)], CLASSES, drop_other_entries=True)
    assert FeatureStore(path).load().ids == ["n"]


@pytest.mark.parametrize("damage", ["truncated", "header zeroed"])
def test_damaged_store_is_named_damaged_and_replace_rebuilds_it(
    path: Path, abc: dict, damage: str
) -> None:
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(bytes(4096) + data[4096:])
    with pytest.raises(StoreError, match="damaged featurepipe store") as err:
        FeatureStore(path).load()
    assert str(path) in str(err.value) and "--replace" in str(err.value)
    assert "not a featurepipe store" not in str(err.value)
    with pytest.raises(StoreError, match="damaged featurepipe store"):
        FeatureStore(path).writer(KEY, ATTRS, lock_timeout=0).__enter__()
    _rebuild(path)


def test_replace_never_overwrites_a_foreign_file(path: Path) -> None:
    jpeg = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(3000)
    path.write_bytes(jpeg)
    with pytest.raises(StoreError, match="not a featurepipe store"):
        FeatureStore(path).writer(KEY, ATTRS, lock_timeout=0, replace=True).__enter__()
    assert path.read_bytes() == jpeg

    with h5py.File(path, "w") as f:  # a user's own HDF5 file, then truncated
        f["data"] = np.arange(100_000)
    data = path.read_bytes()[:50_000]
    path.write_bytes(data)
    with pytest.raises(StoreError, match="damaged HDF5 file that does not look like"):
        FeatureStore(path).writer(KEY, ATTRS, lock_timeout=0, replace=True).__enter__()
    assert path.read_bytes() == data


# ---------------------------------------------------------------------------------------------
# full disk (issue 19: a segfault while committing, a raw traceback while writing a shard)


def _no_space(*args: object, **kwargs: object) -> None:
    raise OSError(28, "No space left on device")


def _only_store_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_full_disk_while_writing_a_shard_names_it(
    path: Path, abc: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FeatureStore(path).writer(KEY, ATTRS, lock_timeout=0) as w:
        monkeypatch.setattr(np, "savez", _no_space)
        with pytest.raises(StoreError) as err:
            w.write_shard("s1", ["a"], ["2"], feats(1))
        monkeypatch.undo()
        assert list(w.parts_dir.iterdir()) == []  # the temp file is gone
    target = FeatureStore(path).parts_path / KEY / "s1.npz"
    assert str(err.value) == f"cannot write shard {target}: no space left on device"


@pytest.mark.parametrize("where", ["reserve", "_write_features"])
def test_full_disk_while_committing_keeps_the_old_store(
    path: Path, abc: dict, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    import featurepipe.store as store_mod

    before = path.read_bytes()
    target = "posix_fallocate" if where == "reserve" else where
    with FeatureStore(path).writer(KEY, ATTRS, lock_timeout=0) as w:
        w.write_shard("s1", ["a"], ["2"], feats(1))
        monkeypatch.setattr(store_mod.os if where == "reserve" else store_mod, target, _no_space)
        with pytest.raises(StoreError) as err:
            w.commit([("a", "2", 0)], CLASSES)
        monkeypatch.undo()
    msg = str(err.value)
    assert msg.startswith(f"cannot write store {path}: no space left on device (needs about ")
    assert "the old store is unchanged" in msg and "\n" not in msg
    assert path.read_bytes() == before
    assert _only_store_files(path) == ["store.h5", "store.h5.lock", "store.h5.parts"]
    assert FeatureStore(path).load().ids == ["a", "b", "c"]


def test_commit_reserves_at_least_the_file_it_writes(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import featurepipe.store as store_mod

    reserve, asked = store_mod.reserve, []

    def record(tmp: Path, nbytes: int) -> None:
        asked.append(nbytes)
        reserve(tmp, nbytes)

    monkeypatch.setattr(store_mod, "reserve", record)
    cases = [
        (1, 4, 1, "float32", "k1"),
        (10, 1280, 30, "float16", "k2"),  # fixed HDF5 overhead dominates
        (700, 3, 180, "float32", "k3"),  # long ids dominate; k1 and k2 are copied along
        (3000, 64, 8, "float16", "k1"),
    ]
    for n, dim, id_len, dtype, key in cases:
        ids = [f"{i:0{id_len}d}" for i in range(n)]
        skipped = [(f"bad{i}", "x", "not an image") for i in range(n // 10)]
        rows = [(i, "fp" * 20, -1) for i in ids] + [(i, f, -1) for i, f, _ in skipped]
        shard = ("s", ids, ["fp" * 20] * n, feats(n, dim), skipped)
        commit(path, rows, [shard], key=key, attrs={**ATTRS, "dtype": dtype})
        size = path.stat().st_size
        # enough for the file, and not so much that a disk with room for it is refused
        assert size <= asked[-1] <= 1.25 * size + (1 << 18), (n, dim, id_len)


def _mount_tmpfs(folder: Path, size: str) -> None:
    if sys.platform != "linux":
        pytest.skip("a small tmpfs needs Linux")
    folder.mkdir()
    run = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if run.returncode != 0:
        pytest.skip(f"cannot mount a {size} tmpfs here (needs root): {run.stderr.strip()}")


@pytest.mark.parametrize("reserve", ["reserve", "noreserve"])
def test_real_full_disk_fails_in_one_line_and_keeps_the_store(tmp_path: Path, reserve: str) -> None:
    """On a 2 MiB tmpfs: a small store fits, a 1.5 MB commit after its shard does not.

    ``noreserve`` switches the preallocation off, so HDF5 itself meets the full disk.
    """
    mnt = tmp_path / "mnt"
    _mount_tmpfs(mnt, "2m")
    try:
        path = mnt / "s.h5"
        run = subprocess.run(
            [sys.executable, str(HELPER), "fill", str(path), "1500", "256", reserve],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 1, run.stderr[-2000:]
        assert run.stderr == "", run.stderr[-2000:]
        lines = run.stdout.splitlines()
        assert lines[0] == "small committed" and len(lines) == 2, lines
        assert lines[1].startswith(f"error: cannot write store {path}: no space left on device")
        assert FeatureStore(path).load(helper.KEY_B).ids == helper.make_ids(100)
        assert _only_store_files(path) == ["s.h5", "s.h5.lock", "s.h5.parts"]
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# ---------------------------------------------------------------------------------------------
# an unwritable place (issue 21: --out /proc/x.h5 waited forever "for another writer")


def test_lock_file_that_cannot_be_created_is_an_error_not_a_wait(tmp_path: Path) -> None:
    places = [tmp_path / "a-file" / "s.h5"]
    (tmp_path / "a-file").write_text("not a folder")
    if Path("/proc/self").is_dir():
        places.append(Path("/proc/featurepipe-test.h5"))
    for place in places:
        with pytest.raises(StoreError, match="cannot create the") as err:
            FeatureStore(place).writer(KEY, ATTRS, lock_timeout=5).__enter__()
        assert not isinstance(err.value, StoreLockedError) and str(place.parent) in str(err.value)


# ---------------------------------------------------------------------------------------------
# non-finite features (issue 19: 24 NaN rows stored, then fit died in scikit-learn)


def test_non_finite_rows_become_skipped_records(path: Path) -> None:
    x = feats(4)
    x[1, 2], x[3, 0] = np.nan, np.inf
    big = np.full((1, 6), 1e6, np.float32)  # finite in float32, inf in a float16 store
    rows = [("a", "1", 0), ("b", "1", 1), ("c", "1", 0), ("d", "1", 1), ("e", "1", 0)]
    result = commit(
        path,
        rows,
        [("s0", ["a", "b", "c", "d"], ["1"] * 4, x, []), ("s1", ["e"], ["1"], big, [])],
        attrs={**ATTRS, "dtype": "float16"},
    )
    loaded = FeatureStore(path).load()
    assert loaded.ids == ["a", "c"] and result.n_skipped == 3
    assert sorted(loaded.skipped) == [(i, "non-finite features") for i in ("b", "d", "e")]


def test_reading_an_old_store_with_non_finite_rows_names_them(path: Path, abc: dict) -> None:
    with h5py.File(path, "r+") as f:
        f[f"entries/{KEY}/features"][1, 0] = np.nan
        f[f"entries/{KEY}/features"][2, 3] = -np.inf
    store = FeatureStore(path)
    for read in (
        store.load,
        lambda: list(store.iter_chunks(chunk_rows=2)),
        lambda: store.read_rows(KEY, [2, 1, 0]),
    ):
        with pytest.raises(StoreError) as err:
            read()
        msg = str(err.value)
        assert str(path) in msg and KEY in msg and "non-finite" in msg and "'b'" in msg
    assert store.read_rows(KEY, [0]).shape == (1, 6)


def test_writer_without_a_source_keeps_the_recorded_one(path: Path, abc: dict) -> None:
    commit(path, [("a", "1", 0), ("b", "1", 1), ("c", "1", 0)], attrs=SRC_A)
    commit(
        path,
        [("q", "1", 0)],
        [("s", ["q"], ["1"], feats(1), [])],
        attrs={**ATTRS, "source": None},
        drop_missing=False,
    )
    assert FeatureStore(path).attrs()["source"] == "folder:/data/cats"
    with pytest.raises(StoreError, match="4 row"):
        commit(path, [("d", "1", 0)], [("s", ["d"], ["1"], feats(1), [])], attrs=SRC_B)


def test_work_that_cannot_fit_is_refused_before_it_starts(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import featurepipe.store as store_mod

    usage = store_mod.shutil.disk_usage(path.parent)
    monkeypatch.setattr(store_mod.shutil, "disk_usage", lambda _p: usage._replace(free=3 * 100 * 4))
    with FeatureStore(path).writer(KEY, {**ATTRS, "dim": 100}, lock_timeout=0) as w:
        w.check_space(2, 1)  # 2 rows in the store, 1 of them new: 1,200 bytes of features
        with pytest.raises(StoreError) as err:
            w.check_space(3, 0)  # a store of 3 rows and no shard would fit...
            w.check_space(3, 1)  # ...with one more shard row it does not
    msg = str(err.value)
    assert msg.startswith(f"cannot write store {path}: no space left on device")
    assert "MiB free" in msg and "--out" in msg
