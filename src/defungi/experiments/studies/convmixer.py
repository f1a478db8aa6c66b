"""The ConvMixer study, in the published order (seven steps)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from defungi.data.splits import train_val_test_split
from defungi.experiments.fit import model_args
from defungi.experiments.run import fit_cached
from defungi.experiments.studies import steps
from defungi.experiments.studies.runner import STUDIES, Step, StudyContext, StudyDef
from defungi.report.plots import plot_bars, plot_confusion, plot_epoch_curves, plot_errorbars

PUBLISHED = {"accuracy": 0.78, "precision": 0.81, "recall": 0.79, "f1": 0.80}  # 8 mixers
DEPTH = "train.model_args"


def _args(ctx: StudyContext, **change: Any) -> dict[str, Any]:
    """The ConvMixer arguments so far (registry defaults, config, choices), with changes."""
    base = model_args(steps.explore_config(ctx))
    return {**base, **change}


def base_model(ctx: StudyContext, out: Path) -> dict[str, Any]:
    """The documented default ConvMixer trained and evaluated."""
    result = fit_cached(steps.explore_config(ctx), ctx.data, ctx.split, out / "fit")
    args = _args(ctx)
    test = result["metrics"]["test"]
    figs = [
        plot_epoch_curves([result["history"]], ["base model"], out / "epoch_curves.png", "base model: per-epoch curves").name,
        plot_confusion(test["confusion_matrix"], ctx.data.classes, out / "confusion_test.png", "base model, test").name,
    ]
    summary = (
        f"ConvMixer with width {args['dim']}, {args['depth']} mixers, kernel {args['kernel_size']}, patch {args['patch_size']}: "
        f"test macro-F1 {test['f1']:.3f}, accuracy {test['accuracy']:.3f} after {len(result['history'])} epochs."
    )
    return {"summary": summary, "figures": figs, "test": test}


def curve_90(ctx: StudyContext, out: Path) -> dict[str, Any]:
    """Learning curve on 90% of the data."""
    sc = ctx.config.study
    result = steps.curve(ctx, out, 0.9, sc.curve_fractions)
    return {"summary": steps.curve_summary(result), "figures": steps.curve_figures({"90% of the data": result}, out, "learning curve on 90% of the data"), "curve": result}


def split_ratio(ctx: StudyContext, out: Path) -> dict[str, Any]:
    """The same model at several train/test ratios, each with repeated seeds; the best ratio is kept."""
    sc, dc = ctx.config.study, ctx.config.data
    config = steps.explore_config(ctx)
    scores = np.full((len(sc.split_ratios), sc.split_repeats), np.nan)
    for i, ratio in enumerate(sc.split_ratios):
        for r in range(sc.split_repeats):
            split = train_val_test_split(ctx.data.labels, ctx.data.groups, dc.val_fraction * ratio, 1 - ratio, dc.split, dc.seed + 1000 * r)
            scores[i, r] = fit_cached(config, ctx.data, split, out / "fits" / f"train{ratio:.2f}-seed{r}")["metrics"]["test"]["f1"]
    mean, spread = scores.mean(axis=1), scores.std(axis=1)
    best = int(np.argmax(mean))
    fig = plot_errorbars([f"{100 * r:.0f}/{100 - 100 * r:.0f}" for r in sc.split_ratios], mean, spread, out / "split_ratio.png", "train/test split", "test macro-F1", f"test macro-F1 by split ratio ({sc.split_repeats} seeds each)")
    ratio = sc.split_ratios[best]
    summary = (
        f"Mean test macro-F1 per ratio: " + ", ".join(f"{100 * r:.0f}/{100 - 100 * r:.0f}: {m:.3f} ± {s:.3f}" for r, m, s in zip(sc.split_ratios, mean, spread))
        + f". {100 * ratio:.0f}/{100 - 100 * ratio:.0f} has the best mean and is carried forward (a larger test part gives a steadier estimate, a larger training part a better model; the spread shows how much a single split can mislead)."
    )
    return {"summary": summary, "figures": [fig.name], "choice": {"data.test_fraction": round(1 - ratio, 4)}, "scores": scores.tolist()}


def grid_full(ctx: StudyContext, out: Path) -> dict[str, Any]:
    """Grid search of batch size x learning rate on the full training set."""
    sc = ctx.config.study
    return steps.grid(ctx, out, {steps.BATCH: sc.grid_batch_sizes, steps.LR: sc.grid_lrs}, 1.0, "grid search on the full training set")


def evaluate_tuned(ctx: StudyContext, out: Path) -> dict[str, Any]:
    """Performance of the tuned model on the test part: metrics, per-class table, confusion matrix."""
    result = fit_cached(steps.explore_config(ctx), ctx.data, ctx.split, out / "fit")
    test = result["metrics"]["test"]
    figs = [plot_confusion(test["confusion_matrix"], ctx.data.classes, out / "confusion_test.png", "tuned model, test").name, plot_epoch_curves([result["history"]], ["tuned"], out / "epoch_curves.png").name]
    table = "| class | precision | recall | F1 | support |\n|---|---|---|---|---|\n" + "".join(f"| {c} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['support']} |\n" for c, r in test["per_class"].items())
    return {"summary": f"Tuned model: test accuracy {test['accuracy']:.3f}, macro precision {test['precision']:.3f}, recall {test['recall']:.3f}, F1 {test['f1']:.3f}.", "figures": figs, "table": table, "test": test}


def depth(ctx: StudyContext, out: Path) -> dict[str, Any]:
    """More mixers: each depth with the hyper-parameters tuned for 8, then with its learning rate re-tuned."""
    sc = ctx.config.study
    split = {"train": ctx.split["train"], "val": ctx.split["val"], "test": ctx.split["test"]}
    lr = ctx.choices[steps.LR]
    rows = []
    for d in sc.depths:
        fits = {f: fit_cached(steps.explore_config(ctx, **{DEPTH: _args(ctx, depth=d), steps.LR: float(f"{lr * f:.3g}")}), ctx.data, split, out / "fits" / f"depth{d}-lr{lr * f:.3g}") for f in sorted(set(sc.depth_lr_factors) | {1.0})}
        retuned = max(fits, key=lambda f: fits[f]["metrics"]["val"]["f1"])
        rows.append({"depth": d, "tuned_for_8": fits[1.0]["metrics"]["test"]["f1"], "retuned": fits[retuned]["metrics"]["test"]["f1"], "retuned_lr": float(f"{lr * retuned:.3g}"), "val_retuned": fits[retuned]["metrics"]["val"]["f1"]})
    depths = [r["depth"] for r in rows]
    order = np.argsort(depths)
    fig = plot_errorbars(
        [depths[i] for i in order], [], [], out / "depth.png", "mixers (depth)", "test macro-F1", "test macro-F1 by depth",
        series={"hyper-parameters tuned for 8": ([rows[i]["tuned_for_8"] for i in order], [0] * len(rows)), "learning rate re-tuned per depth": ([rows[i]["retuned"] for i in order], [0] * len(rows))},
    )
    table = "| mixers | test F1, tuned for 8 | test F1, lr re-tuned | re-tuned lr |\n|---|---|---|---|\n" + "".join(f"| {r['depth']} | {r['tuned_for_8']:.3f} | {r['retuned']:.3f} | {r['retuned_lr']:g} |\n" for r in rows)
    by = {r["depth"]: r for r in rows}
    verdict = ""
    if 8 in by and 16 in by:
        worse = by[16]["tuned_for_8"] < by[8]["tuned_for_8"]
        verdict = (
            f" Without re-tuning, 16 mixers score {by[16]['tuned_for_8']:.3f} against {by[8]['tuned_for_8']:.3f} for 8: "
            + ("the study's claim (more mixers without re-tuning do worse) holds here" if worse else "the study's claim (more mixers without re-tuning do worse) does not hold here")
            + f"; with the learning rate re-tuned, 16 mixers score {by[16]['retuned']:.3f}."
        )
    return {"summary": f"Depths {depths} compared with the same budget.{verdict}", "figures": [fig.name], "table": table, "rows": rows}


def final(ctx: StudyContext, out: Path) -> dict[str, Any]:
    """Final fits with 8 mixers: grouped split and random split, beside the published figures."""
    return steps.final_fits(ctx, out, PUBLISHED, {DEPTH: _args(ctx, depth=8)})


STUDIES["convmixer"] = StudyDef("convmixer-8", PUBLISHED, [
    Step("base", "1. Base model", base_model),
    Step("curve90", "2. Learning curve on 90% of the data", curve_90),
    Step("split_ratio", "3. Optimal train/test split", split_ratio),
    Step("grid_full", "4. Grid search of batch size x learning rate on the full training set", grid_full),
    Step("evaluate", "5. Performance evaluation of the tuned model", evaluate_tuned),
    Step("depth", "6. Adding mixers: 8, 16 and more, with and without re-tuning", depth),
    Step("final", "7. Final fit and evaluation (8 mixers)", final),
])
