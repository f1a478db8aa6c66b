import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from defungi.errors import DefungiError
from defungi.experiments import fit as fit_module
from defungi.experiments.protocols import fit_run
from defungi.jobs import evaluate_job, train_job
from defungi.models.ensemble import Ensemble
from defungi.results.run import read_evaluation, read_run_metrics
from defungi.serve.evaluate import evaluate_folder
from defungi.train.checkpoint import load_trained
from defungi.train.loop import predict_proba
from tests.conftest import fails_on_call, tiny_config, write_folder

# the tiny recipe, wider and longer: these tests ask the fit to learn (test macro-F1 over 0.5)
LEARNS = {
    "data.image_size": 24,
    "train.model_args": {"dim": 16, "depth": 1, "kernel_size": 3, "patch_size": 4},
    "train.epochs": 6,
    "train.batch_size": 16,
    "train.lr": 5e-3,
    "train.ema_decay": 0,
}


def _config(data: Path, **over):
    return tiny_config(data, LEARNS | over)


def test_run_folder_holds_everything_and_checkpoint_loads_weights_only(tiny_data: Path, tmp_path: Path):
    out = tmp_path / "run"
    metrics = train_job(_config(tiny_data), out).metrics
    for name in (
        "config.json",
        "split.csv",
        "metrics.json",
        "history.csv",
        "training_curves.png",
        "confusion_test.png",
        "excluded.csv",
        "excluded.png",
        "best.pt",
        "last.pt",
    ):
        assert (out / name).exists(), name
    assert metrics.part("test").f1 > 0.5 and metrics.part("test").n > 0
    assert metrics.protocol.split == "grouped" and metrics.protocol.excluded == 1
    assert metrics.kind == "fit" and metrics.schema_version == 1 and len(metrics.best_epochs) == 1
    state = torch.load(out / "best.pt", weights_only=True)
    assert state["classes"] == ["H1", "H2", "H3"] and state["model_args"]["dim"] == 16
    assert len((out / "history.csv").read_text().splitlines()) == 1 + 6


def test_interrupted_run_resumes_from_last_epoch(tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    config = _config(tiny_data, **{"train.epochs": 4, "train.ema_decay": 0.9})  # the weight average resumes too
    fit_run(config, tmp_path / "uninterrupted")
    real = fit_module.train_one_epoch
    monkeypatch.setattr(fit_module, "train_one_epoch", fails_on_call(real, 3))  # dies in the third epoch
    with pytest.raises(KeyboardInterrupt):
        fit_run(config, tmp_path / "run")
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(fit_module, "train_one_epoch", real)
    fit_run(config, tmp_path / "run")
    resumed = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert len(resumed) == 5
    first = (tmp_path / "uninterrupted" / "history.csv").read_text().splitlines()
    col = first[0].split(",").index("train_loss")
    # same seeds per epoch: the resumed run continues the same trajectory
    assert [r.split(",")[col][:6] for r in resumed[1:]] == [r.split(",")[col][:6] for r in first[1:]]
    val = first[0].split(",").index("val_loss")
    assert [r.split(",")[val][:6] for r in resumed[1:]] == [r.split(",")[val][:6] for r in first[1:]]


def test_changed_config_in_same_folder_is_refused(tiny_data: Path, tmp_path: Path):
    fit_run(_config(tiny_data, **{"train.epochs": 1}), tmp_path / "run")
    with pytest.raises(DefungiError, match="another config"):
        fit_run(_config(tiny_data, **{"train.epochs": 2}), tmp_path / "run")


def test_evaluate_on_unseen_folder(tiny_data: Path, tmp_path: Path):
    fit_run(_config(tiny_data), tmp_path / "run")
    unseen = write_folder(tmp_path / "unseen", samples_per_class=2, patches=2, seed=7)
    evaluation, folder = evaluate_job(tmp_path / "run", unseen, None, None, None)
    assert evaluation.scores.n == 3 * 2 * 2
    assert read_evaluation(folder / "metrics.json") == evaluation
    assert (folder / "confusion.png").exists()
    assert evaluation.prior_weight == 0.5


@pytest.mark.parametrize(("amp", "precision"), [(False, "float32"), (True, "bfloat16")])
def test_run_records_the_precision_it_computed_in(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, amp: bool, precision: str
):
    monkeypatch.setattr("defungi.train.loop.cpu_has_native_bf16", lambda: True)
    metrics = fit_run(_config(tiny_data, **{"train.epochs": 1, "train.amp": amp}), tmp_path / "run").metrics
    assert metrics.protocol.precision == precision and np.isfinite(metrics.part("test").loss)


def test_checkpoint_keeps_the_training_class_shares_for_the_decision(tiny_data: Path, tmp_path: Path):
    fit_run(_config(tiny_data, **{"train.epochs": 1}), tmp_path / "run")
    trained = load_trained(tmp_path / "run")
    assert trained.class_prior is not None and abs(sum(trained.class_prior) - 1) < 1e-9
    assert np.allclose(trained.class_weights(), np.sqrt(trained.class_prior))
    assert trained.class_weights(0) is None
    unbalanced = _config(tiny_data, **{"train.epochs": 1, "train.balance": False})
    metrics = fit_run(unbalanced, tmp_path / "plain").metrics
    assert load_trained(tmp_path / "plain").class_weights() is None and metrics.protocol.prior_weight == 0


def test_ensemble_run_scores_the_mean_of_its_seeded_members_and_resumes(tiny_data: Path, tmp_path: Path):
    config = _config(tiny_data, **{"train.epochs": 2, "train.ensemble": 2, "train.tta": False})
    out = tmp_path / "run"
    metrics = train_job(config, out).metrics
    assert metrics.protocol.ensemble == 2 and [m.seed for m in metrics.members] == [0, 1]
    assert metrics.kind == "ensemble" and len(metrics.best_epochs) == 2
    assert (out / "training_curves.png").exists() and (out / "confusion_test.png").exists()
    member_configs = [json.loads((out / f"member-{k}" / "config.json").read_text())["train"] for k in (0, 1)]
    assert [(c["seed"], c["ensemble"]) for c in member_configs] == [(0, 1), (1, 1)]
    # the ensemble's probabilities are the mean of its members' (each a run folder of its own)
    ensemble, members = load_trained(out), [load_trained(out / f"member-{k}") for k in (0, 1)]
    assert isinstance(ensemble.model, Ensemble) and ensemble.info["members"] == 2
    images = np.random.default_rng(0).integers(0, 256, (5, 24, 24, 3), dtype=np.uint8)
    mean = np.mean([predict_proba(t.model, images, t.preprocess, t.device) for t in members], axis=0)
    assert np.allclose(predict_proba(ensemble.model, images, ensemble.preprocess, ensemble.device), mean, atol=1e-5)
    assert metrics.parameters == 2 * read_run_metrics(out / "member-0" / "metrics.json").parameters
    # interrupted before the second member: the first one is read back, not trained again
    first = (out / "member-0" / "best.pt").stat().st_mtime_ns
    (out / "metrics.json").unlink()
    shutil.rmtree(out / "member-1")
    with pytest.raises(DefungiError, match="1 of its 2 models are trained"):
        load_trained(out)
    again = fit_run(config, out).metrics
    assert (out / "member-0" / "best.pt").stat().st_mtime_ns == first
    assert (out / "member-1" / "best.pt").exists() and again.part("test").f1 == pytest.approx(metrics.part("test").f1)
    assert evaluate_folder(out, tiny_data)[0].scores.n > 0


def test_finished_run_is_read_back_without_training(tiny_data: Path, tmp_path: Path):
    config = _config(tiny_data, **{"train.epochs": 1})
    first = fit_run(config, tmp_path / "run")
    stamp = (tmp_path / "run" / "best.pt").stat().st_mtime_ns
    again = fit_run(config, tmp_path / "run")
    assert again.metrics == first.metrics and again.history == first.history
    assert (tmp_path / "run" / "best.pt").stat().st_mtime_ns == stamp


def test_restore_best_false_scores_the_last_epoch(tiny_data: Path, tmp_path: Path):
    config = _config(tiny_data, **{"train.epochs": 3, "train.restore_best": False, "train.tta": False})
    record = fit_run(config, tmp_path / "run")
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    # the validation score is the last epoch's, as its history row says, not the best epoch's
    assert record.score("val") == pytest.approx(record.history[-1].val_f1)
    assert last["epoch"] == 2
    assert load_trained(tmp_path / "run").info["epoch"] == 2  # evaluate/predict load the weights that were scored
