"""Decode worker processes never hang a run: shared memory is checked up front, and a batch
that never comes ends the run in one line (see docs/reliability.md, "Decode workers")."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from featurepipe.backbones import load_backbone, resolve_spec
from featurepipe.cli import main
from featurepipe.embedding import EmbedOptions, resolve_backbone, run_embed, worker_guard
from featurepipe.embedding.runners import processes
from featurepipe.embedding.runners.base import Work
from featurepipe.embedding.runners.processes import ProcessesRunner
from featurepipe.exceptions import ConfigError, FeaturePipeWarning, WorkerError
from featurepipe.store import FeatureStore
from tests.helpers import TINY, write_good_images
from tests.test_cli import TINY_ARGS

MiB = 2**20
CROP_224 = 3 * 224 * 224


def test_in_flight_bytes_counts_workers_prefetch_and_uint8_crops():
    batches = [64] * 100
    assert worker_guard.in_flight_bytes(2, batches, (224, 224)) == 2 * 4 * 64 * CROP_224
    assert worker_guard.in_flight_bytes(2, batches, (224, 224), prefetch=2) == 2 * 2 * 64 * CROP_224
    # never more batches than the run has, each counted at the largest batch's size
    assert worker_guard.in_flight_bytes(8, [10, 64, 3], (224, 224)) == 3 * 64 * CROP_224
    assert worker_guard.in_flight_bytes(0, batches, (224, 224)) == 0
    assert worker_guard.in_flight_bytes(2, [], (224, 224)) == 0


@pytest.mark.parametrize("free_mib", [1, 16])
def test_small_shm_is_refused_in_one_line_naming_dev_shm_and_threads(free_mib):
    with pytest.raises(ConfigError) as info:
        worker_guard.check_shared_memory(2, [64] * 100, (224, 224), free_bytes=free_mib * MiB)
    text = str(info.value)
    assert "\n" not in text
    assert "/dev/shm" in text and f"{free_mib}.0 MiB free" in text
    assert "--workers 2" in text and "leave --workers unset to decode in threads" in text
    assert isinstance(info.value, ValueError)


def test_advice_fits_the_device_and_the_space():
    # 16 MiB holds one worker's 4 batches of 8 crops of 224x224 (4.6 MiB), three of them
    with pytest.raises(ConfigError, match=r"use --workers 3 or fewer"):
        worker_guard.check_shared_memory(8, [8] * 100, (224, 224), free_bytes=16 * MiB)
    with pytest.raises(ConfigError) as info:
        worker_guard.check_shared_memory(2, [64] * 100, (224, 224), device_type="cuda",
                                         free_bytes=MiB)
    text = str(info.value)
    assert "--workers 0 to decode in the main process" in text and "or fewer" not in text


def test_enough_shm_no_shm_or_no_workers_pass():
    need = worker_guard.in_flight_bytes(2, [64] * 100, (224, 224))
    assert worker_guard.check_shared_memory(2, [64] * 100, (224, 224), free_bytes=need) == 2
    assert worker_guard.check_shared_memory(0, [64] * 100, (224, 224), free_bytes=0) == 0


def test_no_shm_folder_means_nothing_to_check(tmp_path: Path):
    missing = tmp_path / "no-shm-here"
    assert worker_guard.shm_free_bytes(missing) is None
    assert worker_guard.check_shared_memory(4, [64] * 100, (224, 224), shm_path=missing) == 4
    free = worker_guard.shm_free_bytes(tmp_path)
    assert isinstance(free, int) and free >= 0


def test_default_workers_are_lowered_to_what_fits_not_refused():
    args = ([8] * 100, (224, 224))
    assert worker_guard.check_shared_memory(8, *args, free_bytes=16 * MiB, asked=False) == 3
    assert worker_guard.check_shared_memory(8, *args, free_bytes=MiB, asked=False) == 0


def test_loader_failures_become_one_line_worker_errors_and_others_pass():
    error = worker_guard.worker_failure(RuntimeError("DataLoader timed out after 7 seconds"), 7)
    assert isinstance(error, WorkerError) and isinstance(error, RuntimeError)
    text = str(error)
    assert "\n" not in text and "7 s" in text and "/dev/shm" in text and "threads" in text
    died = RuntimeError("DataLoader worker (pid(s) 123) exited unexpectedly\nmore detail")
    assert "exited unexpectedly" in str(worker_guard.worker_failure(died, 600))
    assert "\n" not in str(worker_guard.worker_failure(died, 600))
    assert worker_guard.worker_failure(RuntimeError("CUDA out of memory"), 600) is None
    assert worker_guard.worker_failure(ValueError("DataLoader"), 600) is None


class _Unsendable:
    """What a worker holds when it cannot put a batch into shared memory: pickling it for the
    main process fails in the worker's feeder thread, which only prints the error."""

    def __reduce__(self):
        raise OSError(errno.ENOSPC, "No space left on device", "/dev/shm/torch_0")


class _LostBatches(Dataset):
    """Samples whose batch never reaches the main process (as with a full /dev/shm)."""

    input_size = (32, 32)

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        return i, torch.zeros(3, 32, 32, dtype=torch.uint8), _Unsendable()


def test_a_batch_that_never_comes_ends_the_run_in_one_line():
    """Before the DataLoader timeout the main process waited for the lost batch forever."""
    backbone = load_backbone(resolve_spec(TINY["backbone"], weights="random",
                                          image_size=TINY["image_size"]))
    work = Work(_LostBatches(), [[0, 1], [2, 3]], backbone, torch.device("cpu"), "fp32",
                batch_size=2, workers=1)
    runner = ProcessesRunner(timeout=1)
    with pytest.raises(WorkerError) as info:
        list(runner.run(work))
    text = str(info.value)
    assert "\n" not in text and "timed out" in text and "1 s" in text and "/dev/shm" in text
    assert ProcessesRunner().timeout == worker_guard.WORKER_TIMEOUT_S >= 60


def test_cli_embed_with_workers_and_a_small_shm_fails_at_once(tmp_path, capsys, monkeypatch):
    """The CLI has no way to pass the free space in: the reading function is replaced."""
    write_good_images(tmp_path / "photos" / "a", 3, seed=0)
    write_good_images(tmp_path / "photos" / "b", 3, seed=1)
    monkeypatch.setattr(worker_guard, "shm_free_bytes", lambda path=None: 4096)
    args = [*TINY_ARGS]
    args[args.index("--workers") + 1] = "2"
    store = tmp_path / "s.h5"
    code = main(["embed", str(tmp_path / "photos"), "--out", str(store), *args])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert "/dev/shm" in err and "--workers 2" in err and "threads" in err
    assert not FeatureStore(store).exists()


def test_default_workers_that_do_not_fit_decode_in_the_main_process(tmp_path, monkeypatch):
    write_good_images(tmp_path / "photos" / "a", 2, seed=0)
    write_good_images(tmp_path / "photos" / "b", 2, seed=1)
    monkeypatch.setattr(worker_guard, "shm_free_bytes", lambda path=None: 0)
    monkeypatch.setattr(processes, "default_workers", lambda device: 2)
    spec = resolve_backbone(TINY["backbone"], TINY["weights"], None, TINY["image_size"])
    with pytest.warns(FeaturePipeWarning, match="0 worker process"):
        report = run_embed(tmp_path / "photos", tmp_path / "s.h5", spec,
                           EmbedOptions(precision="fp32", progress=False),
                           runner=processes.ProcessesRunner())
    assert (report.n_rows, report.n_skipped) == (4, 0)
    assert np.isfinite(FeatureStore(tmp_path / "s.h5").load().features).all()
