"""The one stratified split: scikit-learn's rows for a seed, checked sizes, a stated fallback."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from sklearn.model_selection import StratifiedShuffleSplit, train_test_split

from featurepipe.exceptions import ConfigError, FeaturePipeWarning
from featurepipe.splits import split_sizes, stratified_split, stratified_subsample

LABELS = np.repeat(np.array([0, 1, 2]), [10, 7, 5])


@pytest.mark.parametrize("test_size", [0.2, 0.5, 6, 3])
@pytest.mark.parametrize("seed", [0, 1, 42])
def test_same_rows_as_scikit_learn_for_a_seed(test_size, seed):
    positions = np.arange(len(LABELS))
    want_train, want_test = train_test_split(positions, test_size=test_size, stratify=LABELS,
                                             random_state=seed)
    train, test = stratified_split(LABELS, test_size, seed=seed, sort=False)
    assert train.tolist() == want_train.tolist() and test.tolist() == want_test.tolist()
    train, test = stratified_split(LABELS, test_size, seed=seed)
    assert train.tolist() == sorted(want_train.tolist())
    assert test.tolist() == sorted(want_test.tolist())
    assert sorted([*train.tolist(), *test.tolist()]) == positions.tolist()
    assert set(LABELS[test].tolist()) == {0, 1, 2}  # every class in the test part


def test_same_rows_as_the_probe_s_shuffle_split():
    labels = np.tile(np.arange(4), 50)
    want = next(StratifiedShuffleSplit(n_splits=1, test_size=0.2, random_state=7)
                .split(np.zeros(len(labels)), labels))
    got = stratified_split(labels, 0.2, seed=7, sort=False)
    assert [g.tolist() for g in got] == [w.tolist() for w in want]


def test_string_labels():
    labels = np.array(["cat"] * 4 + ["dog"] * 4)
    train, test = stratified_split(labels, 0.5, seed=0)
    assert sorted(labels[test].tolist()) == ["cat", "cat", "dog", "dog"] and len(train) == 4


@pytest.mark.parametrize(("labels", "test_size", "why"), [
    (np.array([0, 0, 0, 1, 1, 1, 2]), 0.3, "class 2 has only 1 member"),
    (LABELS, 2, "2 test rows cannot hold one row of each of the 3 classes"),
    (LABELS, 20, "2 training rows cannot hold one row of each of the 3 classes"),
])
def test_too_small_to_stratify_raises_naming_the_counts(labels, test_size, why):
    with pytest.raises(ConfigError, match="cannot make a stratified test split") as err:
        stratified_split(labels, test_size, seed=0, hint="add images")
    assert why in str(err.value) and "class counts" in str(err.value)
    assert str(err.value).endswith("; add images")


def test_random_fallback_warns_and_is_scikit_learn_s_unstratified_split():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2])
    with pytest.warns(FeaturePipeWarning, match="validation split is not stratified"):
        train, test = stratified_split(labels, 3, seed=5, fallback="random",
                                       what="validation split", sort=False)
    want_train, want_test = train_test_split(np.arange(9), test_size=3, random_state=5)
    assert train.tolist() == want_train.tolist() and test.tolist() == want_test.tolist()


@pytest.mark.parametrize("bad", [0, 0.0, 1.0, 1.5, -2, 22, True, "0.2", None])
def test_sizes_that_leave_a_part_empty_are_refused(bad):
    with pytest.raises(ConfigError, match="test_size"):
        stratified_split(LABELS, bad, seed=0)


def test_split_sizes_match_scikit_learn():
    assert split_sizes(22, 0.2) == (17, 5)  # ceil for the test part, as scikit-learn
    assert split_sizes(22, 5) == (17, 5)
    assert split_sizes(10, np.float64(0.25)) == (7, 3)


def test_unknown_fallback_is_refused():
    with pytest.raises(ConfigError, match="fallback"):
        stratified_split(LABELS, 0.2, seed=0, fallback="drop")  # type: ignore[arg-type]


def test_subsample_is_scikit_learn_s_stratified_training_part():
    keep = stratified_subsample(LABELS, 9, seed=3)
    want, _ = train_test_split(np.arange(len(LABELS)), train_size=9, stratify=LABELS,
                               random_state=3)
    assert keep.tolist() == sorted(want.tolist())
    assert stratified_subsample(LABELS, 50, seed=3).tolist() == list(range(len(LABELS)))


def test_subsample_of_a_tiny_class_falls_back_with_a_warning():
    labels = np.array([0] * 10 + [1])
    with pytest.warns(FeaturePipeWarning, match="subsample is not stratified"):
        keep = stratified_subsample(labels, 5, seed=0)
    assert len(keep) == 5 and len(set(keep.tolist())) == 5


def test_splits_and_records_import_no_torch():
    code = "import sys, featurepipe.splits, featurepipe.records; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
