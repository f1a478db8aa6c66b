"""fit() without the CLI: an interrupted fit resumes to the uninterrupted result, on images and on a
frozen backbone's cached output; the cached path scales its loss; the fit meets its Sync at fixed points."""

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from defungi.config import Config, load_config
from defungi.data.dataset import Dataset, load_dataset
from defungi.errors import DefungiError
from defungi.experiments import fit as fit_module
from defungi.experiments.fit import FitResult, fit
from defungi.experiments.protocols import split_for
from defungi.experiments.rundir import RunDir
from defungi.results.schema import to_dict
from defungi.stats.metrics import weighted
from defungi.train import distributed
from defungi.train import loop as loop_module
from defungi.train.checkpoint import load_trained
from defungi.train.frozen import FrozenPass
from defungi.train.sources import frozen_features
from tests.conftest import MIXER, fails_on_call

FROZEN = {"train.freeze_backbone": True, "data.normalize": "pretrained"}
KINDS = {
    "images": {"train.mix": "mixup", "train.augment": "strong"},
    "frozen head": FROZEN,
    "frozen from blocks.1, 2 views": FROZEN | {"train.train_from": "blocks.1", "train.cached_views": 2},
}


def _config(data: Path, weights: Path, **over: Any) -> Config:
    values = {
        "data.root": str(data),
        "data.image_size": 16,
        "train.model": "convmixer",
        "train.model_args": json.dumps(MIXER),
        "train.weights": str(weights),
        "train.epochs": 3,
        "train.batch_size": 8,
        "train.lr": 5e-3,
        "train.ema_decay": 0.9,  # the weight average resumes too
        "train.tta": False,
        "train.device": "cpu",
    }
    return load_config("quick", values | over)


def _fit(config: Config, data: Dataset, out: Path, sync: distributed.Sync | None = None) -> FitResult:
    run = RunDir(out)
    run.prepare()
    run.claim(config)
    return fit(config, data, split_for(config, data), run, sync)


def _history(result: FitResult) -> list[dict[str, float]]:
    return [{k: v for k, v in to_dict(row).items() if k not in ("seconds", "images_per_s")} for row in result.history]


@pytest.mark.parametrize("kind", KINDS)
def test_an_interrupted_fit_resumes_to_the_uninterrupted_result(
    kind: str, tiny_data: Path, weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    config = _config(tiny_data, weights, **KINDS[kind])
    data = load_dataset(tiny_data, 16, config.data.variance_threshold, progress=False)
    whole = _fit(config, data, tmp_path / "whole")
    real = fit_module.train_one_epoch
    monkeypatch.setattr(fit_module, "train_one_epoch", fails_on_call(real, 2))  # dies in the second epoch
    with pytest.raises(KeyboardInterrupt):
        _fit(config, data, tmp_path / "run")
    if kind == "images":  # checkpointed every epoch; a head on cached features only at its end (seconds)
        assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 0
    else:
        assert not (tmp_path / "run" / "last.pt").exists()
    monkeypatch.setattr(fit_module, "train_one_epoch", real)
    resumed = _fit(config, data, tmp_path / "run")
    assert len(resumed.history) == 3 and _history(resumed) == _history(whole)
    assert resumed.metrics["test"]["f1"] == whole.metrics["test"]["f1"]
    assert all(np.array_equal(resumed.probabilities[p], whole.probabilities[p]) for p in whole.probabilities)
    a, b = (torch.load(tmp_path / r / "last.pt", weights_only=True) for r in ("whole", "run"))
    for key in ("state_dict", "train_state_dict"):
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key]), key
    if kind != "images":  # what the frozen backbone holds is the file's; what follows it trained
        start = torch.load(weights, weights_only=True)
        frozen = ("stem.", "blocks.0.") if "blocks.1" in kind else ("stem.", "blocks.")
        for name, value in b["train_state_dict"].items():
            if name.endswith(("weight", "bias")) and not name.startswith("head."):
                assert torch.equal(value, start[name]) == name.startswith(frozen), name


def test_the_cached_path_scales_its_loss_where_autocast_computes_in_fp16(
    tiny_data: Path, weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # as on a GPU without bf16: the fit turns its loss scaler on (the CPU still computes in fp32)
    monkeypatch.setattr(loop_module, "autocast_dtype", lambda device, enabled: torch.float16)
    monkeypatch.setattr(loop_module, "autocast", lambda device, enabled: contextlib.nullcontext())
    scaled = []
    real = torch.amp.GradScaler.scale
    monkeypatch.setattr(torch.amp.GradScaler, "scale", lambda self, loss: scaled.append(1) or real(self, loss))
    config = _config(tiny_data, weights, **FROZEN)
    data = load_dataset(tiny_data, 16, config.data.variance_threshold, progress=False)
    result = _fit(config, data, tmp_path / "run")
    steps = len(split_for(config, data)["train"]) // config.train.batch_size
    assert len(scaled) == 3 * steps and result.history[-1].train_loss < result.history[0].train_loss
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["scaler"]["scale"] > 0  # resumes scaled


def test_frozen_features_are_the_cache_a_frozen_fit_trained_on(
    tiny_data: Path, weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """frozen_features reads the fit's cached head inputs (computing nothing) in the data's order: the
    head the fit trained gives its test probabilities from them."""
    config = _config(tiny_data, weights, **FROZEN)
    data = load_dataset(tiny_data, 16, config.data.variance_threshold, progress=False)
    result = _fit(config, data, tmp_path / "run")
    monkeypatch.setattr(FrozenPass, "run", fails_on_call(FrozenPass.run, 1, AssertionError))
    features = frozen_features(config, data)
    assert features.shape[0] == len(data.labels)
    trained = load_trained(tmp_path / "run", "cpu")
    head = trained.model.combine  # the head alone on the frozen trunk's output
    test = split_for(config, data)["test"]
    with torch.no_grad():
        probs = torch.softmax(head(torch.from_numpy(np.asarray(features[test]))), 1).numpy()
    assert np.allclose(weighted(probs, trained.class_weights()), result.probabilities["test"], atol=1e-5)
    with pytest.raises(DefungiError, match="freeze_backbone"):
        frozen_features(_config(tiny_data, weights), data)


class RecordingSync(distributed.Sync):
    """A world of one process that records where the fit meets it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def start(self, saved: Any = None) -> distributed.Start:
        self.calls.append("start")
        return super().start(saved)

    def epoch(self, stats: dict[str, float], row: Any) -> dict[str, float]:
        self.calls.append("epoch")
        return super().epoch(stats, row)

    def end(self, result: Any) -> Any:
        self.calls.append("end")
        return super().end(result)


def test_a_fit_meets_its_sync_at_the_start_every_epoch_and_the_end_even_when_it_stops_early(
    tiny_data: Path, weights: Path, tmp_path: Path
):
    # next to no learning: no epoch improves on the first, and patience ends the fit after the second
    config = _config(
        tiny_data, weights, **{"train.lr": 1e-9, "train.patience_epochs": 1, "train.min_epochs": 0, "train.epochs": 5}
    )
    data = load_dataset(tiny_data, 16, config.data.variance_threshold, progress=False)
    sync = RecordingSync()
    result = _fit(config, data, tmp_path / "run", sync)
    assert result.stop_reason.startswith("no improvement") and len(result.history) == 2
    assert sync.calls == ["start", "epoch", "epoch", "end"]
    again = RecordingSync()  # the stopped fit's last.pt: nothing left to train, still one start and one end
    assert _fit(config, data, tmp_path / "run", again).history == result.history
    assert again.calls == ["start", "end"]
