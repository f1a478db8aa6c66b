import numpy as np
import pytest

from defungi.data.scan import scan
from defungi.data.splits import kfold, subset, train_val_test_split, tuning_split
from defungi.errors import DefungiError
from tests.conftest import REAL_DATA


def _toy(n_specimens: int = 60, per_specimen: int = 5):
    rng = np.random.default_rng(0)
    group_labels = rng.integers(0, 4, n_specimens)
    specimens = np.repeat(np.arange(n_specimens), per_specimen).astype(str)
    labels = np.repeat(group_labels, per_specimen)
    return labels, specimens


def test_grouped_split_keeps_samples_whole_and_is_seeded():
    labels, specimens = _toy()
    split = train_val_test_split(labels, specimens, 0.15, 0.15, "grouped", seed=3)
    parts = [set(specimens[idx]) for idx in split.values()]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert sum(len(v) for v in split.values()) == len(labels)
    again = train_val_test_split(labels, specimens, 0.15, 0.15, "grouped", seed=3)
    assert all(np.array_equal(split[k], again[k]) for k in split)
    other = train_val_test_split(labels, specimens, 0.15, 0.15, "grouped", seed=4)
    assert not np.array_equal(split["test"], other["test"])


def test_random_split_is_stratified():
    labels, specimens = _toy()
    split = train_val_test_split(labels, specimens, 0.2, 0.2, "random", seed=0)
    for idx in split.values():
        share = np.bincount(labels[idx], minlength=4) / len(idx)
        assert np.allclose(share, np.bincount(labels, minlength=4) / len(labels), atol=0.05)
    assert set(specimens[split["train"]]) & set(specimens[split["test"]])  # random: samples are shared


def test_grouped_split_needs_two_samples_per_class():
    labels = np.array([0, 0, 1, 1])
    with pytest.raises(DefungiError, match="--split random"):
        train_val_test_split(labels, np.array(["a", "a", "b", "c"]), 0.25, 0.25, "grouped")


def _samples():
    specimens = np.repeat(np.arange(40), 4).astype(str)
    labels = np.repeat(np.arange(40) % 4, 4)
    return labels, specimens


def test_grouped_folds_cover_everything_once_and_keep_samples_whole():
    labels, specimens = _samples()
    seen = []
    for tr, va in kfold(labels, specimens, 3, "grouped", seed=0):
        assert not set(specimens[tr]) & set(specimens[va])
        seen += list(va)
    assert sorted(seen) == list(range(len(labels)))


def test_subset_fraction_whole_samples_stratified_and_seeded():
    labels, specimens = _samples()
    idx = subset(labels, specimens, 0.25, "grouped", seed=1)
    assert 0.2 <= len(idx) / len(labels) <= 0.4
    counts = np.bincount(labels[idx], minlength=4)
    assert counts.min() > 0 and counts.max() - counts.min() <= 4  # every class, in about equal shares
    for g in set(specimens[idx]):
        assert np.all(np.isin(np.flatnonzero(specimens == g), idx))
    assert np.array_equal(idx, subset(labels, specimens, 0.25, "grouped", seed=1))
    assert not np.array_equal(idx, subset(labels, specimens, 0.25, "grouped", seed=2))
    assert len(subset(labels, specimens, 1.0)) == len(labels)


def test_tuning_split_never_touches_the_test_part():
    labels, specimens = _samples()
    split = train_val_test_split(labels, specimens, 0.15, 0.15, "grouped", seed=0)
    full = tuning_split(labels, specimens, split, 1.0, 0.15, "grouped", 0)
    assert np.array_equal(full["train"], split["train"]) and np.array_equal(full["val"], split["val"])
    part = tuning_split(labels, specimens, split, 0.5, 0.15, "grouped", 0)
    used = np.concatenate([part["train"], part["val"]])
    assert not set(used) & set(split["test"]) and len(used) < len(split["train"]) + len(split["val"])
    assert not set(specimens[part["train"]]) & set(specimens[part["val"]])


@pytest.mark.parametrize("mode", ["grouped", "random"])
@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.4])
def test_holdout_is_the_asked_size_of_every_class(mode, fraction):
    rng = np.random.default_rng(5)
    sizes = rng.integers(1, 30, 200)  # samples of 1 to 29 images
    specimens = np.repeat(np.arange(200), sizes).astype(str)
    labels = np.repeat(np.arange(200) % 5, sizes)
    test = train_val_test_split(labels, specimens, 0.15, fraction, mode, seed=0)["test"]
    for c in range(5):
        asked = fraction * np.sum(labels == c)
        assert abs(np.sum(labels[test] == c) - asked) <= (15 if mode == "grouped" else 1)  # half a sample at most


DEFUNGI = REAL_DATA


@pytest.mark.skipif(not DEFUNGI.is_dir(), reason="no ../shared/defungi")
def test_asked_test_fraction_holds_on_defungi_names():
    records = scan(DEFUNGI)
    classes = sorted({r.label for r in records})
    labels = np.array([classes.index(r.label) for r in records])
    specimens = np.array([r.specimen for r in records])
    split = train_val_test_split(labels, specimens, 0.15, 0.4, "grouped", seed=0)
    assert 0.37 <= len(split["test"]) / len(labels) <= 0.43
    assert 0.12 <= len(split["val"]) / len(labels) <= 0.18
    assert not set(specimens[split["test"]]) & set(specimens[split["train"]])


def test_a_sample_spanning_two_classes_stays_whole_and_every_class_is_on_both_sides():
    labels, specimens = _samples()
    specimens = specimens.copy()
    specimens[labels == 1] = np.where(
        specimens[labels == 1] == specimens[labels == 1][0], "shared", specimens[labels == 1]
    )
    specimens[np.flatnonzero(labels == 0)[:4]] = "shared"  # a duplicate cluster across classes 0 and 1
    for seed in range(20):
        split = train_val_test_split(labels, specimens, 0.15, 0.3, "grouped", seed)
        parts = [set(specimens[idx]) for idx in split.values()]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        for c in range(4):
            assert all(np.any(labels[idx] == c) for idx in split.values())
