"""torchrun + DDP on the CPU (gloo): two real processes on generated images."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from defungi.cli import main
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
    a, b = (json.loads((r / "metrics.json").read_text())["test"] for r in (whole, killed))
    assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}


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
