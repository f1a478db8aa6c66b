"""The bad-input corpus, second round (issue 26): every config key bounded, every file of a run
folder checked, every output path checked first, images bounded by what they decode to, names and
folders that are not what they seem. Each case is one line (exit 2) and no traceback, or a listed
skip. With DEFUNGI_CORPUS=FILE each case is recorded as in test_bad_inputs."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from defungi.config import RULES
from tests.test_bad_inputs import _cli, _train

Check = Callable[[str, list[Any], str], None]


@pytest.fixture
def refused(capsys: pytest.CaptureFixture) -> Iterator[Check]:
    """check(case, argv, needle): exit 2, the last line of stderr holds needle and says 'defungi',
    and no traceback was printed; every case runs, the test fails at the end listing the misses."""
    misses = []

    def check(case: str, argv: list[Any], needle: str) -> None:
        code, line, _ = _cli(case, argv, capsys)
        if not (code == 2 and needle in line and line.startswith("defungi")):
            misses.append((case, code, line))

    yield check
    assert not misses, misses


# ---- 3. every config key bounded, before any work ------------------------------------------------

WHERE_CHECKED = {"profile": "unknown profile", "data.root": "no such file", "train.weights": "no such file"}


def _bad_value(key: str) -> list[str]:
    """Options that give key its rule's refused value."""
    value = RULES[key].refused
    if key == "profile":
        return ["--profile", value]
    if key == "data.root":
        return ["--data", value]
    text = value if isinstance(value, str) else json.dumps(value)
    return ["--set", f"{key}={text}"]


@pytest.mark.parametrize("key", list(RULES))
def test_every_config_key_refuses_a_value_out_of_its_range(key: str, tiny_data: Path, tmp_path: Path, refused):
    needle = WHERE_CHECKED.get(key, f"config key '{key}'")
    refused(f"config {key}={RULES[key].refused}", _train(tiny_data, tmp_path / "run", *_bad_value(key)), needle)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


OPTION_CASES = {
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
def test_the_issue_s_options_are_refused_before_any_work(case: str, tiny_data: Path, tmp_path: Path, refused):
    extra, needle = OPTION_CASES[case]
    refused(case, _train(tiny_data, tmp_path / "run", *extra), needle)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_a_profile_that_is_not_toml_is_one_line(tiny_data: Path, tmp_path: Path, refused):
    (tmp_path / "bad.toml").write_text("[train\nlr = ")
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00")
    for name in ("bad.toml", "binary.toml"):
        argv = _train(tiny_data, tmp_path / "run", "--profile", tmp_path / name)
        refused(f"profile {name}", argv, f"{name}: not a valid TOML profile")


def test_a_fit_whose_loss_is_not_finite_stops_naming_the_epoch(
    tiny_data: Path, tmp_path: Path, refused, monkeypatch: pytest.MonkeyPatch
):
    from defungi.experiments import fit as fit_module

    real = fit_module.train_one_epoch
    monkeypatch.setattr(fit_module, "train_one_epoch", lambda *a, **k: real(*a, **k) | {"loss": float("nan")})
    refused("training loss NaN", _train(tiny_data, tmp_path / "run"), "the training loss became nan in epoch 1")
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_calibration_of_nan_probabilities_does_not_crash():
    import numpy as np

    from defungi.train.metrics import calibration

    probs = np.full((4, 3), np.nan)
    assert calibration(probs, np.array([0, 1, 2, 0]))["count"][0] == 4
