import numpy as np
import pytest

from defungi.stats.conformal import (
    conformal_threshold,
    lac_scores,
    prediction_sets,
    set_label,
    thresholds,
    unit_weights,
)


def _probs(rng: np.random.Generator, n: int, n_classes: int = 5, sharpness: float = 2.0) -> tuple:
    """Probabilities of a model that is right about 70% of the time, and labels drawn from them."""
    logits = rng.normal(0, sharpness, (n, n_classes))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(n_classes, p=p) for p in probs])  # calibrated by construction
    return probs, labels


def test_the_threshold_is_mapies_split_conformal_quantile():
    from mapie.classification import SplitConformalClassifier
    from sklearn.base import BaseEstimator, ClassifierMixin

    class Given(ClassifierMixin, BaseEstimator):  # a fitted model whose inputs are its probabilities
        def fit(self, x, y):
            self.classes_ = np.arange(x.shape[1])
            return self

        def predict_proba(self, x):
            return x

        def predict(self, x):
            return x.argmax(1)

    rng = np.random.default_rng(0)
    probs, labels = _probs(rng, 300)
    test, _ = _probs(rng, 200)
    for level in (0.8, 0.9, 0.95):
        mapie = SplitConformalClassifier(Given().fit(probs, labels), confidence_level=level, prefit=True)
        mapie.conformalize(probs, labels)
        theirs = mapie.predict_set(test)[1][:, :, 0]
        ours = (1 - test) <= conformal_threshold(lac_scores(probs, labels), level) + 1e-12
        assert np.array_equal(ours, theirs)


def test_sets_cover_new_units_at_the_level_and_hold_the_top_class():
    rng = np.random.default_rng(1)
    cal, cal_labels = _probs(rng, 400)
    new, new_labels = _probs(rng, 4000)
    for level in (0.8, 0.9, 0.95):
        marginal, per_class = thresholds(cal, cal_labels, 5, level)
        for t in (marginal, per_class):
            sets = prediction_sets(new, t)
            coverage = sets[np.arange(len(new_labels)), new_labels].mean()
            assert level - 0.03 <= coverage <= level + 0.05
            assert sets[np.arange(len(new)), new.argmax(1)].all()


def test_each_specimen_is_one_unit_however_many_images_it_has():
    scores = np.array([0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.9, 0.5])  # specimen a: 6 near-copies
    specimens = np.array(["a"] * 6 + ["b", "c"])
    weights = unit_weights(specimens)
    assert np.allclose(np.bincount([0] * 6 + [1, 2], weights=weights), 1)
    # 3 specimens: at level 0.5 the conformal rank is ceil(4 * 0.5) = 2 units: a (0.1) and c (0.5)
    assert conformal_threshold(scores, 0.5, weights) == 0.5
    assert conformal_threshold(scores, 0.5) == 0.1  # as if the 6 near-copies were 6 specimens
    assert conformal_threshold(scores, 0.9, weights) == 1.0  # too few units for 90%: every class


@pytest.mark.parametrize(("row", "text"), [([1, 0, 0], "H1"), ([1, 1, 0], "H1 or H2"), ([1, 1, 1], "H1, H2 or H3")])
def test_a_set_reads_as_a_lab_says_it(row, text):
    assert set_label(np.array(row, dtype=bool), ["H1", "H2", "H3"]) == text
