"""What the studies' steps share: the exploratory config, learning curves, grid searches, the final
cross-validated fits, and the sentences their findings are told in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from defungi.config import Config, load_config_from
from defungi.data.splits import tuning_pool, tuning_split
from defungi.experiments.compare import paired_difference
from defungi.experiments.curve import learning_curve, plan_curve
from defungi.experiments.meter import FitPlan
from defungi.experiments.protocols import fit_run, plan_fits
from defungi.experiments.speed import inference_images_per_s
from defungi.experiments.studies.runner import StudyContext
from defungi.results.run import PairedDifference, Scores
from defungi.results.search import LearningCurve
from defungi.results.study import Curves, Final, Grid, NamedCurve

BATCH, LR = "train.batch_size", "train.lr"

# An exploratory fit (curves, grids, comparisons): one model, a fixed number of epochs, no
# test-time augmentation, scored at its last epoch, so that a score is not a maximum over epochs
# on the very validation part it is compared on.
# Nor does it fit the refusal of non-micrographs, which reads every image of the split once more.
EXPLORE = {
    "train.patience_epochs": 0,
    "train.tta": False,
    "train.ensemble": 1,
    "train.restore_best": False,
    "train.ood": False,
}


def explore_config(ctx: StudyContext[Any], **extra: Any) -> Config:
    """The study's config so far, sized for an exploratory fit (see EXPLORE)."""
    return load_config_from(ctx.config, {**ctx.choices, "train.epochs": ctx.options.epochs, **EXPLORE, **extra})


def train_val(ctx: StudyContext[Any]) -> dict[str, np.ndarray]:
    """The main split without its test part: what a comparison of recipes fits and validates on."""
    return {"train": ctx.split["train"], "val": ctx.split["val"]}


def plan_explore(ctx: StudyContext[Any], split: dict[str, np.ndarray], *changes: dict[str, Any]) -> list[FitPlan]:
    """The exploratory fits of each set of changes on split (one fit without changes)."""
    return [fit for c in changes or ({},) for fit in plan_fits(explore_config(ctx, **c), ctx.dataset, split)]


def _curve_inputs(ctx: StudyContext[Any], pool_fraction: float, epochs: int | None) -> tuple[Config, np.ndarray]:
    """A study curve's config and pool (pool_fraction of the training + validation data)."""
    dc = ctx.config.data
    pool = tuning_pool(ctx.dataset.labels, ctx.dataset.specimens, ctx.split, pool_fraction, dc.split, dc.seed)
    return explore_config(ctx, **({"train.epochs": epochs} if epochs else {})), pool


def plan_study_curve(
    ctx: StudyContext[Any], pool_fraction: float, fractions: list[float], cv: int = 0, epochs: int | None = None
) -> list[FitPlan]:
    """The fits of curve(ctx, ..., pool_fraction, fractions, cv, epochs)."""
    config, pool = _curve_inputs(ctx, pool_fraction, epochs)
    return plan_curve(config, ctx.dataset, pool, fractions, cv)


def curve(
    ctx: StudyContext[Any],
    out: Path,
    pool_fraction: float,
    fractions: list[float],
    cv: int = 0,
    epochs: int | None = None,
) -> NamedCurve:
    """A learning curve on pool_fraction of the training + validation data."""
    config, pool = _curve_inputs(ctx, pool_fraction, epochs)
    result = learning_curve(config, ctx.dataset, pool, fractions, out / "fits", cv=cv)
    label = f"{cv}-fold cross-validation" if cv else "validation set"
    return NamedCurve(label=label, pool_size=int(len(pool)), curve=result)


def curve_summary(result: LearningCurve) -> str:
    """One sentence on what a learning curve shows."""
    val = np.nanmean(np.asarray(result.val_f1), axis=0)
    train_f1 = np.nanmean(np.asarray(result.train_f1), axis=0)
    sizes = np.nanmean(np.asarray(result.train_size), axis=0)
    rising = len(val) > 1 and val[-1] > val[-2] + 0.01
    trend = "still rising at the largest size: more data would help" if rising else "flat at the largest size"
    return (
        f"Validation macro-F1 goes from {val[0]:.3f} ({sizes[0]:.0f} images) to {val[-1]:.3f} "
        f"({sizes[-1]:.0f} images), "
        f"{trend}; the train-validation gap at the largest size is {train_f1[-1] - val[-1]:.3f}."
    )


def curves(results: dict[str, NamedCurve]) -> Curves:
    """Named learning curves as a step result."""
    summary = " ".join(
        f"{name}: {curve_summary(r.curve)}" if len(results) > 1 else curve_summary(r.curve)
        for name, r in results.items()
    )
    return Curves(summary=summary, curves=results)


def _grid_split(ctx: StudyContext[Any], pool_fraction: float) -> dict[str, np.ndarray]:
    """A study grid's train and validation parts (pool_fraction of the data; 1.0: the main split's)."""
    dc = ctx.config.data
    return tuning_split(
        ctx.dataset.labels, ctx.dataset.specimens, ctx.split, pool_fraction, dc.val_fraction, dc.split, dc.seed
    )


def plan_study_grid(ctx: StudyContext[Any], grid_values: dict[str, list[Any]], pool_fraction: float) -> list[FitPlan]:
    """The fits of grid(ctx, ..., grid_values, pool_fraction)."""
    from defungi.experiments.grid import plan_grid

    return plan_grid(explore_config(ctx), ctx.dataset, _grid_split(ctx, pool_fraction), grid_values)


def grid(ctx: StudyContext[Any], out: Path, grid_values: dict[str, list[Any]], pool_fraction: float) -> Grid:
    """Grid search on pool_fraction of the data (1.0: the main train/validation split)."""
    from defungi.experiments.grid import grid_search  # Optuna, imported when a study searches

    split = _grid_split(ctx, pool_fraction)
    result = grid_search(explore_config(ctx), ctx.dataset, split, grid_values, out / "fits")
    best = result.best
    summary = (
        f"Best cell: batch size {best[BATCH]}, learning rate {best[LR]:g} (validation macro-F1 "
        f"{result.best_val_f1:.3f}, "
        f"{len(split['train'])} training images); carried forward."
    ) + within_noise({cell_label(r.cell): (r.val_f1, r.val_f1_interval) for r in result.rows})
    return Grid(summary=summary, choice=best, x_key=LR, y_key=BATCH, result=result)


def within_noise(scores: dict[str, tuple[float, list[float]]]) -> str:
    """A sentence on the best of named (score, 95% interval) pairs against the runner-up: a choice
    whose interval overlaps the runner-up's is within noise."""
    ranked = sorted(scores.items(), key=lambda kv: -kv[1][0])
    if len(ranked) < 2:
        return ""
    (_, (_, (low, high))), (second, (_, (low2, high2))) = ranked[:2]
    if low <= high2 and low2 <= high:
        return (
            f" Within noise: its 95% interval over specimens [{low:.3f}, {high:.3f}] overlaps the runner-up's "
            f"({second}: [{low2:.3f}, {high2:.3f}]), so the data cannot tell them apart."
        )
    return (
        f" Its 95% interval over specimens [{low:.3f}, {high:.3f}] lies above the runner-up's "
        f"({second}: [{low2:.3f}, {high2:.3f}])."
    )


def cell_label(cell: dict[str, Any]) -> str:
    """'batch 32, lr 0.001' for a grid cell."""
    return f"batch {cell[BATCH]}, lr {cell[LR]:g}"


def around(best: float, factors: list[float]) -> list[float]:
    """Values around best by the given factors, rounded to 3 significant digits."""
    return sorted({float(f"{best * f:.3g}") for f in factors})


def final_fits(
    ctx: StudyContext[Any], out: Path, published: dict[str, float], extra: dict[str, Any] | None = None
) -> Final:
    """The final recipe (early stopping) scored by K-fold cross-validation over every specimen, grouped
    and random (the published protocol), beside the published figures; the leakage gap with its interval."""
    records = {mode: fit_run(config, out / mode, ctx.dataset) for mode, config in _final_configs(ctx, extra).items()}
    gap = paired_difference(records["grouped"].path, records["random"].path, seed=ctx.config.train.seed)
    g, r = (records[m].metrics.part("test") for m in ("grouped", "random"))
    members = records["grouped"].metrics.protocol.ensemble
    summary = (
        (f"Each fold's model is an ensemble of {members} fits that differ only in their seed. " if members > 1 else "")
        + f"The final recipe, scored by {ctx.options.final_folds}-fold cross-validation: every usable image once, "
        "by a model that never saw it (95% intervals from a bootstrap over specimens). "
        f"Grouped (no specimen in two parts): macro-F1 {_f1(g)} per image, {_f1(g.samples)} per specimen. "
        f"Random (the published protocol: published F1 {published['f1']:.2f}"
        + (
            f"; {opts.random_folds} of its {opts.final_folds} folds fitted, so {r.n} images scored"
            if 0 < (opts := ctx.options).random_folds < opts.final_folds
            else ""
        )
        + "".join(f", {key} {value}" for key, value in ctx.options.random_config.items())
        + f"): {_f1(r)} per image, {_f1(r.samples)} per specimen. "
        + _gap_sentence(gap)
    )
    return Final(
        summary=summary,
        runs={mode: str(rec.path.relative_to(ctx.out_dir)) for mode, rec in records.items()},
        test={mode: rec.metrics.part("test") for mode, rec in records.items()},
        folds={mode: rec.metrics.folds for mode, rec in records.items()},
        gap=gap,
        timing={mode: rec.metrics.timing for mode, rec in records.items()},
        parameters=records["grouped"].metrics.parameters,
        cv_folds=ctx.options.final_folds,
        inference_images_per_s=inference_images_per_s(records["grouped"].path / "fold-0"),
    )


def _final_configs(ctx: StudyContext[Any], extra: dict[str, Any] | None) -> dict[str, Config]:
    """The final recipe's K-fold cross-validations, grouped and random."""
    folds = {"data.cv_folds": ctx.options.final_folds}
    # the random CV only compares with the published protocol: its own folds, no refusal detector
    random = {"data.cv_fit_folds": ctx.options.random_folds, "train.ood": False, **ctx.options.random_config}
    own = {"grouped": {}, "random": random}
    return {
        mode: load_config_from(ctx.config, {**ctx.choices, **(extra or {}), **folds, "data.split": mode, **own[mode]})
        for mode in ("grouped", "random")
    }


def plan_final(ctx: StudyContext[Any], extra: dict[str, Any] | None = None) -> list[FitPlan]:
    """The fits of final_fits(ctx, ..., extra)."""
    return [fit for config in _final_configs(ctx, extra).values() for fit in plan_fits(config, ctx.dataset)]


def _f1(scores: Scores | None) -> str:
    assert scores is not None  # every scored part has its per-specimen scores
    low, high = scores.intervals["f1"]
    return f"{scores.f1:.3f} [{low:.3f}, {high:.3f}]"


def _gap_sentence(gap: PairedDifference) -> str:
    """What near-copies leaking across a random split add, in points with the paired interval."""
    parts = []
    for level, d in (("image", gap.images["f1"]), ("sample", gap.samples["f1"])):
        low, high = d.interval
        verdict = "larger than the noise" if d.clear else "within the noise"
        parts.append(f"{100 * d.difference:+.1f} points per {level} [{100 * low:+.1f}, {100 * high:+.1f}], {verdict}")
    return f"Random minus grouped macro-F1 (paired 95% interval): {'; '.join(parts)}."
