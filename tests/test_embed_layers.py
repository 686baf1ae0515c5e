"""Several layers from one pass (``embed --layers``): one entry per layer, keyed like
single-layer runs, one decode and one forward per image, reuse, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from featurepipe.backbones import load_backbone, load_layers, parse_layers, resolve_spec
from featurepipe.cli import main
from featurepipe.embed import embed
from featurepipe.embedding import EmbedOptions, embed_in_memory, resolve_backbone
from featurepipe.embedding.multi import run_embed_layers
from featurepipe.embedding.pixels import Pixels
from featurepipe.embedding.runners.threads import ThreadsRunner
from featurepipe.exceptions import BackboneError, ConfigError, StoreError
from featurepipe.sources import open_source
from featurepipe.store import FeatureStore, StoreWriter
from tests.helpers import TINY, write_good_images

LAYERS = ("blocks.1", "blocks.2", None)
TINY_ARGS = ["--backbone", TINY["backbone"], "--weights", TINY["weights"], "--image-size",
             str(TINY["image_size"]), "--precision", "fp32", "--workers", "0",
             "--batch-size", "4", "--shard-size", "8"]


def _folder(root: Path, n: int = 7) -> Path:
    write_good_images(root / "a", n, seed=1)
    write_good_images(root / "b", n - 1, seed=2)
    (root / "b" / "zero.jpg").write_bytes(b"")
    return root


def _kw(dtype: str = "float32", **extra):
    return dict(TINY, precision="fp32", dtype=dtype, progress=False, workers=0, batch_size=4,
                shard_size=8, **extra)


def _specs(layers=LAYERS):
    return [resolve_backbone(TINY["backbone"], TINY["weights"], layer, TINY["image_size"])
            for layer in layers]


def _opts(**extra) -> EmbedOptions:
    kw = _kw(**extra)
    for name in ("backbone", "weights", "image_size"):
        kw.pop(name)
    return EmbedOptions(**kw)


def _refuse(*_a, **_k):
    raise AssertionError("the network must not be loaded")


def test_parse_layers():
    assert parse_layers("blocks.4, blocks.5,penultimate") == ("blocks.4", "blocks.5", None)
    assert parse_layers(["x", None]) == ("x", None)
    for bad, match in (("a,,b", "empty layer name"), ("a,a", r"more than once in .a,a.: a"),
                       (["penultimate", None], "more than once in .*: penultimate"),
                       ([], "no layers")):
        with pytest.raises(ConfigError, match=match):
            parse_layers(bad)


def test_load_layers_checks_its_specs():
    spec = resolve_spec(TINY["backbone"], weights="random", image_size=32)
    with pytest.raises(ConfigError, match="differ only in layer"):
        load_layers([spec, resolve_spec(TINY["backbone"], weights="random", image_size=48)])
    with pytest.raises(BackboneError, match=r"unknown layer 'nope'.*blocks\.1"):
        load_layers([spec, resolve_spec(TINY["backbone"], weights="random", layer="nope",
                                        image_size=32)])
    assert load_backbone(spec).layer_dims == (load_backbone(spec).feature_dim,)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_layers_equal_single_layer_runs_under_the_same_keys(tmp_path, dtype):
    root = _folder(tmp_path / "photos")
    reports = embed(root, tmp_path / "multi.h5", layers="blocks.1,blocks.2,penultimate",
                    **_kw(dtype))
    assert [r.layer for r in reports] == list(LAYERS)
    multi = FeatureStore(tmp_path / "multi.h5")
    assert sorted(multi.keys()) == sorted(r.key for r in reports)
    for layer, report in zip(LAYERS, reports, strict=True):
        single = embed(root, tmp_path / f"{layer}.h5", layer=layer, **_kw(dtype))
        assert report.key == single.key
        assert (report.n_rows, report.n_computed, report.n_skipped) == (13, 14, 1)
        a = multi.load(report.key, dtype=None)
        b = FeatureStore(tmp_path / f"{layer}.h5").load(single.key, dtype=None)
        assert a.features.dtype == np.dtype(dtype) and a.ids == b.ids
        assert np.array_equal(a.features, b.features) and a.skipped == b.skipped
        assert multi.attrs(report.key)["layer"] == layer


def test_real_backbone_blocks_and_penultimate_equal_single_layer_runs(tmp_path):
    root = tmp_path / "photos"
    write_good_images(root / "a", 3, seed=4)
    kw = dict(backbone="efficientnet_lite0", image_size=64, precision="fp32", dtype="float32",
              progress=False, workers=0, batch_size=2)
    reports = embed(root, tmp_path / "m.h5", layers=["blocks.4", "blocks.5", None], **kw)
    assert [FeatureStore(tmp_path / "m.h5").attrs(r.key)["dim"] for r in reports] == [
        112, 192, 1280]
    for report in reports:
        single = embed(root, tmp_path / "s.h5", layer=report.layer, other_entries="keep", **kw)
        assert single.key == report.key and single.n_computed == 3
        np.testing.assert_array_equal(FeatureStore(tmp_path / "m.h5").load(report.key).features,
                                      FeatureStore(tmp_path / "s.h5").load(report.key).features)


class CountingRunner(ThreadsRunner):
    """The threads runner, counting the batches it yields."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[int]] = []

    def run(self, work):
        for batch in super().run(work):
            self.batches.append(batch[0])
            yield batch


def test_one_decode_per_image_and_one_forward_per_batch(tmp_path, monkeypatch):
    root = _folder(tmp_path / "photos")
    decoded: list[int] = []
    real_decode = Pixels.decode_into

    def counting_decode(self, i, out):
        decoded.append(i)
        return real_decode(self, i, out)

    monkeypatch.setattr(Pixels, "decode_into", counting_decode)
    passes: list[int] = []
    loaded: list[list] = []

    def load(specs):
        loaded.append(list(specs))
        bb = load_layers(specs)  # its width probe runs before the hook counts
        bb.model.get_submodule("conv_stem").register_forward_hook(
            lambda _m, _i, out: passes.append(out.shape[0]))
        return bb

    runner = CountingRunner()
    reports = run_embed_layers(root, tmp_path / "s.h5", _specs(), _opts(), runner=runner,
                               load=load)
    assert [len(specs) for specs in loaded] == [3]
    assert sorted(decoded) == list(range(14))  # every image decoded once, bad ones included
    assert sorted(sum(runner.batches, [])) == list(range(14))
    # one network pass per batch; the empty file (index 13, last batch) never reaches it
    assert passes == [4, 4, 4, 1] and [len(b) for b in runner.batches] == [4, 4, 4, 2]
    assert [r.n_computed for r in reports] == [14, 14, 14]


def test_rerun_reuses_every_layer_without_loading_the_network(tmp_path):
    root = _folder(tmp_path / "photos")
    first = run_embed_layers(root, tmp_path / "s.h5", _specs(), _opts())
    stat = (tmp_path / "s.h5").stat()
    again = run_embed_layers(root, tmp_path / "s.h5", _specs(), _opts(), load=_refuse)
    assert [r.key for r in again] == [r.key for r in first]
    assert [(r.n_computed, r.n_reused, r.n_rows) for r in again] == [(0, 13, 13)] * 3
    assert (tmp_path / "s.h5").stat().st_mtime_ns == stat.st_mtime_ns  # nothing rewritten
    # each entry also serves a later single-layer run (no --add-entry needed: it is there)
    single = embed(root, tmp_path / "s.h5", layer="blocks.2", other_entries="error", **_kw())
    assert (single.key, single.n_computed) == (first[1].key, 0)


def test_only_missing_layers_are_computed(tmp_path):
    root = _folder(tmp_path / "photos")
    store = FeatureStore(tmp_path / "s.h5")
    present = embed(root, store.path, layer="blocks.2", **_kw())
    before, updated = store.load(present.key), store.attrs(present.key)["updated"]
    loaded: list[list] = []

    def load(specs):
        loaded.append([s.layer for s in specs])
        return load_layers(specs)

    reports = run_embed_layers(root, store.path, _specs(), _opts(other_entries="error"),
                               load=load)
    assert loaded == [["blocks.1", None]]
    assert [r.n_computed for r in reports] == [14, 0, 14] and reports[1].key == present.key
    after = store.load(present.key)
    assert np.array_equal(before.features, after.features) and before.ids == after.ids
    assert store.attrs(present.key)["updated"] == updated  # the entry was not rewritten
    # the new layers equal a fresh three-layer run
    fresh = run_embed_layers(root, tmp_path / "f.h5", _specs(), _opts())
    for got, want in zip(reports, fresh, strict=True):
        assert np.array_equal(store.load(got.key).features,
                              FeatureStore(tmp_path / "f.h5").load(want.key).features)


class CrashingRunner(ThreadsRunner):
    """Dies (like a killed process) after ``n`` batches."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def run(self, work):
        for k, batch in enumerate(super().run(work)):
            if k == self.n:
                raise KeyboardInterrupt("killed")
            yield batch


def test_crash_mid_run_resumes_from_every_layers_shards(tmp_path):
    root = _folder(tmp_path / "photos", 10)  # 20 images: shards of 8, 8, 4
    store = FeatureStore(tmp_path / "s.h5")
    with pytest.raises(KeyboardInterrupt):
        run_embed_layers(root, store.path, _specs(), _opts(), runner=CrashingRunner(3))
    assert not store.path.exists()  # nothing committed: never a half-valid entry
    assert len(list(store.parts_path.rglob("*.npz"))) == 3  # one finished shard per layer
    resumed = run_embed_layers(root, store.path, _specs(), _opts())
    assert [(r.n_computed, r.n_resumed) for r in resumed] == [(12, 8)] * 3
    clean = run_embed_layers(root, tmp_path / "c.h5", _specs(), _opts())
    for a, b in zip(resumed, clean, strict=True):
        x, y = store.load(a.key), FeatureStore(tmp_path / "c.h5").load(b.key)
        assert x.ids == y.ids and x.skipped == y.skipped
        assert np.array_equal(x.features, y.features)
    assert not store.parts_path.exists()


def test_crash_between_layer_commits_leaves_whole_entries(tmp_path, monkeypatch):
    root = _folder(tmp_path / "photos")
    store = FeatureStore(tmp_path / "s.h5")
    real_commit, calls = StoreWriter.commit, []

    def commit_then_die(self, *args, **kwargs):
        calls.append(self.key)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between two commits")
        return real_commit(self, *args, **kwargs)

    monkeypatch.setattr(StoreWriter, "commit", commit_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_embed_layers(root, store.path, _specs(), _opts())
    monkeypatch.setattr(StoreWriter, "commit", real_commit)
    assert store.keys() == [calls[0]] and store.load(calls[0]).features.shape[0] == 13
    rest = run_embed_layers(root, store.path, _specs(), _opts(), load=_refuse)
    assert [(r.n_computed, r.n_resumed, r.n_reused) for r in rest] == [
        (0, 0, 13), (0, 14, 0), (0, 14, 0)]
    assert sorted(store.keys()) == sorted(r.key for r in rest)


def test_replace_keeps_every_layer_and_drops_other_entries(tmp_path):
    root = _folder(tmp_path / "photos")
    store = FeatureStore(tmp_path / "s.h5")
    other = embed(root, store.path, layer="blocks.0", **_kw())
    reports = run_embed_layers(root, store.path, _specs(), _opts(other_entries="replace"))
    assert sorted(store.keys()) == sorted(r.key for r in reports)
    assert other.key not in store.keys()


def test_space_check_counts_every_layer(tmp_path, monkeypatch):
    import featurepipe.store as store_mod

    root = _folder(tmp_path / "photos")
    dims = load_layers(_specs()).layer_dims
    # room for one layer's rows and shards, not for all three
    room = (14 + 14) * max(dims) * 4 + 1
    usage = store_mod.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(store_mod.shutil, "disk_usage", lambda _p: usage._replace(free=room))
    with pytest.raises(StoreError, match="no space left on device"):
        run_embed_layers(root, tmp_path / "s.h5", _specs(), _opts())
    assert not (tmp_path / "s.h5").exists()


def test_store_of_this_spec_and_another_is_not_refused(tmp_path):
    """A store that already holds this run's entry beside others was chosen knowingly."""
    root = _folder(tmp_path / "photos")
    embed(root, tmp_path / "s.h5", layer="blocks.0", **_kw())
    mine = embed(root, tmp_path / "s.h5", layer="blocks.1", other_entries="keep", **_kw())
    again = embed(root, tmp_path / "s.h5", layer="blocks.1", other_entries="error", **_kw())
    assert (again.key, again.n_computed) == (mine.key, 0)


def test_embed_in_memory_with_a_joint_backbone_splits_by_layer_dims(tmp_path):
    root = _folder(tmp_path / "photos", 3)
    src = open_source(root)
    joint = load_layers(_specs())
    kw = dict(device=torch.device("cpu"), precision="fp32")
    rows = embed_in_memory(src, joint, _opts(), **kw)
    assert isinstance(rows[-1], str) and "empty" in rows[-1]  # b/zero.jpg sorts last
    good = np.stack([r for r in rows if not isinstance(r, str)])
    assert good.shape == (5, sum(joint.layer_dims))  # 3 + 2 good, 1 empty file
    blocks = np.split(good, np.cumsum(joint.layer_dims)[:-1], axis=1)
    for spec, block in zip(_specs(), blocks, strict=True):
        alone = embed_in_memory(src, load_backbone(spec), _opts(), **kw)
        assert np.array_equal(block, np.stack([r for r in alone if not isinstance(r, str)]))


def test_layer_and_layers_together_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="not both"):
        embed(tmp_path, tmp_path / "s.h5", layer="blocks.1", layers="blocks.2", **_kw())


def test_cli_layers_prints_one_line_per_layer_and_json_a_list(tmp_path, capsys):
    root = _folder(tmp_path / "photos")
    store = str(tmp_path / "s.h5")
    code = main(["embed", str(root), "--out", store, *TINY_ARGS, "--quiet",
                 "--layers", "blocks.1,penultimate"])
    out = capsys.readouterr().out
    assert code == 0
    lines = [line for line in out.splitlines() if line.startswith(store)]
    assert len(lines) == 2 and "layer blocks.1" in lines[0] and "layer penultimate" in lines[1]
    assert all("computed 14" in line for line in lines)
    code = main(["embed", str(root), "--out", store, *TINY_ARGS, "--json",
                 "--layers", "blocks.1,blocks.2,penultimate"])
    reports = json.loads(capsys.readouterr().out)
    assert code == 0 and [r["layer"] for r in reports] == list(LAYERS)
    assert [r["n_computed"] for r in reports] == [0, 14, 0]
    code = main(["embed", str(root), "--out", store, *TINY_ARGS, "--layer", "blocks.2"])
    assert code == 0 and "computed 0, reused 13" in capsys.readouterr().out


def test_cli_layer_and_layers_conflict_and_unknown_layer_are_one_line(tmp_path, capsys):
    root = _folder(tmp_path / "photos")
    store = str(tmp_path / "s.h5")
    code = main(["embed", str(root), "--out", store, *TINY_ARGS, "--layer", "blocks.1",
                 "--layers", "blocks.2"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "--layer and --layers" in err
    code = main(["embed", str(root), "--out", store, *TINY_ARGS, "--layers", "blocks.1,nope"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "unknown layer 'nope'" in err and "blocks.1" in err
