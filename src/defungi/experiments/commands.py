"""Stand-alone experiments (`defungi curve`, `defungi grid`): a folder in, figures and JSON out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from defungi.config import Config
from defungi.experiments.crossval import subset
from defungi.experiments.curve import folds_for, learning_curve
from defungi.experiments.grid import grid_search
from defungi.experiments.run import dataset_for, split_for
from defungi.report.plots import plot_epoch_curves, plot_grid, plot_learning_curve
from defungi.utils import atomic_write_json


def _pool(config: Config, fraction: float) -> tuple[Any, np.ndarray]:
    """The data and the positions of `fraction` of its training + validation parts."""
    data = dataset_for(config)
    split = split_for(config, data)
    pool = np.sort(np.concatenate([split["train"], split["val"]]))
    dc = config.data
    return data, pool[subset(data.labels[pool], data.groups[pool], fraction, dc.split, dc.seed)]


def curve_command(config: Config, out: Path, fraction: float, sizes: list[float], cv: int) -> dict[str, Any]:
    """Learning curve on `fraction` of the data: learning_curve.png, epoch_curves.png, curve.json."""
    data, pool = _pool(config, fraction)
    result = learning_curve(config, data, pool, sizes, out / "fits", cv=cv)
    label = f"{cv}-fold CV" if cv >= 2 else "validation set"
    plot_learning_curve({label: result}, out / "learning_curve.png", f"learning curve, {fraction:.0%} of the data ({label})")
    plot_epoch_curves([h for fold in result["histories"] for h in fold], [f"fold {f + 1}, {s:.0%}" for f in range(result["folds"]) for s in sizes], out / "epoch_curves.png")
    atomic_write_json(out / "curve.json", result)
    return result


def grid_command(config: Config, out: Path, fraction: float, grid: dict[str, list[Any]], storage: str | None) -> dict[str, Any]:
    """Grid search on `fraction` of the data (1.0: the main split): grid.png, grid.json."""
    if fraction < 1:
        data, pool = _pool(config, fraction)
        tr, va = folds_for(data, pool, 0, config.data.val_fraction, config.data.split, config.data.seed)[0]
    else:
        data = dataset_for(config)
        split = split_for(config, data)
        tr, va = split["train"], split["val"]
    result = grid_search(config, data, {"train": tr, "val": va}, grid, out / "fits", storage)
    keys = list(grid)
    if len(keys) == 2:
        plot_grid(result["rows"], keys[1], keys[0], out / "grid.png", title=f"grid search, {fraction:.0%} of the data")
    atomic_write_json(out / "grid.json", result)
    return result
