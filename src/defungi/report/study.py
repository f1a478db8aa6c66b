"""A study folder -> its page: every figure and table drawn from study.json (typed: `defungi.results.study`)
and the run folders, by one renderer per step result type (`@renders(Curves)`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from defungi.config import Config, config_from_dict
from defungi.layout import RunLayout, StudyLayout
from defungi.report.page import Page, Table, difference_table, interval_table, metrics_table
from defungi.report.plots import (
    plot_bars,
    plot_class_counts,
    plot_confusion,
    plot_epoch_curves,
    plot_errorbars,
    plot_grid,
    plot_learning_curve,
)
from defungi.report.run import render_run
from defungi.results.run import Scores, cv_label
from defungi.results.schema import to_dict
from defungi.results.study import (
    ClassCounts,
    Comparison,
    Curves,
    Depth,
    Final,
    FitSummary,
    Grid,
    SplitRatio,
    StudyState,
    read_study,
)

Drawn = tuple[list[Table], list[Path]]
R = TypeVar("R")


@dataclass(frozen=True)
class StepPage:
    """What a renderer draws a step's result into: the step's title, its folder, the study's folder and state."""

    title: str
    out: Path
    study: Path
    state: StudyState


Renderer = Callable[[Any, StepPage], Drawn]
RENDERERS: dict[type, Renderer] = {}


def renders(result_type: type[R]) -> Callable[[Callable[[R, StepPage], Drawn]], Callable[[R, StepPage], Drawn]]:
    """Register the decorated function as the one renderer of a step result type."""

    def register(render: Callable[[R, StepPage], Drawn]) -> Callable[[R, StepPage], Drawn]:
        if result_type in RENDERERS:
            raise ValueError(f"{result_type.__name__} has a renderer already: {RENDERERS[result_type].__name__}")
        RENDERERS[result_type] = render
        return render

    return register


@renders(ClassCounts)
def _class_counts(result: ClassCounts, step: StepPage) -> Drawn:
    title = "training set: class counts before and after balancing"
    return [], [plot_class_counts(result.counts, StudyLayout.step_figure(step.out, "class_counts"), title)]


@renders(Curves)
def _curves(result: Curves, step: StepPage) -> Drawn:
    curves = {name: named.curve for name, named in result.curves.items()}
    histories = [c.histories[0][-1] for c in curves.values()] + [c.histories[0][0] for c in curves.values()]
    labels = [f"{name}, largest" for name in curves] + [f"{name}, smallest" for name in curves]
    rows = []
    for name, c in curves.items():
        sizes, val, train = (np.nanmean(np.asarray(v), axis=0) for v in (c.train_size, c.val_f1, c.train_f1))
        rows += [[name, f"{s:.0f}", f"{t:.3f}", f"{v:.3f}"] for s, t, v in zip(sizes, train, val, strict=True)]
    table = Table(["curve", "training images", "training macro-F1", "validation macro-F1"], rows)
    figures = [
        plot_learning_curve(curves, StudyLayout.step_figure(step.out, "learning_curve"), step.title),
        plot_epoch_curves(histories, labels, StudyLayout.step_figure(step.out, "epoch_curves")),
    ]
    return [table], figures


@renders(Grid)
def _grid(result: Grid, step: StepPage) -> Drawn:
    cells, x, y = result.result.rows, result.x_key, result.y_key
    ranked = sorted(cells, key=lambda r: -r.val_f1)
    rows = [
        [
            str(k),
            str(r.cell[y]),
            f"{r.cell[x]:g}",
            f"{r.val_f1:.3f}",
            _interval(r.val_f1_interval),
            f"{r.val_loss:.3f}",
            f"{r.train_seconds:.0f}",
        ]
        for k, r in enumerate(ranked, 1)
    ]
    header = ["rank", y.split(".")[-1], x.split(".")[-1], "val macro-F1", "95% interval", "val loss", "train s"]
    return [Table(header, rows)], [plot_grid(cells, x, y, StudyLayout.step_figure(step.out, "grid"), title=step.title)]


def _interval(interval: list[float] | None) -> str:
    return f"[{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""


def _per_class(test: Scores) -> Table:
    rows = [
        [c, f"{r.precision:.3f}", f"{r.recall:.3f}", f"{r.f1:.3f}", str(r.support)] for c, r in test.per_class.items()
    ]
    return Table(["class", "precision", "recall", "F1", "support"], rows)


@renders(FitSummary)
def _fit(result: FitSummary, step: StepPage) -> Drawn:
    label, test = result.label, result.test
    figures = [
        plot_epoch_curves(
            [result.history], [label], StudyLayout.step_figure(step.out, "epoch_curves"), f"{label}: per-epoch curves"
        ),
        plot_confusion(
            test.confusion_matrix, test.classes, StudyLayout.step_figure(step.out, "confusion_test"), f"{label}, test"
        ),
    ]
    return [_per_class(test)], figures


@renders(Comparison)
def _comparison(result: Comparison, step: StepPage) -> Drawn:
    val = {name: to_dict(scores) for name, scores in result.val.items()}  # the bars and table take metric dicts
    histories = result.histories
    figures = [
        plot_bars(val, StudyLayout.step_figure(step.out, "comparison"), step.title),
        plot_epoch_curves(
            list(histories.values()), list(histories), StudyLayout.step_figure(step.out, "comparison_epochs")
        ),
    ]
    return [metrics_table(val)], figures


@renders(SplitRatio)
def _split_ratio(result: SplitRatio, step: StepPage) -> Drawn:
    scores, names = np.asarray(result.scores), result.labels
    mean, spread = scores.mean(axis=1), scores.std(axis=1)
    title = f"test macro-F1 by split ratio ({scores.shape[1]} seeds each)"
    figure = plot_errorbars(
        names,
        mean,
        spread,
        StudyLayout.step_figure(step.out, "split_ratio"),
        "train/test split",
        "test macro-F1",
        title,
    )
    intervals = np.asarray(result.intervals).mean(axis=1)
    rows = [
        [n, f"{m:.3f}", f"{s:.3f}", _interval(iv.tolist()), ", ".join(map(str, t))]
        for n, m, s, iv, t in zip(names, mean, spread, intervals, result.test_sizes, strict=True)
    ]
    header = ["train/test (test share)", "mean test macro-F1", "spread", "mean 95% interval", "test images per seed"]
    return [Table(header, rows)], [figure]


@renders(Depth)
def _depth(result: Depth, step: StepPage) -> Drawn:
    rows = sorted(result.rows, key=lambda r: r.depth)
    series = {
        "hyper-parameters tuned for 8": ([r.tuned_for_8 for r in rows], [0] * len(rows)),
        "learning rate re-tuned per depth": ([r.retuned for r in rows], [0] * len(rows)),
    }
    figure = plot_errorbars(
        [r.depth for r in rows],
        [],
        [],
        StudyLayout.step_figure(step.out, "depth"),
        "mixers (depth)",
        "test macro-F1",
        "test macro-F1 by depth",
        series=series,
    )
    table = Table(
        ["mixers", "test F1, tuned for 8", "test F1, lr re-tuned", "re-tuned lr"],
        [[str(r.depth), f"{r.tuned_for_8:.3f}", f"{r.retuned:.3f}", f"{r.retuned_lr:g}"] for r in result.rows],
    )
    return [table], [figure]


def final_rows(study: str, final: Final, published: dict[str, float]) -> dict[str, Scores | dict[str, Any]]:
    """The final recipe's out-of-fold metrics per split mode, per image and per specimen, beside the
    published figures, as named rows."""
    rows: dict[str, Scores | dict[str, Any]] = {}
    for mode, m in final.test.items():
        cv = cv_label(final.cv_folds, len(final.folds[mode]))
        rows[f"{study}, {mode} {cv}, per image"] = m
        if m.samples is not None:
            rows[f"{study}, {mode} {cv}, per specimen"] = m.samples
    return rows | {f"{study}, published (random split)": published}


FINAL_RUN_FIGURES = ("folds", "confusion_test", "confusion_test_samples", "reliability_test", "confident_errors")


@renders(Final)
def _final(result: Final, step: StepPage) -> Drawn:
    state = step.state
    bars = {
        f"{mode} {cv_label(result.cv_folds, len(result.folds[mode]))}, per image": to_dict(m)
        for mode, m in result.test.items()
    }
    title = "out-of-fold test metrics (macro over classes, 95% intervals over specimens)"
    figures = [
        plot_bars(
            bars | {"published (random split)": state.published},
            StudyLayout.step_figure(step.out, "final_vs_published"),
            title,
        )
    ]
    for run in result.runs.values():
        render_run(step.study / run)
        figures += [RunLayout(step.study / run).figure(f) for f in FINAL_RUN_FIGURES]
    folds = Table(
        ["split", "fold", "test images / specimens", "F1 per image", "F1 per specimen"],
        [
            [mode, str(f.number), f"{f.test_images} / {f.test_samples}", f"{f.f1:.3f}", f"{f.sample_f1:.3f}"]
            for mode, rows in result.folds.items()
            for f in rows
        ],
    )
    table = interval_table(final_rows(state.study, result, state.published))
    confused = Table(
        ["split", "true class", "predicted as", "images", "share of the true class"],
        [
            [mode, c.true, c.predicted, str(c.count), f"{c.share:.0%}"]
            for mode, m in result.test.items()
            for c in m.most_confused
        ],
    )
    return [table, difference_table(result.gap), folds, confused], figures


def _protocol(config: Config, explore_epochs: int) -> str:
    data, train = config.data, config.train
    parts = f"{1 - data.val_fraction - data.test_fraction:.0%}/{data.val_fraction:.0%}/{data.test_fraction:.0%}"
    return (
        f"Profile '{config.profile}': {data.image_size} px images, outliers under grey variance "
        f"{data.variance_threshold:g} excluded, '{data.split}' split (train/val/test {parts}, "
        f"seed {data.seed}; a step may change the ratio). "
        f"Training batches are class-balanced; predictions weight the training class shares by the power "
        f"{train.prior_weight:g} (0: none). Exploratory fits run {explore_epochs} epochs "
        "and are scored at their "
        "last epoch. Metrics are macro-averaged over the classes."
    )


def build_study_report(study_dir: str | Path) -> Path:
    """report.html and report.md in the study folder, from its files; returns the HTML path."""
    layout = StudyLayout(Path(study_dir))
    state = read_study(layout.state)
    page = Page(f"The {state.study} study")
    page.text(_protocol(config_from_dict(state.config), state.explore_epochs))
    for number, (key, step) in enumerate(state.steps.items(), start=1):
        result = step.result
        page.heading(step.title)
        page.text(result.summary)
        if result.choice:
            page.text(
                "Carried forward: " + ", ".join(f"{k.split('.')[-1]} = {v}" for k, v in result.choice.items()) + "."
            )
        render = RENDERERS[type(result)]
        tables, figures = render(result, StepPage(step.title, layout.step_dir(number, key), layout.root, state))
        for table in tables:
            page.table(table)
        for figure in figures:
            page.figure(figure)
        planned = f" (estimated before it ran: {step.estimate_seconds / 60:.1f} min)" if step.estimate_seconds else ""
        page.note(f"Step time: {step.seconds / 60:.1f} min{planned}.")
    return page.write(layout.root)
