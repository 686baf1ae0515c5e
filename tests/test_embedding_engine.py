"""The engine's pure parts (plan, runner choice) and the driver with an injected runner."""

from __future__ import annotations

import numpy as np
import pytest

from featurepipe.embedding import (
    EmbedOptions,
    RunnerChoice,
    choose_runner,
    make_plan,
    resolve_backbone,
    run_embed,
)
from featurepipe.embedding.plan import default_shard_size
from featurepipe.embedding.runners.base import Runner
from featurepipe.exceptions import ConfigError
from featurepipe.store import FeatureStore
from tests.helpers import TINY, write_good_images


@pytest.mark.parametrize(("device", "workers", "decoder", "compile_", "engine", "runner"), [
    ("cpu", None, "pil", True, "local", "cpu_streams"),
    ("cpu", None, "pil", False, "local", "threads"),
    ("cpu", 0, "pil", True, "local", "processes"),
    ("cpu", 2, "pil", False, "local", "processes"),
    ("cuda", None, "pil", False, "local", "processes"),
    ("cuda", None, "pil", True, "local", "processes"),
    ("cuda", None, "nvjpeg", False, "local", "nvjpeg"),
    ("cuda", 4, "nvjpeg", True, "local", "nvjpeg"),
    ("cpu", None, "pil", False, "ray", "ray"),
    ("cuda", None, "pil", False, "ray", "ray"),
])
def test_choose_runner_table(device, workers, decoder, compile_, engine, runner):
    assert choose_runner(RunnerChoice(device, workers, decoder, compile_, engine)) == runner


def test_plan_finds_new_changed_deleted_and_cuts_batches_inside_shards():
    ids = ["a", "b", "c", "d", "e", "f", "g"]
    fps = ["1", "2", "3", "4", "5", "6", "7"]
    committed = {"a": "1", "b": "old", "gone": "9"}
    skipped = {"c": ("3", "truncated"), "d": ("old", "truncated")}
    plan = make_plan(ids, fps, committed, skipped, batch_size=2, shard_size=4)
    assert plan.new == (4, 5, 6) and plan.changed == (1, 3) and plan.deleted == ("gone",)
    assert [s.indices for s in plan.shards] == [(1, 3, 4, 5), (6,)]
    assert plan.batches() == [[1, 3], [4, 5], [6]]
    assert plan.shards[0].name.startswith("000000-") and plan.shards[1].name.startswith("000001-")
    again = make_plan(ids, fps, committed, skipped, 2, 4,
                      shard_done=lambda name: name == plan.shards[0].name)
    assert again.shards == plan.shards  # same names: a rerun finds an interrupted run's shards
    assert again.pending == plan.shards[1:] and again.n_pending == 1 and again.n_todo == 5


def test_plan_keeps_existing_shard_names():
    # Names an interrupted run of 8697d76 left on disk; a new plan must find them.
    plan = make_plan(["x.jpg", "y.jpg"], ["10:20", "30:40"], {}, {}, batch_size=64)
    assert default_shard_size(64) == 1024
    assert [s.name for s in plan.shards] == ["000000-" + _digest(["x.jpg", "y.jpg"],
                                                                ["10:20", "30:40"])]


def _digest(ids, fps):
    import hashlib

    d = hashlib.blake2b(digest_size=8)
    for i, f in zip(ids, fps, strict=True):
        d.update(i.encode() + b"\0" + f.encode() + b"\n")
    return d.hexdigest()


def test_options_are_validated_once():
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        EmbedOptions(batch_size=0)
    with pytest.raises(ConfigError, match="dtype must be one of"):
        EmbedOptions(dtype="int8")
    with pytest.raises(ConfigError, match="other_entries"):
        EmbedOptions(other_entries="merge")
    with pytest.raises(ConfigError, match="workers"):
        EmbedOptions(workers=-1)


class ConstantRunner(Runner):
    """A fake runner: every image decodes, its feature is its source index."""

    name = "constant"

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim, self.seen = dim, []

    def run(self, work):
        for batch in reversed(list(work.batches)):  # out of order, as Ray returns them
            self.seen.append(list(batch))
            yield list(batch), [""] * len(batch), np.repeat(
                np.asarray(batch, np.float32)[:, None], self.dim, axis=1)


def test_driver_sinks_an_injected_runner_and_commits_its_provenance(tmp_path):
    root = tmp_path / "imgs"
    write_good_images(root, 7, seed=2)
    spec = resolve_backbone(TINY["backbone"], TINY["weights"], None, TINY["image_size"])
    opts = EmbedOptions(precision="fp32", dtype="float32", progress=False, batch_size=2,
                        shard_size=4)
    from featurepipe.backbones import load_backbone

    dim = load_backbone(spec).feature_dim
    runner = ConstantRunner(dim)
    report = run_embed(root, tmp_path / "s.h5", spec, opts, runner=runner)
    assert runner.seen == [[6], [4, 5], [2, 3], [0, 1]]
    assert (report.n_computed, report.runner, report.compiled) == (7, "constant", False)
    fs = FeatureStore(tmp_path / "s.h5")
    data = fs.load(report.key)
    np.testing.assert_array_equal(data.features[:, 0], np.arange(7, dtype=np.float32))
    assert not bool(fs.attrs(report.key)["compiled"])
    rerun = run_embed(root, tmp_path / "s.h5", spec, opts, runner=ConstantRunner(dim))
    assert (rerun.n_computed, rerun.runner) == (0, "")
