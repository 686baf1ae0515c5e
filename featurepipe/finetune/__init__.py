"""End-to-end fine-tuning of pretrained backbones, for comparison with frozen features + heads.

Public API: :class:`FineTuneClassifier` (scikit-learn estimator), :func:`finetune` (what the CLI
runs), :func:`stage_groups`, :func:`plot_history`, and the loop pieces (:class:`Trainer`,
:class:`Callback`) for custom training hooks.
"""

from __future__ import annotations

from featurepipe.finetune.api import FineTuneResult, finetune
from featurepipe.finetune.callbacks import Checkpoint, EarlyStopping, ProgressBar, Unfreezer
from featurepipe.finetune.checkpoint import atomic_save, load_checkpoint
from featurepipe.finetune.classifier import FineTuneClassifier
from featurepipe.finetune.history import plot_history, save_history
from featurepipe.finetune.loop import Callback, Trainer
from featurepipe.finetune.schedules import WarmupCosine
from featurepipe.finetune.strategies import STRATEGIES, stage_groups, unfrozen_stages

__all__ = [
    "STRATEGIES",
    "Callback",
    "Checkpoint",
    "EarlyStopping",
    "FineTuneClassifier",
    "FineTuneResult",
    "ProgressBar",
    "Trainer",
    "Unfreezer",
    "WarmupCosine",
    "atomic_save",
    "finetune",
    "load_checkpoint",
    "plot_history",
    "save_history",
    "stage_groups",
    "unfrozen_stages",
]
