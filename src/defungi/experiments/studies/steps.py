"""Study steps shared by both studies; each returns {'summary', 'figures', 'choice', ...}."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from defungi.config import Config, load_config_from
from defungi.data.augment import balanced_order
from defungi.experiments.crossval import subset
from defungi.experiments.curve import folds_for, learning_curve
from defungi.experiments.grid import grid_search
from defungi.experiments.run import fit_cached, train_run
from defungi.experiments.studies.runner import StudyContext
from defungi.report.plots import plot_bars, plot_class_counts, plot_epoch_curves, plot_grid, plot_learning_curve

BATCH, LR = "train.batch_size", "train.lr"


def explore_config(ctx: StudyContext, **extra: Any) -> Config:
    """The study's config so far, sized for an exploratory fit (one model, fixed epochs, no early stop, no TTA)."""
    values = {**ctx.choices, "train.epochs": ctx.config.study.epochs, "train.patience_epochs": 0, "train.tta": False, "train.ensemble": 1, **extra}
    return load_config_from(ctx.config, values)


def trainval(ctx: StudyContext) -> np.ndarray:
    """Positions of the training + validation parts (everything but the test part)."""
    return np.sort(np.concatenate([ctx.split["train"], ctx.split["val"]]))


def balance(ctx: StudyContext, out: Path) -> dict[str, Any]:
    """Class counts of the training part before and after one balanced, augmented epoch."""
    labels = ctx.data.labels[ctx.split["train"]]
    drawn = labels[balanced_order(labels, len(labels), np.random.default_rng(ctx.config.train.seed))]
    names = ctx.data.classes
    counts = {"before (training images)": {c: int(np.sum(labels == i)) for i, c in enumerate(names)}, "after (one balanced epoch)": {c: int(np.sum(drawn == i)) for i, c in enumerate(names)}}
    fig = plot_class_counts(counts, out / "class_counts.png", "training set: class counts before and after balancing")
    before = counts["before (training images)"]
    summary = (
        f"The training part has {len(labels)} images, from {min(before.values())} ({min(before, key=before.get)}) to "
        f"{max(before.values())} ({max(before, key=before.get)}) per class. Each epoch draws {len(labels)} images class-balanced: "
        "minority images recur (each time with another flip/rotation and colour jitter), majority images are each used once."
    )
    return {"summary": summary, "figures": [fig.name], "counts": counts}


def curve(ctx: StudyContext, out: Path, pool_fraction: float, fractions: list[float], cv: int = 0, epochs: int | None = None, label: str = "") -> dict[str, Any]:
    """A learning curve on pool_fraction of the training + validation data."""
    dc = ctx.config.data
    pool = trainval(ctx)
    pool = pool[subset(ctx.data.labels[pool], ctx.data.groups[pool], pool_fraction, dc.split, dc.seed)]
    config = explore_config(ctx, **({"train.epochs": epochs} if epochs else {}))
    result = learning_curve(config, ctx.data, pool, fractions, out / "fits", cv=cv)
    return result | {"pool_size": int(len(pool)), "label": label or ("3-fold cross-validation" if cv else "validation set")}


def curve_figures(results: dict[str, dict[str, Any]], out: Path, title: str) -> list[str]:
    """Learning-curve figure and the per-epoch curves of the largest fit of each curve."""
    figs = [plot_learning_curve(results, out / "learning_curve.png", title).name]
    histories = [r["histories"][0][-1] for r in results.values()] + [r["histories"][0][0] for r in results.values()]
    labels = [f"{name}, largest" for name in results] + [f"{name}, smallest" for name in results]
    figs.append(plot_epoch_curves(histories, labels, out / "epoch_curves.png").name)
    return figs


def curve_summary(result: dict[str, Any]) -> str:
    """One sentence on what a learning curve shows."""
    val = np.nanmean(np.asarray(result["val_f1"]), axis=0)
    train = np.nanmean(np.asarray(result["train_f1"]), axis=0)
    sizes = np.nanmean(np.asarray(result["train_size"]), axis=0)
    trend = "still rising at the largest size: more data would help" if len(val) > 1 and val[-1] > val[-2] + 0.01 else "flat at the largest size"
    return f"Validation macro-F1 goes from {val[0]:.3f} ({sizes[0]:.0f} images) to {val[-1]:.3f} ({sizes[-1]:.0f} images), {trend}; the train-validation gap at the largest size is {train[-1] - val[-1]:.3f}."


def grid(ctx: StudyContext, out: Path, grid_values: dict[str, list[Any]], pool_fraction: float, title: str) -> dict[str, Any]:
    """Grid search on pool_fraction of the data (1.0: the main train/validation split)."""
    dc = ctx.config.data
    if pool_fraction < 1:
        pool = trainval(ctx)
        pool = pool[subset(ctx.data.labels[pool], ctx.data.groups[pool], pool_fraction, dc.split, dc.seed)]
        tr, va = folds_for(ctx.data, pool, 0, dc.val_fraction, dc.split, dc.seed)[0]
        split = {"train": tr, "val": va}
    else:
        split = {"train": ctx.split["train"], "val": ctx.split["val"]}
    result = grid_search(explore_config(ctx), ctx.data, split, grid_values, out / "fits")
    fig = plot_grid(result["rows"], LR, BATCH, out / "grid.png", title=title)
    ranked = sorted(result["rows"], key=lambda r: -r["val_f1"])
    table = "| rank | batch size | learning rate | val macro-F1 | val loss | train s |\n|---|---|---|---|---|---|\n" + "".join(
        f"| {k} | {r[BATCH]} | {r[LR]:g} | {r['val_f1']:.3f} | {r['val_loss']:.3f} | {r['train_seconds']:.0f} |\n" for k, r in enumerate(ranked, 1)
    )
    best = result["best"]
    summary = f"Best cell: batch size {best[BATCH]}, learning rate {best[LR]:g} (validation macro-F1 {result['best_val_f1']:.3f}, {len(split['train'])} training images); carried forward."
    return {"summary": summary, "figures": [fig.name], "table": table, "choice": best, "rows": result["rows"], "trials_before": result["trials_before"], "trials_run": result["trials_run"]}


def around(best: float, factors: list[float]) -> list[float]:
    """Values around best by the given factors, rounded to 3 significant digits."""
    return sorted({float(f"{best * f:.3g}") for f in factors})


def compare_augmentation(ctx: StudyContext, out: Path) -> dict[str, Any]:
    """The tuned model with the basic and the strong augmentation, same budget."""
    split = {"train": ctx.split["train"], "val": ctx.split["val"]}
    results = {level: fit_cached(explore_config(ctx, **{"train.augment": level}), ctx.data, split, out / "fits" / level) for level in ("basic", "strong")}
    figs = [
        plot_bars({f"{k} augmentation": r["metrics"]["val"] for k, r in results.items()}, out / "augmentation.png", "validation metrics, same budget").name,
        plot_epoch_curves([r["history"] for r in results.values()], [f"{k} augmentation" for k in results], out / "augmentation_epochs.png").name,
    ]
    f1 = {k: r["metrics"]["val"]["f1"] for k, r in results.items()}
    winner = max(f1, key=f1.get)
    summary = (
        f"Validation macro-F1 {f1['basic']:.3f} with the basic augmentation (flips, 90-degree rotations, colour jitter) and "
        f"{f1['strong']:.3f} with the strong one (+ random resized crops, stronger jitter); the {winner} augmentation is carried forward."
    )
    return {"summary": summary, "figures": figs, "choice": {"train.augment": winner}, "val": {k: r["metrics"]["val"] for k, r in results.items()}}


def final_fits(ctx: StudyContext, out: Path, published: dict[str, float], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Final fits with early stopping, grouped and random split; test metrics beside the published ones."""
    runs = {}
    for mode in ("grouped", "random"):
        config = load_config_from(ctx.config, {**ctx.choices, **(extra or {}), "data.split": mode})
        runs[mode] = train_run(config, out / mode)
    figures = []
    for mode, m in runs.items():
        for name in ("training_curves.png", "confusion_test.png"):
            figures.append(f"{mode}/{name}")
    bars = {f"defungi, {mode} split": m["test"] for mode, m in runs.items()} | {"published (random split)": published}
    figures.insert(0, plot_bars(bars, out / "final_vs_published.png", "test metrics (macro over classes)").name)
    g, r = runs["grouped"]["test"], runs["random"]["test"]
    members = runs["grouped"]["protocol"].get("ensemble", 1)
    summary = (
        (f"Each final model is an ensemble of {members} fits that differ only in their seed (the mean of their probabilities). " if members > 1 else "")
        + f"Test macro-F1 {g['f1']:.3f} under the grouped split (no sample in two parts) and {r['f1']:.3f} under the random split "
        f"(the published protocol: published F1 {published['f1']:.2f}); the gap of {r['f1'] - g['f1']:.3f} is what near-copies leaking across a random split add."
    )
    return {"summary": summary, "figures": figures, "test": {mode: m["test"] for mode, m in runs.items()}, "timing": {mode: m["timing"] for mode, m in runs.items()}, "parameters": runs["grouped"]["parameters"], "runs": {mode: str(out / mode) for mode in runs}}
