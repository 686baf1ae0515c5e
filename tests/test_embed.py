"""The local embedding engine against real files: skips, alignment, reruns, increments, resume."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from featurepipe.backbones import load_backbone, resolve_spec
from featurepipe.embed import embed, forward_features, prepare_model, resolve_precision
from featurepipe.exceptions import ConfigError, DecodeError, StoreLockedError
from featurepipe.sources import open_source
from featurepipe.store import FeatureStore
from tests.helpers import TINY, write_good_images

HERE = Path(__file__).parent


def _fp32(**extra):
    return dict(TINY, precision="fp32", dtype="float32", progress=False, workers=0, **extra)


def test_mixed_folder_skips_bad_files_and_keeps_alignment(mixed_folder, tmp_path):
    root, expected = mixed_folder
    store = tmp_path / "s.h5"
    report = embed(root, store, **_fp32(batch_size=4))

    bad = {k: v for k, v in expected.items() if v is not None}
    good = sorted(k for k, v in expected.items() if v is None)
    assert report.n_total == len(expected)
    assert report.n_rows == len(good)
    assert report.n_skipped == len(bad)
    skipped = dict(report.skipped)
    assert set(skipped) == set(bad)
    for sid, prefix in bad.items():
        assert skipped[sid].startswith(prefix), (sid, skipped[sid])

    fs = FeatureStore(store).load()
    assert sorted(fs.ids) == good
    assert fs.class_names == ["a", "b"]
    assert [fs.class_names[label] for label in fs.labels] == [i.split("/")[0] for i in fs.ids]
    assert dict(fs.skipped) == skipped

    # Every row holds its own image's features, whatever its batch neighbours were.
    bb = load_backbone(resolve_spec(TINY["backbone"], weights="random", image_size=32))
    model, src = prepare_model(bb, __import__("torch").device("cpu")), open_source(root)
    transform = bb.preprocess.eval_transform()
    for sid in (good[0], "b/cmyk.jpg", "b/deep16.png", good[-1]):
        i = [s.id for s in src.samples].index(sid)
        x = transform(src.load(i, target_size=bb.preprocess.resize_size)).unsqueeze(0)
        alone = forward_features(model, x, __import__("torch").device("cpu"), "fp32").numpy()[0]
        np.testing.assert_allclose(fs.features[fs.ids.index(sid)], alone, rtol=1e-4, atol=1e-5)


def test_rerun_computes_nothing_and_leaves_file_untouched(mixed_folder, tmp_path):
    root, _ = mixed_folder
    store = tmp_path / "s.h5"
    first = embed(root, store, **_fp32())
    stat = store.stat()
    second = embed(root, store, **_fp32())
    assert first.n_computed > 0
    assert second.n_computed == 0
    assert second.n_rows == first.n_rows and second.skipped == first.skipped
    assert (store.stat().st_ino, store.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)


def test_grown_and_edited_folder_recomputes_only_changes(tmp_path):
    root = tmp_path / "photos"
    write_good_images(root / "a", 5, seed=1)
    write_good_images(root / "b", 5, seed=2)
    store = tmp_path / "s.h5"
    embed(root, store, **_fp32())

    (root / "a" / "img_000.jpg").unlink()  # deleted
    rng = np.random.default_rng(99)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
        root / "b" / "img_001.png"
    )
    os.utime(root / "b" / "img_001.png", ns=(1, 1))  # edited (new size/mtime)
    write_good_images(root / "c", 2, seed=3)  # grown: a new class
    report = embed(root, store, **_fp32())
    assert (report.n_computed, report.n_dropped) == (3, 1)

    fresh = tmp_path / "fresh.h5"
    embed(root, fresh, **_fp32())
    a, b = FeatureStore(store).load(), FeatureStore(fresh).load()
    assert a.ids == b.ids and a.class_names == b.class_names == ["a", "b", "c"]
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.features, b.features)


def test_changing_the_spec_recomputes_under_a_new_key(tmp_path):
    root = tmp_path / "photos"
    write_good_images(root / "a", 3, seed=1)
    write_good_images(root / "b", 3, seed=2)
    store = tmp_path / "s.h5"
    r1 = embed(root, store, **_fp32())
    r2 = embed(root, store, **dict(_fp32(), image_size=48))
    r3 = embed(root, store, **dict(_fp32(), dtype="float16"))
    assert len({r1.key, r2.key, r3.key}) == 3
    assert r2.n_computed == r3.n_computed == 6
    assert sorted(FeatureStore(store).keys()) == sorted([r1.key, r2.key, r3.key])


def test_on_error_raise_names_the_file(mixed_folder, tmp_path):
    root, _ = mixed_folder
    with pytest.raises(DecodeError) as info:
        embed(root, tmp_path / "s.h5", **_fp32(on_error="raise"))
    assert "b/" in str(info.value) and info.value.reason


def test_arrays_embed_with_labels(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 28, 28), dtype=np.uint8)
    labels = np.arange(12) % 3
    report = embed(images, tmp_path / "a.h5", labels=labels, **_fp32())
    fs = FeatureStore(tmp_path / "a.h5").load()
    assert report.n_rows == 12 and fs.features.shape[0] == 12
    np.testing.assert_array_equal(fs.labels, labels)


def test_bad_parameters_are_named():
    with pytest.raises(ConfigError, match="batch_size"):
        embed([], "x.h5", batch_size=0)
    with pytest.raises(ConfigError, match="precision"):
        resolve_precision("fp8", __import__("torch").device("cpu"))


# --------------------------------------------------------------------------- processes


def _run_embed_script(root: Path, store: Path, *extra: str, slow: float = 0.0,
                      hold: Path | None = None, hold_after_shards: int = 0) -> subprocess.Popen:
    """``hold``: the run stops before a forward pass once ``hold_after_shards`` shards are
    written, creates ``hold.waiting`` and goes on only when ``hold`` exists (_embed_worker.py)."""
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    if hold is not None:
        env.update(FP_TEST_HOLD=str(hold), FP_TEST_HOLD_AFTER_SHARDS=str(hold_after_shards))
    return subprocess.Popen(
        [sys.executable, str(HERE / "_embed_worker.py"), str(root), str(store), str(slow), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_for_file(path: Path, proc: subprocess.Popen) -> None:
    """Until ``path`` exists (the worker holds there) or the worker has exited."""
    while not path.exists() and proc.poll() is None:
        time.sleep(0.02)


def test_sigkill_mid_run_then_rerun_equals_uninterrupted(tmp_path):
    root = tmp_path / "photos"
    write_good_images(root / "a", 30, seed=1)
    write_good_images(root / "b", 30, seed=2)
    (root / "b" / "zero.jpg").write_bytes(b"")
    killed, clean = tmp_path / "killed.h5", tmp_path / "clean.h5"

    # The run holds (never goes on) once two shards are written: killed there, not finished.
    hold = tmp_path / "never"
    proc = _run_embed_script(root, killed, hold=hold, hold_after_shards=2)
    parts = Path(str(killed) + ".parts")
    _wait_for_file(Path(f"{hold}.waiting"), proc)
    assert proc.poll() is None, proc.communicate()
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()  # reap and close the pipes
    n_done_before = len(list(parts.rglob("*.npz")))
    assert n_done_before >= 2
    assert not killed.exists()  # nothing committed yet: never a half-valid store

    rerun = _run_embed_script(root, killed)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert f"computed {61 - 8 * n_done_before}" in out  # finished shards were not recomputed
    assert f"resumed {8 * n_done_before} (from an interrupted run)" in out
    ref = _run_embed_script(root, clean)
    out, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err

    a, b = FeatureStore(killed).load(), FeatureStore(clean).load()
    assert a.ids == b.ids and a.skipped == b.skipped == [("b/zero.jpg", a.skipped[0][1])]
    np.testing.assert_array_equal(a.features, b.features)
    assert not parts.exists()
    with h5py.File(killed, "r") as fh:  # plain h5py reads it
        assert len(fh["entries"]) == 1


def test_two_writers_never_corrupt_the_store(tmp_path):
    root = tmp_path / "photos"
    write_good_images(root / "a", 20, seed=1)
    write_good_images(root / "b", 20, seed=2)
    store = tmp_path / "s.h5"
    procs = [_run_embed_script(root, store, slow=0.05) for _ in range(2)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    assert [r[2] for r in results] == [0, 0], results
    computed = sorted(int(re.search(r"computed (\d+)", r[0]).group(1)) for r in results)
    assert computed == [0, 40]  # the second waited for the lock, then found everything done
    assert len(FeatureStore(store).load().ids) == 40


def test_second_writer_with_no_wait_gets_a_clear_error(tmp_path):
    root = tmp_path / "photos"
    write_good_images(root / "a", 16, seed=1)
    write_good_images(root / "b", 16, seed=2)
    store = tmp_path / "s.h5"
    go = tmp_path / "go"
    first = _run_embed_script(root, store, hold=go)  # holds the lock until `go` exists
    _wait_for_file(Path(f"{go}.waiting"), first)
    assert first.poll() is None, first.communicate()
    with pytest.raises(StoreLockedError, match=str(store)):
        embed(root, store, **_fp32(lock_timeout=0))
    go.touch()
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert len(FeatureStore(store).load().ids) == 32


def test_copied_store_is_reused(tmp_path):
    """A store is self-contained: copying it elsewhere keeps every row valid."""
    root = tmp_path / "photos"
    write_good_images(root / "a", 3, seed=1)
    write_good_images(root / "b", 3, seed=2)
    embed(root, tmp_path / "s.h5", **_fp32())
    shutil.copy(tmp_path / "s.h5", tmp_path / "t.h5")
    assert embed(root, tmp_path / "t.h5", **_fp32()).n_computed == 0


def test_cached_rerun_never_builds_the_network(tmp_path):
    from featurepipe.embedding import EmbedOptions, resolve_backbone, run_embed

    root = tmp_path / "photos"
    write_good_images(root / "a", 3, seed=1)
    write_good_images(root / "b", 3, seed=2)
    first = embed(root, tmp_path / "s.h5", **_fp32())

    def refuse(*_a, **_k):
        raise AssertionError("a cached rerun must not load the backbone")

    opts = _fp32()
    spec = resolve_backbone(opts.pop("backbone"), opts.pop("weights"), None,
                            opts.pop("image_size"))
    again = run_embed(root, tmp_path / "s.h5", spec, EmbedOptions(**opts), load=refuse)
    assert (again.key, again.n_computed, again.n_rows) == (first.key, 0, 6)


@pytest.mark.skipif(sys.platform != "linux",
                    reason="malloc_trim is glibc's; other platforms keep their allocator")
def test_free_heap_is_handed_back_after_every_shard():
    from featurepipe.embedding.memory import release_free_heap
    from featurepipe.embedding.plan import make_plan
    from featurepipe.embedding.sink import ShardSink

    assert release_free_heap() is True  # glibc has malloc_trim
    ids = [f"img{i}" for i in range(7)]
    fps = ["fp"] * 7
    plan = make_plan(ids, fps, {}, {}, batch_size=2, shard_size=2)
    written, trims = [], []

    class Writer:
        def write_shard(self, name, ids, fps, features, skipped=()):
            written.append((name, list(ids)))

    sink = ShardSink(plan.pending, Writer(), ids, fps, dim=3, dtype="float32",
                     after_shard=lambda: trims.append(len(written)))
    assert sink.after_shard is not release_free_heap
    assert ShardSink(plan.pending, Writer(), ids, fps, 3, "float32").after_shard \
        is release_free_heap  # the default
    for batch in reversed(plan.batches()):  # any order: shards are written when complete
        sink.add(batch, [""] * len(batch), np.ones((len(batch), 3), np.float32))
    assert [len(w[1]) for w in written] == [1, 2, 2, 2]  # shards of 2, 2, 2, 1, last first
    assert trims == [1, 2, 3, 4] and not sink.pending


def test_decode_threads_match_worker_processes_bit_for_bit(mixed_folder, tmp_path):
    """The CPU default (decode threads between forward passes) changes speed, not features."""
    root, _ = mixed_folder
    opts = dict(_fp32(batch_size=3))
    serial = embed(root, tmp_path / "serial.h5", **opts)
    opts["workers"] = None  # auto: threads on CPU
    threaded = embed(root, tmp_path / "threads.h5", **opts)
    a, b = FeatureStore(tmp_path / "serial.h5").load(), FeatureStore(tmp_path / "threads.h5").load()
    assert a.ids == b.ids and serial.skipped == threaded.skipped
    np.testing.assert_array_equal(a.features, b.features)


def test_uint8_batches_are_normalised_like_eval_transform_exactly(mixed_folder):
    """Workers ship uint8 crops; NormalizedInput must rebuild eval_transform's floats exactly."""
    import torch

    from featurepipe.embedding.forward import NormalizedInput
    from featurepipe.embedding.pixels import collate as _collate

    root, expected = mixed_folder
    src = open_source(root)
    pre = resolve_spec(TINY["backbone"], weights="random", image_size=32)
    bb = load_backbone(pre)
    good = [i for i, s in enumerate(src.samples) if expected[s.id] is None][:5]
    images = [src.load(i, target_size=bb.preprocess.resize_size) for i in good]
    floats = torch.stack([bb.preprocess.eval_transform()(im) for im in images])
    _, crops, _ = _collate([(i, bb.preprocess.decode_transform()(im), "")
                            for i, im in zip(good, images, strict=True)])
    assert crops.dtype == torch.uint8
    assert crops.is_contiguous(memory_format=torch.channels_last)
    norm = NormalizedInput(torch.nn.Identity(), bb.preprocess.mean, bb.preprocess.std)
    assert torch.equal(norm(crops), floats)
    assert norm(floats) is floats  # float batches are taken as normalised already


_HEAP_SCRIPT = """
import ctypes
import featurepipe.embed as E

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks",
                                               "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
tuned = E.keep_buffers_in_heap()
before = libc.mallinfo2().hblks  # chunks glibc serves by mmap
buffer = libc.malloc(26 << 20)  # one activation of a batch
mapped = libc.mallinfo2().hblks - before
libc.free(buffer)
print(tuned, mapped)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning only")
@pytest.mark.parametrize("setting", ["", "default"])
def test_cpu_buffers_stay_in_the_heap_unless_asked(setting):
    """A batch-sized buffer comes from malloc's heap once the engine tuned glibc (no fresh
    mmap, so no page faults to bring it back on every batch), and FEATUREPIPE_MALLOC=default
    leaves glibc as it is. glibc's own counter of mmapped chunks says which: deterministic,
    unlike counting page faults.
    """
    env = {**os.environ, "FEATUREPIPE_MALLOC": setting}
    out = subprocess.run([sys.executable, "-c", _HEAP_SCRIPT], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    tuned, mapped = out[0] == "True", int(out[1])
    if setting == "default":
        assert not tuned and mapped == 1
    else:
        assert tuned and mapped == 0


def test_decode_threads_write_each_crop_into_its_batch_slot(mixed_folder):
    """decode_into gives __getitem__'s pixels and reasons, bad files as zeros, for the default
    crop and for any other transform (float eval_transform here)."""
    import torch

    from featurepipe.decode import DecodePolicy
    from featurepipe.embedding.pixels import Pixels

    root, _ = mixed_folder
    src = open_source(root)
    pre = load_backbone(resolve_spec(TINY["backbone"], weights="random",
                                     image_size=32)).preprocess
    for transform, dtype in ((pre.decode_transform(), torch.uint8),
                             (pre.eval_transform(), torch.float32)):
        ds = Pixels(src, transform, DecodePolicy(), pre.input_size, pre.resize_size,
                    fill_dtype=dtype)
        batch = torch.full((len(src), *pre.input_size, 3), 7, dtype=dtype).permute(0, 3, 1, 2)
        for k in range(len(src)):
            i, reason = ds.decode_into(k, batch[k])
            j, expected, expected_reason = ds[k]
            assert (i, reason) == (j, expected_reason)
            assert torch.equal(batch[k], expected)
        assert any(r for _, _, r in (ds[k] for k in range(len(src))))  # bad files were seen


def test_decode_threads_run_torch_ops_on_their_own_thread(mixed_folder):
    """Each decode thread runs torch's ops alone (no OpenMP team of its own fighting the other
    decode thread for the cores); the forward pass in the calling thread keeps its threads."""
    import torch

    from featurepipe.decode import DecodePolicy
    from featurepipe.embedding.pixels import Pixels
    from featurepipe.embedding.runners.threads import DecodeInThreads

    root, _ = mixed_folder
    src = open_source(root)
    pre = load_backbone(resolve_spec(TINY["backbone"], weights="random",
                                     image_size=32)).preprocess
    crop = pre.decode_transform()
    seen: list[int] = []

    def counting(img, out=None):
        seen.append(torch.get_num_threads())
        return crop(img) if out is None else out.copy_(crop(img))

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ds = Pixels(src, counting, DecodePolicy(), pre.input_size, pre.resize_size,
                    fill_dtype=torch.uint8)
        batches = list(DecodeInThreads(ds, [[0, 1, 2], [3, 4, 5]], threads=2))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert [len(idx) for idx, _, _ in batches] == [3, 3]
    assert seen and set(seen) == {1}
