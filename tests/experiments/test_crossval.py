import numpy as np

from defungi.experiments.crossval import kfold, subset


def _toy():
    groups = np.repeat(np.arange(40), 4).astype(str)
    labels = np.repeat(np.arange(40) % 4, 4)
    return labels, groups


def test_grouped_folds_cover_everything_once_and_keep_samples_whole():
    labels, groups = _toy()
    seen = []
    for tr, va in kfold(labels, groups, 3, "grouped", seed=0):
        assert not set(groups[tr]) & set(groups[va])
        seen += list(va)
    assert sorted(seen) == list(range(len(labels)))


def test_subset_fraction_whole_samples_stratified_and_seeded():
    labels, groups = _toy()
    idx = subset(labels, groups, 0.25, "grouped", seed=1)
    assert 0.2 <= len(idx) / len(labels) <= 0.4
    assert set(np.bincount(labels[idx])) and len(np.unique(labels[idx])) == 4
    for g in set(groups[idx]):
        assert np.all(np.isin(np.flatnonzero(groups == g), idx))
    assert np.array_equal(idx, subset(labels, groups, 0.25, "grouped", seed=1))
    assert len(subset(labels, groups, 1.0)) == len(labels)
