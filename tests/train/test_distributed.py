"""torchrun + DDP on the CPU (gloo): two real processes on generated images."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from defungi.cli import main
from defungi.results.run import read_run_metrics
from defungi.train import distributed
from tests.conftest import SRC, free_port, tiny_args, write_folder

TINY = tiny_args({"train.epochs": 4, "train.device": "cpu"})

# Each rank records what it opens for writing, creates, renames or deletes under the run folder;
# rank 0 kills itself (SIGKILL) after its KILL_AFTER-th last.pt when that is set.
LAUNCHER = """
import atexit, json, os, signal, sys
run, log = os.path.abspath(sys.argv[1]), sys.argv[2]
writes = []
def inside(path):
    path = os.path.abspath(os.fsdecode(path))
    return path == run or path.startswith(run + os.sep)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path, mode, flags = os.fsdecode(args[0]), args[1] or "", args[2] or 0
        if (any(c in mode for c in "wax+") or flags & WRITE_FLAGS) and inside(path):
            writes.append(path)
    elif event in ("os.rename", "os.replace", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree"):
        if inside(args[0]):
            writes.append(f"{event} {args[0]}")
rank = os.environ["RANK"]
atexit.register(lambda: open(f"{log}.{rank}", "w").write(json.dumps(writes)))
if os.environ.get("KILL_AFTER") and rank == "0":
    from defungi.experiments.rundir import RunDir
    real, calls = RunDir.save_last, []
    def save_last(self, *args):
        real(self, *args)
        calls.append(1)
        if len(calls) == int(os.environ["KILL_AFTER"]):
            os.kill(os.getpid(), signal.SIGKILL)
    RunDir.save_last = save_last
sys.addaudithook(hook)
from defungi.cli import main
sys.exit(main(sys.argv[3:]))
"""


def torchrun(tmp_path: Path, run: Path, argv: list[str], **env: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2` of the launcher above, for `defungi argv`."""
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    cmd += ["--master-port", str(free_port()), str(launcher), str(run), str(tmp_path / f"{run.name}.writes"), *argv]
    environ = os.environ | {"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"} | env
    return subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=600)


def test_shards_of_the_ranks_make_up_one_process_batches(monkeypatch: pytest.MonkeyPatch):
    order = np.arange(50)
    parts = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        parts.append(distributed.shard(order, 8).reshape(-1, 4))
    together = np.concatenate(parts, axis=1).ravel()
    assert np.array_equal(together, order[:48])  # 6 global batches of 8, each half on one rank


def _meet(rank: int, port: int, out: str, rank_0_fits: bool) -> None:
    """One of two processes meeting at a Sync as a fit and train()'s follower do (mp.spawn's target)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    distributed.setup(torch.device("cpu"))
    sync, seen = distributed.Sync(), {}

    def only_rank_0(value: object) -> object:
        assert rank == 0, "rank 0 alone reads the run folder, validates and scores"
        return value

    if rank == 0:
        start = sync.start((lambda: only_rank_0({"epoch": 3})) if rank_0_fits else None)
    else:
        heard = sync.start()  # the follower hears the start before it loads the data ...
        start = sync.start(lambda: only_rank_0(None))  # ... and its fit meets the same start again
        seen["same start"] = heard == start
    seen["start"] = list(start)
    if start.trains:
        stats = {"loss": rank + 1.0, "accuracy": rank / 2, "images": 10 * (rank + 1), "seconds": rank + 1.0}
        seen["row"] = sync.epoch(stats, lambda s: only_rank_0(s | {"val_f1": 0.5}))
        seen["end"] = sync.end(lambda: only_rank_0("scored"))
    Path(out, f"{rank}.json").write_text(json.dumps(seen))
    distributed.teardown()


@pytest.mark.parametrize("rank_0_fits", [True, False])
def test_the_ranks_meet_at_the_same_points_and_hear_rank_0(rank_0_fits: bool, tmp_path: Path):
    ranks = mp.spawn(_meet, args=(free_port(), str(tmp_path), rank_0_fits), nprocs=2, join=False)
    deadline = time.monotonic() + 300
    while not ranks.join(timeout=5):  # False until both have ended (an error in one is raised here)
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("the two ranks did not finish meeting within 5 minutes (a deadlock)")
    seen = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert seen[1]["same start"] and seen[0]["start"] == seen[1]["start"]
    if not rank_0_fits:  # e.g. the run is finished: nobody fits
        assert seen[0]["start"] == [False, None] and "row" not in seen[1]
        return
    assert seen[1]["start"] == [True, {"epoch": 3}]  # rank 0's resume state, on every rank
    row = {"loss": (10 + 2 * 20) / 30, "accuracy": 20 * 0.5 / 30, "images": 30, "seconds": 2.0, "val_f1": 0.5}
    assert seen[0]["row"] == seen[1]["row"] == pytest.approx(row)  # stats over both ranks, rank 0's validation
    assert seen[0]["end"] == "scored" and seen[1]["end"] is None


def test_two_gloo_processes_train_like_one_and_only_rank_0_writes(tmp_path: Path):
    data = write_folder(tmp_path / "data", samples_per_class=8, patches=4)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", "--data", str(data), "--out", str(one), *TINY]) == 0
    done = torchrun(tmp_path, two, ["train", "--data", str(data), "--out", str(two), *TINY])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run folder:") == 1  # rank 0 reports
    single, ddp = (json.loads((r / "metrics.json").read_text()) for r in (one, two))
    assert ddp["protocol"]["processes"] == 2 and single["protocol"]["processes"] == 1

    def schema(d: dict) -> object:
        return {k: schema(v) for k, v in d.items()} if isinstance(d, dict) else type(d).__name__

    assert schema(ddp) == schema(single)
    loss = [
        [float(line.split(",")[2]) for line in (r / "history.csv").read_text().splitlines()[1:]] for r in (one, two)
    ]
    assert len(loss[0]) == len(loss[1]) == 4 and max(abs(a - b) for a, b in zip(*loss, strict=True)) < 0.1
    writes = [json.loads((tmp_path / f"two.writes.{rank}").read_text()) for rank in (0, 1)]
    assert writes[0] and writes[1] == []  # rank 1 trained without writing into the run folder


def test_a_killed_distributed_fit_resumes_to_the_uninterrupted_result(tmp_path: Path):
    data = write_folder(tmp_path / "data", samples_per_class=6, patches=3)
    argv = ["train", "--data", str(data), *TINY]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert torchrun(tmp_path, whole, [*argv, "--out", str(whole)]).returncode == 0
    interrupted = torchrun(tmp_path, killed, [*argv, "--out", str(killed)], KILL_AFTER="2")
    assert interrupted.returncode != 0 and f"exitcode  : -{int(signal.SIGKILL)}" in interrupted.stderr
    assert not (killed / "metrics.json").exists() and (killed / "last.pt").exists()
    resumed = torchrun(tmp_path, killed, ["train", "--resume", str(killed)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (read_run_metrics(r / "metrics.json").part("test") for r in (whole, killed))
    assert replace(a, seconds=None) == replace(b, seconds=None)


def test_torchrun_refuses_what_it_cannot_split(tmp_path: Path):
    data = write_folder(tmp_path / "data", samples_per_class=4, patches=2)
    odd = torchrun(
        tmp_path,
        tmp_path / "odd",
        ["train", "--data", str(data), "--out", str(tmp_path / "odd"), *TINY, "--batch-size", "7"],
    )
    assert odd.returncode != 0 and "batch size 7 does not split evenly over 2 processes" in odd.stderr
    cv = torchrun(tmp_path, tmp_path / "cv", ["grid", "--data", str(data), "--out", str(tmp_path / "cv")])
    assert cv.returncode != 0 and "torchrun runs 'defungi train' only" in cv.stderr
