"""Head presets, the small-class fallback and the out-of-core SGD head (small, CPU, offline)."""

from __future__ import annotations

import json
import re
import tracemalloc
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.datasets import make_blobs, make_classification
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier
from sklearn.utils.estimator_checks import parametrize_with_checks
from threadpoolctl import threadpool_limits

from featurepipe.exceptions import ConfigError, FeaturePipeWarning
from featurepipe.heads import (
    HEAD_PRESETS,
    KNN_NEIGHBORS,
    LOGREG_CS,
    LogisticProbeCV,
    OutOfCoreSGDClassifier,
    RBFKernelClassifier,
    ScaledGammaSVC,
    chosen_params,
    fit_head,
    fixed_head,
    make_head,
)

EXPECTED_PARAMS = {
    "logreg": {"C"},
    "linear-svm": {"C"},
    "svm-rbf": {"C", "gamma_scale"},
    "knn": {"n_neighbors"},
    "ridge": {"alpha"},
    "sgd": set(),
}
FOLD_SEARCH_PRESETS = ("logreg", "linear-svm", "svm-rbf", "knn")


@pytest.fixture(autouse=True)
def one_blas_thread():
    """On shared, busy cores multi-threaded OpenBLAS spins: lbfgs fits measured 15-50x slower."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="module")
def split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A small separable 3-class problem, stratified 75/25 split."""
    X, y = make_classification(
        n_samples=240,
        n_features=20,
        n_informative=6,
        n_redundant=2,
        n_classes=3,
        n_clusters_per_class=1,
        class_sep=2.0,
        random_state=0,
    )
    return tuple(train_test_split(X, y, test_size=0.25, stratify=y, random_state=0))


def small_classes(sizes: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Blobs with the given number of samples per class."""
    centers = np.random.default_rng(0).normal(scale=5.0, size=(len(sizes), 8))
    return make_blobs(n_samples=list(sizes.values()), centers=centers, random_state=0)


# --------------------------------------------------------------------------------------------
# presets


@pytest.mark.parametrize("preset", HEAD_PRESETS)
def test_preset_fits_predicts_and_reports_params(preset, split):
    X_train, X_test, y_train, y_test = split
    fitted, info = fit_head(make_head(preset), X_train, y_train)
    assert (fitted.predict(X_test) == y_test).mean() >= 0.8
    assert set(chosen_params(fitted)) == EXPECTED_PARAMS[preset]
    assert info["params"] == chosen_params(fitted)
    assert info["warnings"] == []
    assert info["fit_seconds"] >= 0  # a coarse clock can read 0.0 for a fast fit
    json.dumps(info)  # plain values only


def test_logreg_picks_C_from_grid_by_stratified_cv_and_accepts_float32(split):
    X_train, X_test, y_train, y_test = split
    head = make_head("logreg", cv=3, random_state=7)
    search = head[-1]
    assert isinstance(search, LogisticProbeCV)
    assert (search.cv, search.random_state) == (3, 7)
    fitted, info = fit_head(head, X_train.astype(np.float32), y_train)
    assert any(np.isclose(info["params"]["C"], c) for c in LOGREG_CS)
    assert isinstance(info["params"]["C"], float)
    assert fitted[-1].cv_results_["splits"] == 3  # below split_threshold: K-fold
    assert fitted[-1].coef_.dtype == np.float32
    assert fitted[0].transform(X_test.astype(np.float32)).dtype == np.float32
    assert (fitted.predict(X_test.astype(np.float32)) == fitted.predict(X_test)).all()


@pytest.mark.parametrize("preset", ["linear-svm", "knn"])
def test_grid_search_presets_use_stratified_shuffled_folds(preset):
    search = make_head(preset, cv=4, random_state=1)
    search = search if isinstance(search, GridSearchCV) else search[-1]
    assert isinstance(search, GridSearchCV)
    assert isinstance(search.cv, StratifiedKFold)
    assert (search.cv.n_splits, search.cv.shuffle, search.cv.random_state) == (4, True, 1)


def test_estimator_object_is_cloned_not_mutated(split):
    X_train, _, y_train, _ = split
    tree = DecisionTreeClassifier(max_depth=3, random_state=5)
    before = tree.get_params()
    head = make_head(tree)
    fitted, info = fit_head(head, X_train, y_train)
    assert head is not tree and fitted is not head
    assert not hasattr(tree, "tree_") and not hasattr(head, "tree_")
    assert tree.get_params() == before
    assert info["params"] == {}


def test_module_class_string_is_imported_and_seeded():
    head = make_head("sklearn.tree:DecisionTreeClassifier", random_state=3)
    assert isinstance(head, DecisionTreeClassifier)
    assert head.random_state == 3


@pytest.mark.parametrize(
    "spec",
    [
        "no_such_module_xyz:Head",
        "sklearn.ensemble:NoSuchClassifier",
        "sklearn.linear_model:Ridge",  # a regressor
        "sklearn.preprocessing:StandardScaler",  # a transformer
        "json:dumps",  # not an estimator class
        "sklearn.ensemble:",
    ],
)
def test_bad_module_class_string_names_the_string(spec):
    with pytest.raises(ConfigError, match=re.escape(repr(spec))):
        make_head(spec)


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="'logistic'") as excinfo:
        make_head("logistic")
    assert all(preset in str(excinfo.value) for preset in HEAD_PRESETS)


@pytest.mark.parametrize("bad", [{"head": StandardScaler()}, {"head": 3}, {"cv": 1}])
def test_make_head_rejects_bad_arguments(bad):
    with pytest.raises(ConfigError):
        make_head(**bad)


# --------------------------------------------------------------------------------------------
# the logreg probe and the kernel head


@pytest.fixture(scope="module")
def easy() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three far-apart blobs (every C scores 100%) and their centres."""
    centres = np.random.default_rng(3).normal(scale=10.0, size=(3, 16))
    X, y = make_blobs(n_samples=90, centers=centres, cluster_std=1.0, random_state=0)
    return X, y, centres


def test_logreg_tie_breaks_toward_confident_model_on_easy_data(easy):
    """Every C is 100% accurate: the least regularised tie wins, so obvious rows score > 0.9."""
    X, y, centres = easy
    fitted, info = fit_head(make_head("logreg"), X, y)
    assert info["params"]["C"] > min(LOGREG_CS)
    proba = fitted.predict_proba(centres)
    assert (proba.argmax(axis=1) == [0, 1, 2]).all()
    assert proba.max(axis=1).min() > 0.9


def test_probe_at_one_C_matches_sklearn_logistic_regression(split):
    X_train, X_test, y_train, _ = split
    scaler = StandardScaler().fit(X_train)
    Xs, Xt = scaler.transform(X_train), scaler.transform(X_test)
    probe = LogisticProbeCV(Cs=(0.1,)).fit(Xs, y_train)
    reference = LogisticRegression(C=0.1, max_iter=1000, tol=1e-6).fit(Xs, y_train)
    assert probe.cv_results_["splits"] == 0 and probe.C_ == 0.1
    np.testing.assert_allclose(probe.predict_proba(Xt), reference.predict_proba(Xt), atol=2e-3)


def test_probe_uses_one_stratified_split_from_the_threshold(split):
    X_train, _, y_train, _ = split
    probe = LogisticProbeCV(split_threshold=100, val_size=0.25, patience=None)
    probe.fit(X_train, y_train)
    results = probe.cv_results_
    assert results["splits"] == 1
    assert len(results["accuracy"]) == len(LOGREG_CS) and not np.isnan(results["accuracy"]).any()
    assert probe.C_ in results["tied"]


def test_probe_path_stops_after_a_C_that_improves_nothing():
    X, y = make_classification(n_samples=300, n_features=60, n_informative=5, flip_y=0.2,
                               random_state=0)
    probe = LogisticProbeCV(cv=3).fit(StandardScaler().fit_transform(X), y)
    accuracy = probe.cv_results_["accuracy"]
    assert np.isnan(accuracy[-1])  # overfitting Cs were never fit
    ran = int(np.sum(~np.isnan(accuracy)))
    assert probe.cv_results_["log_loss"][ran - 1] > min(probe.cv_results_["log_loss"][: ran - 1])


def test_probe_shows_progress_only_when_asked(split, capsys):
    X_train, _, y_train, _ = split
    fit_head(make_head("logreg", cv=2), X_train, y_train)
    assert "C search" not in capsys.readouterr().err
    fitted, _ = fit_head(make_head("logreg", cv=2), X_train, y_train, progress=True)
    assert "C search" in capsys.readouterr().err
    assert fitted[-1].verbose == 0  # the saved head draws no bars


@pytest.mark.parametrize("preset", ["linear-svm", "knn", "svm-rbf"])
def test_grid_searches_show_progress_and_keep_their_scoring(preset, split, capsys):
    X_train, _, y_train, _ = split
    fitted, _ = fit_head(make_head(preset, cv=2), X_train, y_train, progress=True)
    err = capsys.readouterr().err
    assert re.search(r"(GridSearchCV|RBF SVC search).*fit/s", err)
    search = fitted if isinstance(fitted, GridSearchCV) else fitted[-1]
    search = getattr(search, "model_", search)  # the kernel head's inner exact search
    assert search.scoring is None and type(search.scorer_).__name__ == "_PassthroughScorer"


def test_kernel_head_switches_to_nystroem_past_the_row_threshold(split):
    X_train, X_test, y_train, y_test = split
    exact = RBFKernelClassifier(exact_max_rows=len(y_train), cv=3).fit(X_train, y_train)
    approx = RBFKernelClassifier(exact_max_rows=len(y_train) - 1, n_components=50, cv=3)
    approx.fit(X_train, y_train)
    assert not exact.approximate_ and approx.approximate_
    assert not hasattr(exact, "predict_proba") and hasattr(approx, "predict_proba")
    assert set(approx.best_params_) == {"C", "gamma_scale", "n_components"}
    assert approx.score(X_test, y_test) >= 0.8 and exact.score(X_test, y_test) >= 0.8


@pytest.mark.parametrize("preset", ["logreg", "svm-rbf", "knn", "ridge", "linear-svm"])
def test_fixed_head_refits_the_chosen_parameters_without_searching(preset, split):
    X_train, _, y_train, _ = split
    fitted, info = fit_head(make_head(preset, cv=3), X_train, y_train)
    fixed = fixed_head(fitted)
    refit, again = fit_head(fixed, X_train, y_train)
    assert again["warnings"] == []
    chosen = {k: v for k, v in info["params"].items()}
    short = {k.rsplit("__", 1)[-1]: v for k, v in fixed.get_params().items()}
    for name, value in chosen.items():
        if name in short and not isinstance(short[name], tuple):
            assert short[name] == value
    assert (refit.predict(X_train) == fitted.predict(X_train)).mean() > 0.95


def test_kernel_head_nystroem_branch_round_trips_through_skops(split, tmp_path):
    sio = pytest.importorskip("skops.io")
    from featurepipe.model import SKOPS_TRUSTED

    X_train, X_test, y_train, _ = split
    head = make_head("svm-rbf", cv=3).set_params(rbfkernelclassifier__exact_max_rows=10,
                                                 rbfkernelclassifier__n_components=30)
    fitted, _ = fit_head(head, X_train, y_train)
    sio.dump(fitted, tmp_path / "k.skops")
    assert set(sio.get_untrusted_types(file=tmp_path / "k.skops")) <= set(SKOPS_TRUSTED)
    loaded = sio.load(tmp_path / "k.skops", trusted=list(SKOPS_TRUSTED))
    np.testing.assert_allclose(loaded.predict_proba(X_test), fitted.predict_proba(X_test))


# --------------------------------------------------------------------------------------------
# fit_head: small classes


@pytest.mark.parametrize("preset", FOLD_SEARCH_PRESETS)
def test_class_with_one_sample_skips_search_with_middle_of_grid(preset):
    X, y = small_classes({0: 20, 1: 20, 2: 2, 3: 1})
    with pytest.warns(FeaturePipeWarning, match=r"class 3 has 1 sample;.*was skipped") as record:
        fitted, info = fit_head(make_head(preset), X, y)
    assert len(record) == 1
    assert info["warnings"] == [str(record[0].message)]
    assert set(info["params"]) == EXPECTED_PARAMS[preset]
    assert chosen_params(fitted) == {}  # nothing was chosen by CV
    assert set(fitted.predict(X)) <= {0, 1, 2, 3}
    if preset == "logreg":
        assert info["params"] == {"C": LOGREG_CS[3]}
    if preset == "knn":
        assert info["params"] == {"n_neighbors": KNN_NEIGHBORS[1]}


@pytest.mark.parametrize("preset", FOLD_SEARCH_PRESETS)
def test_class_with_two_samples_reduces_folds(preset):
    X, y = small_classes({0: 20, 1: 20, 2: 2})
    with pytest.warns(FeaturePipeWarning, match=r"class 2 has 2 samples.*used 2-fold") as record:
        fitted, info = fit_head(make_head(preset), X, y)
    assert info["warnings"] == [str(w.message) for w in record]
    assert set(info["params"]) == EXPECTED_PARAMS[preset]
    assert (fitted.predict(X) == y).mean() > 0.9


@pytest.mark.parametrize("preset", ["ridge", "sgd"])
def test_heads_without_fold_search_need_no_fallback(preset):
    X, y = small_classes({0: 20, 1: 20, 2: 2, 3: 1})
    _, info = fit_head(make_head(preset), X, y)  # filterwarnings=error: no warning issued
    assert info["warnings"] == []


def test_knn_grid_is_capped_by_training_fold_size():
    X, y = small_classes({0: 8, 1: 8})  # 3 folds -> 10 training rows
    fitted, _ = fit_head(make_head("knn", cv=3), X, y)
    assert fitted.param_grid == {"n_neighbors": [1, 5, 10]}
    assert fitted.best_params_["n_neighbors"] in (1, 5, 10)


def test_single_class_is_a_config_error():
    X, y = small_classes({0: 10})
    with pytest.raises(ConfigError, match="at least 2 classes"):
        fit_head(make_head("logreg"), X, y)


def test_fit_warnings_are_recorded_and_reissued(split):
    X_train, _, y_train, _ = split
    with pytest.warns(ConvergenceWarning):
        _, info = fit_head(LogisticRegression(max_iter=1), X_train, y_train)
    assert len(info["warnings"]) == 1
    assert info["warnings"][0].startswith("ConvergenceWarning: ")


# --------------------------------------------------------------------------------------------
# OutOfCoreSGDClassifier


def _expected_failures(estimator):
    if isinstance(estimator, RBFKernelClassifier) and estimator.exact_max_rows > 0:
        return {"check_decision_proba_consistency": "predict_proba exists only after the "
                "Nystroem branch was fitted; the exact SVC branch has no probabilities"}
    return {}


@parametrize_with_checks([
    OutOfCoreSGDClassifier(),
    ScaledGammaSVC(),
    LogisticProbeCV(),
    LogisticProbeCV(split_threshold=0),  # the single-split branch
    RBFKernelClassifier(),
    RBFKernelClassifier(exact_max_rows=0, n_components=20),  # the Nystroem branch
], expected_failed_checks=_expected_failures)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)


def make_chunks(X: np.ndarray, y: np.ndarray, rows: int, *, as_objects: bool = False):
    """A chunk factory over in-memory arrays, like FeatureStore.iter_chunks."""

    def factory():
        for start in range(0, len(y), rows):
            X_chunk, y_chunk = X[start : start + rows], y[start : start + rows]
            if as_objects:
                yield SimpleNamespace(features=X_chunk, labels=y_chunk)
            else:
                yield X_chunk, y_chunk

    return factory


@pytest.fixture(scope="module")
def sgd_problem():
    X, y = make_classification(
        n_samples=2400, n_features=30, n_informative=10, n_classes=3, random_state=1
    )
    return tuple(train_test_split(X, y, test_size=0.25, stratify=y, random_state=0))


@pytest.mark.parametrize("as_objects", [False, True])
def test_fit_chunks_matches_in_memory_fit(sgd_problem, as_objects):
    X_train, X_test, y_train, y_test = sgd_problem
    in_memory = OutOfCoreSGDClassifier().fit(X_train, y_train).score(X_test, y_test)
    # float16 features and unlabelled rows (-1), as the feature store holds them
    X_store = np.vstack([X_train, X_train[:50] + 100]).astype(np.float16)
    y_store = np.concatenate([y_train, np.full(50, -1)])
    streamed = OutOfCoreSGDClassifier().fit_chunks(
        make_chunks(X_store, y_store, 100, as_objects=as_objects)
    )
    assert streamed.classes_.tolist() == [0, 1, 2]
    assert streamed.n_features_in_ == 30
    assert streamed.n_rows_seen_ == len(y_train)
    assert abs(streamed.score(X_test, y_test) - in_memory) <= 0.03
    assert in_memory >= 0.75
    np.testing.assert_allclose(streamed.predict_proba(X_test).sum(axis=1), 1.0)


def test_fit_chunks_holds_one_chunk_at_a_time(monkeypatch):
    chunk_rows, n_chunks, n_features = 256, 40, 64
    held = {"chunks": 0, "live": 0, "partial_fit_rows": 0}

    def release() -> None:
        held["live"] -= 1

    def factory():
        for i in range(n_chunks):
            rng = np.random.default_rng(i)
            y = rng.integers(0, 2, chunk_rows)
            X = rng.normal(size=(chunk_rows, n_features)) + y[:, None]
            weakref.finalize(X, release)  # counts chunk arrays still alive
            held["live"] += 1
            held["chunks"] = max(held["chunks"], held["live"])
            yield X, y

    def counting(method):
        def wrapper(self, X, *args, **kwargs):
            held["partial_fit_rows"] = max(held["partial_fit_rows"], len(X))
            return method(self, X, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(SGDClassifier, "partial_fit", counting(SGDClassifier.partial_fit))
    monkeypatch.setattr(StandardScaler, "partial_fit", counting(StandardScaler.partial_fit))
    head = OutOfCoreSGDClassifier(chunk_rows=chunk_rows, epochs=2)
    head.fit_chunks(factory)  # warm-up: lazy imports and caches out of the measurement
    tracemalloc.start()
    head.fit_chunks(factory)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    all_rows_bytes = n_chunks * chunk_rows * n_features * 8
    assert held["partial_fit_rows"] <= chunk_rows
    assert held["chunks"] <= 3
    assert peak < all_rows_bytes / 5, f"peak {peak} B vs {all_rows_bytes} B for all rows"
    assert head.score(*next(iter(factory()))) > 0.7


def test_large_chunks_are_split_to_chunk_rows(monkeypatch, sgd_problem):
    X_train, _, y_train, _ = sgd_problem
    sizes: list[int] = []
    original = SGDClassifier.partial_fit

    def recording(self, X, *args, **kwargs):
        sizes.append(len(X))
        return original(self, X, *args, **kwargs)

    monkeypatch.setattr(SGDClassifier, "partial_fit", recording)
    OutOfCoreSGDClassifier(chunk_rows=500, epochs=1).fit(X_train, y_train)
    assert max(sizes) == 500 and sum(sizes) == len(y_train)


def test_fit_chunks_classes_and_errors(sgd_problem):
    X_train, _, y_train, _ = sgd_problem
    chunks = make_chunks(X_train, y_train, 600)
    head = OutOfCoreSGDClassifier(epochs=1).fit_chunks(chunks, classes=[0, 1, 2, 3])
    assert head.classes_.tolist() == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match=r"labels \[2\] are not in classes"):
        OutOfCoreSGDClassifier(classes=[0, 1]).fit_chunks(chunks)
    one_shot = chunks()
    with pytest.raises(ConfigError, match="fresh iterator"):
        OutOfCoreSGDClassifier().fit_chunks(lambda: one_shot)
    with pytest.raises(ConfigError, match="no labelled rows"):
        OutOfCoreSGDClassifier().fit_chunks(make_chunks(X_train, np.full(len(X_train), -1), 600))
    with pytest.raises(ConfigError, match="epochs"):
        OutOfCoreSGDClassifier(epochs=0).fit(X_train, y_train)


def test_predict_proba_only_for_probabilistic_losses():
    assert hasattr(OutOfCoreSGDClassifier(), "predict_proba")
    assert not hasattr(OutOfCoreSGDClassifier(loss="hinge"), "predict_proba")
