"""Figures of a stand-alone learning curve or grid search, from its JSON file."""

from __future__ import annotations

from pathlib import Path

from defungi.layout import SearchLayout, read_json
from defungi.report.plots import plot_epoch_curves, plot_grid, plot_learning_curve


def render_curve(out_dir: str | Path, title: str) -> list[Path]:
    """learning_curve.png and epoch_curves.png from curve.json."""
    layout = SearchLayout(Path(out_dir))
    curve = read_json(layout.curve)
    label = f"{curve['cv']}-fold CV" if curve["cv"] >= 2 else "validation set"
    histories = [h for fold in curve["histories"] for h in fold]
    labels = [f"fold {f + 1}, {s:.0%}" for f in range(curve["folds"]) for s in curve["train_fractions"]]
    return [
        plot_learning_curve({label: curve}, layout.figure("learning_curve"), f"{title} ({label})"),
        plot_epoch_curves(histories, labels, layout.figure("epoch_curves")),
    ]


def render_grid(out_dir: str | Path, title: str) -> list[Path]:
    """grid.png (a heat map when the grid has two axes) from grid.json."""
    layout = SearchLayout(Path(out_dir))
    grid = read_json(layout.grid)
    keys = list(grid["grid"])
    if len(keys) != 2:
        return []
    return [plot_grid(grid["rows"], keys[1], keys[0], layout.figure("grid"), title=title)]
