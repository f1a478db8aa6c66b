"""Why the model decided: class activation maps (pytorch-grad-cam) of a chosen class, on the feature
maps that the model's registry entry names (every member of a cross-validated run), and how much of
a map lies in the image's border ring (where a microscope's vignetted corners are)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch.nn as nn

from defungi.errors import DefungiError
from defungi.models import model_entry
from defungi.models.ensemble import members
from defungi.report.plots import plot_explanation
from defungi.results.answers import ImageAnswer
from defungi.serve.predict import Answers, classify, decode, expand_paths, probability_table
from defungi.serve.predictor import Predictor, Scores, torch_predictor
from defungi.stats.metrics import prior_weights, temper, weighted

if TYPE_CHECKING:
    from defungi.train.checkpoint import TrainedModel

log = logging.getLogger(__name__)

BORDER = 0.15  # the border ring: the outer 15% of the image's side on every edge
# map kind -> (pytorch-grad-cam method, the registry's part it reads). HiResCAM (each cell's gradient
# times activation, summed over channels) on the finer map: over 300 out-of-fold images of the
# transfer profile it found what the model uses best (benchmarks/gradcam_border.py's deletion gap
# 0.24, paired +0.03 over Layer-CAM and +0.12 over Grad-CAM on the 7 x 7 map, both beyond noise)
MAPS = {
    "fine": ("HiResCAM", "fine_features"),
    "coarse": ("GradCAM", "features"),
}
SHOWN = "fine"  # the map figures and the page show


def cam_layers(model: nn.Module, module: str) -> list[nn.Module]:
    """The layers whose activations and gradients a map weighs: the named module, of each member of
    an ensemble."""
    return [member.get_submodule(module) for member in members(model)]


def map_source(model_name: str, kind: str) -> tuple[str, str]:
    """The pytorch-grad-cam method of a map kind and the module it reads for this model."""
    method, part = MAPS[kind]
    return method, getattr(model_entry(model_name).parts, part)


def class_maps(trained: TrainedModel, images: np.ndarray, targets: Sequence[int], kind: str = SHOWN) -> np.ndarray:
    """Maps (N x H x W, 0..1 at the input size) of uint8 NHWC images for the target classes: 'coarse'
    on the last feature map, 'fine' on the registry's finer one."""
    return cam_maps(trained, images, targets, *map_source(trained.info["model_name"], kind))


def cam_maps(trained: TrainedModel, images: np.ndarray, targets: Sequence[int], method: str, module: str) -> np.ndarray:
    """Maps of a pytorch-grad-cam method (by class name: GradCAM, LayerCAM, ...) on the named module."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x = trained.preprocess.to_tensor(images, trained.device, channels_last=False)
    layers = cam_layers(trained.model, module)
    with getattr(pytorch_grad_cam, method)(model=trained.model, target_layers=layers) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])


def border_ring(size: int, fraction: float = BORDER) -> np.ndarray:
    """size x size booleans: True on the pixels within fraction of the side from an edge."""
    centre = np.arange(size) + 0.5
    edge = np.minimum(centre, size - centre)
    return np.minimum.outer(edge, edge) < fraction * size


def border_share(maps: np.ndarray, fraction: float = BORDER) -> np.ndarray:
    """Per map (N x S x S) the share of its mass in the border ring; a uniform map gives the ring's
    share of the area (0.51 for 15%), a map that points at the centre ~0, one on the corners ~1."""
    ring = border_ring(maps.shape[-1], fraction)
    total = maps.sum((-2, -1))
    return np.divide(maps[..., ring].sum(-1), total, out=np.full(total.shape, np.nan), where=total > 0)


def overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """The map as a heat map over the image (uint8 RGB)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(image.astype(np.float32) / 255, cam, use_rgb=True, image_weight=0.55)


def class_index(model: Predictor, name: str) -> int:
    """The index of a class the model knows; a one-line error naming them otherwise."""
    if name not in model.classes:
        raise DefungiError(f"unknown class '{name}'; this model's classes are {', '.join(model.classes)}")
    return model.classes.index(name)


@contextlib.contextmanager
def _gradients_from(model: nn.Module, layers: list[nn.Module]) -> Iterator[None]:
    """While entered, the model's forward passes record gradients from the layers' outputs on only: no
    weight needs one (maps differentiate the class score by the activations), so the backward pass
    stops at the map's layer instead of running back to the image. Registered before the CAM's own
    hooks, so that they see the output that records."""
    wanted = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    handles = [layer.register_forward_hook(lambda _m, _i, out: out.detach().requires_grad_()) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for p, want in zip(model.parameters(), wanted, strict=True):
            p.requires_grad_(want)


def one_pass(
    trained: TrainedModel, images: np.ndarray, choose: Callable[[np.ndarray], list[int]], kind: str = SHOWN
) -> tuple[Scores, np.ndarray, list[int]]:
    """One forward pass of the model on uint8 NHWC images, gradients kept: the probabilities and
    refusal scores that answers read, the classes choose(probabilities) picks, and each image's map
    of its class's evidence (a pytorch-grad-cam method, as class_maps)."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    method, module = map_source(trained.info["model_name"], kind)
    x = trained.preprocess.to_tensor(images, trained.device, channels_last=True)
    hooks, layers = trained.ood_hooks(), cam_layers(trained.model, module)
    with _gradients_from(trained.model, layers), getattr(pytorch_grad_cam, method)(trained.model, layers) as cam:
        with hooks if hooks is not None else contextlib.nullcontext():
            outputs = cam.activations_and_grads(x)
        probs = outputs.detach().float().softmax(dim=1).cpu().numpy()
        chosen = choose(probs)
        targets = [ClassifierOutputTarget(t) for t in chosen]
        sum(t(o) for t, o in zip(targets, outputs, strict=True)).backward(retain_graph=True)
        maps = cam.aggregate_multi_layers(cam.compute_cam_per_layer(x, targets, False))
    ood = hooks.images().detach().cpu().numpy() if hooks is not None else None
    return Scores(probs, ood), maps, chosen


@dataclass
class Explained:
    """An image's answer with what explains it: its pixels at the model's input size where it decoded and,
    where it was classified, the map of the explained class's evidence, the map over the image, the class
    explained and its calibrated probability."""

    answer: ImageAnswer
    image: np.ndarray | None = None
    map: np.ndarray | None = None
    overlay: np.ndarray | None = None
    explained: str | None = None
    explained_probability: float | None = None


def explained(
    model: Predictor,
    files: list[Path],
    target: str | None = None,
    tta: bool | None = None,
    prior_weight: float | None = None,
    answers: Answers | None = None,
) -> list[Explained]:
    """predict's answers, each decoded one with its image and each classified one with the class explained
    (target, else the predicted one) with its calibrated probability, its map and the map's overlay: the answers and
    the maps from one forward pass per image (test-time augmentation's other views aside)."""
    fixed = None if target is None else class_index(model, target)
    rows, decoded = decode(model.inputs, files)
    if not decoded.paths:
        return [Explained(r) for r in rows]
    images = decoded.images
    power = model.prior_weight if prior_weight is None else prior_weight

    def choose(probs: np.ndarray) -> list[int]:
        decided = weighted(probs, prior_weights(model.class_prior, power)).argmax(1)
        return [int(c) if fixed is None else fixed for c in decided]

    computed, maps, targets = one_pass(model.trained, images, choose)
    views = model.tta if tta is None else tta
    rows = classify(model, rows, decoded, tta, prior_weight, answers, None if views else computed)
    at = {path: k for k, path in enumerate(decoded.paths)}
    result = []
    for row in rows:
        if row.class_ is None:  # refused as not a fungus micrograph: its pixels are shown all the same
            result.append(Explained(row, images[at[row.path]] if row.path in at else None))
            continue
        k = at[row.path]
        t = targets[k] if fixed is not None or not views else model.classes.index(row.class_)
        if t != targets[k]:  # test-time augmentation decided another class than the first view
            maps[k] = class_maps(model.trained, images[k : k + 1], [t])[0]
        p = temper(probability_table([row], model.classes), model.temperature())[0]
        overlaid = overlay(images[k], maps[k])
        result.append(Explained(row, images[k], maps[k], overlaid, model.classes[t], float(p[t])))
    return result


def figure_title(shown: Explained) -> str:
    """What a figure explains: the file, the class and its calibrated probability, the decision (its
    calibrated confidence beside the model's probability), the truth."""
    row = shown.answer
    said = f"calibrated confidence {row.confidence:.2f}, probability {row.probability:.2f}"
    said = f"predicted {row.decision} ({said})  ·  true {row.label or 'unknown'}"
    why = f"evidence for {shown.explained} (calibrated probability {shown.explained_probability:.2f})"
    return f"{Path(row.path).name}: {why}\n{said}"


def explain(
    run_dir: str | Path, paths: list[str | Path], out: str | Path, target: str | None = None, **decision: Any
) -> list[Path]:
    """One figure per classified image in out (the image, the map of target's evidence, else the
    predicted class's, over it and alone). Images that cannot be classified are listed in the log,
    with the reason."""
    model = torch_predictor(run_dir)
    written: list[Path] = []
    seen: dict[str, int] = {}  # stems already written: files of one name in two folders get -2, -3
    area = float(border_ring(model.image_size).mean())  # the ring's share of the image
    method = "{} on {}".format(*map_source(model.trained.info["model_name"], SHOWN))
    for shown in explained(model, expand_paths(paths), target, **decision):
        if shown.overlay is None:
            log.warning("%s: %s, not explained", shown.answer.path, shown.answer.error or shown.answer.status)
            continue
        stem = Path(shown.answer.path).stem
        seen[stem] = seen.get(stem, 0) + 1
        name = f"{stem}-{seen[stem]}.gradcam.png" if seen[stem] > 1 else f"{stem}.gradcam.png"
        ring = (BORDER, float(border_share(shown.map[None])[0]), area)
        figure = plot_explanation(
            shown.image, shown.overlay, shown.map, Path(out) / name, figure_title(shown), method, ring
        )
        written.append(figure)
    return written
