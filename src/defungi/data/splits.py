"""Seeded, stratified splits (scikit-learn style index generators): train / validation / test,
K folds, subsets and the pools that searches and curves use; grouped by specimen or random."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from defungi.errors import DefungiError

SPLIT_MODES = ("grouped", "random")


def _units(labels: np.ndarray, specimens: np.ndarray, mode: str) -> np.ndarray:
    """What a split keeps whole: the specimen (grouped) or the image (random)."""
    if mode == "grouped":
        return np.asarray(specimens)
    if mode == "random":
        return np.arange(len(labels)).astype(str)
    raise DefungiError(f"unknown split mode '{mode}'; use one of {', '.join(SPLIT_MODES)}")


def _pick(labels: np.ndarray, units: np.ndarray, fraction: float, seed: int, leave_one: bool) -> np.ndarray:
    """Boolean mask of whole units that hold `fraction` of every class's images, within half a unit's
    worth: per class, its units in a seeded random order are taken up to the count closest to the
    target, at least one (and, with leave_one, never all). A unit whose images span two classes
    counts towards both."""
    rng = np.random.default_rng(seed)
    names, unit_of = np.unique(units, return_inverse=True)
    taken = np.zeros(len(names), dtype=bool)
    for c in np.unique(labels):
        counts = np.bincount(unit_of[labels == c], minlength=len(names))
        free = rng.permutation(np.flatnonzero((counts > 0) & ~taken))
        cum = np.concatenate([[0], np.cumsum(counts[free])])
        have = counts[taken].sum()
        k = int(np.argmin(np.abs(have + cum - fraction * counts.sum())))
        k = max(k, 1 if have == 0 else 0)
        if leave_one and k == len(free):
            k -= 1
        taken[free[:k]] = True
    return taken[unit_of]


def _holdout(
    labels: np.ndarray, specimens: np.ndarray, fraction: float, mode: str, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Positions (into labels) of the rest and of a stratified holdout of `fraction` of every class
    (within half a specimen's worth when grouped, which keeps specimens whole)."""
    units = _units(labels, specimens, mode)
    fewest = min(len(np.unique(units[labels == c])) for c in np.unique(labels))
    if fewest < 2:
        raise DefungiError(
            "a class has images of only one specimen: a grouped split is impossible; use --split random"
            if mode == "grouped"
            else "a class has a single image: add images to it so that it can be split"
        )
    held = _pick(labels, units, fraction, seed, leave_one=True)
    for c in np.unique(labels):
        if held[labels == c].all() or not held[labels == c].any():
            raise DefungiError(
                f"the {mode} split leaves a class without images on one side (a specimen spans two classes); "
                "use another --seed or --split random"
            )
    return np.flatnonzero(~held), np.flatnonzero(held)


def train_val_test_split(
    labels: np.ndarray,
    specimens: np.ndarray,
    val_fraction: float,
    test_fraction: float,
    mode: str = "grouped",
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Index arrays for 'train', 'val' and 'test' (test may be empty when test_fraction is 0)."""
    labels, specimens = np.asarray(labels), np.asarray(specimens)
    all_idx = np.arange(len(labels))
    if test_fraction > 0:
        rest, test = _holdout(labels, specimens, test_fraction, mode, seed)
    else:
        rest, test = all_idx, np.array([], dtype=int)
    sub, val = _holdout(labels[rest], specimens[rest], val_fraction / (1 - test_fraction), mode, seed + 1)
    return {"train": np.sort(rest[sub]), "val": np.sort(rest[val]), "test": np.sort(test)}


def kfold(
    labels: np.ndarray, specimens: np.ndarray, n_splits: int, mode: str = "grouped", seed: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(train, validation) positions for each of n_splits folds; grouped keeps specimens whole."""
    x = np.zeros(len(labels))
    if mode == "grouped":
        yield from StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(x, labels, specimens)
    elif mode == "random":
        yield from StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(x, labels)
    else:
        raise DefungiError(f"unknown split mode '{mode}'; use one of {', '.join(SPLIT_MODES)}")


def subset(
    labels: np.ndarray, specimens: np.ndarray, fraction: float, mode: str = "grouped", seed: int = 0
) -> np.ndarray:
    """Sorted positions of a stratified subset of `fraction` of every class (whole specimens when grouped)."""
    if not 0 < fraction <= 1:
        raise DefungiError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return np.arange(len(labels))
    return np.flatnonzero(_pick(labels, _units(labels, specimens, mode), fraction, seed, leave_one=False))


def folds(
    labels: np.ndarray, specimens: np.ndarray, pool: np.ndarray, cv: int, val_fraction: float, mode: str, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, validation) positions of pool: K folds when cv >= 2, else one holdout of val_fraction."""
    sub_labels, sub_specimens = labels[pool], specimens[pool]
    if cv >= 2:
        return [(pool[tr], pool[va]) for tr, va in kfold(sub_labels, sub_specimens, cv, mode, seed)]
    tr, va = _holdout(sub_labels, sub_specimens, val_fraction, mode, seed)
    return [(pool[tr], pool[va])]


def tuning_pool(
    labels: np.ndarray, specimens: np.ndarray, split: dict[str, np.ndarray], fraction: float, mode: str, seed: int
) -> np.ndarray:
    """Sorted positions of `fraction` of the training + validation parts (the test part is never touched)."""
    pool = np.sort(np.concatenate([split["train"], split["val"]]))
    return pool[subset(labels[pool], specimens[pool], fraction, mode, seed)]


def tuning_split(
    labels: np.ndarray,
    specimens: np.ndarray,
    split: dict[str, np.ndarray],
    fraction: float,
    val_fraction: float,
    mode: str,
    seed: int,
) -> dict[str, np.ndarray]:
    """Train and validation parts for a search on `fraction` of the data: the split's own parts at
    1.0, else a holdout of the tuning pool."""
    if fraction >= 1:
        return {"train": split["train"], "val": split["val"]}
    pool = tuning_pool(labels, specimens, split, fraction, mode, seed)
    tr, va = folds(labels, specimens, pool, 0, val_fraction, mode, seed)[0]
    return {"train": tr, "val": va}


def cv_folds(
    labels: np.ndarray,
    specimens: np.ndarray,
    classes: list[str],
    k_folds: int,
    val_fraction: float,
    mode: str,
    seed: int,
) -> list[dict[str, np.ndarray]]:
    """One split per fold of a K-fold cross-validation (grouped: whole specimens): the fold's images
    are its test part; a validation part for early stopping is carved from the other folds' specimens
    (val_fraction of all the data), never from the test part."""
    units = _units(labels, specimens, mode)
    for c, name in enumerate(classes):
        n_units = len(np.unique(units[labels == c]))
        if n_units <= k_folds:  # a fold to test on, and the others to train and validate on
            what = "samples" if mode == "grouped" else "images"
            raise DefungiError(
                f"class {name} has {n_units} {what}; {k_folds}-fold cross-validation needs at least {k_folds + 1} "
                f"(use fewer folds{' or --split random' if mode == 'grouped' else ''})"
            )
    inner = min(0.5, val_fraction / (1 - 1 / k_folds))
    splits = []
    for k, (rest, test) in enumerate(kfold(labels, specimens, k_folds, mode, seed)):
        part = train_val_test_split(labels[rest], specimens[rest], inner, 0.0, mode, seed + k)
        splits.append({"train": rest[part["train"]], "val": rest[part["val"]], "test": np.sort(test)})
    return splits
