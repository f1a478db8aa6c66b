"""A trained model as `predict` and the web page use it: its classes, input size, variance
threshold, temperature and a function from uint8 images to class probabilities and out-of-distribution
scores. It comes from a run folder (PyTorch, here) or from an exported ONNX file (`serve.lite`:
onnxruntime; torch is then never imported); `serve.predict.open_predictor` picks one."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from defungi.layout import RunLayout
from defungi.results.run import read_run_metrics
from defungi.train.metrics import prior_weights, weighted


class Scores(NamedTuple):
    """What a model computes for a batch of images."""

    probabilities: np.ndarray  # images x classes
    # per image, its distance from the training micrographs over the refusal threshold (over 1: not a
    # fungus micrograph, see train.ood), on the image as it is; None where the run has no detector
    ood: np.ndarray | None


@dataclass(frozen=True)
class Predictor:
    """What is needed to classify decoded images the way the run was scored."""

    classes: list[str]
    image_size: int
    variance_threshold: float
    temperature: float
    tta: bool
    prior_weight: float
    class_prior: list[float] | None
    scores: Callable[[np.ndarray, bool], Scores]  # uint8 NHWC images, tta -> scores
    trained: Any = None  # the TrainedModel of the torch backend (Grad-CAM needs it)

    def answer(self, images: np.ndarray, tta: bool | None = None, prior_weight: float | None = None) -> Scores:
        """Class probabilities (tta and prior weight as trained unless given) and out-of-distribution scores."""
        probs, ood = self.scores(images, self.tta if tta is None else tta)
        power = self.prior_weight if prior_weight is None else prior_weight
        return Scores(weighted(probs, prior_weights(self.class_prior, power)), ood)

    def probabilities(
        self, images: np.ndarray, tta: bool | None = None, prior_weight: float | None = None
    ) -> np.ndarray:
        """Class probabilities (tta and prior weight as trained unless given)."""
        return self.answer(images, tta, prior_weight).probabilities

    def metadata(self) -> dict[str, Any]:
        """Everything but the model, as JSON (stored inside an exported ONNX file)."""
        names = ("classes", "image_size", "variance_threshold", "temperature", "tta", "prior_weight", "class_prior")
        return {k: getattr(self, k) for k in names}


def run_temperature(run_dir: str | Path) -> float:
    """The image temperature the run's answers use: fitted on held-out predictions and kept where it
    helped on others (1.0 otherwise)."""
    path = RunLayout(Path(run_dir)).metrics
    trust = read_run_metrics(path).trust if path.exists() else None
    return trust.temperatures["image"].applied if trust is not None else 1.0


def torch_predictor(run_dir: str | Path, device: str = "auto") -> Predictor:
    """The run folder's model (its checkpoints, one per fold or member, averaged) with PyTorch."""
    from defungi.experiments.protocols import load_trained
    from defungi.train.loop import predict_proba

    trained = load_trained(run_dir, device)
    hooks = trained.ood_hooks()

    def scores(images: np.ndarray, tta: bool) -> Scores:
        with hooks if hooks is not None else contextlib.nullcontext():
            probs = predict_proba(
                trained.model, images, trained.preprocess, trained.device, tta=tta, amp=trained.config.train.amp
            )
        return Scores(probs, hooks.images(8 if tta else 1).cpu().numpy() if hooks is not None else None)

    return Predictor(
        classes=list(trained.classes),
        image_size=trained.preprocess.image_size,
        variance_threshold=trained.config.data.variance_threshold,
        temperature=run_temperature(run_dir),
        tta=trained.config.train.tta,
        prior_weight=trained.config.train.prior_weight,
        class_prior=trained.class_prior,
        scores=scores,
        trained=trained,
    )
