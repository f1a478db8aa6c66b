"""The ConvMixer study, in the published order (seven steps), and its options."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from defungi.data.splits import train_val_test_split
from defungi.experiments.meter import FitPlan
from defungi.experiments.protocols import fit_run
from defungi.experiments.studies import steps
from defungi.experiments.studies.runner import Study, StudyContext, StudyOptions
from defungi.results.study import Curves, Depth, DepthRow, Final, FitSummary, Grid, SplitRatio
from defungi.train.checkpoint import model_args

DEPTH = "train.model_args"


@dataclass
class ConvMixerOptions(StudyOptions):
    """The ConvMixer study's own sizes: the train/test ratios it compares and the depths it tries."""

    split_ratios: list[float] = field(default_factory=lambda: [0.6, 0.7, 0.8, 0.9])  # train share
    split_repeats: int = 2
    depths: list[int] = field(default_factory=lambda: [8, 16, 4])
    depth_lr_factors: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])


Context = StudyContext[ConvMixerOptions]
CONVMIXER = Study(
    "convmixer",
    model="convmixer-8",
    published={"accuracy": 0.78, "precision": 0.81, "recall": 0.79, "f1": 0.80},  # 8 mixers
    options=ConvMixerOptions,
)


def _args(ctx: Context, **change: Any) -> dict[str, Any]:
    """The ConvMixer arguments so far (registry defaults, config, choices), with changes."""
    return {**model_args(steps.explore_config(ctx)), **change}


@CONVMIXER.step("base", "1. Base model", plan=lambda ctx: steps.plan_explore(ctx, ctx.split))
def base_model(ctx: Context, out: Path) -> FitSummary:
    """The documented default ConvMixer trained and evaluated."""
    record = fit_run(steps.explore_config(ctx), out / "fit", ctx.dataset, ctx.split)
    args, test = _args(ctx), record.metrics.part("test")
    summary = (
        f"ConvMixer with width {args['dim']}, {args['depth']} mixers, kernel {args['kernel_size']}, "
        f"patch {args['patch_size']}: "
        f"test macro-F1 {test.f1:.3f}, accuracy {test.accuracy:.3f} after {len(record.history)} epochs."
    )
    return FitSummary(summary=summary, label="base model", test=test, history=record.history)


@CONVMIXER.step(
    "curve90",
    "2. Learning curve on 90% of the data",
    plan=lambda ctx: steps.plan_study_curve(ctx, 0.9, ctx.options.curve_fractions),
)
def curve_90(ctx: Context, out: Path) -> Curves:
    """Learning curve on 90% of the data."""
    return steps.curves({"90% of the data": steps.curve(ctx, out, 0.9, ctx.options.curve_fractions)})


def _ratio_split(ctx: Context, ratio: float, repeat: int) -> dict[str, np.ndarray]:
    """The repeat-th split with a train share of ratio (its validation part scaled alike)."""
    dc = ctx.config.data
    return train_val_test_split(
        ctx.dataset.labels, ctx.dataset.specimens, dc.val_fraction * ratio, 1 - ratio, dc.split, dc.seed + 1000 * repeat
    )


def _plan_split_ratio(ctx: Context) -> list[FitPlan]:
    opts = ctx.options
    return [
        fit
        for ratio in opts.split_ratios
        for r in range(opts.split_repeats)
        for fit in steps.plan_explore(ctx, _ratio_split(ctx, ratio, r))
    ]


@CONVMIXER.step("split_ratio", "3. Optimal train/test split", plan=_plan_split_ratio)
def split_ratio(ctx: Context, out: Path) -> SplitRatio:
    """The same model at several train/test ratios, each with repeated seeds; the best ratio is kept."""
    opts = ctx.options
    config = steps.explore_config(ctx)
    shape = (len(opts.split_ratios), opts.split_repeats)
    scores, sizes, intervals = np.full(shape, np.nan), np.zeros(shape, dtype=int), np.zeros((*shape, 2))
    for i, ratio in enumerate(opts.split_ratios):
        for r in range(opts.split_repeats):
            split = _ratio_split(ctx, ratio, r)
            record = fit_run(config, out / "fits" / f"train{ratio:.2f}-seed{r}", ctx.dataset, split)
            scores[i, r], sizes[i, r] = record.score("test"), len(split["test"])
            intervals[i, r] = record.metrics.part("test").interval("f1")
    mean, spread = scores.mean(axis=1), scores.std(axis=1)
    names = [  # the asked ratio and the test share the splits really had
        f"{100 * r:.0f}/{100 - 100 * r:.0f} (test {100 * t.mean() / len(ctx.dataset.labels):.1f}%)"
        for r, t in zip(opts.split_ratios, sizes, strict=True)
    ]
    best = int(np.argmax(mean))
    summary = (
        "Mean test macro-F1 per ratio (asked train/test, the test share actually used): "
        + ", ".join(f"{n}: {m:.3f} ± {s:.3f}" for n, m, s in zip(names, mean, spread, strict=True))
        + f". {names[best]} has the best mean and is carried forward "
        "(a larger test part gives a steadier "
        "estimate, a larger training part a better model; the spread shows how much a single split can mislead)."
        + steps.within_noise(
            {n: (m, iv.mean(axis=0).tolist()) for n, m, iv in zip(names, mean, intervals, strict=True)}
        )
    )
    return SplitRatio(
        summary=summary,
        choice={"data.test_fraction": round(1 - opts.split_ratios[best], 4)},
        ratios=list(opts.split_ratios),
        scores=scores.tolist(),
        test_sizes=sizes.tolist(),
        labels=names,
        images=len(ctx.dataset.labels),
        intervals=intervals.tolist(),
    )


def _grid(ctx: Context) -> dict[str, list]:
    return {steps.BATCH: ctx.options.grid_batch_sizes, steps.LR: ctx.options.grid_lrs}


@CONVMIXER.step(
    "grid_full",
    "4. Grid search of batch size x learning rate on the full training set",
    plan=lambda ctx: steps.plan_study_grid(ctx, _grid(ctx), 1.0),
)
def grid_full(ctx: Context, out: Path) -> Grid:
    """Grid search of batch size x learning rate on the full training set."""
    return steps.grid(ctx, out, _grid(ctx), 1.0)


@CONVMIXER.step(
    "evaluate", "5. Performance evaluation of the tuned model", plan=lambda ctx: steps.plan_explore(ctx, ctx.split)
)
def evaluate_tuned(ctx: Context, out: Path) -> FitSummary:
    """Performance of the tuned model on the test part: metrics, per-class table, confusion matrix."""
    record = fit_run(steps.explore_config(ctx), out / "fit", ctx.dataset, ctx.split)
    test = record.metrics.part("test")
    summary = (
        f"Tuned model: test accuracy {test.accuracy:.3f}, macro precision {test.precision:.3f}, "
        f"recall {test.recall:.3f}, F1 {test.f1:.3f}."
    )
    return FitSummary(summary=summary, label="tuned model", test=test, history=record.history)


def _depth_changes(ctx: Context, d: int) -> dict[float, dict[str, Any]]:
    """Per learning-rate factor, the changes of the fit with d mixers (at plan time, the config's rate)."""
    lr = ctx.choices.get(steps.LR, ctx.config.train.lr)
    factors = sorted(set(ctx.options.depth_lr_factors) | {1.0})
    return {f: {DEPTH: _args(ctx, depth=d), steps.LR: float(f"{lr * f:.3g}")} for f in factors}


@CONVMIXER.step(
    "depth",
    "6. Adding mixers: 8, 16 and more, with and without re-tuning",
    plan=lambda ctx: [
        fit for d in ctx.options.depths for fit in steps.plan_explore(ctx, ctx.split, *_depth_changes(ctx, d).values())
    ],
)
def depth(ctx: Context, out: Path) -> Depth:
    """More mixers: each depth with the hyper-parameters tuned for 8, then with its learning rate re-tuned."""
    opts = ctx.options
    lr = ctx.choices[steps.LR]
    rows = []
    for d in opts.depths:
        records = {}
        for f, changes in _depth_changes(ctx, d).items():
            config = steps.explore_config(ctx, **changes)
            records[f] = fit_run(config, out / "fits" / f"depth{d}-lr{lr * f:.3g}", ctx.dataset, ctx.split)
        retuned = max(records, key=lambda f: records[f].score("val"))
        rows.append(
            DepthRow(
                depth=d,
                tuned_for_8=records[1.0].score("test"),
                tuned_for_8_interval=records[1.0].metrics.part("test").interval("f1"),
                retuned=records[retuned].score("test"),
                retuned_lr=float(f"{lr * retuned:.3g}"),
                val_retuned=records[retuned].score("val"),
            )
        )
    by = {r.depth: r for r in rows}
    verdict = ""
    if 8 in by and 16 in by:
        holds = "holds" if by[16].tuned_for_8 < by[8].tuned_for_8 else "does not hold"
        verdict = (
            f" Without re-tuning, 16 mixers score {by[16].tuned_for_8:.3f} "
            f"against {by[8].tuned_for_8:.3f} for 8: "
            f"the study's claim (more mixers without re-tuning do worse) {holds} here"
            f"; with the learning rate re-tuned, 16 mixers score {by[16].retuned:.3f}."
        ) + steps.within_noise({f"{d} mixers": (by[d].tuned_for_8, by[d].tuned_for_8_interval) for d in (8, 16)})
    return Depth(summary=f"Depths {[r.depth for r in rows]} compared with the same budget.{verdict}", rows=rows)


@CONVMIXER.step(
    "final",
    "7. Final fit and evaluation (8 mixers)",
    plan=lambda ctx: steps.plan_final(ctx, {DEPTH: _args(ctx, depth=8)}),
)
def final(ctx: Context, out: Path) -> Final:
    """Final fits with 8 mixers: grouped split and random split, beside the published figures."""
    return steps.final_fits(ctx, out, CONVMIXER.published, {DEPTH: _args(ctx, depth=8)})
