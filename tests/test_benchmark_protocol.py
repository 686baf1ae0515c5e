"""The Fashion-MNIST protocol code (benchmarks/protocol.md): selection by validation only, the
shared head search, and the append-only results log. Synthetic data; no dataset needed."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import fm_heads, fm_log
from benchmarks.fashion_mnist import verdict
from benchmarks.fm_protocol import _headline

ROWS = [  # test accuracy and validation accuracy disagree on purpose
    {"arm": "lite0+logreg", "family": "frozen", "accuracy": 0.95, "val_accuracy": 0.80,
     "n_train": 54, "train_seconds": 1.0},
    {"arm": "lite0+svm-rbf", "family": "frozen", "accuracy": 0.85, "val_accuracy": 0.90,
     "n_train": 54, "train_seconds": 2.0},
    {"arm": "pixels+logreg", "family": "classical", "accuracy": 0.99, "val_accuracy": 0.70,
     "n_train": 54, "train_seconds": 1.0},
    {"arm": "hog+svm-rbf", "family": "classical", "accuracy": 0.60, "val_accuracy": 0.75,
     "n_train": 54, "train_seconds": 3.0},
]


def test_verdict_names_the_arms_validation_chose():
    text = "\n".join(verdict({"rows": ROWS}, None, None))
    assert "frozen-feature arm lite0+svm-rbf 0.8500" in text
    assert "from-scratch arm hog+svm-rbf 0.6000" in text
    assert "lite0+logreg" not in text and "pixels+logreg" not in text


def test_verdict_names_no_headline_without_validation_scores():
    old = [{k: v for k, v in r.items() if k != "val_accuracy"} for r in ROWS]
    text = "\n".join(verdict({"rows": old}, None, None))
    assert "no headline arms" in text and "0.9900" not in text


def test_protocol_headline_skips_unconverged_arms():
    arms = [{"arm": "a", "family": "classical", "val_accuracy": 0.9, "converged": False},
            {"arm": "b", "family": "classical", "val_accuracy": 0.8, "converged": True}]
    assert _headline(arms, "classical")["arm"] == "b"
    assert _headline(arms, "frozen") is None


@pytest.fixture(scope="module")
def blobs():
    from sklearn.datasets import make_classification

    X, y = make_classification(n_samples=240, n_features=12, n_informative=6, n_classes=3,
                               random_state=0)
    return X.astype(np.float32), y


@pytest.mark.parametrize("family", ["linear", "kernel"])
def test_search_chooses_the_best_validation_point_of_the_declared_grid(blobs, family):
    X, y = blobs
    res = fm_heads.search(family, X[:180], y[:180], X[180:], y[180:], n_components=60)
    grid = ([(None, c) for c in fm_heads.LINEAR_CS] if family == "linear"
            else [(g, c) for g in fm_heads.KERNEL_G for c in fm_heads.RIDGE_CS])
    tried = [(p["g"], p["C"]) for p in res.points]
    stopped = [(p["g"], p["C"]) for p in res.not_run]
    assert tried + stopped == grid and tried  # the path stops early, never skips in between
    best = max(p["val_accuracy"] for p in res.points)
    assert res.chosen["val_accuracy"] == best
    ties = [p for p in res.points if p["val_accuracy"] == best]
    assert res.chosen["C"] == min(p["C"] for p in ties)  # ties: the smaller C
    model, rec = fm_heads.final_fit(family, res.chosen, X, y, n_components=60)
    assert rec["converged"] and model.predict(X).shape == y.shape
    if family == "kernel":
        assert model.named_steps["map"].gamma == pytest.approx(res.chosen["g"] / X.shape[1])
        assert model.named_steps["map"].n_components == 60


def test_ridge_path_equals_ridge_classifier_at_every_c(blobs):
    from sklearn.linear_model import RidgeClassifier

    X, y = blobs
    cs = (0.01, 1.0, 100.0)
    for C, model in zip(cs, fm_heads.RidgePath().fit_path(X, y, cs), strict=True):
        ref = RidgeClassifier(alpha=1 / (2 * C)).fit(X.astype(np.float64), y)
        # Scores, not weights: the blobs have collinear columns, so weakly regularised
        # weights are determined only up to directions that no row sees.
        expected = ref.decision_function(X)
        np.testing.assert_allclose(model.decision_function(X), expected, atol=2e-3)
        np.testing.assert_allclose(fm_heads.RidgePath(C=C).fit(X, y).decision_function(X),
                                   expected, atol=2e-3)
        assert (model.predict(X) == ref.predict(X)).all()


def test_linear_path_stops_when_neither_score_improves(blobs):
    X, y = blobs
    res = fm_heads.search("linear", X[:180], y[:180], X[180:], y[180:])
    scores = [(p["val_accuracy"], p["val_log_loss"]) for p in res.points]

    def improved(k: int) -> bool:
        return (scores[k][0] > max(acc for acc, _ in scores[:k])
                or scores[k][1] < min(loss for _, loss in scores[:k]))

    # Every point but the last improved a score (else the path stops after it) ...
    assert all(improved(k) for k in range(1, len(scores) - 1))
    # ... and when the path stopped early, the last point run improved neither.
    if res.not_run:
        assert not improved(len(scores) - 1)


def test_kernel_head_is_exact_svc_on_request():
    pipe = fm_heads.kernel_head(1.0, 10.0, 4, n_rows=100, exact=True)
    assert type(pipe[-1]).__name__ == "SVC" and pipe[-1].gamma == pytest.approx(0.25)
    assert fm_heads.kernel_head(1.0, 1.0, 4, n_rows=100)["map"].n_components == 100


def test_results_log_only_grows(tmp_path, monkeypatch):
    path = tmp_path / "log.jsonl"
    assert fm_log.append([{"arm": "a", "accuracy": 0.5}], path) == 1
    assert fm_log.append([{"arm": "b", "accuracy": 0.4}, {"arm": "c"}], path) == 2
    assert [e["arm"] for e in fm_log.read(path)] == ["a", "b", "c"]
    monkeypatch.setattr(fm_log, "LOG", path)
    with pytest.raises(SystemExit, match="append-only"):
        fm_log.main(["seed"])
    assert len(fm_log.read(path)) == 3


def test_committed_log_holds_every_committed_configuration():
    entries = fm_log.read()
    committed = [e for e in entries if e.get("source") == "committed result"]
    accs = {(e["stage"], e["arm"], e["accuracy"]) for e in committed}
    # the first run (64 px, frozen 0.8525 vs classical 0.8545) and the later one both stay
    assert ("compare", "efficientnet_lite0+logreg", 0.8525) in accs
    assert ("compare", "pixels+svm-rbf", 0.8545) in accs
    assert ("compare", "efficientnet_lite0+svm-rbf", 0.9067) in accs
    assert len([e for e in committed if e["stage"] == "finetune-full"]) == 5


def test_verdict_headline_reads_validation_never_test():
    from benchmarks.fm_verdict import headline

    arms = [{"arm": "a", "family": "frozen", "converged": True, "val_accuracy": 0.90,
             "accuracy": 0.99},
            {"arm": "b", "family": "frozen", "converged": True, "val_accuracy": 0.91,
             "accuracy": 0.80},
            {"arm": "c", "family": "frozen", "converged": False, "val_accuracy": 0.95,
             "accuracy": 0.99},
            {"arm": "d", "family": "classical", "converged": True, "val_accuracy": 0.99,
             "accuracy": 0.99}]
    assert headline(arms, "frozen")["arm"] == "b"
    for a in arms:  # any test scores: the same choice
        a["accuracy"] = 1.0 - a["accuracy"]
    assert headline(arms, "frozen")["arm"] == "b"
    assert headline(arms, "hybrid") is None


def test_section_8_rules():
    from benchmarks.fm_verdict import accuracy_verdict, time_verdict

    assert accuracy_verdict(0.01, 0.001) == "supported"
    assert accuracy_verdict(-0.01, 0.001) == "not supported"
    assert accuracy_verdict(0.01, 0.2) == "mixed"
    fast, slow = {"median": 10, "min": 9, "max": 11}, {"median": 20, "min": 19, "max": 22}
    assert time_verdict(fast, slow, accuracy_worse=False) == "supported"
    assert time_verdict(fast, slow, accuracy_worse=True) == "mixed"
    assert time_verdict(slow, fast, accuracy_worse=False) == "not supported"
    assert time_verdict(fast, {"median": 12, "min": 10.5, "max": 13}, False) == "mixed"
