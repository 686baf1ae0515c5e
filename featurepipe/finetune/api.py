"""``finetune()``: everything ``featurepipe finetune`` does, as one library call."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featurepipe.atomic import atomic_write_text
from featurepipe.finetune.classifier import CHECKPOINT_NAME, FineTuneClassifier
from featurepipe.finetune.history import plot_history, save_history

__all__ = ["FineTuneResult", "finetune", "refuse_existing_run"]


@dataclass
class FineTuneResult:
    """What :func:`finetune` produced.

    Attributes
    ----------
    estimator : FineTuneClassifier
        The fitted estimator (best epoch's weights).
    out_dir : Path
    metrics : dict
        Also written to ``out_dir/metrics.json``.
    paths : dict
        ``checkpoint``, ``history_json``, ``history_png``, ``model``, ``metrics`` file paths.
    """

    estimator: FineTuneClassifier
    out_dir: Path
    metrics: dict[str, Any]
    paths: dict[str, str] = field(default_factory=dict)

    @property
    def history(self) -> list[dict[str, Any]]:
        """Per-epoch records (``estimator.history_``)."""
        return self.estimator.history_

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary: metrics plus the paths written (what the CLI prints)."""
        return {**self.metrics, "out_dir": str(self.out_dir), "paths": dict(self.paths)}


def refuse_existing_run(out: Path, checkpoint_dir: Path) -> None:
    """Stop before a fresh run replaces a finished or interrupted one in the same folder."""
    from featurepipe.exceptions import ConfigError

    if (out / "metrics.json").is_file():
        state = "a finished fine-tuning run"
    elif (checkpoint_dir / CHECKPOINT_NAME).is_file():
        state = "an interrupted fine-tuning run"
    else:
        return
    raise ConfigError(f"{out} holds {state}; pass --resume to continue it (with --epochs N to "
                      "train longer) or --overwrite to replace it")


def finetune(source: Any, out_dir: str | os.PathLike[str], *, y: Any | None = None,
             overwrite: bool = False, **params: Any) -> FineTuneResult:
    """Fine-tune on ``source`` and write a self-contained run folder.

    Writes ``out_dir/checkpoint.pt`` (every epoch, atomic; rerun with ``resume=True`` to continue
    a killed run), ``history.json``, ``history.png``, ``model/`` (the fine-tuned network as a
    backbone directory: ``featurepipe embed SOURCE --backbone out_dir/model``) and ``metrics.json``.

    Parameters
    ----------
    source : folder, manifest CSV, list of paths, array or ImageSource
        Training images (labels from the source unless ``y`` is given).
    out_dir : str or path
        Run folder; also the checkpoint folder unless ``checkpoint_dir`` is passed.
    y : array-like, optional
        Labels, when the source carries none.
    overwrite : bool, default=False
        Start over in a folder that holds a finished or interrupted run. Without it (and without
        ``resume=True``) such a folder is refused, so no run is lost to a rerun.
    **params
        :class:`FineTuneClassifier` parameters.

    Returns
    -------
    FineTuneResult

    Examples
    --------
    >>> res = finetune("photos/", "ft/", backbone="efficientnet_lite0", epochs=5)  # doctest: +SKIP
    >>> res.to_dict()["best_val_acc"]                                              # doctest: +SKIP
    """
    out = Path(out_dir)
    if params.get("checkpoint_dir") is None:
        params["checkpoint_dir"] = str(out)
    if not params.get("resume") and not overwrite:
        refuse_existing_run(out, Path(params["checkpoint_dir"]))
    out.mkdir(parents=True, exist_ok=True)
    est = FineTuneClassifier(**params)
    start = time.perf_counter()
    est.fit(source, y)
    seconds = time.perf_counter() - start
    paths = {
        "checkpoint": str(Path(params["checkpoint_dir"]) / CHECKPOINT_NAME),
        "history_json": str(save_history(est.history_, out / "history.json")),
        "history_png": str(plot_history(est.history_, out / "history.png")),
        "model": str(est.export(out / "model")),
        "metrics": str(out / "metrics.json"),
    }
    metrics = summarize(est, seconds)
    save_json(metrics, out / "metrics.json")
    return FineTuneResult(est, out, metrics, paths)


def summarize(est: FineTuneClassifier, seconds: float | None = None) -> dict[str, Any]:
    """Headline numbers of a fitted estimator: best epoch's metrics, data sizes, setup."""
    best = est.history_[est.best_epoch_ - 1] if est.history_ else {}
    return {
        "backbone": est.backbone_spec_.to_dict(),
        "strategy": est.strategy,
        "epochs_run": len(est.history_),
        "best_epoch": est.best_epoch_,
        "best_val_loss": best.get("val_loss"),
        "best_val_acc": best.get("val_acc"),
        "train_loss": best.get("train_loss"),
        "train_acc": best.get("train_acc"),
        "n_train": est.n_train_,
        "n_val": est.n_val_,
        "n_skipped": len(est.skipped_),
        "skipped": est.skipped_,
        "classes": [str(c) for c in est.classes_],
        "device": est.device_,
        "precision": est.precision_,
        "seed": est.seed_,
        "seconds": seconds,
    }


def save_json(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` as indented JSON atomically (via :func:`.history.save_history`'s writer)."""
    path = Path(path)
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")
    return path
