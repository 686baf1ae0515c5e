"""Training history as JSON and as a PNG of train vs validation accuracy and loss."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from featurepipe.finetune.checkpoint import default_file_mode
from featurepipe.finetune.loop import Callback, Trainer

__all__ = ["HistoryFile", "plot_history", "save_history"]


def save_history(history: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write ``history`` as indented JSON, atomically (readers never see half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(list(history), f, indent=2)
            f.write("\n")
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def plot_history(history: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Draw train vs validation accuracy (left) and loss (right) per epoch to a PNG.

    Uses matplotlib's object API on the Agg canvas: no display, no pyplot global state.

    Parameters
    ----------
    history : sequence of dict
        ``FineTuneClassifier.history_`` records (``epoch``, ``train_acc``, ``val_acc`` ...).
    path : str or path
        PNG file to write (folders are created).
    """
    from featurepipe.report import new_figure, save_figure

    fig = new_figure(9.0, 3.5)
    epochs = [r["epoch"] for r in history]
    panels = (("acc", "accuracy"), ("loss", "loss"))
    for ax, (key, title) in zip(fig.subplots(1, 2), panels, strict=True):
        ax.plot(epochs, [r[f"train_{key}"] for r in history], "o-", label="train")
        val = [(r["epoch"], r[f"val_{key}"]) for r in history if r[f"val_{key}"] is not None]
        if val:
            ax.plot([e for e, _ in val], [v for _, v in val], "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)
    return Path(path)


class HistoryFile(Callback):
    """Rewrite ``history.json`` after every epoch, so a long run can be watched."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        save_history(trainer.history, self.path)
