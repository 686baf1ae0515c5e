"""The callbacks :class:`~featurepipe.finetune.FineTuneClassifier` installs.

Order matters and is fixed by the classifier: ``Unfreezer`` (decides what trains this epoch),
``ProgressBar``, ``EarlyStopping`` (tracks the best epoch), user callbacks, ``Checkpoint`` last
(so the file it writes includes what the others decided this epoch).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from featurepipe.finetune.checkpoint import atomic_save, get_rng_state
from featurepipe.finetune.loop import Callback, Trainer
from featurepipe.finetune.strategies import apply_freeze, set_bn_policy, unfrozen_stages

__all__ = ["Checkpoint", "EarlyStopping", "ProgressBar", "Unfreezer"]


class Unfreezer(Callback):
    """Apply a freezing strategy at the start of every epoch (see :mod:`.strategies`).

    Sets ``requires_grad`` per stage, puts BatchNorm layers of frozen stages in eval mode, and
    records the trainable parameter count on the trainer (``trainer.n_trainable``).
    """

    def __init__(
        self, groups: Sequence[Sequence[str]], strategy: str, unfreeze_stages: int = 2,
        gradual_every: int = 1,
    ) -> None:
        self.groups = groups
        self.strategy = strategy
        self.unfreeze_stages = unfreeze_stages
        self.gradual_every = gradual_every
        self.unfrozen: list[int] = []

    def on_epoch_begin(self, trainer: Trainer, epoch: int) -> None:
        self.unfrozen = unfrozen_stages(self.strategy, len(self.groups), epoch,
                                        self.unfreeze_stages, self.gradual_every)
        trainer.n_trainable = apply_freeze(trainer.model, self.groups, self.unfrozen)
        set_bn_policy(trainer.model)


class ProgressBar(Callback):
    """One tqdm bar per epoch with running loss and accuracy in the postfix."""

    def __init__(self, disable: bool = False) -> None:
        self.disable = disable
        self._bar: Any = None
        self._loss = 0.0
        self._correct = self._n = 0

    def on_epoch_begin(self, trainer: Trainer, epoch: int) -> None:
        from tqdm.auto import tqdm

        self._loss, self._correct, self._n = 0.0, 0, 0
        self._bar = tqdm(total=len(trainer.train_loader),
                         desc=f"epoch {epoch + 1}/{trainer.epochs}", unit="batch",
                         disable=self.disable, dynamic_ncols=True, leave=True)

    def on_batch_end(self, trainer: Trainer, batch: dict[str, Any]) -> None:
        self._loss += batch["loss"] * batch["n"]
        self._correct += batch["correct"]
        self._n += batch["n"]
        self._bar.set_postfix(loss=f"{self._loss / self._n:.4f}",
                              acc=f"{self._correct / self._n:.3f}", refresh=False)
        self._bar.update(1)

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        post = {"loss": f"{record['train_loss']:.4f}", "acc": f"{record['train_acc']:.3f}"}
        if record["val_loss"] is not None:
            post.update(val_loss=f"{record['val_loss']:.4f}", val_acc=f"{record['val_acc']:.3f}")
        self._bar.set_postfix(post, refresh=True)
        self._bar.close()


class EarlyStopping(Callback):
    """Keep the best epoch's weights; stop after ``patience`` epochs without improvement.

    Parameters
    ----------
    monitor : str
        History key to watch, ``val_loss`` by default (smoother than accuracy on small sets).
    patience : int or None
        Epochs without improvement before stopping; ``None`` never stops early but still restores
        the best weights at the end.
    mode : {"min", "max"}
    min_delta : float
        Improvement smaller than this does not count.
    """

    def __init__(self, monitor: str = "val_loss", patience: int | None = 5, mode: str = "min",
                 min_delta: float = 0.0) -> None:
        self.monitor = monitor
        self.patience = patience
        self.mode = mode
        self.min_delta = min_delta
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.wait = 0

    def _better(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        value = record.get(self.monitor)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        if self._better(value):
            self.best, self.best_epoch, self.wait = float(value), int(record["epoch"]), 0
            self.best_state = {k: v.detach().to("cpu", copy=True)
                               for k, v in trainer.model.state_dict().items()}
        else:
            self.wait += 1
            if self.patience is not None and self.wait >= self.patience:
                trainer.stop_training = True

    def on_train_end(self, trainer: Trainer) -> None:
        if self.best_state is not None:
            trainer.model.load_state_dict(self.best_state)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait,
                "best_state": self.best_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.wait, self.best_state = state["wait"], state["best_state"]


class Checkpoint(Callback):
    """Write the whole training state atomically to ``path`` after every epoch.

    ``extra`` (a callable returning a dict) adds what the caller needs to validate a resume,
    e.g. the estimator's parameters and a fingerprint of the training data.
    """

    def __init__(self, path: str | os.PathLike[str],
                 extra: Callable[[], dict[str, Any]] | None = None) -> None:
        self.path = Path(path)
        self.extra = extra

    def on_train_begin(self, trainer: Trainer) -> None:
        # Temp files of a writer that was killed mid-write; the checkpoint itself is intact.
        for stale in self.path.parent.glob(f"{self.path.name}.tmp-*"):
            stale.unlink(missing_ok=True)

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.save(trainer)

    def save(self, trainer: Trainer) -> Path:
        """Write the checkpoint now (atomic: the previous file survives any crash)."""
        state = {"format": 1, "trainer": trainer.state_dict(), "rng": get_rng_state()}
        if self.extra is not None:
            state.update(copy.deepcopy(self.extra()))
        return atomic_save(state, self.path)
