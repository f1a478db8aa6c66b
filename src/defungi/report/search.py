"""Figures of a stand-alone learning curve or grid search, from its JSON file."""

from __future__ import annotations

from pathlib import Path

from defungi.layout import SearchLayout
from defungi.report.plots import plot_epoch_curves, plot_grid, plot_learning_curve
from defungi.results.search import read_curve, read_grid


def render_curve(out_dir: str | Path, title: str) -> list[Path]:
    """learning_curve.png and epoch_curves.png from curve.json."""
    layout = SearchLayout(Path(out_dir))
    curve = read_curve(layout.curve)
    histories = [h for fold in curve.histories for h in fold]
    labels = [f"fold {f + 1}, {s:.0%}" for f in range(curve.folds) for s in curve.train_fractions]
    return [
        plot_learning_curve({curve.label: curve}, layout.figure("learning_curve"), f"{title} ({curve.label})"),
        plot_epoch_curves(histories, labels, layout.figure("epoch_curves")),
    ]


def render_grid(out_dir: str | Path, title: str) -> list[Path]:
    """grid.png from grid.json: a heat map over the last two axes (the best cell over any others,
    named in the title; one row for a one-axis grid)."""
    layout = SearchLayout(Path(out_dir))
    grid = read_grid(layout.grid)
    keys, rows = list(grid.grid), grid.rows
    if len(keys) == 1:
        rows, keys = [r | {"grid": "all"} for r in rows], ["grid", *keys]
    y, x, others = keys[-2], keys[-1], keys[:-2]
    if others:
        best: dict[tuple, dict] = {}
        for r in rows:
            cell = (r[y], r[x])
            if cell not in best or r["val_f1"] > best[cell]["val_f1"]:
                best[cell] = r
        rows = list(best.values())
        title = f"{title} (best over {', '.join(k.split('.')[-1] for k in others)})"
    return [plot_grid(rows, x, y, layout.figure("grid"), title=title)]
