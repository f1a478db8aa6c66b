"""The ResNet-34 study, in the published order (seven steps), and its options."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from defungi.data.augment import balanced_order
from defungi.experiments.meter import FitPlan
from defungi.experiments.protocols import fit_run
from defungi.experiments.studies import steps
from defungi.experiments.studies.runner import Study, StudyContext, StudyOptions
from defungi.results.study import ClassCounts, Comparison, Curves, Final, Grid


@dataclass
class ResNet34Options(StudyOptions):
    """The ResNet-34 study's own sizes: its first curve and grid on a subset, the second grid around the
    first one's best cell, the learning curves on the full data."""

    subset_fraction: float = 0.2  # the study's "20% of the data" for the first curve and grid
    grid2_lr_factors: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    grid2_batch_sizes: list[int] = field(default_factory=list)  # empty: keep the first grid's best
    full_curve_fractions: list[float] = field(default_factory=lambda: [0.5, 1.0])
    full_curve_epochs: int = 4
    cv_folds: int = 3  # the cross-validated learning curve


Context = StudyContext[ResNet34Options]
RESNET34 = Study(
    "resnet34",
    model="resnet34",
    published={"accuracy": 0.77, "precision": 0.78, "recall": 0.79, "f1": 0.79},
    options=ResNet34Options,
)


@RESNET34.step("balance", "1. Augmentation that balances the classes")
def balance(ctx: Context, out: Path) -> ClassCounts:
    """Class counts of the training part before and after one balanced, augmented epoch."""
    labels = ctx.dataset.labels[ctx.split["train"]]
    picks = balanced_order(labels, len(labels), np.random.default_rng(ctx.config.train.seed))
    drawn = labels[picks]
    names = ctx.dataset.classes
    before = {c: int(np.sum(labels == i)) for i, c in enumerate(names)}
    after = {c: int(np.sum(drawn == i)) for i, c in enumerate(names)}
    distinct = {c: len(np.unique(picks[drawn == i])) for i, c in enumerate(names)}
    largest = max(before, key=before.get)
    summary = (
        f"The training part has {len(labels)} images, from {min(before.values())} ({min(before, key=before.get)}) to "
        f"{before[largest]} ({largest}) per class. Each epoch draws {len(labels)} images, the same number from every "
        "class: the rare classes' images recur (each time with another flip/rotation and colour "
        "jitter), and the large "
        f"classes are subsampled, each image at most once per epoch and another subset every epoch "
        f"({largest}: {distinct[largest]} of its {before[largest]} images in this epoch)."
    )
    return ClassCounts(
        summary=summary, counts={"before (training images)": before, "after (one balanced epoch)": after}
    )


@RESNET34.step(
    "curve20",
    "2. Learning curve on 20% of the data",
    plan=lambda ctx: steps.plan_study_curve(ctx, ctx.options.subset_fraction, ctx.options.curve_fractions),
)
def curve_20(ctx: Context, out: Path) -> Curves:
    """Learning curve on 20% of the data."""
    opts = ctx.options
    label = f"{opts.subset_fraction:.0%} of the data"
    return steps.curves({label: steps.curve(ctx, out, opts.subset_fraction, opts.curve_fractions)})


def _grid20(ctx: Context) -> dict[str, list]:
    return {steps.BATCH: ctx.options.grid_batch_sizes, steps.LR: ctx.options.grid_lrs}


def _grid2(ctx: Context) -> dict[str, list]:
    """The second grid, around the first one's best cell (at plan time, the config's values)."""
    opts, tc = ctx.options, ctx.config.train
    batches = opts.grid2_batch_sizes or [ctx.choices.get(steps.BATCH, tc.batch_size)]
    return {steps.BATCH: batches, steps.LR: steps.around(ctx.choices.get(steps.LR, tc.lr), opts.grid2_lr_factors)}


@RESNET34.step(
    "grid20",
    "3. First grid search (batch size x learning rate) on 20% of the data",
    plan=lambda ctx: steps.plan_study_grid(ctx, _grid20(ctx), ctx.options.subset_fraction),
)
def grid_20(ctx: Context, out: Path) -> Grid:
    """First grid search (batch size x learning rate) on 20% of the data."""
    return steps.grid(ctx, out, _grid20(ctx), ctx.options.subset_fraction)


@RESNET34.step(
    "grid_full",
    "4. Second grid search on the full training set",
    plan=lambda ctx: steps.plan_study_grid(ctx, _grid2(ctx), 1.0),
)
def grid_full(ctx: Context, out: Path) -> Grid:
    """Second grid search on the full training set, around the first one's best cell."""
    return steps.grid(ctx, out, _grid2(ctx), 1.0)


def _plan_curves_full(ctx: Context) -> list[FitPlan]:
    opts = ctx.options
    return [
        fit
        for cv in (opts.cv_folds, 0)
        for fit in steps.plan_study_curve(ctx, 1.0, opts.full_curve_fractions, cv, opts.full_curve_epochs)
    ]


@RESNET34.step(
    "curves_full",
    "5. Learning curves on the full data: cross-validation and validation set",
    plan=_plan_curves_full,
)
def curves_full(ctx: Context, out: Path) -> Curves:
    """Learning curves on the full data: K-fold cross-validation beside the validation-set approach."""
    opts = ctx.options
    results = {
        f"{opts.cv_folds}-fold CV": steps.curve(
            ctx, out / "cv", 1.0, opts.full_curve_fractions, cv=opts.cv_folds, epochs=opts.full_curve_epochs
        ),
        "validation set": steps.curve(
            ctx, out / "holdout", 1.0, opts.full_curve_fractions, epochs=opts.full_curve_epochs
        ),
    }
    return steps.curves(results)


AUGMENT = "train.augment"
LEVELS = ("basic", "strong")


@RESNET34.step(
    "augmentation",
    "6. Improvement through data augmentation",
    plan=lambda ctx: steps.plan_explore(ctx, steps.train_val(ctx), *({AUGMENT: level} for level in LEVELS)),
)
def compare_augmentation(ctx: Context, out: Path) -> Comparison:
    """The tuned model with the basic and the strong augmentation, same budget."""
    split = steps.train_val(ctx)
    records = {
        level: fit_run(steps.explore_config(ctx, **{AUGMENT: level}), out / "fits" / level, ctx.dataset, split)
        for level in LEVELS
    }
    f1 = {k: r.score("val") for k, r in records.items()}
    noise = steps.within_noise(
        {f"{k} augmentation": (r.score("val"), r.metrics.part("val").interval("f1")) for k, r in records.items()}
    )
    winner = max(f1, key=f1.get)
    summary = (
        f"Validation macro-F1 {f1['basic']:.3f} with the basic augmentation (flips, 90-degree rotations, "
        "colour jitter) and "
        f"{f1['strong']:.3f} with the strong one (+ random resized crops, stronger jitter); the {winner} "
        "augmentation is carried forward."
    ) + noise
    return Comparison(
        summary=summary,
        choice={"train.augment": winner},
        val={f"{k} augmentation": r.metrics.part("val") for k, r in records.items()},
        histories={f"{k} augmentation": r.history for k, r in records.items()},
    )


@RESNET34.step("final", "7. Final fit with early stopping and test metrics", plan=steps.plan_final)
def final(ctx: Context, out: Path) -> Final:
    """Final fits with early stopping, grouped and random split."""
    return steps.final_fits(ctx, out, RESNET34.published)
