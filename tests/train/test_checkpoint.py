"""A trained model from its files: the checkpoint schema both ways, which run folders make a run's model,
and the model loaded from a run folder answering as its weights do."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from defungi.config import load_config
from defungi.errors import DefungiError
from defungi.layout import RunLayout
from defungi.models import create_model
from defungi.models.ensemble import Ensemble
from defungi.results.run import read_run_metrics
from defungi.train import checkpoint
from defungi.train.checkpoint import (
    checkpoint_of,
    load_checkpoint,
    load_checkpoints,
    load_trained,
    model_args,
    model_parts,
    read_config,
)
from defungi.train.loop import Preprocess, predict_proba
from tests.conftest import TINY, TinyRun


@pytest.mark.parametrize(
    ("over", "parts"),
    [
        ({}, ["."]),
        ({"train.ensemble": 3}, ["member-0", "member-1", "member-2"]),
        ({"data.cv_folds": 3}, ["fold-0", "fold-1", "fold-2"]),
        ({"data.cv_folds": 3, "data.cv_fit_folds": 2}, ["fold-0", "fold-1"]),
        (
            {"data.cv_folds": 3, "data.cv_fit_folds": 2, "train.ensemble": 2},
            ["fold-0/member-0", "fold-0/member-1", "fold-1/member-0", "fold-1/member-1"],
        ),
    ],
)
def test_a_runs_model_is_its_members_or_its_folds_by_its_config(over: dict, parts: list[str], tmp_path: Path):
    run = RunLayout(tmp_path)
    assert [str(p.root.relative_to(tmp_path)) for p in model_parts(load_config("quick", over), run)] == parts


def test_a_checkpoint_reads_back_what_was_written_and_refuses_another_version(tmp_path: Path):
    config = load_config("quick", TINY)
    model = create_model("convmixer", num_classes=3, **model_args(config))
    written = checkpoint_of(
        model, config, ["a", "b", "c"], Preprocess(16, (0.5, 0.4, 0.3), (0.2, 0.2, 0.1)), [0.2, 0.3, 0.5], 4, 0.75
    )
    torch.save(written, tmp_path / "best.pt")
    read = load_checkpoint(tmp_path / "best.pt", torch.device("cpu"))
    weights, read_weights = written.pop("state_dict"), read.pop("state_dict")
    assert read == written and all(torch.equal(read_weights[k], v) for k, v in weights.items())
    torch.save(written | {"schema_version": 99, "state_dict": weights}, tmp_path / "other.pt")
    with pytest.raises(DefungiError, match="other.pt.*schema_version 99"):
        load_checkpoint(tmp_path / "other.pt", torch.device("cpu"))


def test_a_run_folder_loads_the_model_its_checkpoint_holds(tiny_run: TinyRun, tmp_path: Path):
    """The tiny run's model answers as its best.pt's weights rebuilt by hand; a cross-validation whose
    two folds are that run answers as it does (the mean of two equal models)."""
    trained = load_trained(tiny_run.run, "cpu")
    state = torch.load(tiny_run.run / "best.pt", weights_only=True)
    by_hand = create_model(state["model_name"], num_classes=len(state["classes"]), **state["model_args"])
    by_hand.load_state_dict(state["state_dict"])
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    answers = predict_proba(trained.model, images, trained.preprocess, trained.device)
    assert np.array_equal(answers, predict_proba(by_hand.eval(), images, trained.preprocess, trained.device))
    assert trained.classes == state["classes"] and trained.config == read_config(tiny_run.run / "config.json")
    assert np.array_equal(answers, predict_proba(load_checkpoints([tiny_run.run / "best.pt"], "cpu").model, images,
                                                 trained.preprocess, trained.device))  # fmt: skip
    cv = tmp_path / "cv"
    for k in (0, 1):
        shutil.copytree(tiny_run.run, cv / f"fold-{k}")
    config = json.loads((tiny_run.run / "config.json").read_text())
    (cv / "config.json").write_text(json.dumps(config | {"data": config["data"] | {"cv_folds": 2}}))
    folds = load_trained(cv, "cpu")
    assert isinstance(folds.model, Ensemble) and folds.info["members"] == 2
    assert np.allclose(predict_proba(folds.model, images, folds.preprocess, folds.device), answers, atol=1e-6)
    shutil.rmtree(cv / "fold-1")
    with pytest.raises(DefungiError, match="1 of its 2 models are trained"):
        load_trained(cv, "cpu")


def test_a_run_without_a_refusal_detector_says_why(
    tiny_run: TinyRun, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    def why(run: Path) -> str:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="defungi"):
            assert load_trained(run).detectors is None
        (line,) = [r.getMessage() for r in caplog.records if "no refusal detector" in r.getMessage()]
        return line

    val = read_run_metrics(tiny_run.run / "metrics.json").protocol.sizes["val"]
    assert val < 99
    assert f"it has no refusal detector ({val} validation images are too few to fit one (99 needed))" in why(
        tiny_run.run
    )
    monkeypatch.setattr(checkpoint, "held_out_needed", lambda: val)  # enough images: only an older defungi fitted none
    assert "(trained before defungi refused non-micrographs)" in why(tiny_run.run)
    copy = Path(shutil.copytree(tiny_run.run, tmp_path / "run"))
    state = torch.load(copy / "best.pt", weights_only=True)
    state["config"]["train"]["ood"] = False
    torch.save(state, copy / "best.pt")
    assert "(trained without one: train.ood = false)" in why(copy)
