"""Measure the transfer-learning claims: classical ML vs frozen features + heads vs fine-tuning.

:func:`compare` runs every arm under one protocol (benchmarks/protocol.md: same images, same
stratified split and seed, every arm fitted on the same rows, hyperparameters chosen on training
data only, headline arms chosen on a validation holdout of the training rows, one test score with
a 95% interval, paired McNemar tests) and writes a Markdown table, JSON
and a PNG of accuracy against training time. :func:`learning_curve` repeats it over labelled-set
sizes and seeds.

Examples
--------
>>> from featurepipe.compare import compare, learning_curve
>>> res = compare("photos/", "report/", backbones="efficientnet_lite0")    # doctest: +SKIP
>>> curve = learning_curve("photos/", "report/", [5, 10, 25], seeds=3)      # doctest: +SKIP
"""

from __future__ import annotations

from featurepipe.compare._api import DEFAULT_CLASSICAL, DEFAULT_HEADS, CompareResult, compare
from featurepipe.compare._arms import CLASSICAL_ARMS, FINETUNE_STRATEGIES, TimeLimit
from featurepipe.compare._curves import (
    CURVE_CLASSICAL,
    CURVE_HEADS,
    LearningCurveResult,
    learning_curve,
)
from featurepipe.compare._data import ids_digest
from featurepipe.compare._measure import Measure
from featurepipe.compare._output import (
    compare_figure,
    curve_markdown,
    format_params,
    plot_compare,
    plot_curve,
)
from featurepipe.compare._pixels import PixelSpec, pixel_features
from featurepipe.compare._stats import (
    accuracy_interval,
    mcnemar_exact,
    paired_comparison,
    wilson_interval,
)

__all__ = [
    "CLASSICAL_ARMS",
    "CURVE_CLASSICAL",
    "CURVE_HEADS",
    "DEFAULT_CLASSICAL",
    "DEFAULT_HEADS",
    "FINETUNE_STRATEGIES",
    "CompareResult",
    "LearningCurveResult",
    "Measure",
    "PixelSpec",
    "TimeLimit",
    "accuracy_interval",
    "compare",
    "compare_figure",
    "curve_markdown",
    "format_params",
    "ids_digest",
    "learning_curve",
    "mcnemar_exact",
    "paired_comparison",
    "pixel_features",
    "plot_compare",
    "plot_curve",
    "wilson_interval",
]
