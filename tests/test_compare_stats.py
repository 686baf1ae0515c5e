"""Wilson intervals and the exact McNemar test against values published or derived by hand."""

from __future__ import annotations

from math import comb

import numpy as np
import pytest

from featurepipe.compare._stats import (
    accuracy_interval,
    mcnemar_exact,
    paired_comparison,
    wilson_interval,
)
from featurepipe.exceptions import ConfigError


@pytest.mark.parametrize(("k", "n", "low", "high"), [
    # Newcombe (1998), Statistics in Medicine 17:857-872, Table I, method 3 (Wilson score).
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0000, 0.1611),
    (1, 29, 0.0061, 0.1718),
])
def test_wilson_matches_newcombes_table(k, n, low, high):
    got = wilson_interval(k, n)
    assert got == pytest.approx((low, high), abs=6e-5)


def test_wilson_is_the_closed_form_score_interval():
    z, k, n = 1.959963984540054, 8939, 10_000
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert wilson_interval(k, n) == pytest.approx((centre - half, centre + half), rel=1e-9)


def test_wilson_refuses_impossible_counts():
    with pytest.raises(ConfigError, match="11 of 10"):
        wilson_interval(11, 10)
    with pytest.raises(ConfigError):
        wilson_interval(0, 0)


def test_mcnemar_exact_is_the_binomial_tail_of_the_discordant_pairs():
    # 10 images only A gets right, 1 only B: p = 2 * P(X <= 1), X ~ Bin(11, 1/2) = 24/2048.
    a = [True] * 10 + [False] + [True] * 5 + [False] * 3
    b = [False] * 10 + [True] + [True] * 5 + [False] * 3
    res = mcnemar_exact(a, b)
    assert (res["a_only"], res["b_only"], res["discordant"]) == (10, 1, 11)
    assert res["pvalue"] == pytest.approx(24 / 2048, rel=1e-12)
    assert mcnemar_exact(b, a)["pvalue"] == pytest.approx(res["pvalue"])


def test_mcnemar_exact_balanced_and_empty_cases():
    # 3 vs 3 discordant: two-sided p is 1; concordant pairs do not matter.
    a = [True, True, True, False, False, False, True]
    b = [False, False, False, True, True, True, True]
    assert mcnemar_exact(a, b)["pvalue"] == pytest.approx(1.0)
    assert mcnemar_exact([True, False], [True, False])["pvalue"] == 1.0
    # 7 vs 2 by hand: 2 * sum_{i<=2} C(9, i) / 2^9
    a = [True] * 7 + [False] * 2
    b = [False] * 7 + [True] * 2
    expected = 2 * sum(comb(9, i) for i in range(3)) / 2**9
    assert mcnemar_exact(a, b)["pvalue"] == pytest.approx(expected, rel=1e-12)


def test_paired_comparison_and_accuracy_interval():
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    a = np.array([0, 1, 2, 0, 1, 2, 0, 0])   # 7/8
    b = np.array([0, 1, 1, 1, 1, 2, 0, 1])   # 6/8
    res = paired_comparison(y, a, b)
    assert res["difference"] == pytest.approx(1 / 8)
    assert (res["a_only"], res["b_only"]) == (2, 1)
    acc = accuracy_interval(y, a)
    assert acc["correct"] == 7 and acc["n"] == 8
    assert acc["ci_low"] < 7 / 8 < acc["ci_high"]
    with pytest.raises(ConfigError, match="same length"):
        mcnemar_exact([True], [True, False])
