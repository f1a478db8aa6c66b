"""Grid search over any config keys (batch size x learning rate by default), on Optuna.

Optuna's GridSampler alone decides which cell a trial fits; every cell is a run folder under
out_dir (resumable, read back once finished). Trials live in an Optuna study named after a hash
of the grid, the config and the split, in an SQLite file in out_dir or a shared database
(`storage`). Heartbeats mark the trials of a killed worker stale; they are retried
(RetryHeartbeatStaleTrialCallback), and the cell's run folder resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from sqlalchemy.exc import SQLAlchemyError

from defungi.config import Config, load_config_from
from defungi.data.dataset import Dataset
from defungi.errors import DefungiError
from defungi.experiments.train import train

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 30  # a running trial says it is alive this often
GRACE_PERIOD_S = 120  # a trial silent this long belongs to a dead worker: failed, then retried
MAX_ATTEMPTS = 3  # rounds of the grid before a cell that keeps failing is reported


@dataclass
class GridResult:
    """Every cell's validation scores in a fixed order (last key varies fastest), and the best cell."""

    grid: dict[str, list[Any]]
    rows: list[dict[str, Any]]
    best: dict[str, Any]
    best_val_f1: float
    trials_before: int
    trials_run: int
    study_name: str
    train_size: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parameter_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination, in a fixed order (last key varies fastest), like sklearn's ParameterGrid."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


def cell_name(params: dict[str, Any]) -> str:
    """Folder name of one grid cell, e.g. 'batch_size=32,lr=0.001'."""
    return ",".join(
        f"{k.split('.')[-1]}={v:g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}" for k, v in params.items()
    )


def study_name(config: Config, split: dict[str, np.ndarray], grid: dict[str, list[Any]]) -> str:
    """'grid-' and a hash of what the trials depend on, so that grids sharing a database stay apart."""
    key = {
        "grid": grid,
        "config": config.to_dict(),
        "split": {p: hashlib.sha1(np.asarray(i).tobytes()).hexdigest() for p, i in split.items()},
    }
    return "grid-" + hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def open_storage(url: str) -> RDBStorage:
    """An Optuna database with heartbeats, or a clear error for a URL that is not one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return RDBStorage(
                url,
                heartbeat_interval=HEARTBEAT_INTERVAL_S,
                grace_period=GRACE_PERIOD_S,
                heartbeat_stale_trial_callback=_retry(),
            )
        except (ValueError, ImportError, SQLAlchemyError) as exc:
            raise DefungiError(
                f"--storage {url}: not a usable database URL ({type(exc).__name__}); e.g. sqlite:///grid.db or postgresql://user@host/db"
            ) from None


def _key(params: dict[str, Any], keys: list[str]) -> tuple:
    return tuple(params[k] for k in keys)


def _requeue_failed(study: optuna.Study, cells: set[tuple], keys: list[str]) -> None:
    """Queue again, with its grid cell, the last failed trial of each cell that has none finished
    (stopped with Ctrl-C, or a stale one): the grid sampler counts a failed cell as tried."""
    trials = study.get_trials(deepcopy=False)
    queued = {_key(t.params, keys) for t in trials if t.state in (TrialState.WAITING, TrialState.RUNNING)}
    failed = {_key(t.params, keys): t for t in trials if t.state == TrialState.FAIL and t.params}
    for cell, trial in failed.items():
        if cell in cells and cell not in queued:
            _retry()(study, trial)


def _retry() -> RetryHeartbeatStaleTrialCallback:
    """Optuna's callback that queues a failed trial again with its parameters (and grid cell)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=MAX_ATTEMPTS)


def grid_search(
    config: Config,
    data: Dataset,
    split: dict[str, np.ndarray],
    grid: dict[str, list[Any]],
    out_dir: Path,
    storage: str | None = None,
) -> GridResult:
    """Fit every cell (train on split['train'], score macro-F1 on split['val']); results in grid order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    keys, cells = list(grid), parameter_grid(grid)
    name = study_name(config, split, grid)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=name,
        storage=open_storage(storage or f"sqlite:///{(out_dir / 'grid.sqlite3').resolve()}"),
        direction="maximize",
        sampler=optuna.samplers.GridSampler(grid, seed=0),
        load_if_exists=True,
    )

    def complete() -> dict[tuple, optuna.trial.FrozenTrial]:
        return {_key(t.params, keys): t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}

    before = complete()
    missing = [c for c in cells if _key(c, keys) not in before]
    log.info("grid %s: %d cells, %d done before, %d to fit", name, len(cells), len(cells) - len(missing), len(missing))

    def objective(trial: optuna.Trial) -> float:
        params = {k: trial.suggest_categorical(k, v) for k, v in grid.items()}
        record = train(load_config_from(config, params), out_dir / cell_name(params), data, split)
        trial.set_user_attr("val_loss", record.score("val", "loss"))
        trial.set_user_attr("val_accuracy", record.score("val", "accuracy"))
        trial.set_user_attr("train_seconds", record.metrics["timing"]["train_seconds"])
        trial.set_user_attr("val_f1_interval", record.metrics["val"]["intervals"]["f1"])
        return record.score("val")

    for _ in range(MAX_ATTEMPTS):
        left = [c for c in cells if _key(c, keys) not in complete()]
        if not left:
            break
        _requeue_failed(study, {_key(c, keys) for c in left}, keys)
        study.optimize(objective)  # the grid sampler stops the study once every cell has been tried
    by_cell = complete()
    unfinished = [cell_name(c) for c in cells if _key(c, keys) not in by_cell]
    if unfinished:
        raise DefungiError(
            f"grid {name}: cells {', '.join(unfinished)} failed {MAX_ATTEMPTS} times; see their folders in {out_dir}"
        )
    rows = []
    for c in cells:
        t = by_cell[_key(c, keys)]
        rows.append(
            {
                **c,
                "val_f1": t.value,
                **{k: t.user_attrs[k] for k in ("val_f1_interval", "val_loss", "val_accuracy", "train_seconds")},
            }
        )
    best = max(rows, key=lambda r: r["val_f1"])
    return GridResult(
        grid={k: list(v) for k, v in grid.items()},
        rows=rows,
        best={k: best[k] for k in keys},
        best_val_f1=best["val_f1"],
        trials_before=len(cells) - len(missing),
        trials_run=len(missing),
        study_name=name,
        train_size=int(len(split["train"])),
    )
