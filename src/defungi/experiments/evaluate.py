"""A trained run scored on another labelled folder, and its inference speed."""

from __future__ import annotations

import contextlib
import hashlib
import time
from pathlib import Path

import numpy as np

from defungi.data.dataset import load_dataset
from defungi.experiments.protocols import load_trained
from defungi.experiments.rundir import RunDir, write_predictions
from defungi.layout import EvaluationLayout, RunLayout
from defungi.results.ood import OodCheck
from defungi.results.run import Evaluation, PartScores, read_evaluation
from defungi.results.schema import SchemaError, from_dict, to_dict
from defungi.train.loop import evaluate, predict_proba
from defungi.train.metrics import scored
from defungi.train.ood import OodDetector, refused_share
from defungi.utils import atomic_write_json


def evaluate_run(
    run_dir: str | Path,
    data_root: str | Path,
    out_dir: str | Path | None = None,
    tta: bool | None = None,
    prior_weight: float | None = None,
) -> tuple[Evaluation, Path]:
    """Score a trained run on any labelled folder; its metrics.json and predictions.csv (per image, with
    its out-of-distribution score: over 1 is refused as not a fungus micrograph by predict and the
    page, counted in the evaluation's `ood`; the scores cover every image) go to out_dir (default:
    RUN/evaluations/NAME, NAME-<hash> when another folder of that name was evaluated there before).
    Returns the evaluation and its folder."""
    out = EvaluationLayout(Path(out_dir)) if out_dir else _evaluation_layout(Path(run_dir), Path(data_root))
    RunDir(out.root).prepare()
    trained = load_trained(run_dir)
    data = load_dataset(
        data_root, trained.preprocess.image_size, trained.config.data.variance_threshold, classes=trained.classes
    )
    use_tta = trained.config.train.tta if tta is None else tta
    power = trained.config.train.prior_weight if prior_weight is None else prior_weight
    weights = trained.class_weights(power)
    hooks = trained.ood_hooks()
    with hooks if hooks is not None else contextlib.nullcontext():
        probs, loss = evaluate(
            trained.model,
            data.images,
            data.labels,
            trained.preprocess,
            trained.device,
            tta=use_tta,
            amp=trained.config.train.amp,
            class_weights=weights,
        )
    ood = hooks.images(8 if use_tta else 1).cpu().numpy() if hooks is not None else None
    scores = scored(probs, data.labels, data.groups, trained.classes, seed=trained.config.train.seed)
    evaluation = Evaluation(
        scores=from_dict(PartScores, scores | {"loss": loss, "tta": use_tta}),
        data=str(Path(data_root).resolve()),
        run=str(run_dir),
        model=trained.info["model_name"],
        tta=use_tta,
        prior_weight=power if weights is not None else 0.0,
        excluded=data.excluded,
        ood=_refusals(trained.detectors, ood, data.groups, trained.config.train.seed),
    )
    extra = {"ood": [f"{x:.4f}" for x in ood]} if ood is not None else None
    write_predictions(out.predictions, data, np.arange(len(probs)), probs, extra)
    atomic_write_json(out.metrics, to_dict(evaluation))
    return evaluation, out.root


def _refusals(
    detectors: list[OodDetector] | None, ood: np.ndarray | None, groups: np.ndarray, seed: int
) -> OodCheck | None:
    """The evaluated micrographs refused as not fungus micrographs (None without detectors)."""
    if detectors is None or ood is None:
        return None
    share, interval = refused_share(ood > 1, groups, seed=seed)
    return OodCheck("evaluation", detectors[0].quantile, [d.threshold for d in detectors], len(ood), share, interval)


def _evaluation_layout(run_dir: Path, data_root: Path) -> EvaluationLayout:
    """RUN/evaluations/NAME for a data folder called NAME, unless another folder of that name (or an
    unreadable evaluation) is there: then NAME-<hash of its path>."""
    name = data_root.resolve().name
    out = RunLayout(run_dir).evaluation(name)
    if out.metrics.exists():
        try:
            same = Path(read_evaluation(out.metrics).data).resolve() == data_root.resolve()
        except SchemaError:
            same = False
        if not same:
            digest = hashlib.sha1(str(data_root.resolve()).encode()).hexdigest()[:6]
            out = RunLayout(run_dir).evaluation(f"{name}-{digest}")
    return out


def inference_images_per_s(run_dir: str | Path, n_images: int = 256, batch_size: int = 64) -> float:
    """Images/s of a run's model predicting (no test-time augmentation, in the precision predict uses)
    on synthetic inputs of its size."""
    trained = load_trained(run_dir)
    size = trained.preprocess.image_size
    images = np.random.default_rng(0).integers(0, 256, (n_images, size, size, 3), dtype=np.uint8)
    amp = trained.config.train.amp
    predict_proba(
        trained.model, images[:batch_size], trained.preprocess, trained.device, batch_size, amp=amp
    )  # warm-up
    start = time.perf_counter()
    predict_proba(trained.model, images, trained.preprocess, trained.device, batch_size, amp=amp)
    return n_images / (time.perf_counter() - start)
