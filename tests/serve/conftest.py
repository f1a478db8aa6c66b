"""One tiny trained run shared by the serve tests (training it takes a few seconds)."""

from pathlib import Path

import pytest

from defungi.cli import main
from tests.conftest import TINY_MODEL, write_folder

TINY = ["--image-size", "16", "--epochs", "2", "--batch-size", "8", *TINY_MODEL]
TINY += ["--set", "train.amp=false"]  # fp32 wherever the tests run, as the ONNX comparison needs


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder trained on generated images (module-wide: the tests only read it)."""
    root = tmp_path_factory.mktemp("served")
    mp = pytest.MonkeyPatch()
    mp.setenv("DEFUNGI_CACHE", str(root / "cache"))
    try:
        assert main(["train", "--data", str(write_folder(root / "data")), "--out", str(root / "run"), *TINY]) == 0
    finally:
        mp.undo()
    return root / "run"
