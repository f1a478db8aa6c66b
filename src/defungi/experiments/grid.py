"""Grid search over any config keys (batch size x learning rate by default), on Optuna.

Trials live in an Optuna study named after a hash of the grid, the config and the split, in an
SQLite file in out_dir or a database that several workers share (`storage`, e.g. PostgreSQL).
A worker queues one open cell at a time and takes a waiting trial from the queue (Optuna pops it
atomically); a trial whose cell another worker holds (an earlier trial of it running or waiting,
or one finished) is pruned before it trains, so every cell is fitted once. Heartbeats mark the
trials of a killed worker stale; they are queued again (RetryHeartbeatStaleTrialCallback) and
taken by any worker, and the cell's run folder resumes where it stopped. A worker with nothing
to take waits until every cell is finished. Every cell is a run folder under out_dir of the
worker that fitted it; the results come from the study.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import TrialState
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError, SQLAlchemyError

from defungi.config import Config, load_config_from
from defungi.data.dataset import Dataset
from defungi.errors import DefungiError
from defungi.experiments.meter import FitPlan
from defungi.experiments.protocols import fit_run, plan_fits
from defungi.results.search import GridResult, GridRow

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 30  # a running trial says it is alive this often
GRACE_PERIOD_S = 120  # a trial silent this long belongs to a dead worker: failed, then retried
MAX_ATTEMPTS = 3  # trials of a cell that raised an error (not interrupted, not stale) before it is reported
POLL_S = 2.0  # a worker with no cell to take looks again this often
SCHEMA_ATTEMPTS = 5
ACTIVE = (TrialState.RUNNING, TrialState.WAITING)


def parameter_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination, in a fixed order (last key varies fastest), like sklearn's ParameterGrid."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


def cell_name(params: dict[str, Any]) -> str:
    """Folder name of one grid cell, e.g. 'batch_size=32,lr=0.001': each key's last part, or the
    whole key where two keys share it (train.seed and data.seed)."""
    short = [k.split(".")[-1] for k in params]
    names = [s if short.count(s) == 1 else k for s, k in zip(short, params, strict=True)]
    return ",".join(
        f"{n}={v:g}" if isinstance(v, float) else f"{n}={v}" for n, v in zip(names, params.values(), strict=True)
    )


def study_name(config: Config, split: dict[str, np.ndarray], grid: dict[str, list[Any]]) -> str:
    """'grid-' and a hash of what the trials depend on, so that grids sharing a database stay apart."""
    key = {
        "grid": grid,
        "config": config.to_dict(),
        "split": {p: hashlib.sha1(np.asarray(i).tobytes()).hexdigest() for p, i in split.items()},
    }
    return "grid-" + hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def open_storage(url: str, heartbeat: int | None = None) -> RDBStorage:
    """An Optuna database with heartbeats (every `heartbeat` s, a trial silent for 4 of them is
    stale; default 30 s and 120 s), or a one-line error. Workers that start together on an empty
    database race to create its tables: the losers try again. postgresql:// means psycopg 3."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    for attempt in range(SCHEMA_ATTEMPTS):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                return RDBStorage(
                    url,
                    heartbeat_interval=heartbeat or HEARTBEAT_INTERVAL_S,
                    grace_period=4 * heartbeat if heartbeat else GRACE_PERIOD_S,
                    heartbeat_stale_trial_callback=_retry(),
                )
            except ImportError as exc:
                raise DefungiError(
                    f"--storage {url}: the database's Python driver is missing ({exc}); for PostgreSQL: "
                    "pip install 'psycopg[binary]'"
                ) from None
            except (IntegrityError, ProgrammingError) as exc:  # another worker created the tables meanwhile?
                if attempt == SCHEMA_ATTEMPTS - 1:
                    raise DefungiError(f"--storage {url}: cannot set up Optuna's tables: {_first_line(exc)}") from None
                time.sleep(0.2 * (attempt + 1))
            except OperationalError as exc:
                raise DefungiError(f"--storage {url}: cannot use the database: {_first_line(exc)}") from None
            except (ValueError, SQLAlchemyError) as exc:
                raise DefungiError(
                    f"--storage {url}: not a usable database URL ({type(exc).__name__}); "
                    "e.g. sqlite:///grid.db or postgresql://user@host/db"
                ) from None
    raise AssertionError("unreachable")


def _first_line(exc: BaseException) -> str:
    """The driver's own message, without SQLAlchemy's statement and background lines."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _key(params: dict[str, Any], keys: list[str]) -> tuple:
    return tuple(params[k] for k in keys)


def _cell(trial: optuna.trial.FrozenTrial, keys: list[str]) -> tuple | None:
    """The grid cell of a trial: its parameters, or those it was queued with."""
    params = trial.params or trial.system_attrs.get("fixed_params") or {}
    return _key(params, keys) if all(k in params for k in keys) else None


def _held_elsewhere(study: optuna.Study, number: int, cell: tuple, keys: list[str]) -> bool:
    """Whether another trial owns the cell: a finished one, or an earlier one running or waiting
    (the earliest active trial of a cell is the one that fits it)."""
    for t in study.get_trials(deepcopy=False):
        if t.number != number and _cell(t, keys) == cell:
            if t.state == TrialState.COMPLETE or (t.state in ACTIVE and t.number < number):
                return True
    return False


def _retry() -> RetryHeartbeatStaleTrialCallback:
    """Optuna's callback that queues a stale trial again with its parameters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=MAX_ATTEMPTS)


def plan_grid(
    config: Config, dataset: Dataset, split: dict[str, np.ndarray], grid: dict[str, list[Any]]
) -> list[FitPlan]:
    """The fits grid_search would run: those of every cell."""
    return [fit for cell in parameter_grid(grid) for fit in plan_fits(load_config_from(config, cell), dataset, split)]


def grid_search(
    config: Config,
    dataset: Dataset,
    split: dict[str, np.ndarray],
    grid: dict[str, list[Any]],
    out_dir: Path,
    storage: str | None = None,
    heartbeat: int | None = None,
) -> GridResult:
    """Fit every cell (train on split['train'], score macro-F1 on split['val']); results in grid order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    keys, cells = list(grid), check_cells(config, grid)
    name = study_name(config, split, grid)
    study = _open_study(name, storage or f"sqlite:///{(out_dir / 'grid.sqlite3').resolve()}", heartbeat)
    before = _completed(study, keys)
    missing = [c for c in cells if _key(c, keys) not in before]
    log.info("grid %s: %d cells, %d done before, %d to fit", name, len(cells), len(cells) - len(missing), len(missing))

    fitted: list[str] = []  # the cells this worker fitted

    def objective(trial: optuna.Trial) -> float:
        params = {k: trial.suggest_categorical(k, v) for k, v in grid.items()}
        if _held_elsewhere(study, trial.number, _key(params, keys), keys):
            raise optuna.TrialPruned(f"cell {cell_name(params)} is another worker's")
        try:
            record = fit_run(load_config_from(config, params), out_dir / cell_name(params), dataset, split)
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}".splitlines()[0])
            raise
        fitted.append(cell_name(params))
        trial.set_user_attr("val_loss", record.score("val", "loss"))
        trial.set_user_attr("val_accuracy", record.score("val", "accuracy"))
        trial.set_user_attr("train_seconds", record.metrics.timing.train_seconds)
        trial.set_user_attr("val_f1_interval", record.metrics.part("val").interval("f1"))
        return record.score("val")

    _work(study, cells, keys, objective, out_dir)
    by_cell = _completed(study, keys)
    rows = [_row(c, by_cell[_key(c, keys)]) for c in cells]
    best = max(rows, key=lambda r: r.val_f1)
    return GridResult(
        grid={k: list(v) for k, v in grid.items()},
        rows=rows,
        best=dict(best.cell),
        best_val_f1=best.val_f1,
        trials_before=len(cells) - len(missing),
        trials_run=len(fitted),
        study_name=name,
        train_size=int(len(split["train"])),
    )


def check_cells(config: Config, grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The grid's cells; one whose config is refused is refused before any decoding, naming it."""
    cells = parameter_grid(grid)
    for cell in cells:
        try:
            load_config_from(config, cell)
        except DefungiError as exc:
            raise DefungiError(f"grid cell {cell_name(cell)}: {exc}") from None
    return cells


def _open_study(name: str, storage: str, heartbeat: int | None) -> optuna.Study:
    """The grid's Optuna study in storage, created by the first worker to ask."""
    # ERROR: a failed trial's traceback is not printed; its first line is kept (user attribute 'error')
    # and said once the cell has failed MAX_ATTEMPTS times
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna.create_study(
        study_name=name,
        storage=open_storage(storage, heartbeat),
        direction="maximize",
        # cells are queued with their parameters; a trial made when the queue ran dry meanwhile draws one
        sampler=optuna.samplers.RandomSampler(),
        load_if_exists=True,
    )


def _completed(study: optuna.Study, keys: list[str]) -> dict[tuple, optuna.trial.FrozenTrial]:
    """The study's completed trials by grid cell."""
    return {_key(t.params, keys): t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}


def _row(cell: dict[str, Any], trial: optuna.trial.FrozenTrial) -> GridRow:
    """A cell's row: its completed trial's validation macro-F1 and what the trial recorded beside it."""
    scores = {k: trial.user_attrs[k] for k in ("val_f1_interval", "val_loss", "val_accuracy", "train_seconds")}
    return GridRow(cell=dict(cell), val_f1=trial.value, **scores)


def _work(
    study: optuna.Study,
    cells: list[dict[str, Any]],
    keys: list[str],
    objective: Callable[[optuna.Trial], float],
    out_dir: Path,
) -> None:
    """Take waiting trials (queueing one open cell at a time) until every cell is complete; with no
    cell left to take, wait for the other workers' trials (or for them to go stale, then retry them)."""
    while True:
        trials = study.get_trials(deepcopy=False)
        done = {_cell(t, keys) for t in trials if t.state == TrialState.COMPLETE}
        active = {_cell(t, keys) for t in trials if t.state in ACTIVE}
        failed = [t for t in trials if t.state == TrialState.FAIL and "error" in t.user_attrs]
        errors = [_cell(t, keys) for t in failed]
        open_cells = [c for c in cells if _key(c, keys) not in done | active]
        given_up = [cell_name(c) for c in open_cells if errors.count(_key(c, keys)) >= MAX_ATTEMPTS]
        if given_up:
            raise DefungiError(
                f"grid {study.study_name}: cells {', '.join(given_up)} raised an error {MAX_ATTEMPTS} times (the "
                f"last: {failed[-1].user_attrs['error']}); see their folders in {out_dir}"
            )
        if all(_key(c, keys) in done for c in cells):
            return
        if not any(t.state == TrialState.WAITING for t in trials):
            if not open_cells:  # the rest is running elsewhere: wait for it, or for a worker to go stale
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    fail_stale_trials(study)
                time.sleep(POLL_S)
                continue
            study.enqueue_trial(open_cells[0])
        study.optimize(objective, n_trials=1)  # takes a waiting trial
