"""Selective answers: answer only the most confident specimens, and say how accurate those answers are.

The risk-coverage curve ranks units (specimens) by the confidence of their decision and gives, for
every share answered, the accuracy on the answered ones. A target accuracy picks the lowest
confidence threshold whose answered units reach it on held-out (out-of-fold) data.
"""

from __future__ import annotations

import numpy as np

COVERAGES = (1.0, 0.9, 0.8, 0.7, 0.5)


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


def threshold_for_accuracy(
    thresholds: np.ndarray, coverage: np.ndarray, accuracy: np.ndarray, target: float
) -> tuple[float, float, float] | None:
    """(confidence threshold, expected coverage, accuracy) of the largest answered share whose
    accuracy reaches target on the curve; None when no share does."""
    reach = np.flatnonzero(accuracy >= target)
    if len(reach) == 0:
        return None
    i = reach[-1]
    return float(thresholds[i]), float(coverage[i]), float(accuracy[i])
