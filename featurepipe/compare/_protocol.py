"""The rules that keep a comparison honest, in one place (see benchmarks/protocol.md).

- **Validation holdout**: a stratified part of the *training* rows, the same for every arm. Every
  arm is fitted on the rest (the fit rows) and scored on it; that score, never the test score,
  picks the headline arm of each family.
- **Same rows, same budget**: a training cap, if any, must be the same for every arm, so every
  arm is fitted on the same subsample.
- **Uncertainty**: each test accuracy carries a 95% Wilson interval, and the headline
  comparisons (frozen vs classical, fine-tune vs classical, fine-tune vs frozen) an exact McNemar
  test on the same test images.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from featurepipe.compare._data import Part
from featurepipe.compare._stats import paired_comparison
from featurepipe.exceptions import ConfigError
from featurepipe.splits import stratified_split

__all__ = [
    "HEADLINE_PAIRS",
    "check_same_caps",
    "headline",
    "headline_comparisons",
    "headline_markdown",
    "validation_split",
]

#: (family A, family B) pairs compared on the test set, each by its headline arm.
HEADLINE_PAIRS: tuple[tuple[str, str], ...] = (
    ("frozen", "classical"), ("finetune", "classical"), ("finetune", "frozen"))


def validation_split(train: Part, val_size: float | int, seed: int) -> tuple[Part, Part]:
    """Split ``train`` into (fit rows, validation rows), stratified, at least one per class.

    Parameters
    ----------
    train : Part
        The training rows (the test rows never come here).
    val_size : float or int
        Fraction in (0, 1) or count of training rows held out.
    seed : int

    Returns
    -------
    (fit, val) : tuple of Part
    """
    n = len(train)
    n_classes = len(np.unique(train.labels))
    if isinstance(val_size, bool) or not isinstance(val_size, int | float) or val_size <= 0 \
            or (isinstance(val_size, float) and val_size >= 1):
        raise ConfigError(f"val_size must be a fraction in (0, 1) or a count >= 1; "
                          f"got {val_size!r}")
    count = math.ceil(val_size * n) if isinstance(val_size, float) else int(val_size)
    count = max(count, n_classes)
    if n - count < n_classes:
        raise ConfigError(f"{n} training images are too few for a validation holdout of "
                          f"{count} with {n_classes} classes; add images or lower val_size")
    fit, val = stratified_split(train.labels, count, seed=seed, what="validation holdout",
                                hint="add images to the smallest class")
    return train.take(fit), train.take(val)


def check_same_caps(arm_names: Sequence[str], caps: Mapping[str, int | None]) -> int | None:
    """The one training cap every arm shares; ConfigError naming the arms when they differ."""
    values = {name: caps.get(name) for name in arm_names}
    distinct = set(values.values())
    if len(distinct) > 1:
        shown = ", ".join(f"{k}={'all' if v is None else v}" for k, v in values.items())
        raise ConfigError(
            f"max_train gives arms different training sets ({shown}); every arm must train on "
            "the same rows: give one cap for all (max_train=N, or the pattern '*')")
    return next(iter(distinct)) if distinct else None


def headline(rows: Sequence[Mapping[str, Any]], family: str | None = None) -> Mapping[str, Any]:
    """The row with the best *validation* accuracy (of one family); never the test accuracy.

    Ties go to the earlier row (report order), so the result does not depend on test scores.
    """
    pool = [r for r in rows if family is None or r["family"] == family]
    if not pool:
        raise KeyError(f"no arms of family {family!r}")
    scored = [r for r in pool if r.get("val_accuracy") is not None]
    if not scored:
        raise KeyError(f"no arm of family {family!r} has a validation accuracy")
    best = max(r["val_accuracy"] for r in scored)
    return next(r for r in scored if r["val_accuracy"] == best)


def headline_comparisons(rows: Sequence[Mapping[str, Any]],
                         predictions: Mapping[str, np.ndarray],
                         y_test: np.ndarray) -> list[dict[str, Any]]:
    """Paired test comparison of the headline arms of each pair in :data:`HEADLINE_PAIRS`."""
    out = []
    for fam_a, fam_b in HEADLINE_PAIRS:
        try:
            a, b = headline(rows, fam_a), headline(rows, fam_b)
        except KeyError:
            continue
        res = paired_comparison(y_test, predictions[a["arm"]], predictions[b["arm"]])
        out.append({"a": a["arm"], "b": b["arm"], "family_a": fam_a, "family_b": fam_b,
                    "val_accuracy_a": a["val_accuracy"], "val_accuracy_b": b["val_accuracy"],
                    **res})
    return out


def headline_markdown(comparisons: Sequence[Mapping[str, Any]]) -> str:
    """One line per headline comparison: the difference and its McNemar p-value."""
    if not comparisons:
        return ""
    lines = ["Headline arms (best validation accuracy of each family; the test set chose "
             "nothing), compared on the same test images:", ""]
    for c in comparisons:
        lines.append(
            f"- {c['family_a']} `{c['a']}` {c['accuracy_a']:.4f} vs {c['family_b']} `{c['b']}` "
            f"{c['accuracy_b']:.4f}: difference {c['difference']:+.4f}, exact McNemar "
            f"p = {c['pvalue']:.3g} ({c['a_only']} vs {c['b_only']} discordant images)")
    return "\n".join(lines) + "\n"
