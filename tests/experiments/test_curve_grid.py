from pathlib import Path

import numpy as np

from defungi.config import load_config
from defungi.data.dataset import load_dataset
from defungi.experiments.curve import learning_curve
from defungi.experiments.grid import grid_search
from defungi.experiments.run import split_for
from tests.conftest import write_folder

TINY = {"data.image_size": 16, "train.model": "convmixer", "train.model_args": '{"dim": 8, "depth": 1, "kernel_size": 3, "patch_size": 4}', "train.epochs": 1, "train.batch_size": 8, "train.tta": "false"}


def _setup(tmp_path: Path):
    data_dir = write_folder(tmp_path / "d", samples_per_class=6, patches=3)
    config = load_config("quick", {"data.root": str(data_dir), **TINY})
    data = load_dataset(data_dir, 16, 15.0, progress=False)
    return config, data


def test_learning_curve_with_cv_and_resume(tmp_path: Path):
    config, data = _setup(tmp_path)
    pool = np.arange(len(data.labels))
    result = learning_curve(config, data, pool, [0.5, 1.0], tmp_path / "curve", cv=2)
    assert np.array(result["val_f1"]).shape == (2, 2)
    sizes = np.array(result["train_size"])
    assert np.all(sizes[:, 0] < sizes[:, 1])
    assert len(result["histories"][0][1]) == 1
    stamp = (tmp_path / "curve" / "fold0-size0.50" / "result.json").stat().st_mtime_ns
    again = learning_curve(config, data, pool, [0.5, 1.0], tmp_path / "curve", cv=2)
    assert again["val_f1"] == result["val_f1"]
    assert (tmp_path / "curve" / "fold0-size0.50" / "result.json").stat().st_mtime_ns == stamp


def test_grid_search_ranks_cells_and_resumes(tmp_path: Path):
    config, data = _setup(tmp_path)
    split = split_for(config, data)
    grid = {"train.batch_size": [8, 16], "train.lr": [1e-3, 3e-3]}
    result = grid_search(config, data, split, grid, tmp_path / "grid")
    assert result["trials_run"] == 4 and len(result["rows"]) == 4
    assert [(r["train.batch_size"], r["train.lr"]) for r in result["rows"]] == [(8, 1e-3), (8, 3e-3), (16, 1e-3), (16, 3e-3)]
    assert result["best_val_f1"] == max(r["val_f1"] for r in result["rows"])
    again = grid_search(config, data, split, {"train.batch_size": [8, 16, 32], "train.lr": [1e-3, 3e-3]}, tmp_path / "grid2")
    assert again["trials_run"] == 6
    resumed = grid_search(config, data, split, grid, tmp_path / "grid")
    assert resumed["trials_before"] == 4 and resumed["trials_run"] == 0 and resumed["rows"] == result["rows"]
