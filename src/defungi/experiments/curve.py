"""Learning curves: validation (and training) macro-F1 and loss against the training-set size."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from defungi.config import Config
from defungi.data.dataset import Dataset
from defungi.data.splits import folds, subset
from defungi.experiments.meter import FitPlan
from defungi.experiments.protocols import fit_run, plan_fits
from defungi.experiments.rundir import FitRecord
from defungi.results.search import LearningCurve

log = logging.getLogger(__name__)

TRAIN_EVAL_MAX = 600  # training images scored per fit for the training curve (a sample keeps it cheap)


def _point_name(fold: int, fraction: float) -> str:
    """A curve point's folder: fold and training fraction (two decimals, as before, unless that
    would merge two fractions)."""
    return f"fold{fold}-size{fraction:.2f}" if round(fraction, 2) == fraction else f"fold{fold}-size{fraction:g}"


def curve_points(
    config: Config, dataset: Dataset, pool: np.ndarray, train_fractions: Sequence[float], cv: int = 0
) -> list[list[dict[str, np.ndarray]]]:
    """Per fold (K folds of pool, or one holdout), per training fraction: the fit's split ('train':
    that fraction of the fold's training part, 'val', 'train_eval': a sample of 'train' it is scored on)."""
    dc = config.data
    points = []
    for f, (tr, va) in enumerate(
        folds(dataset.labels, dataset.specimens, pool, cv, dc.val_fraction, dc.split, dc.seed)
    ):
        points.append([])
        for j, fraction in enumerate(train_fractions):
            sub = tr[subset(dataset.labels[tr], dataset.specimens[tr], fraction, dc.split, seed=dc.seed + f)]
            rng = np.random.default_rng([dc.seed, f, j])
            train_eval = np.sort(rng.choice(sub, min(len(sub), TRAIN_EVAL_MAX), replace=False))
            points[f].append({"train": sub, "val": va, "train_eval": train_eval})
    return points


def plan_curve(
    config: Config, dataset: Dataset, pool: np.ndarray, train_fractions: Sequence[float], cv: int = 0
) -> list[FitPlan]:
    """The fits learning_curve would run."""
    points = curve_points(config, dataset, pool, train_fractions, cv)
    return [fit for fold in points for split in fold for fit in plan_fits(config, dataset, split)]


def learning_curve(
    config: Config, dataset: Dataset, pool: np.ndarray, train_fractions: Sequence[float], out_dir: Path, cv: int = 0
) -> LearningCurve:
    """Fit on growing fractions of the training part of each fold (K folds of pool, or one holdout).

    pool: the images the curve may use (e.g. 20% of the training data). Every fit is a run folder
    in out_dir, so a re-run only does the fits that are missing.
    """
    parts = curve_points(config, dataset, pool, train_fractions, cv)
    records: list[list[FitRecord]] = []
    for f, fold in enumerate(parts):
        records.append([])
        for fraction, split in zip(train_fractions, fold, strict=True):
            sub = split["train"]
            log.info("curve fold %d/%d, %.0f%% of training (%d images)", f + 1, len(parts), 100 * fraction, len(sub))
            records[f].append(fit_run(config, out_dir / _point_name(f, fraction), dataset, split))

    def table(score: Callable[[FitRecord], Any]) -> list[list[Any]]:
        return [[score(record) for record in fold] for fold in records]

    return LearningCurve(
        list(train_fractions),
        cv,
        len(parts),
        train_size=[[float(len(split["train"])) for split in fold] for fold in parts],
        train_f1=table(lambda r: r.score("train_eval")),
        train_loss=table(lambda r: r.score("train_eval", "loss")),
        val_f1=table(lambda r: r.score("val")),
        val_loss=table(lambda r: r.score("val", "loss")),
        seconds=table(lambda r: r.metrics.timing.train_seconds),
        histories=table(lambda r: r.history),
    )
