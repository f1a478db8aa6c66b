"""Two commands on one run folder at once, as a lab's two terminals (or a script and the page) start
them: every pair of the lab's commands, and each command twice, either completes both with files that
read back whole, or refuses one in a line naming the holder; no traceback, and the run's own files
keep their fingerprints. And two cross-validations filling one feature cache at once."""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defungi.cli import main
from defungi.train.frozen import ENGINE_ENV
from tests.conftest import SRC, TinyRun, tiny_args, write_folder

pytestmark = pytest.mark.slow

# what serve does with an upload: the page's whole request path, in a process of its own
SERVE = """
import sys
from pathlib import Path
from fastapi.testclient import TestClient
from defungi.serve.predictor import torch_predictor
from defungi.serve.web import create_app
files = sorted(Path(sys.argv[2]).rglob("*.jpg"))[:4]
reply = TestClient(create_app(torch_predictor(sys.argv[1]))).post(
    "/api/predict", files=[("files", (f.name, f.read_bytes())) for f in files])
assert reply.status_code == 200 and len(reply.json()["images"]) == 4, reply.text
"""


def _command(name: str, run: Path, data: Path) -> list[str]:
    """The argv of one of the lab's commands on run (data: a labelled folder)."""
    cli = [sys.executable, "-m", "defungi"]
    images = [str(p) for p in sorted((data / "H2").iterdir())[:3]]
    return {
        "evaluate": [*cli, "evaluate", str(run), "--data", str(data)],
        "report": [*cli, "report", str(run)],
        "export": [*cli, "export", str(run)],
        "explain": [*cli, "explain", str(run), *images, "--out", str(run / "explain")],
        "predict": [*cli, "predict", str(run), str(data), "--by-sample", "--format", "json"],
        "serve": [sys.executable, "-c", SERVE, str(run), str(data)],
        "train --resume": [*cli, "train", "--resume", str(run)],
    }[name]


COMMANDS = ("evaluate", "report", "export", "explain", "predict", "serve", "train --resume")
TRAINED = ("config.json", "metrics.json", "history.csv", "split.csv", "best.pt", "last.pt", "ood.npz")


def _fingerprints(run: Path) -> dict[str, str]:
    """What training wrote into the run folder (its checkpoints, split and scores), by content."""
    found = [p for name in TRAINED for p in [run / name, *run.glob(f"fold-*/{name}"), *run.glob(f"member-*/{name}")]]
    found = [p for p in found if p.exists()]
    return {str(p.relative_to(run)): hashlib.sha1(p.read_bytes()).hexdigest() for p in found}


def _read_back(run: Path) -> list[str]:
    """Every file under run that does not read back whole (JSON, CSV, PNG, ONNX, HTML), and any
    temporary file left behind."""
    import onnx

    bad = []
    for path in (p for p in run.rglob("*") if p.is_file()):
        try:
            if path.name.startswith(".") and path.name != ".lock":
                raise ValueError("a temporary file left behind")
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".csv":
                list(csv.reader(path.open()))
            elif path.suffix == ".png":
                with Image.open(path) as image:
                    image.load()
            elif path.suffix == ".onnx":
                onnx.checker.check_model(onnx.load(str(path)))
            elif path.suffix == ".html" and not path.read_text().rstrip().endswith("</html>"):
                raise ValueError("cut short")
        except Exception as exc:  # noqa: BLE001 - any way of not reading back is a finding
            bad.append(f"{path.relative_to(run)}: {type(exc).__name__}: {exc}")
    return bad


def _outcome(name: str, done: subprocess.CompletedProcess) -> str:
    """'done', 'refused (holder named)', or what went wrong."""
    if "Traceback" in done.stderr:
        return f"{name}: traceback\n{done.stderr[-1500:]}"
    if done.returncode == 0:
        return "done"
    line = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    if done.returncode == 2 and line.startswith("defungi: error:") and "(pid " in line:
        return "refused (holder named)"
    return f"{name}: exit {done.returncode}: {line}"


def test_every_pair_of_commands_at_once_completes_or_refuses_naming_the_holder(
    tiny_run: TinyRun, tiny_run_copy: Path, capsys: pytest.CaptureFixture
):
    run, data = tiny_run_copy, tiny_run.data
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "DEFUNGI_CACHE": str(run.parent / "cache")}
    before, table, start = _fingerprints(run), [], time.perf_counter()
    for a, b in itertools.combinations_with_replacement(COMMANDS, 2):
        started = [
            subprocess.Popen(_command(n, run, data), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for n in (a, b)
        ]
        outcomes = []
        for name, process in zip((a, b), started, strict=True):
            out, err = process.communicate(timeout=600)
            outcomes.append(_outcome(name, subprocess.CompletedProcess(process.args, process.returncode, out, err)))
        table.append((a, b, *outcomes, _read_back(run), _fingerprints(run) == before))
    seconds = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n{len(table)} pairs side by side in {seconds:.0f} s")
        for a, b, first, second, bad, kept in table:
            print(f"  {a} + {b}: {first.splitlines()[0]} / {second.splitlines()[0]}; files read back: "
                  f"{'yes' if not bad else bad}; training's files kept: {'yes' if kept else 'NO'}")  # fmt: skip
    for a, b, first, second, bad, kept in table:
        assert {first, second} <= {"done", "refused (holder named)"}, (a, b, first, second)
        assert first == "done" or second == "done", (a, b)  # a refusal leaves the other to finish
        assert not bad and kept, (a, b, bad)


def test_two_cross_validations_filling_one_feature_cache_at_once_give_the_figures_of_one_alone(tmp_path: Path):
    import torch

    from defungi.models import create_model

    mixer = {"dim": 8, "depth": 2, "kernel_size": 3, "patch_size": 4}
    torch.save(create_model("convmixer", num_classes=1000, **mixer).state_dict(), tmp_path / "w.pt")
    data = write_folder(tmp_path / "data")
    over = {
        "train.model_args": mixer,
        "train.freeze_backbone": True,
        "data.normalize": "pretrained",
        "train.amp": False,
    }
    args = ["--cv", "2", "--weights", str(tmp_path / "w.pt"), *tiny_args(over)]
    # one engine for all three (each cache would time its own, and heads trained on the two engines'
    # features differ by more than float rounding: docs/history/measurements.md, "The lab's loop")
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "DEFUNGI_CACHE": str(tmp_path / "shared-cache")}
    env[ENGINE_ENV] = "torch"
    together = [
        subprocess.Popen(
            [sys.executable, "-m", "defungi", "train", "--data", str(data), "--out", str(tmp_path / f"cv{k}"), *args],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(2)
    ]
    for process in together:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0 and "Traceback" not in err, err[-2000:]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEFUNGI_CACHE", str(tmp_path / "own-cache"))
        mp.setenv(ENGINE_ENV, "torch")
        assert main(["train", "--data", str(data), "--out", str(tmp_path / "alone"), *args]) == 0

    def oof(run: str) -> np.ndarray:
        with open(tmp_path / run / "oof.csv") as fh:
            return np.array([[float(v) for k, v in r.items() if k.startswith("p_")] for r in csv.DictReader(fh)])

    assert np.array_equal(oof("cv0"), oof("cv1")) and np.allclose(oof("cv0"), oof("alone"), atol=1e-6)
    passes = [p for p in (tmp_path / "shared-cache" / "features").glob("*/*.keys.npy")]
    assert len({p.parent for p in passes}) == len(passes)  # each reading stored once: one CV computed, one waited
