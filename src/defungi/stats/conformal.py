"""Split-conformal prediction sets with the specimen as the exchangeable unit.

A set holds every class whose probability p satisfies 1 - p <= t (the LAC score, Sadinle et al.
2019), plus the most probable class so that no set is empty. t is the conformal quantile of the
calibration units' scores of their true class: with n exchangeable calibration specimens, a new
specimen's set holds its class with probability at least `level`. Images of one specimen are
near-copies, so for image-level sets each calibration specimen carries weight 1 in total (its images
share it). Class-conditional (Mondrian) thresholds give the guarantee within every class.

MAPIE's `SplitConformalClassifier` computes the same unweighted quantile (the tests check it), but
it calibrates on exchangeable rows and has no notion of groups of rows, so the weighted quantile
that makes specimens the unit is done here, in a few lines.
"""

from __future__ import annotations

import math

import numpy as np


def lac_scores(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Non-conformity of each row's true class: 1 - its probability."""
    return 1.0 - probs[np.arange(len(labels)), labels]


def conformal_threshold(scores: np.ndarray, level: float, weights: np.ndarray | None = None) -> float:
    """The finite-sample conformal quantile of scores at level: the smallest s such that the weight of
    the scores <= s reaches ceil((n + 1) level) units, n the total weight (the number of specimens when
    each specimen's rows share a weight of 1). 1.0 (every class) when there are too few units."""
    weights = np.ones(len(scores)) if weights is None else np.asarray(weights, dtype=float)
    n = float(weights.sum())
    need = math.ceil((n + 1) * level - 1e-9)
    if n == 0 or need > n + 1e-9:
        return 1.0
    order = np.argsort(scores, kind="stable")
    reached = np.cumsum(weights[order]) >= need - 1e-9
    return float(scores[order][np.argmax(reached)])


def unit_weights(specimens: np.ndarray) -> np.ndarray:
    """Weights that give every specimen a total weight of 1, shared by its rows."""
    _, inverse, counts = np.unique(specimens, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse]


def thresholds(
    probs: np.ndarray, labels: np.ndarray, n_classes: int, level: float, weights: np.ndarray | None = None
) -> tuple[float, np.ndarray]:
    """The marginal threshold and one per class (Mondrian: calibrated on that class's units only)."""
    scores = lac_scores(probs, labels)
    weights = np.ones(len(scores)) if weights is None else weights
    per_class = np.array(
        [conformal_threshold(scores[labels == c], level, weights[labels == c]) for c in range(n_classes)]
    )
    return conformal_threshold(scores, level, weights), per_class


def prediction_sets(probs: np.ndarray, threshold: float | np.ndarray) -> np.ndarray:
    """Boolean (rows, classes): the classes whose 1 - p is within the threshold (per class when an
    array), and always the most probable class."""
    sets = (1.0 - probs) <= np.asarray(threshold) + 1e-12
    sets[np.arange(len(probs)), probs.argmax(1)] = True
    return sets


def set_label(sets_row: np.ndarray, classes: list[str]) -> str:
    """A set as a lab reads it: 'H1', 'H1 or H2', 'H1, H2 or H5'."""
    names = [c for c, inside in zip(classes, sets_row, strict=True) if inside]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
