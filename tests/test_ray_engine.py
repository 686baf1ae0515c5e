"""The Ray engine against the local one: same features, same store, resume after SIGKILL.

One local Ray instance (2 CPUs, no dashboard) serves the whole module and is shut down at the
end; only the SIGKILL test starts a second one, inside the subprocess it kills.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from featurepipe.cli import main
from featurepipe.embed import embed
from featurepipe.engines.ray import RAY_INSTALL, embed_ray
from featurepipe.exceptions import ConfigError, DecodeError, MissingDependencyError
from featurepipe.heads import OutOfCoreSGDClassifier
from featurepipe.store import FeatureStore
from tests.helpers import TINY, write_good_images

pytestmark = [
    # Ray Data's DataContext sets its own deprecated fields while it is built (ray/data/context.py);
    # nothing we call is deprecated, and pytest runs with filterwarnings=error.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*"),
]

ROOT = Path(__file__).parent.parent
TINY_ARGS = ["--backbone", "timm:test_efficientnet", "--weights", "random", "--image-size", "32",
             "--precision", "fp32", "--dtype", "float32", "--batch-size", "4", "--shard-size", "8",
             "--quiet"]
ONE_WORKER = {"concurrency": 1}  # one actor to start where the test is not about several


def _fp32(**extra):
    return dict(TINY, precision="fp32", dtype="float32", progress=False, batch_size=4,
                shard_size=8, **extra)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[object]:
    """A local Ray instance for the module: 2 CPUs (shared machine), no dashboard."""
    ray = pytest.importorskip("ray", reason='needs pip install "featurepipe[ray]"')
    # address="local": our own instance even if someone runs `ray start` on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning")
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Ray CPU workers run torch on 1 thread; the local engine must too for bit-equal fp32.

    (oneDNN splits some reductions by thread count: 2 threads vs 1 differ by ~1e-8.)
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _shard_rows(parts: Path) -> int:
    """Images (embedded or skipped) held by the shard files under ``parts``."""
    total = 0
    for path in parts.rglob("*.npz"):
        with np.load(path) as z:
            total += len(z["ids"]) + len(z["skipped_ids"])
    return total


# --------------------------------------------------------------------------- equality and re-use


def test_ray_equals_local_and_each_reuses_the_others_store(ray_cluster, mixed_folder, tmp_path,
                                                           one_thread):
    root, expected = mixed_folder
    local_store, ray_store = tmp_path / "local.h5", tmp_path / "ray.h5"
    local = embed(root, local_store, workers=0, **_fp32())
    remote = embed_ray(root, ray_store, concurrency=2, **_fp32())

    assert remote.key == local.key  # same entry key: the stores are interchangeable
    assert (remote.n_computed, remote.n_rows, remote.skipped) == (
        local.n_computed, local.n_rows, local.skipped)
    assert {sid for sid, _ in remote.skipped} == {k for k, v in expected.items() if v}
    a, b = FeatureStore(local_store).load(), FeatureStore(ray_store).load()
    assert a.ids == b.ids and a.class_names == b.class_names and a.skipped == b.skipped
    np.testing.assert_array_equal(a.labels, b.labels)
    assert np.abs(a.features - b.features).max() == 0.0  # fp32, same batches, same threads

    assert embed_ray(root, local_store, **_fp32()).n_computed == 0  # local -> ray
    assert embed(root, ray_store, workers=0, **_fp32()).n_computed == 0  # ray -> local


def test_on_error_raise_names_the_file_and_frees_the_workers(ray_cluster, mixed_folder, tmp_path):
    root, _ = mixed_folder
    with pytest.raises(DecodeError) as info:
        embed_ray(root, tmp_path / "s.h5", on_error="raise", **_fp32(**ONE_WORKER))
    assert "b/" in str(info.value) and info.value.reason
    # The actors of the failed run are gone, or later runs in this instance would starve.
    deadline = time.time() + 120  # a cap for a broken release, not a measurement
    while time.time() < deadline and ray_cluster.available_resources().get("CPU") != 2:
        time.sleep(0.2)
    assert ray_cluster.available_resources().get("CPU") == 2


def test_worker_with_other_weights_reports_a_clear_error(ray_cluster, tmp_path):
    """An actor whose backbone differs from the driver's stops the run with a BackboneError
    (sent back as data: Ray would only keep the text of an exception raised in __init__)."""
    from featurepipe.backbones import load_backbone, resolve_spec
    from featurepipe.decode import DecodePolicy
    from featurepipe.embedding.runners.ray import EmbedWorker, WorkerConfig, worker_error
    from featurepipe.exceptions import BackboneError
    from featurepipe.sources import open_source

    write_good_images(tmp_path / "p" / "a", 2, seed=1)
    bb = load_backbone(resolve_spec(TINY["backbone"], weights="random", image_size=32))
    config = WorkerConfig(
        source_ref=[ray_cluster.put(open_source(tmp_path / "p"))], spec=bb.spec,
        weights_sha256="not-the-drivers", preprocess=bb.preprocess.to_dict(),
        policy=DecodePolicy(), device="cpu", precision="fp32", dtype="float32", batch_size=4,
        threads=1, dim=bb.feature_dim)
    out = EmbedWorker(config)({"indices": [np.array([0, 1])]})
    error = worker_error(str(out["error"][0]))
    assert isinstance(error, BackboneError) and "other weights" in str(error)
    assert out["feature"].shape == (1, bb.feature_dim)


# --------------------------------------------------------------------------- CLI and heads


def test_cli_engine_ray_store_feeds_an_out_of_core_head(ray_cluster, tmp_path, capsys):
    root = tmp_path / "photos"
    write_good_images(root / "a", 10, seed=1)
    write_good_images(root / "b", 10, seed=2)
    store = tmp_path / "s.h5"
    code = main(["embed", str(root), "--out", str(store), *TINY_ARGS, "--engine", "ray",
                 "--concurrency", "1", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["n_computed"] == 20

    fs = FeatureStore(store)
    head = OutOfCoreSGDClassifier(epochs=2, chunk_rows=8)
    head.fit_chunks(lambda: fs.iter_chunks(chunk_rows=8))
    assert head.n_rows_seen_ == 20 and list(head.classes_) == [0, 1]
    full = fs.load()
    assert head.predict(full.features).shape == (20,)


def test_cli_rejects_mixed_engine_options(tmp_path, capsys):
    write_good_images(tmp_path / "p" / "a", 1, seed=1)
    code = main(["embed", str(tmp_path / "p"), "--out", str(tmp_path / "s.h5"),
                 "--concurrency", "2"])
    assert code == 1 and "--engine ray" in capsys.readouterr().err
    code = main(["embed", str(tmp_path / "p"), "--out", str(tmp_path / "s.h5"), "--engine", "ray",
                 "--workers", "2"])
    assert code == 1 and "--concurrency" in capsys.readouterr().err


def test_bad_ray_options_are_named():
    with pytest.raises(ConfigError, match="concurrency"):
        embed_ray([], "x.h5", concurrency=0)
    with pytest.raises(ConfigError, match="gpus_per_worker"):
        embed_ray([], "x.h5", device="cuda")


# --------------------------------------------------------------------------- missing dependency


def test_missing_ray_names_the_install_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    monkeypatch.setitem(sys.modules, "ray.data", None)
    with pytest.raises(MissingDependencyError, match=r'pip install "featurepipe\[ray\]"'):
        embed_ray([], tmp_path / "s.h5")
    write_good_images(tmp_path / "p" / "a", 1, seed=1)
    code = main(["embed", str(tmp_path / "p"), "--out", str(tmp_path / "s.h5"), "--engine", "ray"])
    assert code == 1 and RAY_INSTALL in capsys.readouterr().err


# --------------------------------------------------------------------------- SIGKILL and resume

# The killed driver: a local Ray instance of its own whose workers, once two shards are on disk,
# wait before each forward pass until FP_TEST_GO exists (a worker_process_setup_hook): the run
# cannot finish before the test SIGKILLs it with some shards written, however slow the test is.
_KILLED_DRIVER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import ray

    def slow_down():
        import featurepipe.embedding.forward as engine
        real = engine.start_forward
        parts, go = Path(os.environ["FP_TEST_PARTS"]), os.environ["FP_TEST_GO"]

        def slow(*args, **kwargs):
            while len(list(parts.rglob("*.npz"))) >= 2 and not os.path.exists(go):
                time.sleep(0.05)
            return real(*args, **kwargs)

        engine.start_forward = slow

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning",
             runtime_env={"worker_process_setup_hook": slow_down})
    from featurepipe.cli import main
    sys.exit(main(["embed", *sys.argv[1:]]))
""")


_AGENTS = (b"ray::DashboardAgent", b"ray::RuntimeEnvAgent")


def _marked_pids(marker: str, but: tuple[bytes, ...] = ()) -> list[int]:
    """Processes whose environment holds our marker (the driver and every Ray process it began),
    except those whose command line starts with one of ``but``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue  # gone, or another user's
        if f"FP_TEST_RAY_RUN={marker}".encode() in env and not cmd.startswith(but):
            found.append(int(proc.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_killed_ray_run_resumes_without_recomputing(ray_cluster, tmp_path, one_thread):
    root = tmp_path / "photos"
    write_good_images(root / "a", 20, seed=1)
    write_good_images(root / "b", 19, seed=2)
    (root / "b" / "zero.jpg").write_bytes(b"")
    n_total = 40
    killed, clean = tmp_path / "killed.h5", tmp_path / "clean.h5"
    parts = Path(str(killed) + ".parts")
    marker = uuid.uuid4().hex
    go = tmp_path / "go"  # created once the driver is dead: lets its workers end their wait
    env = dict(os.environ, PYTHONPATH=str(ROOT), FP_TEST_PARTS=str(parts), FP_TEST_GO=str(go),
               FP_TEST_RAY_RUN=marker)
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_DRIVER, str(root), "--out", str(killed), *TINY_ARGS,
         "--engine", "ray", "--concurrency", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        while proc.poll() is None and len(list(parts.rglob("*.npz"))) < 2:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        go.touch()
    # The local Ray instance dies with its driver: GCS, raylet and workers within seconds. Its
    # dashboard and runtime-env agents poll the raylet and exit on their own about a minute
    # later; rather than wait, kill those by pid (only processes carrying this run's marker).
    deadline = time.time() + 120  # a cap for processes that never exit, not a measurement
    while time.time() < deadline and _marked_pids(marker, but=_AGENTS):
        time.sleep(0.5)
    leftover = _marked_pids(marker, but=_AGENTS)
    for pid in _marked_pids(marker):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    assert not leftover, f"Ray processes of the killed driver survived it: {leftover}"

    done = _shard_rows(parts)
    assert 8 <= done < n_total and not killed.exists()  # some shards, nothing committed
    rerun = embed_ray(root, killed, **_fp32(**ONE_WORKER))
    assert rerun.n_computed == n_total - done  # finished shards were not recomputed
    assert (rerun.n_resumed, rerun.n_reused) == (done, 0)
    reference = embed_ray(root, clean, **_fp32(**ONE_WORKER))
    assert (reference.n_computed, reference.n_resumed) == (n_total, 0)

    a, b = FeatureStore(killed).load(), FeatureStore(clean).load()
    assert a.ids == b.ids and a.skipped == b.skipped == [("b/zero.jpg", "empty file")]
    np.testing.assert_array_equal(a.features, b.features)
    assert not parts.exists()
