"""A study folder -> its page: every figure and table drawn from study.json and the run folders."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from defungi.layout import RunLayout, StudyLayout, read_json
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
from defungi.results.run import PairedDifference
from defungi.results.schema import from_dict

Drawn = tuple[list[Table], list[Path]]


def _class_counts(step: dict[str, Any], out: Path, study: Path) -> Drawn:
    return [], [
        plot_class_counts(
            step["counts"], out / "class_counts.png", "training set: class counts before and after balancing"
        )
    ]


def _curves(step: dict[str, Any], out: Path, study: Path) -> Drawn:
    curves = step["curves"]
    histories = [c["histories"][0][-1] for c in curves.values()] + [c["histories"][0][0] for c in curves.values()]
    labels = [f"{name}, largest" for name in curves] + [f"{name}, smallest" for name in curves]
    rows = []
    for name, c in curves.items():
        sizes, val, train = (np.nanmean(np.asarray(c[k]), axis=0) for k in ("train_size", "val_f1", "train_f1"))
        rows += [[name, f"{s:.0f}", f"{t:.3f}", f"{v:.3f}"] for s, t, v in zip(sizes, train, val, strict=True)]
    table = Table(["curve", "training images", "training macro-F1", "validation macro-F1"], rows)
    figures = [
        plot_learning_curve(curves, out / "learning_curve.png", step["title"]),
        plot_epoch_curves(histories, labels, out / "epoch_curves.png"),
    ]
    return [table], figures


def _grid(step: dict[str, Any], out: Path, study: Path) -> Drawn:
    result, x, y = step["result"], step["x_key"], step["y_key"]
    ranked = sorted(result["rows"], key=lambda r: -r["val_f1"])
    rows = [
        [
            str(k),
            str(r[y]),
            f"{r[x]:g}",
            f"{r['val_f1']:.3f}",
            _interval(r.get("val_f1_interval")),
            f"{r['val_loss']:.3f}",
            f"{r['train_seconds']:.0f}",
        ]
        for k, r in enumerate(ranked, 1)
    ]
    header = ["rank", y.split(".")[-1], x.split(".")[-1], "val macro-F1", "95% interval", "val loss", "train s"]
    table = Table(header, rows)
    return [table], [plot_grid(result["rows"], x, y, out / "grid.png", title=step["title"])]


def _interval(interval: list[float] | None) -> str:
    return f"[{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""


def _per_class(test: dict[str, Any]) -> Table:
    rows = [
        [c, f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}", str(r["support"])]
        for c, r in test["per_class"].items()
    ]
    return Table(["class", "precision", "recall", "F1", "support"], rows)


def _fit(step: dict[str, Any], out: Path, study: Path) -> Drawn:
    label, test = step["label"], step["test"]
    figures = [
        plot_epoch_curves([step["history"]], [label], out / "epoch_curves.png", f"{label}: per-epoch curves"),
        plot_confusion(test["confusion_matrix"], test["classes"], out / "confusion_test.png", f"{label}, test"),
    ]
    return [_per_class(test)], figures


def _comparison(step: dict[str, Any], out: Path, study: Path) -> Drawn:
    figures = [
        plot_bars(step["val"], out / "comparison.png", step["title"]),
        plot_epoch_curves(list(step["histories"].values()), list(step["histories"]), out / "comparison_epochs.png"),
    ]
    return [metrics_table(step["val"])], figures


def _split_ratio(step: dict[str, Any], out: Path, study: Path) -> Drawn:
    scores = np.asarray(step["scores"])
    names = step["labels"]
    mean, spread = scores.mean(axis=1), scores.std(axis=1)
    title = f"test macro-F1 by split ratio ({scores.shape[1]} seeds each)"
    figure = plot_errorbars(names, mean, spread, out / "split_ratio.png", "train/test split", "test macro-F1", title)
    intervals = np.asarray(step["intervals"]).mean(axis=1)
    rows = [
        [n, f"{m:.3f}", f"{s:.3f}", _interval(iv.tolist()), ", ".join(map(str, t))]
        for n, m, s, iv, t in zip(names, mean, spread, intervals, step["test_sizes"], strict=True)
    ]
    header = ["train/test (test share)", "mean test macro-F1", "spread", "mean 95% interval", "test images per seed"]
    return [Table(header, rows)], [figure]


def _depth(step: dict[str, Any], out: Path, study: Path) -> Drawn:
    rows = sorted(step["rows"], key=lambda r: r["depth"])
    depths = [r["depth"] for r in rows]
    series = {
        "hyper-parameters tuned for 8": ([r["tuned_for_8"] for r in rows], [0] * len(rows)),
        "learning rate re-tuned per depth": ([r["retuned"] for r in rows], [0] * len(rows)),
    }
    figure = plot_errorbars(
        depths, [], [], out / "depth.png", "mixers (depth)", "test macro-F1", "test macro-F1 by depth", series=series
    )
    table = Table(
        ["mixers", "test F1, tuned for 8", "test F1, lr re-tuned", "re-tuned lr"],
        [
            [str(r["depth"]), f"{r['tuned_for_8']:.3f}", f"{r['retuned']:.3f}", f"{r['retuned_lr']:g}"]
            for r in step["rows"]
        ],
    )
    return [table], [figure]


def final_rows(name: str, step: dict[str, Any], published: dict[str, float]) -> dict[str, dict[str, Any]]:
    """The final recipe's out-of-fold metrics per split mode, per image and per sample, beside the
    published figures, as named rows."""
    k = step["cv_folds"]
    rows: dict[str, dict[str, Any]] = {}
    for mode, m in step["test"].items():
        rows[f"{name}, {mode} {k}-fold CV, per image"] = m
        rows[f"{name}, {mode} {k}-fold CV, per sample"] = m["samples"]
    return rows | {f"{name}, published (random split)": published}


def _final(step: dict[str, Any], out: Path, study: Path) -> Drawn:
    state = read_json(StudyLayout(study).state)
    k = step["cv_folds"]
    bars = {f"{mode} {k}-fold CV, per image": m for mode, m in step["test"].items()} | {
        "published (random split)": state["published"]
    }
    title = "out-of-fold test metrics (macro over classes, 95% intervals over samples)"
    figures = [plot_bars(bars, out / "final_vs_published.png", title)]
    for run in step["runs"].values():
        render_run(study / run)
        layout = RunLayout(study / run)
        names = ("folds", "confusion_test", "confusion_test_samples", "reliability_test", "confident_errors")
        figures += [layout.figure(f) for f in names]
    folds = Table(
        ["split", "fold", "test images / samples", "F1 per image", "F1 per sample"],
        [
            [mode, str(f["fold"]), f"{f['test_images']} / {f['test_samples']}", f"{f['f1']:.3f}"]
            + [f"{f['sample_f1']:.3f}"]
            for mode, rows in step["folds"].items()
            for f in rows
        ],
    )
    table = interval_table(final_rows(state["study"], step, state["published"]))
    confused = Table(
        ["split", "true class", "predicted as", "images", "share of the true class"],
        [
            [mode, c["true"], c["predicted"], str(c["count"]), f"{c['share']:.0%}"]
            for mode, m in step["test"].items()
            for c in m.get("most_confused", [])
        ],
    )
    return [table, difference_table(from_dict(PairedDifference, step["gap"])), folds, confused], figures


RENDERERS: dict[str, Callable[[dict[str, Any], Path, Path], Drawn]] = {
    "class_counts": _class_counts,
    "curves": _curves,
    "grid": _grid,
    "fit": _fit,
    "comparison": _comparison,
    "split_ratio": _split_ratio,
    "depth": _depth,
    "final": _final,
}


def _protocol(cfg: dict[str, Any]) -> str:
    data, train = cfg["data"], cfg["train"]
    parts = (
        f"{1 - data['val_fraction'] - data['test_fraction']:.0%}/{data['val_fraction']:.0%}/{data['test_fraction']:.0%}"
    )
    return (
        f"Profile '{cfg['profile']}': {data['image_size']} px images, outliers under grey variance "
        f"{data['variance_threshold']:g} excluded, '{data['split']}' split (train/val/test {parts}, "
        f"seed {data['seed']}; a step may change the ratio). "
        f"Training batches are class-balanced; predictions weight the training class shares by the power "
        f"{train['prior_weight']:g} (0: none). Exploratory fits run {cfg['study']['epochs']} epochs "
        "and are scored at their "
        "last epoch. Metrics are macro-averaged over the classes."
    )


def build_study_report(study_dir: str | Path) -> Path:
    """report.html and report.md in the study folder, from its files; returns the HTML path."""
    layout = StudyLayout(Path(study_dir))
    state = read_json(layout.state)
    page = Page(f"The {state['study']} study")
    page.text(_protocol(state["config"]))
    for i, (key, step) in enumerate(state["steps"].items(), start=1):
        page.heading(step["title"])
        page.text(step["summary"])
        if step.get("choice"):
            page.text(
                "Carried forward: " + ", ".join(f"{k.split('.')[-1]} = {v}" for k, v in step["choice"].items()) + "."
            )
        tables, figures = RENDERERS[step["kind"]](step, layout.step_dir(i, key), layout.root)
        for table in tables:
            page.table(table)
        for figure in figures:
            page.figure(figure)
        page.note(f"Step time: {step['seconds'] / 60:.1f} min.")
    return page.write(layout.root)
