"""Figures of a stand-alone learning curve or grid search, from its JSON file, and what the
command prints of it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from defungi.layout import SearchLayout
from defungi.report.plots import plot_epoch_curves, plot_grid, plot_learning_curve
from defungi.results.search import GridResult, GridRow, LearningCurve, read_curve, read_grid

CURVE_FIGURES = ("learning_curve", "epoch_curves")
GRID_FIGURE = "grid"


def render_curve(out_dir: str | Path, title: str) -> list[Path]:
    """learning_curve.png and epoch_curves.png from curve.json."""
    layout = SearchLayout(Path(out_dir))
    curve = read_curve(layout.curve)
    histories = [h for fold in curve.histories for h in fold]
    labels = [f"fold {f + 1}, {s:.0%}" for f in range(curve.folds) for s in curve.train_fractions]
    learning, epochs = (layout.figure(name) for name in CURVE_FIGURES)
    return [
        plot_learning_curve({curve.label: curve}, learning, f"{title} ({curve.label})"),
        plot_epoch_curves(histories, labels, epochs),
    ]


def render_grid(out_dir: str | Path, title: str) -> list[Path]:
    """grid.png from grid.json: a heat map over the last two axes (the best cell over any others,
    named in the title; one row for a one-axis grid)."""
    layout = SearchLayout(Path(out_dir))
    grid = read_grid(layout.grid)
    keys, rows = list(grid.grid), grid.rows
    if len(keys) == 1:
        rows, keys = [replace(r, cell=r.cell | {"grid": "all"}) for r in rows], ["grid", *keys]
    y, x, others = keys[-2], keys[-1], keys[:-2]
    if others:
        best: dict[tuple, GridRow] = {}
        for r in rows:
            cell = (r.cell[y], r.cell[x])
            if cell not in best or r.val_f1 > best[cell].val_f1:
                best[cell] = r
        rows = list(best.values())
        title = f"{title} (best over {', '.join(k.split('.')[-1] for k in others)})"
    return [plot_grid(rows, x, y, layout.figure(GRID_FIGURE), title=title)]


def curve_summary(curve: LearningCurve, out_dir: Path) -> str:
    """Lines for a terminal: the mean validation macro-F1 (over folds) per training fraction, and the figures."""
    lines = []
    for j, size in enumerate(curve.train_fractions):
        val = [row[j] for row in curve.val_f1]
        images = sum(row[j] for row in curve.train_size) / len(val)
        lines.append(f"{size:>5.0%} of training ({images:.0f} images): validation macro-F1 {sum(val) / len(val):.3f}")
    figures = ", ".join(str(SearchLayout(out_dir).figure(name)) for name in CURVE_FIGURES)
    return "\n".join([*lines, f"figures: {figures}"])


def grid_summary(grid: GridResult, out_dir: Path) -> str:
    """Lines for a terminal: what this worker fitted, every cell best first, and the best cell."""
    done = f"{grid.trials_before} cells done before, {grid.trials_run} fitted by this worker"
    lines = [f"{done} (Optuna study {grid.study_name})"]
    for r in sorted(grid.rows, key=lambda r: -r.val_f1):
        cell = "  ".join(f"{k.split('.')[-1]}={r.cell[k]}" for k in grid.grid)
        lines.append(f"  {cell}  val macro-F1 {r.val_f1:.3f}")
    lines.append(f"best: {grid.best}  (heat map: {SearchLayout(out_dir).figure(GRID_FIGURE)})")
    return "\n".join(lines)
