"""Seeded, stratified train / validation / test splits, grouped by physical sample or random."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from defungi.errors import DefungiError

SPLIT_MODES = ("grouped", "random")


def _holdout(labels: np.ndarray, groups: np.ndarray, fraction: float, mode: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (into labels) of a stratified holdout of about `fraction`; grouped keeps samples whole."""
    n_splits = max(2, round(1 / fraction))
    min_count = np.bincount(labels).min()
    if mode == "grouped":
        n_groups_min = min(len(np.unique(groups[labels == c])) for c in np.unique(labels))
        if n_groups_min < 2:
            raise DefungiError("a class has images of only one sample: a grouped split is impossible; use --split random")
        splitter = StratifiedGroupKFold(n_splits=min(n_splits, n_groups_min), shuffle=True, random_state=seed)
        rest, held = next(splitter.split(np.zeros(len(labels)), labels, groups))
    elif mode == "random":
        if min_count < 2:
            raise DefungiError("a class has a single image: add images to it so that it can be split")
        splitter = StratifiedKFold(n_splits=min(n_splits, int(min_count)), shuffle=True, random_state=seed)
        rest, held = next(splitter.split(np.zeros(len(labels)), labels))
    else:
        raise DefungiError(f"unknown split mode '{mode}'; use one of {', '.join(SPLIT_MODES)}")
    return rest, held


def train_val_test_split(labels: np.ndarray, groups: np.ndarray, val_fraction: float, test_fraction: float, mode: str = "grouped", seed: int = 0) -> dict[str, np.ndarray]:
    """Index arrays for 'train', 'val' and 'test' (test may be empty when test_fraction is 0)."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    all_idx = np.arange(len(labels))
    if test_fraction > 0:
        rest, test = _holdout(labels, groups, test_fraction, mode, seed)
    else:
        rest, test = all_idx, np.array([], dtype=int)
    sub, val = _holdout(labels[rest], groups[rest], val_fraction / (1 - test_fraction), mode, seed + 1)
    return {"train": np.sort(rest[sub]), "val": np.sort(rest[val]), "test": np.sort(test)}
