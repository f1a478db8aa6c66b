"""Grid search over any config keys (batch size x learning rate by default), on Optuna.

The study lives in an SQLite file in the run folder: an interrupted search resumes without
redoing finished trials, and the same code runs against a shared database (storage URL).
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from defungi.config import Config, load_config_from
from defungi.data.dataset import Dataset
from defungi.experiments.run import fit_cached

log = logging.getLogger(__name__)


def parameter_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination, in a fixed order (last key varies fastest), like sklearn's ParameterGrid."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def cell_name(params: dict[str, Any]) -> str:
    """Folder name of one grid cell, e.g. 'batch_size=32,lr=0.001'."""
    return ",".join(f"{k.split('.')[-1]}={v:g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}" for k, v in params.items())


def _open_study(storage: str, grid: dict[str, list[Any]]) -> optuna.Study:
    """Load or create the study; stale RUNNING trials (a killed run) are failed and re-queued."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="grid", storage=storage, direction="maximize", sampler=optuna.samplers.GridSampler(grid, seed=0), load_if_exists=True)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    return study


def grid_search(config: Config, data: Dataset, split: dict[str, np.ndarray], grid: dict[str, list[Any]], out_dir: Path, storage: str | None = None) -> dict[str, Any]:
    """Fit every cell (train on split['train'], score macro-F1 on split['val']); ranked results."""
    out_dir.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(out_dir / 'grid.sqlite3').resolve()}"
    study = _open_study(storage, grid)
    cells = parameter_grid(grid)

    def key(params: dict[str, Any]) -> tuple:
        return tuple(params[k] for k in grid)

    complete = {key(t.params) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    waiting = {key(t.system_attrs["fixed_params"]) for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))}
    missing = [c for c in cells if key(c) not in complete]
    for c in missing:
        if key(c) not in waiting:
            study.enqueue_trial(c)
    log.info("grid: %d cells, %d done before, %d to fit", len(cells), len(complete), len(missing))

    def objective(trial: optuna.Trial) -> float:
        params = {k: trial.suggest_categorical(k, v) for k, v in grid.items()}
        result = fit_cached(load_config_from(config, params), data, split, out_dir / cell_name(params))
        trial.set_user_attr("val_loss", result["metrics"]["val"]["loss"])
        trial.set_user_attr("val_accuracy", result["metrics"]["val"]["accuracy"])
        trial.set_user_attr("train_seconds", result["train_seconds"])
        return result["metrics"]["val"]["f1"]

    if missing:
        study.optimize(objective, n_trials=len(missing))
    by_cell = {key(t.params): t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    rows = [
        {**c, "val_f1": by_cell[key(c)].value, "val_loss": by_cell[key(c)].user_attrs["val_loss"], "val_accuracy": by_cell[key(c)].user_attrs["val_accuracy"], "train_seconds": by_cell[key(c)].user_attrs["train_seconds"]}
        for c in cells
    ]
    best = max(rows, key=lambda r: r["val_f1"])
    return {"grid": {k: list(v) for k, v in grid.items()}, "rows": rows, "best": {k: best[k] for k in grid}, "best_val_f1": best["val_f1"], "trials_before": len(complete), "trials_run": len(missing)}
