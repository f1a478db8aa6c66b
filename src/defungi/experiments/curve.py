"""Learning curves: validation (and training) macro-F1 and loss against the training-set size."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from defungi.config import Config
from defungi.data.dataset import Dataset
from defungi.experiments.crossval import kfold, subset
from defungi.experiments.run import fit_cached

log = logging.getLogger(__name__)

TRAIN_EVAL_MAX = 600  # training images scored per fit for the training curve (a sample keeps it cheap)


def folds_for(data: Dataset, pool: np.ndarray, cv: int, val_fraction: float, mode: str, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """cv >= 2: K folds of pool; otherwise one train/validation split of pool."""
    labels, groups = data.labels[pool], data.groups[pool]
    if cv >= 2:
        return [(pool[tr], pool[va]) for tr, va in kfold(labels, groups, cv, mode, seed)]
    n_splits = max(2, round(1 / val_fraction))
    tr, va = next(kfold(labels, groups, n_splits, mode, seed))
    return [(pool[tr], pool[va])]


def learning_curve(config: Config, data: Dataset, pool: np.ndarray, train_fractions: Sequence[float], out_dir: Path, cv: int = 0) -> dict[str, Any]:
    """Fit on growing fractions of the training part of each fold; scores as arrays (fold x size).

    pool: the images the curve may use (e.g. 20% of the training data). Every fit is cached in
    out_dir, so a re-run only does the fits that are missing.
    """
    dc = config.data
    folds = folds_for(data, pool, cv, dc.val_fraction, dc.split, dc.seed)
    shape = (len(folds), len(train_fractions))
    scores = {k: np.full(shape, np.nan) for k in ("train_size", "train_f1", "train_loss", "val_f1", "val_loss", "seconds")}
    histories: list[list[list[dict[str, float]]]] = []
    for f, (tr, va) in enumerate(folds):
        histories.append([])
        for j, fraction in enumerate(train_fractions):
            sub = tr[subset(data.labels[tr], data.groups[tr], fraction, dc.split, seed=dc.seed + f)]
            rng = np.random.default_rng([dc.seed, f, j])
            train_eval = np.sort(rng.choice(sub, min(len(sub), TRAIN_EVAL_MAX), replace=False))
            log.info("curve fold %d/%d, %.0f%% of training (%d images)", f + 1, len(folds), 100 * fraction, len(sub))
            result = fit_cached(config, data, {"train": sub, "val": va, "train_eval": train_eval}, out_dir / f"fold{f}-size{fraction:.2f}")
            m = result["metrics"]
            scores["train_size"][f, j] = len(sub)
            scores["train_f1"][f, j], scores["train_loss"][f, j] = m["train_eval"]["f1"], m["train_eval"]["loss"]
            scores["val_f1"][f, j], scores["val_loss"][f, j] = m["val"]["f1"], m["val"]["loss"]
            scores["seconds"][f, j] = result["train_seconds"]
            histories[f].append(result["history"])
    return {"train_fractions": list(train_fractions), "cv": cv, "folds": len(folds), **{k: v.tolist() for k, v in scores.items()}, "histories": histories}
