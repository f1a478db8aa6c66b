import numpy as np
import pytest
from scipy.stats import gmean
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from defungi.config import RULES, load_config
from defungi.errors import DefungiError
from defungi.stats.metrics import (
    SPECIMEN_RULES,
    bootstrap_difference,
    bootstrap_intervals,
    calibration,
    classification_metrics,
    score_metrics,
    specimen_decisions,
    specimen_probabilities,
)


def test_macro_metrics_and_confusion():
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    p = np.array([0, 0, 0, 1, 1, 1, 2, 0])
    m = classification_metrics(y, p, ["a", "b", "c"])
    assert m["accuracy"] == 6 / 8
    assert np.isclose(m["recall"], (3 / 4 + 1 + 1 / 2) / 3)
    assert m["confusion_matrix"][0] == [3, 1, 0]
    assert m["per_class"]["c"]["support"] == 2


def test_sample_decision_is_the_mean_probability_of_its_images():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]])
    ids, labels, mean = specimen_decisions(probs, np.array([0, 0, 1, 1]), np.array(["a", "a", "b", "b"]))
    assert list(ids) == ["a", "b"] and list(labels) == [0, 1]
    assert np.allclose(mean, [[0.55, 0.45], [0.45, 0.55]])


def test_the_geometric_mean_lets_one_sure_image_veto_a_class():
    """Two images lean to class 0, one is sure it is not 0: the mean keeps 0, the mean log-probability
    (a geometric mean, as scipy computes it, renormalised) gives 1."""
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.001, 0.999]])
    assert specimen_probabilities(probs, "mean").argmax() == 0
    geometric = specimen_probabilities(probs, "log_mean")
    assert geometric.argmax() == 1 and np.allclose(geometric, gmean(probs, axis=0) / gmean(probs, axis=0).sum())


def test_the_trimmed_mean_ignores_a_few_outlying_images():
    """Eight images at 0.6 / 0.4 and two sure of class 1: the mean follows the two, the trimmed mean
    (20% cut at each end of every class's column) does not."""
    probs = np.array([[0.6, 0.4]] * 8 + [[0.0, 1.0]] * 2)
    assert specimen_probabilities(probs, "mean").argmax() == 1
    assert np.allclose(specimen_probabilities(probs, "trimmed"), [0.6, 0.4])


@pytest.mark.parametrize("rule", SPECIMEN_RULES)
def test_every_rule_gives_probabilities_and_agrees_on_unanimous_images(rule: str):
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(5), size=7)
    pooled = specimen_probabilities(probs, rule)
    assert pooled.shape == (5,) and np.isclose(pooled.sum(), 1) and (pooled >= 0).all()
    same = np.tile(probs[:1], (6, 1))  # identical images: every rule returns them
    assert np.allclose(specimen_probabilities(same, rule), probs[0])


@pytest.mark.parametrize("rule", SPECIMEN_RULES)
def test_specimen_decisions_pool_each_specimen_by_the_rule_whatever_the_row_order(rule: str):
    rng = np.random.default_rng(4)
    specimens = rng.permutation(np.repeat(["b", "a", "c"], [5, 3, 6]))
    probs = rng.dirichlet(np.ones(3), size=len(specimens))
    labels = np.array([{"a": 0, "b": 1, "c": 2}[g] for g in specimens])
    ids, specimen_labels, pooled = specimen_decisions(probs, labels, specimens, rule)
    assert list(ids) == ["a", "b", "c"] and list(specimen_labels) == [0, 1, 2]
    for k, g in enumerate(ids):
        assert np.allclose(pooled[k], specimen_probabilities(probs[specimens == g], rule))
    per_specimen = score_metrics(probs, labels, specimens, ["x", "y", "z"], rule=rule)["samples"]
    assert per_specimen["accuracy"] == np.mean(pooled.argmax(1) == specimen_labels)


def test_the_config_offers_the_rules_there_are_and_refuses_others():
    assert RULES["train.specimen_rule"].choices == tuple(SPECIMEN_RULES)
    assert load_config("quick", {"train.specimen_rule": "trimmed"}).train.specimen_rule == "trimmed"
    with pytest.raises(DefungiError, match="specimen_rule.*log_mean"):
        load_config("quick", {"train.specimen_rule": "median"})
    with pytest.raises(DefungiError, match="unknown specimen rule 'median'"):
        specimen_probabilities(np.full((2, 2), 0.5), "median")


def test_bootstrap_resamples_samples_not_images():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(40) % 2, 10)
    specimens = np.repeat(np.arange(40), 10).astype(str)
    # every image of a sample is decided together: right for 30 samples, wrong for 10
    wrong = np.repeat(rng.permutation(40) < 10, 10)
    predictions = np.where(wrong, 1 - labels, labels)
    by_sample = bootstrap_intervals(labels, predictions, specimens, 2, seed=1)
    by_image = bootstrap_intervals(labels, predictions, np.arange(len(labels)).astype(str), 2, seed=1)
    assert by_sample["accuracy"][0] < 0.75 < by_sample["accuracy"][1]
    # 40 samples vary far more than 400 independent images would: the interval is wider
    width = lambda iv: iv["accuracy"][1] - iv["accuracy"][0]  # noqa: E731
    assert width(by_sample) > 2 * width(by_image)
    assert bootstrap_intervals(labels, predictions, specimens, 2, seed=1) == by_sample  # seeded


@pytest.mark.parametrize("seed", range(5))
def test_macro_scores_match_sklearn_with_a_class_absent(seed: int):
    """Random labels of a 4-class model whose last class has no image here (but is sometimes predicted):
    macro precision / recall / F1 are scikit-learn's per-class scores averaged over the 3 present classes."""
    rng = np.random.default_rng(seed)
    classes = ["a", "b", "c", "absent"]
    y = rng.integers(0, 3, 60)
    p = np.where(rng.random(60) < 0.6, y, rng.integers(0, 4, 60))
    m = classification_metrics(y, p, classes)
    precision, recall, f1, support = precision_recall_fscore_support(y, p, labels=range(4), zero_division=0)
    present = support > 0
    assert list(present) == [True, True, True, False] and m["absent_classes"] == ["absent"]
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert m["precision"] == pytest.approx(precision[present].mean())
    assert m["recall"] == pytest.approx(recall[present].mean())
    assert m["f1"] == pytest.approx(f1[present].mean())
    assert m["f1"] != pytest.approx(f1.mean())  # the absent class's zero is not averaged in
    for i, c in enumerate(classes):
        assert m["per_class"][c] == pytest.approx(
            {"precision": precision[i], "recall": recall[i], "f1": f1[i], "support": support[i]}
        )
    intervals = bootstrap_intervals(y, p, np.arange(60).astype(str), 4, n_boot=50, seed=seed)
    assert all(0 <= intervals[k][0] <= intervals[k][1] <= 1 for k in ("accuracy", "precision", "recall", "f1"))


def test_calibration_error_is_the_gap_between_confidence_and_accuracy():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    honest = np.tile([0.6, 0.4], (10, 1))  # says 0.6 for class 0, which is right 40% of the time
    assert np.isclose(calibration(honest, labels)["ece"], 0.2)
    sure = np.tile([0.0, 1.0], (10, 1))
    assert np.isclose(calibration(sure, labels)["ece"], 0.4)


def test_macro_metrics_average_the_classes_present_and_match_their_intervals():
    y = np.array([0, 0, 1, 1])
    p = np.array([0, 0, 1, 1])
    m = classification_metrics(y, p, ["a", "b", "c"])
    assert m["f1"] == 1.0 and m["absent_classes"] == ["c"]
    low, high = bootstrap_intervals(y, p, np.arange(4).astype(str), 3, n_boot=50)["f1"]
    assert low <= m["f1"] <= high


def test_paired_difference_is_zero_for_the_same_predictions_and_signed_otherwise():
    rng = np.random.default_rng(0)
    specimens = np.repeat(np.arange(60), 4).astype(str)
    labels = np.repeat(np.arange(60) % 3, 4)
    worse = np.where(rng.random(len(labels)) < 0.5, labels, (labels + 1) % 3)
    same = bootstrap_difference(labels, worse, worse, specimens, 3, n_boot=200)
    assert same["f1"]["difference"] == 0 and same["f1"]["interval"] == [0.0, 0.0]
    better = bootstrap_difference(labels, worse, labels, specimens, 3, n_boot=200)
    assert better["accuracy"]["difference"] == 1 - np.mean(worse == labels)
    low, high = better["f1"]["interval"]
    assert 0 < low <= better["f1"]["difference"] <= high <= 1


def test_temperature_scaling_softens_over_confident_probabilities():
    from defungi.stats.metrics import calibration, fit_temperature, temper

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 600)
    right = rng.random(600) < 0.6  # 60% right, each with confidence 0.98
    predicted = np.where(right, labels, (labels + 1) % 3)
    probs = np.full((600, 3), 0.01)
    probs[np.arange(600), predicted] = 0.98
    temperature = fit_temperature(probs[:300], labels[:300])
    before, after = (calibration(p, labels[300:])["ece"] for p in (probs[300:], temper(probs[300:], temperature)))
    assert temperature > 1 and after < before / 2  # on images it was not fitted on
    assert np.array_equal(temper(probs, 3.0).argmax(1), probs.argmax(1))


def test_most_confused_pairs_are_the_largest_off_diagonal_cells():
    y_true = np.array([0] * 10 + [1] * 10 + [2] * 10)
    y_pred = np.array([0] * 6 + [1] * 4 + [1] * 9 + [2] * 1 + [2] * 10)
    pairs = classification_metrics(y_true, y_pred, ["a", "b", "c"])["most_confused"]
    assert pairs == [
        {"true": "a", "predicted": "b", "count": 4, "share": 0.4},
        {"true": "b", "predicted": "c", "count": 1, "share": 0.1},
    ]
