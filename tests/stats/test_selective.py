import numpy as np
import pytest
from scipy.stats import binom

from defungi.stats.selective import (
    GRID,
    accuracy_at,
    accuracy_intervals,
    guaranteed,
    risk_coverage,
    share_interval,
    threshold_at,
)


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


def test_learn_then_test_keeps_the_lowest_grid_threshold_shown_to_reach_the_target():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.4, 1, 400)
    correct = rng.uniform(0, 1, 400) < confidence**0.5  # accuracy rises with confidence
    t = threshold_at(confidence, correct, 0.85)
    assert t in GRID

    def p_value(g: float) -> float:
        answered = confidence >= g
        return binom.cdf(np.sum(~correct[answered]), answered.sum(), 1 - 0.85)

    assert p_value(t) <= 0.1 / len(GRID)
    assert all(p_value(g) > 0.1 / len(GRID) for g in GRID if g < t)  # the lowest one that passes
    assert threshold_at(confidence, correct, 0.999) is None  # no count here can show 99.9%
    # one early error among the most confident does not stop the search (it did with a fixed sequence)
    confidence, correct = np.r_[0.995, np.full(200, 0.9)], np.r_[False, np.ones(200, bool)]
    assert threshold_at(confidence, correct, 0.9) <= 0.9  # every specimen answered
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        guaranteed(np.array([0.9]), np.array([1]), np.array([0]), 1.0)


def test_a_promise_holds_on_new_units_with_the_probability_it_states():
    rng = np.random.default_rng(1)
    failed = 0
    for _ in range(200):
        confidence = rng.uniform(0.3, 1, 300)
        t = threshold_at(confidence, rng.uniform(0, 1, 300) < confidence, 0.85, 0.1)
        if t is None:
            continue
        true_accuracy = (1 + t) / 2  # of units answered at confidence >= t, right with probability = confidence
        failed += true_accuracy < 0.85
    assert failed <= 0.1 * 200 + 3 * np.sqrt(200 * 0.1 * 0.9)  # at most delta of the draws, up to noise
    assert threshold_at(np.array([0.95, 0.9]), np.array([True, True]), 0.9) is None  # too few to show anything


def test_the_share_answered_comes_with_an_exact_interval():
    low, high = share_interval(40, 100)
    assert low < 0.4 < high and 0.29 < low < 0.31 and 0.49 < high < 0.51


def test_tied_confidences_are_answered_together():
    cut, coverage, _ = risk_coverage(np.array([0.9, 0.9, 0.5]), np.array([1, 0, 1], dtype=bool))
    assert cut.tolist() == [0.9, 0.5] and coverage.tolist() == [2 / 3, 1.0]
