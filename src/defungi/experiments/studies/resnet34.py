"""The ResNet-34 study, in the published order (seven steps)."""

from __future__ import annotations

from pathlib import Path

from defungi.experiments.studies import steps
from defungi.experiments.studies.results import Curves, Final, Grid
from defungi.experiments.studies.runner import STUDIES, Step, StudyContext, StudyDef

PUBLISHED = {"accuracy": 0.77, "precision": 0.78, "recall": 0.79, "f1": 0.79}


def curve_20(ctx: StudyContext, out: Path) -> Curves:
    """Learning curve on 20% of the data."""
    sc = ctx.config.study
    label = f"{sc.subset_fraction:.0%} of the data"
    return steps.curves(
        {label: steps.curve(ctx, out, sc.subset_fraction, sc.curve_fractions)}, f"learning curve on {label}"
    )


def grid_20(ctx: StudyContext, out: Path) -> Grid:
    """First grid search (batch size x learning rate) on 20% of the data."""
    sc = ctx.config.study
    grid = {steps.BATCH: sc.grid_batch_sizes, steps.LR: sc.grid_lrs}
    return steps.grid(ctx, out, grid, sc.subset_fraction, f"grid search on {sc.subset_fraction:.0%} of the data")


def grid_full(ctx: StudyContext, out: Path) -> Grid:
    """Second grid search on the full training set, around the first one's best cell."""
    sc = ctx.config.study
    batches = sc.grid2_batch_sizes or [ctx.choices[steps.BATCH]]
    grid = {steps.BATCH: batches, steps.LR: steps.around(ctx.choices[steps.LR], sc.grid2_lr_factors)}
    return steps.grid(ctx, out, grid, 1.0, "grid search on the full training set")


def curves_full(ctx: StudyContext, out: Path) -> Curves:
    """Learning curves on the full data: 3-fold cross-validation beside the validation-set approach."""
    sc = ctx.config.study
    results = {
        f"{sc.cv_folds}-fold CV": steps.curve(
            ctx, out / "cv", 1.0, sc.full_curve_fractions, cv=sc.cv_folds, epochs=sc.full_curve_epochs
        ),
        "validation set": steps.curve(ctx, out / "holdout", 1.0, sc.full_curve_fractions, epochs=sc.full_curve_epochs),
    }
    return steps.curves(results, "learning curves on the full data")


def final(ctx: StudyContext, out: Path) -> Final:
    """Final fits with early stopping, grouped and random split."""
    return steps.final_fits(ctx, out, PUBLISHED)


STUDIES["resnet34"] = StudyDef(
    "resnet34",
    PUBLISHED,
    [
        Step("balance", "1. Augmentation that balances the classes", steps.balance),
        Step("curve20", "2. Learning curve on 20% of the data", curve_20),
        Step("grid20", "3. First grid search (batch size x learning rate) on 20% of the data", grid_20),
        Step("grid_full", "4. Second grid search on the full training set", grid_full),
        Step("curves_full", "5. Learning curves on the full data: cross-validation and validation set", curves_full),
        Step("augmentation", "6. Improvement through data augmentation", steps.compare_augmentation),
        Step("final", "7. Final fit with early stopping and test metrics", final),
    ],
)
