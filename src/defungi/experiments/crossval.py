"""Seeded index generators for cross-validation and training-set subsets (scikit-learn style)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from defungi.errors import DefungiError


def kfold(labels: np.ndarray, groups: np.ndarray, n_splits: int, mode: str = "grouped", seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(train, validation) positions for each of n_splits folds; grouped keeps samples whole."""
    x = np.zeros(len(labels))
    if mode == "grouped":
        yield from StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(x, labels, groups)
    elif mode == "random":
        yield from StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(x, labels)
    else:
        raise DefungiError(f"unknown split mode '{mode}'; use grouped or random")


def subset(labels: np.ndarray, groups: np.ndarray, fraction: float, mode: str = "grouped", seed: int = 0) -> np.ndarray:
    """Sorted positions of a stratified subset of about `fraction` (whole samples when grouped)."""
    if not 0 < fraction <= 1:
        raise DefungiError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keys = groups if mode == "grouped" else np.arange(len(labels)).astype(str)
    chosen: list[np.ndarray] = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        units = rng.permutation(np.unique(keys[members]))
        sizes = np.array([np.sum(keys[members] == u) for u in units])
        take = units[: max(1, int(np.searchsorted(np.cumsum(sizes), fraction * len(members)) + 1))]
        chosen.append(members[np.isin(keys[members], take)])
    return np.sort(np.concatenate(chosen))
