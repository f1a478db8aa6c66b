import json
from pathlib import Path

import numpy as np
import pytest
import torch

from defungi.config import load_config
from defungi.errors import DefungiError
from defungi.experiments import fit as fit_module
from defungi.experiments.run import evaluate_run, train_run
from defungi.train.checkpoint import load_trained
from tests.conftest import write_folder


def _config(data: Path, **over):
    values = {"data.root": str(data), "data.image_size": 24, "train.model": "convmixer", "train.model_args": '{"dim": 16, "depth": 1, "kernel_size": 3, "patch_size": 4}', "train.epochs": 6, "train.batch_size": 16, "train.lr": 5e-3, "train.ema_decay": 0}
    return load_config("quick", values | over)


def test_run_folder_holds_everything_and_checkpoint_loads_weights_only(tiny_data: Path, tmp_path: Path):
    out = tmp_path / "run"
    metrics = train_run(_config(tiny_data), out, progress=False)
    for name in ("config.json", "split.csv", "metrics.json", "history.csv", "training_curves.png", "confusion_test.png", "excluded.csv", "excluded.png", "best.pt", "last.pt"):
        assert (out / name).exists(), name
    assert metrics["test"]["f1"] > 0.5 and metrics["test"]["n"] > 0
    assert metrics["protocol"]["split"] == "grouped" and metrics["protocol"]["excluded"] == 1
    state = torch.load(out / "best.pt", weights_only=True)
    assert state["classes"] == ["H1", "H2", "H3"] and state["model_args"]["dim"] == 16
    assert len((out / "history.csv").read_text().splitlines()) == 1 + 6


def test_interrupted_run_resumes_from_last_epoch(tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    config = _config(tiny_data, **{"train.epochs": 4, "train.ema_decay": 0.9})  # the weight average resumes too
    train_run(config, tmp_path / "uninterrupted", progress=False)
    real = fit_module.train_one_epoch
    calls = []

    def dies_in_third_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(fit_module, "train_one_epoch", dies_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_run(config, tmp_path / "run", progress=False)
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(fit_module, "train_one_epoch", real)
    train_run(config, tmp_path / "run", progress=False)
    resumed = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert len(resumed) == 5
    first = (tmp_path / "uninterrupted" / "history.csv").read_text().splitlines()
    col = first[0].split(",").index("train_loss")
    # same seeds per epoch: the resumed run continues the same trajectory
    assert [r.split(",")[col][:6] for r in resumed[1:]] == [r.split(",")[col][:6] for r in first[1:]]
    val = first[0].split(",").index("val_loss")
    assert [r.split(",")[val][:6] for r in resumed[1:]] == [r.split(",")[val][:6] for r in first[1:]]


def test_changed_config_in_same_folder_is_refused(tiny_data: Path, tmp_path: Path):
    train_run(_config(tiny_data, **{"train.epochs": 1}), tmp_path / "run", progress=False)
    with pytest.raises(DefungiError, match="another config"):
        train_run(_config(tiny_data, **{"train.epochs": 2}), tmp_path / "run", progress=False)


def test_evaluate_on_unseen_folder(tiny_data: Path, tmp_path: Path):
    train_run(_config(tiny_data), tmp_path / "run", progress=False)
    unseen = write_folder(tmp_path / "unseen", samples_per_class=2, patches=2, seed=7)
    metrics = evaluate_run(tmp_path / "run", unseen)
    assert metrics["n"] == 3 * 2 * 2
    assert json.loads((Path(metrics["out_dir"]) / "metrics.json").read_text())["n"] == metrics["n"]
    assert (Path(metrics["out_dir"]) / "confusion.png").exists()
    assert metrics["prior_weight"] == 0.5


@pytest.mark.parametrize(("amp", "precision"), [(False, "float32"), (True, "bfloat16")])
def test_run_records_the_precision_it_computed_in(tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, amp: bool, precision: str):
    monkeypatch.setattr("defungi.train.loop.cpu_has_native_bf16", lambda: True)
    metrics = train_run(_config(tiny_data, **{"train.epochs": 1, "train.amp": amp}), tmp_path / "run", progress=False)
    assert metrics["protocol"]["precision"] == precision and np.isfinite(metrics["test"]["loss"])


def test_checkpoint_keeps_the_training_class_shares_for_the_decision(tiny_data: Path, tmp_path: Path):
    train_run(_config(tiny_data, **{"train.epochs": 1}), tmp_path / "run", progress=False)
    trained = load_trained(tmp_path / "run")
    assert trained.class_prior is not None and abs(sum(trained.class_prior) - 1) < 1e-9
    assert np.allclose(trained.class_weights(), np.sqrt(trained.class_prior))
    assert trained.class_weights(0) is None
    unbalanced = _config(tiny_data, **{"train.epochs": 1, "train.balance": False})
    metrics = train_run(unbalanced, tmp_path / "plain", progress=False)
    assert load_trained(tmp_path / "plain").class_weights() is None and metrics["protocol"]["prior_weight"] == 0
