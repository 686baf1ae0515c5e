"""Learning-rate schedule: linear warmup, then cosine decay, stepped once per batch.

The schedule is a picklable callable (not a closure) so ``LambdaLR.state_dict()`` can store it in a
checkpoint and a resumed run continues on exactly the same curve.
"""

from __future__ import annotations

import math

import torch

__all__ = ["WarmupCosine", "make_scheduler"]


class WarmupCosine:
    """Multiplier for ``LambdaLR``: linear warmup to 1, then cosine down to ``min_factor``.

    Parameters
    ----------
    warmup_steps : int
        Optimizer steps of linear warmup. Step ``s < warmup_steps`` uses ``(s + 1) / warmup_steps``,
        so the very first step already moves the weights (a factor of 0 would waste a batch).
    total_steps : int
        Optimizer steps in the whole run; the cosine reaches ``min_factor`` at the last one.
    min_factor : float, default=0.0
        Floor of the cosine, as a fraction of each group's base learning rate.

    Examples
    --------
    >>> f = WarmupCosine(warmup_steps=2, total_steps=6)
    >>> [round(f(s), 3) for s in range(6)]
    [0.5, 1.0, 1.0, 0.75, 0.25, 0.0]
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_factor: float = 0.0) -> None:
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_factor = float(min_factor)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = self.total_steps - self.warmup_steps
        if decay_steps <= 1:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (decay_steps - 1))
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_factor + (1.0 - self.min_factor) * cosine


def make_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_factor: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Return a per-step ``LambdaLR`` applying :class:`WarmupCosine` to every param group.

    One multiplier for all groups keeps the ratio between groups (discriminative learning
    rates) constant over the whole run.
    """
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(warmup_steps, total_steps, min_factor)
    )
