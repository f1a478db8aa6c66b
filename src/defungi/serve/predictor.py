"""A trained model as `predict` and the web page use it: its classes, input size, variance
threshold, what the run measured about its answers, and a function from uint8 images to class
probabilities and out-of-distribution scores. It comes from a run folder (PyTorch, here) or from an
exported ONNX file (`serve.lite`: onnxruntime; torch is then never imported);
`serve.predict.open_predictor` picks one."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from defungi.config import config_from_dict
from defungi.errors import DefungiError
from defungi.layout import RunLayout, read_json
from defungi.results.run import ModelCard, model_card, read_run_metrics
from defungi.results.schema import SCHEMA_VERSION, check_version, from_dict, to_dict
from defungi.results.trust import Trust, Unit
from defungi.stats.metrics import prior_weights, weighted


@dataclass(frozen=True)
class Inputs:
    """What decoding needs of a model: its input size, the grey variance under which an image shows no
    fungus (it is not classified), and its classes (an image's folder or name may give one)."""

    image_size: int
    variance_threshold: float
    classes: list[str]


def run_inputs(run_dir: str | Path) -> Inputs | None:
    """A run folder's Inputs from its config.json and metrics.json, read without loading its model (so
    that images decode while it loads); None where either is missing or unreadable (the load then says why)."""
    layout = RunLayout(Path(run_dir))
    try:
        data = config_from_dict(read_json(layout.config)).data
        return Inputs(data.image_size, data.variance_threshold, read_run_metrics(layout.metrics).classes)
    except (OSError, ValueError, TypeError, AttributeError, DefungiError):  # the model's load says what is wrong
        return None


class Scores(NamedTuple):
    """What a model computes for a batch of images."""

    probabilities: np.ndarray  # images x classes
    # per image, its distance from the training micrographs over the refusal threshold (over 1: unlike
    # them; over stats.refusal.REFUSE: not a fungus micrograph, see train.ood), on the image as it is; None
    # where the run has no detector
    ood: np.ndarray | None


@dataclass(frozen=True)
class Predictor:
    """What is needed to classify decoded images the way the run was scored, and what the run measured
    about its answers (trust: calibration, prediction sets, selective answers; card: how accurate it
    was on specimens it never saw)."""

    classes: list[str]
    image_size: int
    variance_threshold: float
    tta: bool
    prior_weight: float
    class_prior: list[float] | None
    scores: Callable[[np.ndarray, bool], Scores]  # uint8 NHWC images, tta -> scores
    trust: Trust | None = None
    card: ModelCard | None = None
    trained: Any = None  # the TrainedModel of the torch backend (Grad-CAM needs it)
    specimen_rule: str = "mean"  # how a specimen's images' probabilities are pooled (stats.metrics.SPECIMEN_RULES)

    @property
    def inputs(self) -> Inputs:
        """What decoding images for this model needs."""
        return Inputs(self.image_size, self.variance_threshold, self.classes)

    def answer(
        self,
        images: np.ndarray,
        tta: bool | None = None,
        prior_weight: float | None = None,
        computed: Scores | None = None,
    ) -> Scores:
        """Class probabilities (tta and prior weight as trained unless given) and out-of-distribution
        scores (computed: the model's scores of these images, when a pass already made them)."""
        probs, ood = computed if computed is not None else self.scores(images, self.tta if tta is None else tta)
        power = self.prior_weight if prior_weight is None else prior_weight
        return Scores(weighted(probs, prior_weights(self.class_prior, power)), ood)

    def probabilities(
        self, images: np.ndarray, tta: bool | None = None, prior_weight: float | None = None
    ) -> np.ndarray:
        """Class probabilities (tta and prior weight as trained unless given)."""
        return self.answer(images, tta, prior_weight).probabilities

    def temperature(self, unit: Unit = "image") -> float:
        """The temperature that calibrates an image's (or a specimen's mean) probabilities: 1 where the
        run measured none that helped."""
        return self.trust.temperatures[unit].applied if self.trust is not None else 1.0

    def metadata(self) -> dict[str, Any]:
        """Everything but the model, as JSON (stored inside an exported ONNX file)."""
        names = ("classes", "image_size", "variance_threshold", "tta", "prior_weight", "class_prior", "specimen_rule")
        records = {k: None if getattr(self, k) is None else to_dict(getattr(self, k)) for k in ("trust", "card")}
        return {"schema_version": SCHEMA_VERSION, **{k: getattr(self, k) for k in names}, **records}

    @classmethod
    def from_metadata(
        cls, meta: dict[str, Any], scores: Callable[[np.ndarray, bool], Scores], source: str
    ) -> Predictor:
        """The predictor that metadata() described, answering with scores (a SchemaError names source)."""
        check_version(meta.pop("schema_version", None), source)
        trust, card = meta.pop("trust"), meta.pop("card")
        return cls(
            **meta,
            scores=scores,
            trust=None if trust is None else from_dict(Trust, trust, "trust"),
            card=None if card is None else from_dict(ModelCard, card, "card"),
        )


def torch_predictor(run_dir: str | Path, device: str = "auto") -> Predictor:
    """The run folder's model (its checkpoints, one per fold or member, averaged) with PyTorch; heads
    on a shared frozen backbone answer from its one pass per image, on the faster engine (train.frozen)."""
    from defungi.train.checkpoint import load_trained

    trained = load_trained(run_dir, device)
    path = RunLayout(Path(run_dir)).metrics
    metrics = read_run_metrics(path) if path.exists() else None
    frozen = trained.frozen_pass()
    if frozen is not None:
        frozen.prepare()
    return Predictor(
        classes=list(trained.classes),
        image_size=trained.preprocess.image_size,
        variance_threshold=trained.config.data.variance_threshold,
        trust=metrics.trust if metrics else None,
        card=model_card(metrics) if metrics else None,
        tta=trained.config.train.tta,
        prior_weight=trained.config.train.prior_weight,
        class_prior=trained.class_prior,
        scores=_frozen_scores(trained, frozen) if frozen is not None else _model_scores(trained),
        trained=trained,
        specimen_rule=trained.config.train.specimen_rule,
    )


def _model_scores(trained: Any) -> Callable[[np.ndarray, bool], Scores]:
    """Scores from the whole model on the images, the refusal read by hooks inside its forward passes."""
    from defungi.train.loop import predict_proba

    hooks = trained.ood_hooks()

    def scores(images: np.ndarray, tta: bool) -> Scores:
        with hooks if hooks is not None else contextlib.nullcontext():
            probs = predict_proba(
                trained.model, images, trained.preprocess, trained.device, tta=tta, amp=trained.config.train.amp
            )  # fp32 on CPUs, as the exported model (see train.loop.inference_precision)
        return Scores(probs, hooks.images(8 if tta else 1).cpu().numpy() if hooks is not None else None)

    return scores


def _frozen_scores(trained: Any, frozen: Any) -> Callable[[np.ndarray, bool], Scores]:
    """Scores of heads on a shared frozen trunk: one pass of the trunk per image and view reads the
    heads' input and the refusal detectors' readings (view 0); the heads and detectors run on them."""
    import torch

    from defungi.models import model_entry
    from defungi.train.ood import Reading

    model, detectors = trained.model, trained.detectors or []
    features = frozen.readings.index(Reading(model_entry(trained.info["model_name"]).parts.classifier, "input"))

    def scores(images: np.ndarray, tta: bool) -> Scores:
        views, ood = range(8 if tta else 1), None
        probs = np.zeros((len(images), len(trained.classes)), dtype=np.float32)
        for k in views:
            read = frozen.of(images, view=k, desc="predict")
            with torch.no_grad():
                logits = model.combine(torch.from_numpy(read[features]).to(trained.device))
            probs += logits.float().softmax(dim=1).cpu().numpy() / len(views)
            if k == 0 and detectors:
                at = [[read[frozen.readings.index(r)] for r in d.readings] for d in detectors]
                ood = np.mean([d.scores(r) for d, r in zip(detectors, at, strict=True)], axis=0)
        return Scores(probs, ood)

    return scores
