"""Selective answers: answer only the most confident specimens, and say how accurate those answers are.

The risk-coverage curve ranks units (specimens) by the confidence of their decision and gives, for
every share answered, the accuracy on the answered ones. A target accuracy picks a confidence
threshold by Learn-then-Test (Angelopoulos et al. 2021, "Learn then Test: calibrating predictive
algorithms to achieve risk control") with the Bonferroni correction: for each threshold of a grid
fixed in advance (GRID), the hypothesis "the accuracy on the units answered at this threshold is under
the target" is tested with an exact binomial p-value on the held-out units it answers, at level
delta / len(GRID); the lowest threshold whose hypothesis is rejected is chosen. With probability at
least 1 - delta over the held-out units, the chosen threshold's accuracy on new units it answers,
drawn like them, is at least the target. (Fixed-sequence testing from the most confident threshold
down was tried first: one early error among the few most confident specimens stopped it; see
docs/history/measurements.md.)
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binom, binomtest

COVERAGES = (1.0, 0.9, 0.8, 0.7, 0.5)
DELTA = 0.1  # the chance, over the held-out units, that a selective promise does not hold
TARGETS = (0.8, 0.85, 0.9, 0.95)  # target accuracies a run checks its promise at, by cross-fitting
GRID = (0.99, 0.97, 0.95, 0.92, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5)  # the calibrated confidences tested


def risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, coverage, accuracy): answering every unit whose confidence is at least
    thresholds[i] answers coverage[i] of them with accuracy[i]; ties answered together."""
    order = np.argsort(-confidence, kind="stable")
    conf, hits = confidence[order], correct[order].astype(float)
    last_of_tie = np.r_[conf[1:] != conf[:-1], True]
    answered = np.arange(1, len(conf) + 1)
    accuracy = np.cumsum(hits) / answered
    return conf[last_of_tie], (answered / len(conf))[last_of_tie], accuracy[last_of_tie]


def accuracy_at(confidence: np.ndarray, correct: np.ndarray, coverage: float) -> float:
    """Accuracy on the most confident `coverage` share of the units (at least one)."""
    order = np.argsort(-confidence, kind="stable")
    k = max(1, int(round(coverage * len(order))))
    return float(np.mean(correct[order[:k]]))


def accuracy_intervals(
    confidence: np.ndarray,
    correct: np.ndarray,
    coverages: tuple[float, ...] = COVERAGES,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> list[list[float]]:
    """95% intervals of accuracy_at per coverage, from a bootstrap over the units."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(confidence), (n_boot, len(confidence)))
    values = np.array([[accuracy_at(confidence[d], correct[d], c) for c in coverages] for d in draws])
    tail = 100 * (1 - level) / 2
    return [[float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))] for v in values.T]


def guaranteed(
    thresholds: np.ndarray, answered: np.ndarray, errors: np.ndarray, target: float, delta: float = DELTA
) -> tuple[float, int] | None:
    """The threshold that Learn-then-Test chooses at target accuracy and risk delta on a risk-coverage
    curve (its thresholds, most confident first, with the units answered and their errors at each):
    the lowest GRID threshold shown to reach target (see the module's docstring), with the curve's point
    that answers the same units; None if none is."""
    if not 0 < target < 1:
        raise ValueError(f"target accuracy {target} must lie strictly between 0 and 1")
    chosen = None
    for threshold in GRID:  # from the highest down
        reached = np.flatnonzero(thresholds >= threshold)
        if len(reached):
            i = int(reached[-1])  # the units answered at confidence >= threshold
            if binom.cdf(errors[i], answered[i], 1 - target) <= delta / len(GRID):
                chosen = threshold, i
    return chosen


def threshold_at(confidence: np.ndarray, correct: np.ndarray, target: float, delta: float = DELTA) -> float | None:
    """The confidence threshold Learn-then-Test chooses on these units (None: none is shown to reach target)."""
    cut, coverage, accuracy = risk_coverage(confidence, correct)
    answered = np.rint(coverage * len(confidence)).astype(int)
    chosen = guaranteed(cut, answered, np.rint(answered * (1 - accuracy)).astype(int), target, delta)
    return None if chosen is None else chosen[0]


def share_interval(answered: int, units: int, level: float = 0.95) -> list[float]:
    """The exact (Clopper-Pearson) interval of the share of new units answered, from answered of units."""
    ci = binomtest(answered, units).proportion_ci(level)
    return [float(ci.low), float(ci.high)]
