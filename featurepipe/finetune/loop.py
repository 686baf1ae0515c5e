"""The training loop: a chain of small overridable steps, with callbacks as hooks.

``fit -> fit_loop -> run_epoch -> (train_epoch -> train_step) + (validate -> eval_step)``.
Everything optional (freezing schedule, progress bar, early stopping, checkpoints) is a
:class:`Callback`; the loop itself has no flags for them.

Determinism: at the start of every epoch the global torch RNG (augmentation, dropout) and the
DataLoader's shuffling generator are seeded from ``(seed, epoch)``, so what an epoch does is a
pure function of the weights it starts from and its number. A run resumed from the checkpoint
written after epoch ``k`` therefore repeats exactly what an uninterrupted run does from epoch
``k + 1`` (in fp32 with ``num_workers=0``; autocast kernels may add their own nondeterminism).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from featurepipe.devices import autocast_context

__all__ = ["Callback", "Trainer", "autocast_context", "epoch_seeds"]


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move images to the device as channels_last (oneDNN and tensor cores prefer NHWC)."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


class Callback:
    """Base class of training hooks; override the ones you need.

    ``on_epoch_begin`` runs after ``model.train()`` (so a callback may put layers back in eval
    mode) and before the first step; ``on_epoch_end`` receives the epoch's history record.
    Callbacks with state worth resuming implement ``state_dict`` / ``load_state_dict``; it is
    stored in checkpoints.
    """

    def on_train_begin(self, trainer: Trainer) -> None:
        """Called once before the first epoch (also when resuming)."""

    def on_epoch_begin(self, trainer: Trainer, epoch: int) -> None:
        """Called at the start of each epoch, after ``model.train()``."""

    def on_batch_end(self, trainer: Trainer, batch: dict[str, Any]) -> None:
        """Called after each training step with ``loss``, ``correct``, ``n`` of the batch."""

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """Called after validation with the epoch's history record."""

    def on_train_end(self, trainer: Trainer) -> None:
        """Called once after the last epoch (or after early stopping)."""

    def state_dict(self) -> dict[str, Any]:
        """State saved in checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def epoch_seeds(seed: int, epoch: int) -> tuple[int, int]:
    """Two independent 63-bit seeds (global torch RNG, loader shuffling) for ``epoch``."""
    a, b = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(2, dtype=np.uint64)
    return int(a >> np.uint64(1)), int(b >> np.uint64(1))


class Trainer:
    """Runs epochs of training and validation on an ``nn.Module`` classifier.

    Parameters
    ----------
    model, optimizer, scheduler, criterion
        Network, optimizer, per-step LR scheduler (``None`` = constant) and loss.
    train_loader : DataLoader
        Shuffling loader; its ``generator`` is reseeded every epoch (see module docstring).
    val_loader : DataLoader or None
        Validation batches; ``None`` skips validation (val metrics are ``None``).
    epochs : int
        Total number of epochs (including those already done when resuming).
    device : torch.device
    precision : {"fp32", "bf16", "fp16"}
        Autocast dtype; ``fp16`` uses a ``GradScaler``.
    seed : int
        Base of the per-epoch seeds.
    callbacks : sequence of Callback
        Called in order.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        criterion: nn.Module,
        train_loader: DataLoader,
        val_loader: DataLoader | None,
        *,
        epochs: int,
        device: torch.device,
        precision: str = "fp32",
        seed: int = 0,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.criterion = criterion
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.epochs = epochs
        self.device = device
        self.precision = precision
        self.seed = seed
        self.callbacks = list(callbacks)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.epoch = 0  # next epoch to run
        self.history: list[dict[str, Any]] = []
        self.stop_training = False
        self.n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ the chain

    def fit(self) -> list[dict[str, Any]]:
        """Train from ``self.epoch`` to ``epochs`` (or until a callback stops); return history."""
        self.notify("on_train_begin")
        self.fit_loop()
        self.notify("on_train_end")
        return self.history

    def fit_loop(self) -> None:
        """Run epochs until done or ``stop_training`` is set."""
        while self.epoch < self.epochs and not self.stop_training:
            self.run_epoch(self.epoch)

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        """One epoch: seed, train, validate, record, notify."""
        start = time.perf_counter()
        self.seed_epoch(epoch)
        self.model.train()
        self.notify("on_epoch_begin", epoch)
        lrs = self.current_lrs()
        train_loss, train_acc = self.train_epoch()
        train_seconds = time.perf_counter() - start
        val_loss, val_acc = self.validate()
        record = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lrs": lrs,
            "seconds": time.perf_counter() - start,
            "train_seconds": train_seconds,
            "n_trainable": self.n_trainable,
        }
        self.history.append(record)
        self.epoch = epoch + 1
        self.notify("on_epoch_end", record)
        return record

    def train_epoch(self) -> tuple[float, float]:
        """Loop over the training batches; return mean loss and accuracy."""
        total = correct = 0
        loss_sum = 0.0
        for x, y in self.train_loader:
            out = self.train_step(x, y)
            loss_sum += out["loss"] * out["n"]
            correct += out["correct"]
            total += out["n"]
            self.notify("on_batch_end", out)
        return loss_sum / max(total, 1), correct / max(total, 1)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """Forward, backward, optimizer and scheduler step on one batch."""
        x, y = to_device(x, self.device), y.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast_context(self.device, self.precision):
            logits = self.model(x)
            loss = self.criterion(logits, y)
        stepped = True
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            # fp16: the scaler skips the step on inf/nan gradients (and lowers its scale); the
            # schedule follows the steps actually taken, as torch's LR scheduler expects.
            stepped = self.scaler.get_scale() >= scale
        else:
            loss.backward()
            self.optimizer.step()
        if self.scheduler is not None and stepped:
            self.scheduler.step()
        correct = int((logits.detach().argmax(1) == y).sum())
        return {"loss": float(loss.detach()), "correct": correct, "n": int(y.shape[0])}

    @torch.no_grad()
    def validate(self) -> tuple[float | None, float | None]:
        """Mean loss and accuracy on the validation loader (``None`` without one)."""
        if self.val_loader is None:
            return None, None
        self.model.eval()
        total = correct = 0
        loss_sum = 0.0
        for x, y in self.val_loader:
            out = self.eval_step(x, y)
            loss_sum += out["loss"] * out["n"]
            correct += out["correct"]
            total += out["n"]
        return loss_sum / max(total, 1), correct / max(total, 1)

    def eval_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """Loss and number of correct predictions on one batch (no gradients)."""
        x, y = to_device(x, self.device), y.to(self.device)
        with autocast_context(self.device, self.precision):
            logits = self.model(x)
        loss = self.criterion(logits.float(), y)
        correct = int((logits.argmax(1) == y).sum())
        return {"loss": float(loss), "correct": correct, "n": int(y.shape[0])}

    # ------------------------------------------------------------------ helpers

    def seed_epoch(self, epoch: int) -> None:
        """Seed the global torch RNG and the loader's generator from ``(seed, epoch)``."""
        global_seed, loader_seed = epoch_seeds(self.seed, epoch)
        torch.manual_seed(global_seed)
        generator = getattr(self.train_loader, "generator", None)
        if generator is not None:
            generator.manual_seed(loader_seed)

    def current_lrs(self) -> dict[str, float]:
        """Learning rate per stage group, for groups with trainable parameters."""
        lrs: dict[str, float] = {}
        for i, group in enumerate(self.optimizer.param_groups):
            if any(p.requires_grad for p in group["params"]):
                lrs.setdefault(str(group.get("stage", i)), float(group["lr"]))
        return lrs

    def notify(self, hook: str, *args: Any) -> None:
        """Call ``hook`` on every callback, in order."""
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue training exactly where it stopped."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "epoch": self.epoch,
            "history": list(self.history),
            "stop_training": self.stop_training,
            "callbacks": {type(cb).__name__: cb.state_dict() for cb in self.callbacks},
        }

    def _load_scheduler(self, saved: dict[str, Any]) -> None:
        """Restore the scheduler's step count, keeping this run's plan for its schedule.

        ``LambdaLR`` saves the state of multiplier objects (e.g. a cosine's total steps) with its
        step count. A resume that extends the run (more epochs) must keep the new total, so the
        cosine is stretched over the longer run and the learning rate is set where the new
        schedule has it at this step. A plain resume plans the same schedule: nothing changes.
        """
        lambdas = getattr(self.scheduler, "lr_lambdas", [])
        planned = [dict(vars(f)) if hasattr(f, "__dict__") else None for f in lambdas]
        self.scheduler.load_state_dict(saved)
        replanned = False
        for f, plan in zip(lambdas, planned, strict=True):
            if plan is not None and vars(f) != plan:
                vars(f).update(plan)
                replanned = True
        if replanned:
            step = self.scheduler.last_epoch
            for group, base, f in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                      lambdas, strict=True):
                group["lr"] = base * f(step)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (callbacks are matched by class name)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self._load_scheduler(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.stop_training = bool(state["stop_training"])
        saved = state.get("callbacks", {})
        for cb in self.callbacks:
            if type(cb).__name__ in saved:
                cb.load_state_dict(saved[type(cb).__name__])

