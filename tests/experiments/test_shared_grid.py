"""Several `defungi grid` workers (real processes) on one PostgreSQL-backed study."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest

from tests.conftest import SRC, tiny_args, write_folder
from tests.postgres import new_database

CELLS = ["--batch-sizes", "8,16", "--lrs", "1e-3,2e-3,4e-3"]  # 6 cells
TINY = tiny_args({"train.tta": False})  # --epochs after it wins


def _worker(data: Path, out: Path, url: str, epochs: int = 2) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "defungi", "grid", "--data", str(data), "--out", str(out), "--storage", url]
    cmd += [*CELLS, *TINY, "--epochs", str(epochs), "--heartbeat", "2"]  # stale after 8 s silent, on a loaded CI
    env = os.environ | {"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _fitted(out: Path) -> set[str]:
    """The cells whose run folder a worker finished."""
    return {p.parent.name for p in (out / "fits").glob("*/metrics.json")}


def _trials(url: str) -> list[optuna.trial.FrozenTrial]:
    (summary,) = optuna.get_all_study_summaries(url)
    return optuna.load_study(study_name=summary.study_name, storage=url).trials


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_folder(tmp_path / "data", samples_per_class=6, patches=3)


@pytest.mark.parametrize("workers", [2, 3])
def test_workers_share_one_grid_each_cell_fitted_once(postgres_server: str, data: Path, tmp_path: Path, workers: int):
    alone, shared = (new_database(postgres_server, f"g{uuid.uuid4().hex[:8]}") for _ in range(2))
    single = _worker(data, tmp_path / "alone", alone)
    assert single.wait(timeout=600) == 0, single.stderr.read()[-2000:]
    procs = [_worker(data, tmp_path / f"w{i}", shared) for i in range(workers)]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()[-2000:]
    fitted = [_fitted(tmp_path / f"w{i}") for i in range(workers)]
    assert sum(len(f) for f in fitted) == 6 and len(set().union(*fitted)) == 6  # every cell once, by one worker
    trials = _trials(shared)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 6 and len({tuple(sorted(t.params.items())) for t in complete}) == 6
    results = [
        json.loads((tmp_path / o / "grid.json").read_text()) for o in ("alone", *(f"w{i}" for i in range(workers)))
    ]
    scores = [[{k: v for k, v in row.items() if k != "train_seconds"} for row in r["rows"]] for r in results]
    assert all(s == scores[0] for s in scores) and len({r["best_val_f1"] for r in results}) == 1  # as one worker's


def test_a_worker_killed_mid_cell_has_its_cell_fitted_by_another(postgres_server: str, data: Path, tmp_path: Path):
    url = new_database(postgres_server, f"k{uuid.uuid4().hex[:8]}")
    victim, survivor = (_worker(data, tmp_path / name, url, epochs=6) for name in ("victim", "survivor"))
    deadline = time.time() + 300
    while not any((tmp_path / "victim" / "fits").glob("*/last.pt")):  # inside a cell, one epoch done
        assert time.time() < deadline and victim.poll() is None
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert survivor.wait(timeout=600) == 0, survivor.stderr.read()[-2000:]
    started = {p.parent.name for p in (tmp_path / "victim" / "fits").glob("*/last.pt")}
    killed_cells = started - _fitted(tmp_path / "victim")
    assert len(killed_cells) == 1 and killed_cells <= _fitted(tmp_path / "survivor")
    assert len(_fitted(tmp_path / "victim") | _fitted(tmp_path / "survivor")) == 6
    states = [t.state.name for t in _trials(url)]
    assert states.count("COMPLETE") == 6 and states.count("FAIL") == 1  # the stale trial, retried once
