"""Fine-tuning: strategies, schedules, checkpoints (incl. SIGKILL + resume), export, sklearn API.

CPU only, tiny random timm network at 32x32, a few dozen images, 1-3 epochs.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from featurepipe.exceptions import ConfigError, DecodeError, FeaturePipeWarning, WriteError
from featurepipe.finetune import (
    EarlyStopping,
    FineTuneClassifier,
    Trainer,
    WarmupCosine,
    atomic_save,
    finetune,
    load_checkpoint,
    stage_groups,
    unfrozen_stages,
)
from featurepipe.finetune.schedules import make_scheduler
from featurepipe.finetune.strategies import apply_freeze, param_groups, set_bn_policy

TINY = {"backbone": "timm:test_efficientnet", "weights": "random", "image_size": 32}
#: Deterministic small run: 18 train / 6 val images, 3 batches per epoch.
EXACT = dict(TINY, epochs=3, batch_size=6, val_size=0.25, lr=3e-3, strategy="full",
             precision="fp32", num_workers=0, random_state=0, verbose=0, early_stopping=None)
WORKER = Path(__file__).with_name("_finetune_worker.py")
METRICS = ("train_loss", "train_acc", "val_loss", "val_acc")


def red_blue(n: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Separable 2-class set: reddish vs bluish 32x32 noise images."""
    rng = np.random.default_rng(seed)
    X = rng.integers(0, 90, size=(n, 32, 32, 3)).astype(np.uint8)
    y = np.array(["blue", "red"] * (n // 2))
    X[y == "red", :, :, 0] += 160
    X[y == "blue", :, :, 2] += 160
    return X, y


def tiny_timm(num_classes: int = 3) -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("test_efficientnet", pretrained=False, num_classes=num_classes)


def trainable_per_stage(model: nn.Module, groups: list[list[str]]) -> list[str]:
    """'all' / 'none' per stage (anything else means a stage is half frozen)."""
    params = dict(model.named_parameters())
    out = []
    for g in groups:
        flags = {params[n].requires_grad for n in g}
        out.append("all" if flags == {True} else "none" if flags == {False} else "mixed")
    return out


def weights_close(a: nn.Module, b: nn.Module, atol: float = 1e-5) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max(float((sa[k].float() - sb[k].float()).abs().max()) if sa[k].numel() else 0.0
               for k in sa)


# --------------------------------------------------------------------------- pure pieces


def test_warmup_cosine_values() -> None:
    f = WarmupCosine(warmup_steps=4, total_steps=12)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(8) == pytest.approx(0.5 * (1 + np.cos(np.pi * 4 / 7)))
    assert f(11) == pytest.approx(0.0, abs=1e-12)
    values = [f(s) for s in range(4, 12)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_scheduler_keeps_group_ratio() -> None:
    model = tiny_timm()
    groups = stage_groups(model, "timm")
    opt = torch.optim.AdamW(param_groups(model, groups, lr=1e-2, backbone_lr_factor=0.1,
                                         weight_decay=0.01))
    sched = make_scheduler(opt, warmup_steps=2, total_steps=6)
    seen = []
    for _ in range(6):
        head = [g["lr"] for g in opt.param_groups if g["stage"] == "head"][0]
        stem = [g["lr"] for g in opt.param_groups if g["stage"] == "stem"][0]
        seen.append((head, stem))
        opt.step()
        sched.step()
    assert [h for h, _ in seen] == pytest.approx([5e-3, 1e-2, 1e-2, 7.5e-3, 2.5e-3, 0.0], abs=1e-12)
    assert all(s == pytest.approx(h * 0.1, abs=1e-15) for h, s in seen)


def test_stage_groups_cover_every_parameter_once() -> None:
    import torchvision

    for model, family, first, head in [
        (tiny_timm(), "timm", "conv_stem.weight", ["classifier.weight", "classifier.bias"]),
        (torchvision.models.resnet18(), "torchvision", "conv1.weight", ["fc.weight", "fc.bias"]),
        (torchvision.models.mobilenet_v3_small(), "torchvision", "features.0.0.weight", None),
    ]:
        groups = stage_groups(model, family)
        flat = [n for g in groups for n in g]
        assert sorted(flat) == sorted(n for n, _ in model.named_parameters())
        assert len(flat) == len(set(flat))
        assert groups[0][0] == first
        if head:
            assert groups[-1] == head
    resnet_groups = stage_groups(torchvision.models.resnet18(), "torchvision")
    assert [g[0].split(".")[0] for g in resnet_groups] == [
        "conv1", "layer1", "layer2", "layer3", "layer4", "fc"]
    assert "bn1.weight" in resnet_groups[0]


@pytest.mark.parametrize(("strategy", "n", "expected_trained"), [
    ("head", 0, 1), ("partial", 1, 2), ("partial", 2, 3), ("full", 0, 7)])
def test_strategy_freezes_exactly_what_it_claims(strategy: str, n: int,
                                                 expected_trained: int) -> None:
    model = tiny_timm()
    groups = stage_groups(model, "timm")
    assert len(groups) == 7  # stem, blocks.0-4, head
    unfrozen = unfrozen_stages(strategy, len(groups), epoch=0, unfreeze_stages=n)
    n_trainable = apply_freeze(model, groups, unfrozen)
    flags = trainable_per_stage(model, groups)
    k = len(groups) - expected_trained
    assert flags == ["none"] * k + ["all"] * expected_trained
    params = dict(model.named_parameters())
    assert n_trainable == sum(params[name].numel() for g in groups[k:] for name in g)


def test_gradual_unfreezes_one_stage_every_n_epochs() -> None:
    n_stages = 7
    got = [len(unfrozen_stages("gradual", n_stages, e, gradual_every=2)) for e in range(16)]
    assert got == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 7, 7]
    assert unfrozen_stages("gradual", n_stages, 3, gradual_every=1) == [3, 4, 5, 6]


def test_batchnorm_in_frozen_stages_stays_in_eval_mode() -> None:
    model = tiny_timm()
    groups = stage_groups(model, "timm")
    apply_freeze(model, groups, unfrozen_stages("partial", len(groups), 0, unfreeze_stages=1))
    model.train()
    set_bn_policy(model)
    bns = {name: m for name, m in model.named_modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    last_stage = {n.rsplit(".", 1)[0] for n in groups[-2]}
    assert bns
    for name, m in bns.items():
        assert m.training == (name in last_stage), name
    # a training step leaves frozen BN running stats untouched
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    after = model.state_dict()
    for key, value in before.items():
        changed = not torch.equal(value, after[key])
        assert changed == (key.rsplit(".", 1)[0] in last_stage), key


def test_param_groups_discriminative_lr() -> None:
    model = tiny_timm()
    groups = stage_groups(model, "timm")
    pg = param_groups(model, groups, lr=1e-3, backbone_lr_factor=0.1, weight_decay=0.05,
                      stage_lr_decay=0.5)
    lr = {g["stage"]: g["lr"] for g in pg}
    assert lr["head"] == pytest.approx(1e-3)
    assert lr["stage5"] == pytest.approx(1e-4)
    assert lr["stage4"] == pytest.approx(5e-5)
    assert lr["stem"] == pytest.approx(1e-4 * 0.5**5)
    for g in pg:  # no weight decay on biases / norm weights
        assert (g["weight_decay"] == 0.0) == all(p.ndim <= 1 for p in g["params"])


def test_interrupted_checkpoint_write_keeps_previous(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoint.pt"
    atomic_save({"epoch": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, f, *args, **kwargs):  # noqa: ANN001, ANN202
        f.write(b"PK\x03\x04 torn")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


class _FullAfter(io.RawIOBase):
    """A file on a disk that fills up after ``room`` bytes."""

    def __init__(self, fh: Any, room: int) -> None:
        self.fh, self.room = fh, room

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.fh.write(data)


def test_full_disk_inside_torch_save_names_the_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save reports a failed write of its file as a RuntimeError ("unexpected pos")."""
    path = tmp_path / "checkpoint.pt"
    atomic_save({"epoch": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def save_onto_a_full_disk(obj, f, *args, **kwargs):  # noqa: ANN001, ANN202
        return real_save(obj, _FullAfter(f, 2000), *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_onto_a_full_disk)
    with pytest.raises(WriteError) as info:
        atomic_save({"epoch": 2, "w": torch.zeros(10_000)}, path)
    monkeypatch.undo()
    assert str(info.value) == f"cannot write {path}: no space left on device"
    assert info.value.errno == errno.ENOSPC
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def data_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    X, y = red_blue()
    path = tmp_path_factory.mktemp("data") / "red_blue.npz"
    np.savez(path, X=X, y=y)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> FineTuneClassifier:
    """An uninterrupted deterministic run (shared by several tests)."""
    X, y = red_blue()
    return FineTuneClassifier(**EXACT, checkpoint_dir=tmp_path_factory.mktemp("ref")).fit(X, y)


def test_loss_falls_and_separable_set_is_learned(reference: FineTuneClassifier) -> None:
    h = reference.history_
    assert [r["epoch"] for r in h] == [1, 2, 3]
    assert h[2]["train_loss"] < h[0]["train_loss"]
    assert h[2]["train_acc"] >= 0.85
    X, y = red_blue()
    assert list(reference.classes_) == ["blue", "red"]
    # A random-init net trained 9 steps has BatchNorm running stats far from its batch stats, so
    # eval-mode accuracy is checked on a head-only run (frozen BN, as with pretrained weights).
    head = FineTuneClassifier(**dict(EXACT, strategy="head", lr=3e-2, epochs=4)).fit(X, y)
    assert head.history_[-1]["train_loss"] < head.history_[0]["train_loss"]
    assert head.score(X, y) >= 0.9
    assert head.history_[-1]["val_acc"] >= 0.8
    proba = reference.predict_proba(X[:5])
    assert proba.shape == (5, 2)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-5)
    assert set(h[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lrs",
                         "seconds", "train_seconds", "n_trainable"}
    assert reference.n_train_ == 18 and reference.n_val_ == 6


def test_history_json_and_png_written(reference: FineTuneClassifier) -> None:
    folder = Path(reference.checkpoint_dir)
    saved = json.loads((folder / "history.json").read_text())
    expected = [r["val_loss"] for r in reference.history_]
    assert [r["val_loss"] for r in saved] == pytest.approx(expected)
    assert (folder / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seeded_runs_are_reproducible(reference: FineTuneClassifier) -> None:
    X, y = red_blue()
    state = torch.get_rng_state()
    again = FineTuneClassifier(**EXACT).fit(X, y)
    assert torch.equal(torch.get_rng_state(), state)  # caller's RNG left alone
    for a, b in zip(reference.history_, again.history_, strict=True):
        for key in METRICS:
            assert a[key] == b[key], key
    assert weights_close(reference.model_, again.model_) == 0.0


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(
        reference: FineTuneClassifier, data_npz: Path, tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "run"
    ckpt_dir.mkdir()
    params = {k: v for k, v in EXACT.items()}
    proc = _spawn(data_npz, ckpt_dir, params, "slow-epochs")
    try:
        _wait_for(ckpt_dir / "checkpoint.pt", proc)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (ckpt_dir / "FINISHED").exists()
    assert load_checkpoint(ckpt_dir / "checkpoint.pt")["trainer"]["epoch"] == 1

    X, y = red_blue()
    with pytest.raises(ConfigError, match=r"parameters differ .*lr: 0.003 -> 0.01"):
        FineTuneClassifier(**dict(EXACT, lr=1e-2, epochs=4), checkpoint_dir=ckpt_dir,
                           resume=True).fit(X, y)
    with pytest.raises(ConfigError, match="images or labels differ"):
        FineTuneClassifier(**EXACT, checkpoint_dir=ckpt_dir, resume=True).fit(X, y[::-1])
    resumed = FineTuneClassifier(**EXACT, checkpoint_dir=ckpt_dir, resume=True).fit(X, y)
    assert len(resumed.history_) == 3
    for a, b in zip(reference.history_, resumed.history_, strict=True):
        for key in METRICS:
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["epoch"], key)
    assert weights_close(reference.model_, resumed.model_) < 1e-5
    assert resumed.best_epoch_ == reference.best_epoch_


def test_sigkill_during_checkpoint_write_leaves_previous_checkpoint(
        data_npz: Path, tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "run"
    ckpt_dir.mkdir()
    params = dict(EXACT, epochs=2)
    proc = _spawn(data_npz, ckpt_dir, params, "hang-in-save")
    try:
        _wait_for(ckpt_dir / "WRITING", proc)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert list(ckpt_dir.glob("checkpoint.pt.tmp-*"))  # the torn temp file is there ...
    ckpt = load_checkpoint(ckpt_dir / "checkpoint.pt")  # ... but the checkpoint is intact
    assert ckpt["trainer"]["epoch"] == 1
    X, y = red_blue()
    resumed = FineTuneClassifier(**params, checkpoint_dir=ckpt_dir, resume=True).fit(X, y)
    assert [r["epoch"] for r in resumed.history_] == [1, 2]
    assert not list(ckpt_dir.glob("checkpoint.pt.tmp-*"))


def _spawn(data_npz: Path, ckpt_dir: Path, params: dict, mode: str) -> subprocess.Popen:
    """Start the worker; its stderr goes to ``ckpt_dir/../worker.log`` (no pipes to leak)."""
    log = ckpt_dir.parent / "worker.log"
    with open(log, "wb") as err:
        return subprocess.Popen(
            [sys.executable, str(WORKER), str(data_npz), str(ckpt_dir), json.dumps(params), mode],
            stdout=subprocess.DEVNULL, stderr=err)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            log = (path.parent.parent / "worker.log").read_text(errors="replace")
            pytest.fail(f"worker exited {proc.returncode} early:\n{log[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{path.name} did not appear within {timeout}s")
        time.sleep(0.02)


def test_gradual_strategy_grows_trainable_set_on_schedule() -> None:
    X, y = red_blue(16)
    clf = FineTuneClassifier(**dict(EXACT, strategy="gradual", gradual_every=1, epochs=3,
                                    val_size=0, warmup_epochs=0, backbone_lr_factor=0.1))
    clf.fit(X, y)
    h = clf.history_
    assert [sorted(r["lrs"]) for r in h] == [
        ["head"], ["head", "stage5"], ["head", "stage4", "stage5"]]
    assert h[0]["n_trainable"] < h[1]["n_trainable"] < h[2]["n_trainable"]
    assert h[1]["lrs"]["stage5"] == pytest.approx(h[1]["lrs"]["head"] * 0.1)
    assert clf.best_epoch_ == 3  # no validation: the last epoch is kept


def test_finetune_writes_run_folder_and_export_round_trips(tmp_path: Path) -> None:
    from featurepipe.backbones import load_backbone, resolve_spec

    X, y = red_blue(16)
    res = finetune(X, tmp_path / "ft", y=y, **dict(EXACT, epochs=1, strategy="partial",
                                                   unfreeze_stages=1, val_size=0.25))
    out = tmp_path / "ft"
    for name in ("checkpoint.pt", "history.json", "history.png", "metrics.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_epoch"] == 1 and metrics["classes"] == ["blue", "red"]
    assert Path(res.to_dict()["paths"]["model"]).resolve() == (out / "model").resolve()

    bb = load_backbone(resolve_spec(str(out / "model")))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = res.estimator.model_.eval()(x)
        got = bb.model.eval()(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert bb.preprocess == res.estimator.preprocess_


def test_bad_images_are_skipped_with_a_warning(mixed_folder: tuple[Path, dict]) -> None:
    root, expected = mixed_folder
    bad = {name for name, why in expected.items() if why is not None}
    params = dict(EXACT, epochs=1, val_size=0, batch_size=4)
    with pytest.warns(FeaturePipeWarning, match="truncated") as record:
        clf = FineTuneClassifier(**params).fit(root)
    assert len(record) == 1
    assert {Path(s["path"]).relative_to(root).as_posix() for s in clf.skipped_} == bad
    assert clf.n_train_ == len(expected) - len(bad)
    assert list(clf.classes_) == ["a", "b"]
    with pytest.raises(DecodeError):
        FineTuneClassifier(**dict(params, on_error="raise")).fit(root)


def test_invalid_params_raise_in_fit_not_init() -> None:
    X, y = red_blue(8)
    clf = FineTuneClassifier(strategy="everything", epochs=0)
    assert clf.strategy == "everything"
    with pytest.raises(ConfigError, match="strategy"):
        clf.fit(X, y)
    with pytest.raises(ConfigError, match="classes"):
        FineTuneClassifier(**EXACT).fit(X, np.zeros(8, dtype=int))


def test_sklearn_conventions_and_joblib(reference: FineTuneClassifier, tmp_path: Path) -> None:
    import joblib
    from sklearn.base import clone
    from sklearn.utils.estimator_checks import (
        check_get_params_invariance,
        check_no_attributes_set_in_init,
        check_parameters_default_constructible,
        check_set_params,
    )

    est = FineTuneClassifier(**EXACT)
    name = type(est).__name__
    # parametrize_with_checks does not apply as a whole: X is images (paths, folders, (N, H, W, C)
    # arrays), not 2-D numeric tables, and every fit trains a network. The checks that do not fit
    # 2-D data run here; fitted behaviour is covered by the tests above.
    check_no_attributes_set_in_init(name, est)
    check_get_params_invariance(name, est)
    check_set_params(name, est)
    check_parameters_default_constructible(name, est)
    twin = clone(est).set_params(lr=0.5)
    assert twin.lr == 0.5 and est.lr == EXACT["lr"]

    X, _ = red_blue(6)
    joblib.dump(reference, tmp_path / "clf.joblib")  # the network travels as a CPU state dict
    restored = joblib.load(tmp_path / "clf.joblib")
    np.testing.assert_allclose(restored.predict_proba(X), reference.predict_proba(X), atol=1e-6)


def test_trainer_alone_with_callbacks() -> None:
    """The loop is usable without the estimator: plain tensors, an early-stopping callback."""
    torch.manual_seed(0)
    x = torch.randn(32, 4)
    y = (x[:, 0] > 0).long()
    ds = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True,
                                         generator=torch.Generator())
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    stopper = EarlyStopping("val_loss", patience=1)
    trainer = Trainer(model, opt, None, nn.CrossEntropyLoss(), loader, loader, epochs=20,
                      device=torch.device("cpu"), seed=1, callbacks=[stopper])
    history = trainer.fit()
    assert history[-1]["val_acc"] >= 0.9
    assert stopper.best_epoch is not None


def test_early_stopping_patience_and_best_weights() -> None:
    model = nn.Linear(2, 2)
    trainer = type("T", (), {"model": model, "stop_training": False})()
    stopper = EarlyStopping("val_loss", patience=2)
    for epoch, loss in enumerate([0.9, 0.5, 0.6, 0.4, 0.45, 0.41], start=1):
        with torch.no_grad():
            model.weight.fill_(epoch)
        stopper.on_epoch_end(trainer, {"epoch": epoch, "val_loss": loss})
        if trainer.stop_training:
            break
    assert (epoch, stopper.best_epoch, stopper.best) == (6, 4, 0.4)
    stopper.on_train_end(trainer)
    assert model.weight.detach()[0, 0].item() == 4.0


def test_fp16_steps_the_grad_scaler_skips_do_not_advance_the_schedule() -> None:
    """fp16: an overflowing step is skipped by the GradScaler; the LR schedule must not move
    (torch warns 'lr_scheduler.step() before optimizer.step()' otherwise)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    trainer = Trainer(model, opt, sched, nn.CrossEntropyLoss(), [], None, epochs=1,
                      device=torch.device("cpu"), precision="fp16")
    y = torch.zeros(8, dtype=torch.long)
    before = model.weight.detach().clone()
    trainer.train_step(torch.full((8, 4), 3e4), y)  # scaled gradients overflow fp16
    assert sched.last_epoch == 0 and torch.equal(model.weight.detach(), before)
    trainer.train_step(torch.randn(8, 4) * 0.1, y)
    assert sched.last_epoch == 1 and not torch.equal(model.weight.detach(), before)


def test_resume_extends_a_finished_run(tmp_path: Path) -> None:
    """--resume --epochs N after a finished run trains the extra epochs on a stretched cosine."""
    X, y = red_blue()
    run = tmp_path / "run"
    two = FineTuneClassifier(**dict(EXACT, epochs=2), checkpoint_dir=run).fit(X, y)
    with pytest.raises(ConfigError, match="already trained 2 epochs"):
        FineTuneClassifier(**dict(EXACT, epochs=1), checkpoint_dir=run, resume=True).fit(X, y)
    three = FineTuneClassifier(**dict(EXACT, epochs=3), checkpoint_dir=run, resume=True).fit(X, y)
    assert [r["epoch"] for r in three.history_] == [1, 2, 3]
    for a, b in zip(two.history_, three.history_[:2], strict=False):
        assert a[METRICS[0]] == b[METRICS[0]]  # the first two epochs are the finished run's
    # On the old plan the cosine had reached 0 at the end of epoch 2; the new plan stretches it.
    assert two.history_[-1]["lrs"]["head"] > 0 and three.history_[2]["lrs"]["head"] > 0
    assert load_checkpoint(run / "checkpoint.pt")["params"]["epochs"] == 3
    # The extended run's checkpoint resumes like any other: nothing left to train.
    again = FineTuneClassifier(**dict(EXACT, epochs=3), checkpoint_dir=run, resume=True).fit(X, y)
    assert len(again.history_) == 3


def test_finished_run_is_not_overwritten_without_overwrite(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    X, y = red_blue(16)
    params = dict(EXACT, epochs=1, val_size=0.25)
    out = tmp_path / "ft"
    finetune(X, out, y=y, **params)
    before = (out / "metrics.json").read_bytes()
    with pytest.raises(ConfigError, match="holds a finished fine-tuning run") as info:
        finetune(X, out, y=y, **params)
    text = str(info.value)
    assert str(out) in text and "--resume" in text and "--overwrite" in text
    assert (out / "metrics.json").read_bytes() == before
    (out / "metrics.json").unlink()  # as if killed before the end: the checkpoint remains
    with pytest.raises(ConfigError, match="holds an interrupted fine-tuning run"):
        finetune(X, out, y=y, **params)
    finetune(X, out, y=y, overwrite=True, **params)
    assert (out / "metrics.json").is_file()


def test_finetune_cli_refuses_a_finished_run_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from featurepipe.cli import main
    from tests.helpers import write_good_images

    write_good_images(tmp_path / "photos" / "a", 4, seed=0)
    write_good_images(tmp_path / "photos" / "b", 4, seed=1)
    argv = ["finetune", str(tmp_path / "photos"), "--out", str(tmp_path / "ft"), "--backbone",
            TINY["backbone"], "--weights", "random", "--image-size", "32", "--epochs", "1",
            "--batch-size", "4", "--val-size", "4", "--precision", "fp32", "--quiet", "--json"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--resume" in err and "--overwrite" in err
    longer = [*argv[:argv.index("--epochs") + 1], "2", *argv[argv.index("--epochs") + 2:]]
    assert main([*longer, "--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["epochs_run"] == 2
    assert main([*argv, "--overwrite"]) == 0


def test_run_files_follow_the_umask(tmp_path: Path) -> None:
    X, y = red_blue(16)
    old = os.umask(0o027)
    try:
        finetune(X, tmp_path / "ft", y=y, **dict(EXACT, epochs=1))
    finally:
        os.umask(old)
    for name in ("checkpoint.pt", "history.json", "metrics.json", "history.png"):
        assert (tmp_path / "ft" / name).stat().st_mode & 0o777 == 0o640, name


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the file by /proc/self/fd")
@pytest.mark.parametrize("name", ["checkpoint.pt", "history.json"])
def test_full_disk_during_finetune_is_one_line_and_keeps_the_old_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        name: str) -> None:
    """The second epoch's ``name`` meets a full disk (ENOSPC from fsync, as on a real one)."""
    from featurepipe.cli import main
    from tests.helpers import write_good_images

    write_good_images(tmp_path / "photos" / "a", 4, seed=0)
    write_good_images(tmp_path / "photos" / "b", 4, seed=1)
    out = tmp_path / "ft"
    target = out / name
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        written = os.readlink(f"/proc/self/fd/{fd}")
        if Path(written).name.startswith(f"{name}.tmp-") and target.exists():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    code = main(["finetune", str(tmp_path / "photos"), "--out", str(out), "--backbone",
                 TINY["backbone"], "--weights", "random", "--image-size", "32", "--epochs", "2",
                 "--batch-size", "4", "--val-size", "4", "--precision", "fp32", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert err == f"featurepipe: error: cannot write {target}: no space left on device\n"
    if name == "checkpoint.pt":
        assert load_checkpoint(target)["trainer"]["epoch"] == 1
    else:
        assert [r["epoch"] for r in json.loads(target.read_text())] == [1]
    assert not [p.name for p in out.rglob("*.tmp-*")]
