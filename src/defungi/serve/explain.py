"""Why the model decided: Grad-CAM (pytorch-grad-cam) on the feature map that the model's registry
entry names (every member of a cross-validated run)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn as nn

from defungi.models import model_entry
from defungi.models.ensemble import Ensemble
from defungi.report.plots import plot_explanation
from defungi.serve.predict import classify, decode, expand_paths
from defungi.serve.predictor import Predictor, torch_predictor

log = logging.getLogger(__name__)


def cam_layers(model: nn.Module, features: str) -> list[nn.Module]:
    """The layers whose activations and gradients Grad-CAM weighs: the module named features (the
    last 4-D feature map), of each member of an ensemble."""
    members = model.members if isinstance(model, Ensemble) else [model]
    return [member.get_submodule(features) for member in members]


def gradcam(model: Predictor, images: np.ndarray, targets: list[int]) -> np.ndarray:
    """Grad-CAM maps (N x H x W, 0..1 at the input size) of uint8 NHWC images for the target classes."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    trained = model.trained
    x = trained.preprocess.to_tensor(images, trained.device, channels_last=False)
    layers = cam_layers(trained.model, model_entry(trained.info["model_name"]).parts.features)
    with GradCAM(model=trained.model, target_layers=layers) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])


def overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """The map as a heat map over the image (uint8 RGB)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(image.astype(np.float32) / 255, cam, use_rgb=True, image_weight=0.55)


def explained(model: Predictor, files: list[Path], **decision: Any) -> list[dict[str, Any]]:
    """predict's rows, each classified one with its image and Grad-CAM overlay for the predicted class."""
    rows, pixels = decode(model, files)
    rows = classify(model, rows, pixels, **decision)
    done = [r for r in rows if "class" in r]
    if done:
        images = np.stack([pixels[r["path"]] for r in done])
        cams = gradcam(model, images, [model.classes.index(r["class"]) for r in done])
        for row, image, cam in zip(done, images, cams, strict=True):
            row |= {"image": image, "overlay": overlay(image, cam)}
    return rows


def explain(run_dir: str | Path, paths: list[str | Path], out: str | Path, **decision: Any) -> list[Path]:
    """One figure per classified image in out (image, Grad-CAM overlay; predicted and true class in
    the title). Images that cannot be classified are listed in the log, with the reason."""
    model = torch_predictor(run_dir)
    written: list[Path] = []
    seen: dict[str, int] = {}  # stems already written: files of one name in two folders get -2, -3
    for row in explained(model, expand_paths(paths), **decision):
        if "overlay" not in row:
            log.warning("%s: %s, not explained", row["path"], row.get("error") or row.get("status"))
            continue
        title = f"predicted {row['decision']} ({row['confidence']:.2f})  ·  true {row['label'] or 'unknown'}"
        stem = Path(row["path"]).stem
        seen[stem] = seen.get(stem, 0) + 1
        name = f"{stem}-{seen[stem]}.gradcam.png" if seen[stem] > 1 else f"{stem}.gradcam.png"
        written.append(
            plot_explanation(row["image"], row["overlay"], Path(out) / name, f"{Path(row['path']).name}\n{title}")
        )
    return written
