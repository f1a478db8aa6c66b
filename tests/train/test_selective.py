import numpy as np

from defungi.train.selective import accuracy_at, accuracy_intervals, risk_coverage, threshold_for_accuracy


def test_the_most_confident_answers_are_the_most_accurate_when_confidence_means_something():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.2, 1, 2000)
    correct = rng.uniform(0, 1, 2000) < confidence  # right with probability = confidence
    cut, coverage, accuracy = risk_coverage(confidence, correct)
    assert coverage[-1] == 1 and np.all(np.diff(coverage) > 0) and np.all(np.diff(cut) < 0)
    assert accuracy_at(confidence, correct, 0.5) > accuracy_at(confidence, correct, 1.0) + 0.1
    assert abs(accuracy[-1] - correct.mean()) < 1e-12
    (low, high), *_ = accuracy_intervals(confidence, correct, (1.0,), n_boot=200)
    assert low < correct.mean() < high


def test_a_target_accuracy_picks_the_largest_share_that_reaches_it():
    confidence = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    correct = np.array([1, 1, 1, 0, 0], dtype=bool)
    cut, coverage, accuracy = risk_coverage(confidence, correct)
    assert threshold_for_accuracy(cut, coverage, accuracy, 0.75) == (0.6, 0.8, 0.75)
    assert threshold_for_accuracy(cut, coverage, accuracy, 1.0) == (0.7, 0.6, 1.0)
    assert threshold_for_accuracy(cut, coverage, np.zeros(5), 0.5) is None


def test_tied_confidences_are_answered_together():
    cut, coverage, _ = risk_coverage(np.array([0.9, 0.9, 0.5]), np.array([1, 0, 1], dtype=bool))
    assert cut.tolist() == [0.9, 0.5] and coverage.tolist() == [2 / 3, 1.0]
