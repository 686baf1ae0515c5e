"""The learning-curve benchmark (benchmarks/protocol.md section 6): the t-interval, the
section 8 verdict, and a tiny end-to-end run on synthetic features where the test labels are
shown to choose nothing. No dataset needed."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from benchmarks import fm_curves
from benchmarks.fm_curves import draw, labelled_data_verdict, t_interval


def test_t_interval_matches_the_student_t_formula():
    mean, low, high = t_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, df=2) * sd 1 / sqrt(3)
    assert mean == 2.0
    assert low == pytest.approx(2.0 - half) and high == pytest.approx(2.0 + half)
    ref = stats.t.interval(0.95, 2, loc=2.0, scale=stats.sem([1.0, 2.0, 3.0]))
    assert (low, high) == pytest.approx(ref)


def test_t_interval_of_one_value_has_no_bounds_and_constant_values_a_point():
    mean, low, high = t_interval([0.7])
    assert mean == 0.7 and math.isnan(low) and math.isnan(high)
    assert t_interval([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)


def rows(*diffs, sizes=(5, 10, 25, 50, 100, 600)):
    return [{"size": s, "diff": d} for s, d in zip(sizes, diffs, strict=False)]


POS, NEG, ZERO = [0.02, 0.01, 0.03], [-0.02, -0.03, -0.01], [0.0, -0.01, 0.01]


def test_verdict_supported_needs_every_size_up_to_100_above_zero():
    assert labelled_data_verdict(rows(POS, POS, POS, POS, POS)) == "supported"
    # 600 per class is past the claim's sizes: it cannot spoil (or make) the verdict
    assert labelled_data_verdict(rows(POS, POS, POS, POS, POS, NEG)) == "supported"
    assert labelled_data_verdict(rows(POS, POS, POS, POS, ZERO)) == "mixed"


def test_verdict_not_supported_needs_a_majority_below_zero():
    assert labelled_data_verdict(rows(NEG, NEG, NEG, POS, POS)) == "not supported"
    assert labelled_data_verdict(rows(NEG, NEG, ZERO, POS, POS)) == "mixed"
    assert labelled_data_verdict(rows(NEG, NEG, ZERO, ZERO)) == "mixed"  # 2 of 4 is no majority


def test_verdict_without_small_sizes_is_not_measured():
    assert labelled_data_verdict(rows(POS, sizes=(600,))) == "not measured"
    assert labelled_data_verdict([]) == "not measured"


def test_draw_takes_size_rows_of_every_class_and_depends_only_on_the_seed():
    y = np.repeat(np.arange(4), 30)
    rows_ = draw(y, 5, seed=3)
    assert np.bincount(y[rows_]).tolist() == [5, 5, 5, 5]
    assert np.array_equal(rows_, draw(y, 5, seed=3))
    assert not np.array_equal(rows_, draw(y, 5, seed=4))


def _write_data(tmp_path, y_test_perm=None):
    """Three classes; ``pixels`` and ``frozen:good`` separate them, ``hog`` and
    ``frozen:noise`` are noise."""
    rng = np.random.default_rng(0)
    y, y_test = np.repeat(np.arange(3), 12), np.repeat(np.arange(3), 6)
    centres = rng.normal(size=(3, 6)) * 4

    def informative(labels):
        return (centres[labels] + rng.normal(size=(len(labels), 6))).astype(np.float32)

    def noise(labels):
        return rng.normal(size=(len(labels), 5)).astype(np.float32)

    args = []
    for name, make in (("pixels", informative), ("hog", noise), ("frozen:good", informative),
                       ("frozen:noise", noise)):
        tr, te = tmp_path / f"{name}_tr.npy", tmp_path / f"{name}_te.npy"
        np.save(tr, make(y))
        np.save(te, make(y_test))
        args += ["--features", f"{name}={tr}:{te}"]
    np.save(tmp_path / "y.npy", y)
    y_test_file = tmp_path / "y_test.npy"
    np.save(y_test_file, y_test)
    np.save(tmp_path / "y_test_perm.npy", np.random.default_rng(1).permutation(y_test))
    return args


def _run(tmp_path, args, test_labels, out):
    return fm_curves.main([*args, "--labels", f"{tmp_path / 'y.npy'}:{tmp_path / test_labels}",
                           "--sizes", "2,4", "--seeds", "0,1", "--blas-threads", "1",
                           "--results-dir", str(tmp_path / "res"), "--out", out, "--no-log"])


def _choices(res):
    return [(p["size"], p["seed"], {f: c["arm"] for f, c in p["chosen"].items()},
             [(a["arm"], a["chosen"], a["cv_accuracy"]) for a in p["arms"]])
            for p in res["points"]]


def test_tiny_run_reports_every_arm_and_test_labels_choose_nothing(tmp_path):
    args = _write_data(tmp_path)
    res = _run(tmp_path, args, "y_test.npy", "curve")
    on_disk = json.loads((tmp_path / "res" / "curve.json").read_text())
    assert (tmp_path / "res" / "curve.md").exists() and (tmp_path / "res" / "curve.png").exists()
    arms = {f"{n}+{h}" for n in ("pixels", "hog", "frozen:good", "frozen:noise")
            for h in ("linear", "kernel")}
    assert [(p["size"], p["seed"]) for p in on_disk["points"]] == [(2, 0), (2, 1), (4, 0),
                                                                   (4, 1)]
    for p in on_disk["points"]:
        assert {a["arm"] for a in p["arms"]} == arms
        assert all(0.0 <= a["test_accuracy"] <= 1.0 for a in p["arms"])
        assert p["k"] == p["size"] and p["n_train"] == 3 * p["size"]
        assert set(p["chosen"]) == {"frozen", "classical"}
    # the informative sets win their family by CV at 4 per class, where the folds can see it
    for p in on_disk["points"][2:]:
        assert p["chosen"]["frozen"]["arm"].startswith("frozen:good+")
        assert p["chosen"]["classical"]["arm"].startswith("pixels+")
    assert [r["size"] for r in on_disk["summary"]] == [2, 4]
    assert on_disk["mode"] == "small"  # fewer rows than Fashion-MNIST: never a full result
    assert on_disk["verdict"] in {"supported", "not supported", "mixed"}

    permuted = _run(tmp_path, args, "y_test_perm.npy", "permuted")
    assert _choices(permuted) == _choices(res)
    assert any(a["test_accuracy"] != b["test_accuracy"]
               for p, q in zip(res["points"], permuted["points"], strict=True)
               for a, b in zip(p["arms"], q["arms"], strict=True))


def test_feature_files_that_do_not_match_the_labels_are_one_line(tmp_path):
    _write_data(tmp_path)
    np.save(tmp_path / "short.npy", np.zeros((5, 6), np.float32))
    bad = ["--features", f"pixels={tmp_path / 'short.npy'}:{tmp_path / 'short.npy'}"]
    with pytest.raises(SystemExit, match="pixels: shapes"):
        _run(tmp_path, bad, "y_test.npy", "bad")
