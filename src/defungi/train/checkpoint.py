"""Rebuild a trained model from its run folder alone (self-describing checkpoints)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from defungi.config import Config, config_from_dict
from defungi.errors import DefungiError
from defungi.models import create_model
from defungi.models.ensemble import Ensemble
from defungi.train.loop import Preprocess, prior_weights
from defungi.utils import resolve_device


@dataclass
class TrainedModel:
    """A model in eval mode with everything needed to feed it and read its output."""

    model: nn.Module
    preprocess: Preprocess
    classes: list[str]
    config: Config
    device: torch.device
    info: dict[str, Any]
    class_prior: list[float] | None = None

    def class_weights(self, power: float | None = None) -> np.ndarray | None:
        """Probability weights for the decision (power: as trained when None; 0 switches them off)."""
        return prior_weights(self.class_prior, self.config.train.prior_weight if power is None else power)


def _load_checkpoint(path: Path, dev: torch.device) -> dict[str, Any]:
    """A checkpoint's contents (weights_only), or a clear error."""
    try:
        return torch.load(path, map_location=dev, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise DefungiError(f"{path}: unreadable checkpoint ({type(exc).__name__}); train again") from None


def _ensemble_size(run_dir: Path) -> int:
    """How many members the run folder's config asks for (1 without a config)."""
    saved = run_dir / "config.json"
    return json.loads(saved.read_text()).get("train", {}).get("ensemble", 1) if saved.exists() else 1


def load_trained(run_dir: str | Path, device: str = "auto", which: str = "best.pt") -> TrainedModel:
    """Load run_dir/best.pt (weights_only) and rebuild the model it describes.

    A run trained as an ensemble (train.ensemble > 1) has one checkpoint per member
    (run_dir/member-K/best.pt): they are loaded as one model that averages their probabilities.
    """
    path = Path(run_dir) / which
    member_paths = [] if path.exists() else sorted(Path(run_dir).glob(f"member-*/{which}"))
    if not path.exists() and not member_paths:
        raise DefungiError(f"{path}: no checkpoint; train first with 'defungi train --out {run_dir}'")
    expected = _ensemble_size(Path(run_dir))
    if member_paths and len(member_paths) != expected:
        raise DefungiError(f"{run_dir}: an ensemble of {expected} with {len(member_paths)} trained members; finish it with 'defungi train --resume {run_dir}'")
    dev = resolve_device(device)
    states = [_load_checkpoint(p, dev) for p in member_paths or [path]]
    models = []
    for state in states:
        model = create_model(state["model_name"], num_classes=len(state["classes"]), **state["model_args"])
        model.load_state_dict(state["state_dict"])
        models.append(model)
    model = models[0] if len(models) == 1 else Ensemble(models)
    model.to(dev, memory_format=torch.channels_last).eval()
    state = states[0]  # members share classes, preprocessing and class shares (one training part)
    pre = state["preprocess"]
    info = {k: state[k] for k in ("model_name", "model_args", "epoch", "best_metric")} | {"members": len(states)}
    return TrainedModel(model, Preprocess(pre["image_size"], tuple(pre["mean"]), tuple(pre["std"]), pre["normalize"]), state["classes"], config_from_dict(state["config"]), dev, info, state.get("class_prior"))
