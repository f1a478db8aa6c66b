"""Rebuild a trained model from its run folder alone (self-describing checkpoints)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from defungi.config import Config, config_from_dict
from defungi.errors import DefungiError
from defungi.models import create_model
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


def load_trained(run_dir: str | Path, device: str = "auto", which: str = "best.pt") -> TrainedModel:
    """Load run_dir/best.pt (weights_only) and rebuild the model it describes."""
    path = Path(run_dir) / which
    if not path.exists():
        raise DefungiError(f"{path}: no checkpoint; train first with 'defungi train --out {run_dir}'")
    dev = resolve_device(device)
    try:
        state = torch.load(path, map_location=dev, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise DefungiError(f"{path}: unreadable checkpoint ({type(exc).__name__}); train again") from None
    model = create_model(state["model_name"], num_classes=len(state["classes"]), **state["model_args"])
    model.load_state_dict(state["state_dict"])
    model.to(dev, memory_format=torch.channels_last).eval()
    pre = state["preprocess"]
    info = {k: state[k] for k in ("model_name", "model_args", "epoch", "best_metric")}
    return TrainedModel(model, Preprocess(pre["image_size"], tuple(pre["mean"]), tuple(pre["std"]), pre["normalize"]), state["classes"], config_from_dict(state["config"]), dev, info, state.get("class_prior"))
