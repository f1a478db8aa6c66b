import multiprocessing
import time
from pathlib import Path

import numpy as np
import optuna
import pytest

from defungi.data.dataset import load_dataset
from defungi.errors import DefungiError
from defungi.experiments.curve import learning_curve
from defungi.experiments.grid import grid_search, open_storage, study_name
from defungi.experiments.protocols import split_for
from tests.conftest import fails_on_call, tiny_config, write_folder


def _setup(tmp_path: Path):
    data_dir = write_folder(tmp_path / "d", samples_per_class=6, patches=3)
    config = tiny_config(data_dir, {"train.epochs": 1, "train.tta": False})
    data = load_dataset(data_dir, 16, 15.0, progress=False)
    return config, data


def test_learning_curve_with_cv_and_resume(tmp_path: Path):
    config, data = _setup(tmp_path)
    pool = np.arange(len(data.labels))
    result = learning_curve(config, data, pool, [0.5, 1.0], tmp_path / "curve", cv=2)
    assert np.array(result.val_f1).shape == (2, 2)
    sizes = np.array(result.train_size)
    assert np.all(sizes[:, 0] < sizes[:, 1])
    assert len(result.histories[0][1]) == 1
    stamp = (tmp_path / "curve" / "fold0-size0.50" / "metrics.json").stat().st_mtime_ns
    again = learning_curve(config, data, pool, [0.5, 1.0], tmp_path / "curve", cv=2)
    assert again.val_f1 == result.val_f1 and again.histories == result.histories
    assert (tmp_path / "curve" / "fold0-size0.50" / "metrics.json").stat().st_mtime_ns == stamp


def test_grid_search_ranks_cells_and_resumes(tmp_path: Path):
    config, data = _setup(tmp_path)
    split = split_for(config, data)
    grid = {"train.batch_size": [8, 16], "train.lr": [1e-3, 3e-3]}
    result = grid_search(config, data, split, grid, tmp_path / "grid")
    assert result.trials_run == 4 and len(result.rows) == 4
    assert [(r.cell["train.batch_size"], r.cell["train.lr"]) for r in result.rows] == [
        (8, 1e-3),
        (8, 3e-3),
        (16, 1e-3),
        (16, 3e-3),
    ]
    assert result.best_val_f1 == max(r.val_f1 for r in result.rows)
    trials = optuna.load_study(
        study_name=result.study_name, storage=f"sqlite:///{tmp_path / 'grid' / 'grid.sqlite3'}"
    ).trials
    assert sorted((t.params["train.batch_size"], t.params["train.lr"]) for t in trials) == sorted(
        (r.cell["train.batch_size"], r.cell["train.lr"]) for r in result.rows
    )
    resumed = grid_search(config, data, split, grid, tmp_path / "grid")
    assert resumed.trials_before == 4 and resumed.trials_run == 0 and resumed.rows == result.rows


def test_one_cell_grid_and_grids_sharing_a_database(tmp_path: Path):
    config, data = _setup(tmp_path)
    split = split_for(config, data)
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    one = grid_search(config, data, split, {"train.batch_size": [8], "train.lr": [1e-3]}, tmp_path / "one", storage)
    two = grid_search(
        config, data, split, {"train.batch_size": [8], "train.lr": [1e-3, 2e-3]}, tmp_path / "two", storage
    )
    assert one.trials_run == 1 and two.trials_run == 2 and one.study_name != two.study_name
    assert len(optuna.get_all_study_names(storage)) == 2
    assert study_name(config, split, {"train.lr": [1e-3]}) == study_name(config, split, {"train.lr": [1e-3]})


def test_storage_that_is_not_a_database_is_a_clear_error():
    with pytest.raises(DefungiError, match="not a usable database URL"):
        open_storage("notaurl")


def _dies_in_second_cell(tmp_path: Path) -> None:
    """A worker (a fresh process) that finishes one cell and is killed (os._exit) inside the next one."""
    import os

    import defungi.experiments.grid as grid_module

    os.environ["DEFUNGI_CACHE"] = str(tmp_path / "cache")
    grid_module.HEARTBEAT_INTERVAL_S, grid_module.GRACE_PERIOD_S = 1, 2
    config, data = _setup(tmp_path)
    real, calls = grid_module.fit_run, []

    def train(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # after the first beat of the trial's heartbeat thread (Optuna records it asynchronously)
            time.sleep(2)
            os._exit(9)
        return real(*args, **kwargs)

    grid_module.fit_run = train
    grid_search(
        config, data, split_for(config, data), {"train.batch_size": [8, 16], "train.lr": [1e-3]}, tmp_path / "grid"
    )


@pytest.mark.slow
def test_a_killed_workers_cell_is_retried_after_its_heartbeat_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import defungi.experiments.grid as grid_module

    monkeypatch.setattr(grid_module, "HEARTBEAT_INTERVAL_S", 1)
    monkeypatch.setattr(grid_module, "GRACE_PERIOD_S", 2)
    worker = multiprocessing.get_context("spawn").Process(target=_dies_in_second_cell, args=(tmp_path,))
    worker.start()
    worker.join()
    assert worker.exitcode == 9
    time.sleep(3)  # past the grace period: the dead worker's trial is stale
    config, data = _setup(tmp_path)
    result = grid_search(
        config, data, split_for(config, data), {"train.batch_size": [8, 16], "train.lr": [1e-3]}, tmp_path / "grid"
    )
    assert result.trials_before == 1 and result.trials_run == 1 and len(result.rows) == 2
    states = [
        t.state.name
        for t in optuna.load_study(
            study_name=result.study_name, storage=f"sqlite:///{tmp_path / 'grid' / 'grid.sqlite3'}"
        ).trials
    ]
    assert sorted(states) == ["COMPLETE", "COMPLETE", "FAIL"]  # the stale trial failed, its retry completed


def test_a_cell_stopped_with_ctrl_c_is_fitted_on_the_next_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import defungi.experiments.grid as grid_module

    config, data = _setup(tmp_path)
    split = split_for(config, data)
    grid = {"train.batch_size": [8, 16], "train.lr": [1e-3, 2e-3]}
    real = grid_module.fit_run
    monkeypatch.setattr(grid_module, "fit_run", fails_on_call(real, 2))
    with pytest.raises(KeyboardInterrupt):
        grid_search(config, data, split, grid, tmp_path / "grid")
    monkeypatch.setattr(grid_module, "fit_run", real)
    result = grid_search(config, data, split, grid, tmp_path / "grid")
    assert result.trials_before == 1 and result.trials_run == 3 and len(result.rows) == 4


def test_a_fit_folder_is_not_read_back_for_another_split(tmp_path: Path):
    config, data = _setup(tmp_path)
    pool = np.arange(len(data.labels))
    learning_curve(config, data, pool, [1.0], tmp_path / "curve", cv=0)
    with pytest.raises(DefungiError, match="another split"):
        learning_curve(config, data, pool[: len(pool) // 2], [1.0], tmp_path / "curve", cv=0)


def test_cell_names_stay_apart_where_two_keys_end_alike():
    from defungi.experiments.grid import cell_name

    assert cell_name({"train.batch_size": 32, "train.lr": 1e-3}) == "batch_size=32,lr=0.001"
    assert cell_name({"train.seed": 1, "data.seed": 2}) == "train.seed=1,data.seed=2"


@pytest.mark.parametrize("axes", [1, 3])
def test_grid_figure_for_one_or_three_axes(tmp_path: Path, axes: int):
    import itertools
    import json

    from defungi.report.search import render_grid
    from defungi.results.schema import to_dict
    from defungi.results.search import GridResult, GridRow

    grid = {"train.lr": [1e-3, 2e-3], "train.batch_size": [16, 32], "train.optimizer": ["adamw", "sgd"]}
    grid = dict(list(grid.items())[:axes])
    rows = [
        GridRow(dict(zip(grid, cell, strict=True)), i / 10, [0.0, 1.0], 1.0, 0.5, 3.0)
        for i, cell in enumerate(itertools.product(*grid.values()))
    ]
    best = max(rows, key=lambda r: r.val_f1)
    result = GridResult(grid, rows, best.cell, best.val_f1, 0, len(rows), "grid-test", 100)
    (tmp_path / "grid.json").write_text(json.dumps(to_dict(result)))
    (figure,) = render_grid(tmp_path, "grid")
    assert figure.name == "grid.png" and figure.stat().st_size > 5000


def test_curve_points_of_close_fractions_get_their_own_folders():
    from defungi.experiments.curve import _point_name

    assert _point_name(0, 0.25) == "fold0-size0.25"  # the names earlier versions wrote (resume finds them)
    assert len({_point_name(1, f) for f in (0.12, 0.125, 0.1249)}) == 3
