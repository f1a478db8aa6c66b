"""Tiny generated DeFungi-like folders, so that tests are fast and need no real data, and the one
tiny recipe that every test that trains starts from."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from defungi.cli import main
from defungi.config import Config, load_config

CLASSES = ("H1", "H2", "H3")
REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "defungi"  # the real images, where CI has them

# THE tiny recipe: the smallest ConvMixer on 16 px images, 2 epochs of batches of 8 (config keys); a
# test changes what it is about through `over` (tiny_config, tiny_args), never a recipe of its own
TINY = {
    "data.image_size": 16,
    "train.model": "convmixer",
    "train.model_args": {"dim": 8, "depth": 1, "kernel_size": 3, "patch_size": 4},
    "train.epochs": 2,
    "train.batch_size": 8,
    "train.patience_epochs": 6,  # no early stop in a test's few epochs unless it asks (the quick profile's is 2)
}
# the tiny recipe with features rich enough to tell micrographs from other pictures, and a validation
# part large enough (>= 99 images) to set the refusal threshold (on 40 samples per class of 4 images)
RICHER = {
    "data.image_size": 32,
    "data.val_fraction": 0.25,
    "train.model_args": {"dim": 32, "depth": 2, "kernel_size": 3, "patch_size": 4},
    "train.epochs": 5,
    "train.amp": False,
}
FLAGS = {  # config keys that a training command takes as options of their own (a later one wins)
    "data.image_size": "--image-size",
    "train.model": "--model",
    "train.epochs": "--epochs",
    "train.batch_size": "--batch-size",
    "train.device": "--device",
}
SRC = Path(__file__).resolve().parents[1] / "src"  # for subprocesses: PYTHONPATH

# fits compute with a fixed number of threads in the tests: the count chosen by load
# (defungi.train.runtime.Threads) changes float rounding, and the tests compare runs bit for bit
os.environ.setdefault("DEFUNGI_THREADS", "2")


def free_port() -> int:
    """A loopback TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Test modules of parts whose library a machine may lack (the GPU check's has PyTorch, not these):
# left out there, and the header says which.
OPTIONAL = {
    "serve/test_web.py": "fastapi",
    "serve/test_export.py": "onnxruntime",
    "serve/test_explain.py": "pytorch_grad_cam",
    "experiments/test_curve_grid.py": "optuna",
    "experiments/test_shared_grid.py": "optuna",
    "experiments/test_studies.py": "optuna",
}
collect_ignore = [path for path, module in OPTIONAL.items() if importlib.util.find_spec(module) is None]


def pytest_report_header() -> str | None:
    return f"left out, their library missing: {', '.join(collect_ignore)}" if collect_ignore else None


def make_image(rng: np.random.Generator, cls: int, size: int = 40) -> Image.Image:
    """A textured image whose colour and pattern (stripes, checks, blocks) depend on the class."""
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.array([[200, 120, 120], [120, 200, 120], [120, 120, 200]][cls % 3], dtype=np.float32)
    px, py = rng.uniform(0, 2 * np.pi, 2)
    if cls % 3 == 0:
        pattern = np.sin(xx * 0.6 + px)
    elif cls % 3 == 1:
        pattern = np.sin(xx * 0.6 + px) * np.sin(yy * 0.6 + py) * 2
    else:
        pattern = np.kron(rng.uniform(-1, 1, (size // 8 + 1, size // 8 + 1)), np.ones((8, 8)))[:size, :size]
    blob = np.exp(
        -((xx - rng.uniform(0, size)) ** 2 + (yy - rng.uniform(0, size)) ** 2) / (size * 3)
    )  # makes every image distinct
    noise = rng.normal(0, 8, (size, size, 3))
    pixels = np.clip(base + 50 * pattern[..., None] + 60 * blob[..., None] + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def write_folder(
    root: Path,
    samples_per_class: int = 6,
    patches: int = 4,
    size: int = 40,
    classes: tuple[str, ...] = CLASSES,
    seed: int = 0,
) -> Path:
    """root/<class>/<class>_<sample>a_<patch>.jpg, with a blank (low-variance) image in the first class."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for s in range(samples_per_class):
            for p in range(patches):
                make_image(rng, c, size).save(folder / f"{name}_{s + 1}a_{p + 1}.jpg", quality=95)
    Image.new("RGB", (size, size), (128, 128, 128)).save(root / classes[0] / f"{classes[0]}_99a_1.jpg")
    return root


def tiny_config(data: Path, over: dict[str, Any] | None = None) -> Config:
    """The tiny recipe as a config on the folder data, with over (dotted keys) changed."""
    return load_config("quick", {"data.root": str(data), **TINY, **(over or {})})


def tiny_args(over: dict[str, Any] | None = None) -> list[str]:
    """The tiny recipe as options of `defungi train` (or grid, curve), with over changed: a key's own
    option where it has one (so that a later one on the command line still wins), else --set."""
    args = []
    for key, value in (TINY | (over or {})).items():
        text = value if isinstance(value, str) else json.dumps(value)
        args += [FLAGS[key], text] if key in FLAGS else ["--set", f"{key}={text}"]
    return args


@dataclass(frozen=True)
class TinyRun:
    """A finished run of the tiny recipe and the generated folder it was trained on."""

    data: Path
    run: Path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """The tiny recipe trained once per session, in fp32 wherever the tests run (as the ONNX
    comparison needs), for the tests that only read a trained run (tiny_run_copy for the others)."""
    root = tmp_path_factory.mktemp("tiny")
    data = write_folder(root / "data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEFUNGI_CACHE", str(root / "cache"))
        assert main(["train", "--data", str(data), "--out", str(root / "run"), *tiny_args({"train.amp": False})]) == 0
    return TinyRun(data, root / "run")


@pytest.fixture
def tiny_run_copy(tiny_run: TinyRun, tmp_path: Path) -> Path:
    """A copy of tiny_run's folder for a test that writes into it (evaluations, an exported model)."""
    return Path(shutil.copytree(tiny_run.run, tmp_path / "tiny-run"))


MIXER = {"dim": 8, "depth": 2, "kernel_size": 3, "patch_size": 4}  # a tiny ConvMixer's model_args


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    """A pretrained-like state dict for the tiny ConvMixer (a 1000-class head, as ImageNet's)."""
    import torch

    from defungi.models import create_model

    torch.manual_seed(0)
    torch.save(create_model("convmixer", num_classes=1000, **MIXER).state_dict(), tmp_path / "w.pt")
    return tmp_path / "w.pt"


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    """A three-class folder of small generated images."""
    return write_folder(tmp_path / "data")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep decoded-image caches inside the test's temporary folder."""
    monkeypatch.setenv("DEFUNGI_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DEFUNGI_DATA", raising=False)


def nothing_decoded(cache: Path) -> bool:
    """Whether the user cache holds no rows: a refused `train` leaves none (the decoding it started while
    it loaded, data.cache.decoding_ahead, stopped and dropped)."""
    return not list(cache.rglob("*.npy"))


def fails_on_call(real: Callable[..., Any], n: int, exc: type[BaseException] = KeyboardInterrupt) -> Callable[..., Any]:
    """real, except that its n-th call raises exc (an interruption at a chosen point)."""
    calls = []

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == n:
            raise exc
        return real(*args, **kwargs)

    return wrapped


@pytest.fixture(scope="session")
def postgres_server() -> Any:
    """The URL of a PostgreSQL server started for this test session (skipped without one)."""
    from tests.postgres import postgres, server_bin

    if server_bin() is None:
        pytest.skip("no PostgreSQL server or psycopg (make test installs Debian's postgresql package)")
    with postgres() as url:
        yield url
