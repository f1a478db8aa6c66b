"""The bad-input corpus: every case is answered with one line (exit 2) or a listed skip, before any
work it would waste, and leaves nothing half-written behind.

With DEFUNGI_CORPUS=FILE each case appends its exit code and last stderr line to FILE (JSON lines),
which is how the table in the issue's closing note is made, before and after a change.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from defungi.cli import main
from defungi.data import cache as cache_module
from defungi.data.cache import decode_images
from defungi.data.dataset import load_dataset
from defungi.data.scan import scan
from defungi.experiments.rundir import RunDir
from defungi.results.run import read_run_metrics
from tests.conftest import TinyRun, make_image, nothing_decoded, tiny_args, write_folder

TINY = tiny_args({"train.epochs": 1})


def _cli(case: str, argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Run the CLI in-process: its exit code, the last line it wrote to stderr and its stdout (with
    DEFUNGI_CORPUS, the case's code and line, or the exception that escaped, are recorded)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        code = int(exc.code or 0)
    except Exception as exc:  # a traceback: recorded, and a failure of the case
        code, line = -1, f"traceback: {type(exc).__name__}: {exc}".splitlines()[0]
        _record(case, code, line)
        return code, line, capsys.readouterr().out
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    line = lines[-1] if lines else ""
    _record(case, code, line)
    return code, line, captured.out


def _record(case: str, code: int | str, message: str) -> None:
    if os.environ.get("DEFUNGI_CORPUS"):
        with open(os.environ["DEFUNGI_CORPUS"], "a") as fh:
            fh.write(json.dumps({"case": case, "code": code, "message": message[:200]}) + "\n")


@pytest.fixture
def refused(capsys: pytest.CaptureFixture) -> Iterator[Callable[[str, list[Any], str], None]]:
    """check(case, argv, needle): the command must exit 2 with one line holding needle. Every case of
    a test is run; the test fails at the end with all the cases that were not answered so."""
    misses = []

    def check(case: str, argv: list[Any], needle: str) -> None:
        code, line, _ = _cli(case, argv, capsys)
        if not (code == 2 and needle in line and line.startswith(("defungi: error:", "defungi "))):
            misses.append((case, code, line))

    yield check
    assert not misses, misses


def _train(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), *TINY, *extra]


# ---- options: refused before any decoding --------------------------------------------------------

OPTION_CASES = {
    "epochs 0": (["--epochs", "0"], "'train.epochs' is 0"),
    "epochs -2": (["--epochs", "-2"], "'train.epochs' is -2"),
    "batch size 0": (["--batch-size", "0"], "'train.batch_size' is 0"),
    "batch size -4": (["--batch-size", "-4"], "'train.batch_size' is -4"),
    "lr -0.001": (["--lr", "-0.001"], "'train.lr' is -0.001"),
    "lr nan": (["--lr", "nan"], "'train.lr' is nan"),
    "image size 0": (["--image-size", "0"], "'data.image_size' is 0"),
    "image size -5": (["--image-size", "-5"], "'data.image_size' is -5"),
    "image size 1": (["--image-size", "1"], "'data.image_size' is 1; use 16 px to 1024 px"),
    "model_args not JSON": (["--set", "train.model_args=notjson"], "'train.model_args' wants a dict"),
    "test_fraction 1": (["--set", "data.test_fraction=1"], "'data.test_fraction' is 1"),
    "val_fraction 0": (["--set", "data.val_fraction=0"], "'data.val_fraction' is 0"),
    "prior_weight 2": (["--set", "train.prior_weight=2"], "'train.prior_weight' is 2"),
    "device tpu": (["--device", "tpu"], "'train.device' is 'tpu'"),
    "--weights missing": (["--weights", "nowhere.pt"], "--weights nowhere.pt: no such file"),
    "frozen backbone from scratch": (["--set", "train.freeze_backbone=true"], "add --pretrained or --weights"),
    "cached_views 9": (["--set", "train.cached_views=9"], "'train.cached_views' is 9"),
    "train_from unfrozen": (["--set", "train.train_from=blocks.5"], "add --set train.freeze_backbone=true"),
    # issue 26: every key bounded (the walk over all of them: test_hostile_inputs.py)
    "--image-size 100000": (["--image-size", "100000"], "'data.image_size' is 100000"),
    "--seed -1": (["--seed", "-1"], "'data.seed' is -1"),
    "model_args dim -1": (["--set", 'train.model_args={"dim": -1}'], "'train.model_args' is"),
    "model_args dim 0": (["--set", 'train.model_args={"dim": 0}'], "bad arguments for model 'convmixer'"),
    "model_args unknown": (["--set", 'train.model_args={"wings": 2}'], "unexpected keyword argument 'wings'"),
    "unknown model": (["--model", "nosuchnet"], "unknown model 'nosuchnet'"),
    "warmup_fraction 2": (["--set", "train.warmup_fraction=2"], "'train.warmup_fraction' is 2"),
    "label_smoothing 2": (["--set", "train.label_smoothing=2"], "'train.label_smoothing' is 2"),
    "mix_alpha 0 with mixup": (["--set", "train.mix=mixup", "--set", "train.mix_alpha=0"], "'train.mix_alpha' is 0"),
    "weight_decay -1": (["--set", "train.weight_decay=-1"], "'train.weight_decay' is -1"),
    "ema_decay 2": (["--set", "train.ema_decay=2"], "'train.ema_decay' is 2"),
    "lr inf": (["--lr", "inf"], "'train.lr' is inf"),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_bad_options_are_one_line_before_any_decoding(case: str, tiny_data: Path, tmp_path: Path, refused):
    extra, needle = OPTION_CASES[case]
    refused(case, _train(tiny_data, tmp_path / "run", *extra), needle)
    assert nothing_decoded(tmp_path / "cache") and not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu(tiny_data: Path, tmp_path: Path, refused):
    refused("device cuda, no GPU", _train(tiny_data, tmp_path / "run", "--device", "cuda"), "no such CUDA GPU")
    assert nothing_decoded(tmp_path / "cache")


def test_output_folder_is_checked_before_decoding(tiny_data: Path, tmp_path: Path, refused):
    (tmp_path / "file").write_text("x")
    refused("--out an existing file", _train(tiny_data, tmp_path / "file"), "is a file; give a folder path")
    refused("--out under a file", _train(tiny_data, tmp_path / "file" / "run"), "file is a file")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        refused("--out unwritable", _train(tiny_data, locked / "run"), "is not writable")
    assert nothing_decoded(tmp_path / "cache")


def test_a_batch_larger_than_the_training_part_is_refused_and_the_corrected_command_runs(
    tiny_data: Path, tmp_path: Path, refused, capsys
):
    run = tmp_path / "run"
    refused("batch size 100000", _train(tiny_data, run, "--batch-size", "100000"), "larger than the training")
    assert not (run / "last.pt").exists()
    code, _, _ = _cli("corrected command into the same --out", _train(tiny_data, run, "--batch-size", "8"), capsys)
    assert code == 0 and (run / "metrics.json").exists()
    cv = tmp_path / "cv"
    refused("batch size 100000, --cv 2", _train(tiny_data, cv, "--batch-size", "100000", "--cv", "2"), "larger than")
    code, _, _ = _cli("corrected --cv command into the same --out", _train(tiny_data, cv, "--cv", "2"), capsys)
    assert code == 0 and (cv / "oof.csv").exists()


def test_grid_and_predict_options(tiny_run: TinyRun, tmp_path: Path, refused):
    data, run = tiny_run.data, tiny_run.run  # every case is refused before it writes
    grid = ["grid", "--data", data, "--out", tmp_path / "g", *TINY]
    refused("grid --batch-sizes 0", [*grid, "--batch-sizes", "0"], "use a batch size from 1")
    refused("grid --storage notaurl", [*grid, "--storage", "notaurl"], "not a usable database URL")
    refused("predict --prior-weight nan", ["predict", run, data / "H1", "--prior-weight", "nan"], "0 (balanced")
    evaluate = ["evaluate", run, "--data", data]
    refused("evaluate --prior-weight 2", [*evaluate, "--prior-weight", "2"], "0 (balanced")
    (tmp_path / "file").write_text("x")
    refused("evaluate --out an existing file", [*evaluate, "--out", tmp_path / "file"], "is a file")


# ---- resume: the same run, the same data ---------------------------------------------------------


def test_resume_takes_no_options(tiny_run: TinyRun, refused):
    argv = ["train", "--resume", tiny_run.run, "--epochs", "7", "--lr", "0.5"]
    refused("--resume with --epochs --lr", argv, "drop --epochs, --lr")


def _interrupted(data: Path, run: Path) -> None:
    """A run stopped after its last epoch, before scoring (metrics.json missing)."""
    assert main(_train(data, run)) == 0
    (run / "metrics.json").unlink()


def test_resume_refuses_changed_data_naming_the_difference(tmp_path: Path, refused):
    data = write_folder(tmp_path / "data", samples_per_class=5, patches=3)
    run = tmp_path / "run"
    _interrupted(data, run)
    split_before = (run / "split.csv").read_text()
    make_image(np.random.default_rng(7), 0).save(data / "H1" / "H1_50a_1.jpg")
    refused("resume after an image was added", ["train", "--resume", run], "1 added (e.g. ")
    (data / "H1" / "H1_50a_1.jpg").unlink()
    write_folder(tmp_path / "more", samples_per_class=3, patches=3, classes=("H1", "H2", "H3", "H5"))
    shutil.copytree(tmp_path / "more" / "H5", data / "H5")
    refused("resume after a class folder was added", ["train", "--resume", run], "added")
    assert (run / "split.csv").read_text() == split_before  # nothing overwritten


def test_kill_9_mid_fit_resumes_to_the_uninterrupted_result(tmp_path: Path, capsys):
    data = write_folder(tmp_path / "data", samples_per_class=5, patches=3)
    three = ["--epochs", "3"]
    assert main(_train(data, tmp_path / "whole", *three)) == 0
    killer = """
import os, signal, sys
from defungi.experiments.rundir import RunDir
real, calls = RunDir.save_last, []
def save_last(self, *args):
    real(self, *args)
    calls.append(1)
    if len(calls) == 2:  # killed right after the second epoch's last.pt
        os.kill(os.getpid(), signal.SIGKILL)
RunDir.save_last = save_last
from defungi.cli import main
sys.exit(main(sys.argv[1:]))
"""
    argv = [str(a) for a in _train(data, tmp_path / "killed", *three)]
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-c", killer, *argv], env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (tmp_path / "killed" / "metrics.json").exists()
    assert main(["train", "--resume", str(tmp_path / "killed")]) == 0
    whole, resumed = (read_run_metrics(tmp_path / r / "metrics.json").part("test") for r in ("whole", "killed"))
    assert replace(resumed, seconds=None) == replace(whole, seconds=None)


# ---- locks ----------------------------------------------------------------------------------------


def test_a_run_folder_in_use_is_refused_naming_the_holder(tiny_data: Path, tmp_path: Path, refused):
    run = RunDir(tmp_path / "run")
    with run.lock():
        refused("the same --out twice at once", _train(tiny_data, run.root), f"(pid {os.getpid()})")


def test_two_decodes_of_one_cache_entry_wait_for_each_other(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    records = scan(tiny_data)
    calls, real = [], cache_module._Decoding
    monkeypatch.setattr(cache_module, "_Decoding", lambda *a: calls.append(1) or real(*a))
    results: list[np.ndarray] = []
    threads = [
        threading.Thread(target=lambda: results.append(np.asarray(decode_images(records, 16, progress=False).images)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and np.array_equal(results[0], results[1]) and calls == [1]  # one decoded, one waited
    (entry,) = (tmp_path / "cache" / "decoded").iterdir()
    fields = sorted(p.name.split(".", 1)[1] for p in entry.iterdir() if not p.name.startswith("."))
    assert fields == ["ahash.npy", "error.npy", "keys.npy", "pixels.npy", "variance.npy"]  # one shard, whole


# ---- files and folders ----------------------------------------------------------------------------


def test_an_image_over_the_pixel_limit_is_skipped_and_listed(
    tiny_data: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
):
    # PIL refuses images over twice Image.MAX_IMAGE_PIXELS; a lowered limit stands in for a 20000 x 20000 file
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)
    Image.new("L", (300, 300), 128).save(tiny_data / "H1" / "H1_908a_1.png")
    code, _, _ = _cli("image over PIL's pixel limit (train)", _train(tiny_data, tmp_path / "run"), capsys)
    excluded = (tmp_path / "run" / "excluded.csv").read_text()
    assert code == 0 and "H1_908a_1.png" in excluded and "DecompressionBombError" in excluded
    argv = ["predict", tmp_path / "run", tiny_data / "H1"]
    code, _, out = _cli("image over PIL's pixel limit (predict)", argv, capsys)
    assert code == 0 and "unreadable image (DecompressionBombError)" in out and out.count("H1_") >= 5


def _zip(folder: Path, path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(folder.parent))
    return path


def _corrupt_member(path: Path) -> None:
    """Flip bytes inside the first member's compressed data (the zip directory stays valid)."""
    with zipfile.ZipFile(path) as zf:
        info = zf.infolist()[0]
    raw = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start : start + 16] = bytes(16)
    path.write_bytes(bytes(raw))


def test_corrupt_zips_are_one_line_and_leave_no_temp_folder(tiny_data: Path, tmp_path: Path, refused):
    bad = _zip(tiny_data, tmp_path / "bad.zip")
    _corrupt_member(bad)
    refused("zip with a corrupt member", _train(bad, tmp_path / "r1"), "bad.zip: not a readable .zip")
    inner = tmp_path / "wrap"
    inner.mkdir()
    shutil.copy(bad, inner / "inner.zip")
    outer = _zip(inner, tmp_path / "outer.zip")
    refused("zip holding a corrupt zip", _train(outer, tmp_path / "r2"), "outer.zip: not a readable .zip")
    assert not list((tmp_path / "cache" / "unpacked").iterdir())


def test_a_folder_with_two_trees_of_classes_is_refused(tmp_path: Path, refused):
    write_folder(tmp_path / "top" / "defungi")
    write_folder(tmp_path / "top" / "old", classes=("H1", "H2"))
    refused("two trees (defungi/, old/)", _train(tmp_path / "top", tmp_path / "run"), "several trees")


def test_split_errors_name_the_class(tmp_path: Path, refused):
    data = write_folder(tmp_path / "data", samples_per_class=5, patches=2)
    for f in (data / "H3").glob("H3_[345]a_*.jpg"):
        f.unlink()
    refused("grouped split, a class of 2 samples", _train(data, tmp_path / "r1"), "class H3 has 2 samples")
    for f in (data / "H3").glob("H3_2a_*.jpg"):
        f.unlink()
    argv = _train(data, tmp_path / "r2", "--split", "random")
    refused("random split, a class of 2 images", argv, "class H3 has 2 images")


def test_a_class_with_no_usable_image_refuses_training(tiny_data: Path, tmp_path: Path, refused):
    for f in (tiny_data / "H3").iterdir():
        f.write_bytes(b"not an image")
    refused("a class whose files are all unreadable", _train(tiny_data, tmp_path / "run"), "class H3 has no")


def test_one_class_evaluation_folder_scores_the_classes_present(tiny_run_copy: Path, tmp_path: Path, capsys):
    run = tiny_run_copy  # evaluate writes into RUN/evaluations
    one = write_folder(tmp_path / "one", samples_per_class=2, patches=2, classes=("H2",), seed=3)
    (one / "H2" / "H2_99a_1.jpg").unlink()
    code, _, out = _cli("evaluate on a one-class folder", ["evaluate", run, "--data", one, "--json"], capsys)
    metrics = json.loads(out)
    assert code == 0 and metrics["scores"]["absent_classes"] == ["H1", "H3"] and metrics["scores"]["n"] == 4


def test_evaluations_of_two_folders_with_one_name_are_kept_apart(tiny_run_copy: Path, tmp_path: Path, capsys):
    run = tiny_run_copy
    for parent in ("a", "b"):
        folder = write_folder(tmp_path / parent / "base", samples_per_class=1, patches=2, seed=ord(parent))
        assert main(["evaluate", str(run), "--data", str(folder)]) == 0
    capsys.readouterr()
    made = sorted(p.name for p in (run / "evaluations").iterdir() if p.name.startswith("base"))
    assert len(made) == 2 and made[0] == "base"


def test_a_near_blank_16_bit_image_is_excluded_like_its_8_bit_twin(tmp_path: Path):
    data = write_folder(tmp_path / "data", samples_per_class=3, patches=2)
    noise = np.random.default_rng(0).normal(0, 1, (40, 40))
    Image.fromarray((128 + noise).astype(np.uint8)).save(data / "H2" / "H2_80a_1.png")
    Image.fromarray(((128 + noise) * 257).astype(np.uint16)).save(data / "H2" / "H2_81a_1.png")
    excluded = {Path(e["path"]).name for e in load_dataset(data, 16, 15.0, progress=False).excluded}
    assert {"H2_80a_1.png", "H2_81a_1.png"} <= excluded
