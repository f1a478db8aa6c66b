"""One fit: config + data + split -> trained weights, history and metrics of the scored parts."""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from defungi.config import Config, TrainConfig
from defungi.data.dataset import Dataset
from defungi.errors import DefungiError
from defungi.experiments import meter
from defungi.experiments.rundir import RunDir
from defungi.models import model_entry
from defungi.results.history import EpochRow
from defungi.results.schema import from_dict, to_dict
from defungi.stats.metrics import classification_metrics, score_metrics
from defungi.stats.refusal import held_out_needed
from defungi.train import distributed
from defungi.train.checkpoint import checkpoint_of
from defungi.train.loop import Preprocess, evaluate, precision_name, train_one_epoch
from defungi.train.ood import OodDetector, fit_detector, model_readings
from defungi.train.sources import Features, Source, source_of
from defungi.train.task import Learner, Task, learner_of, new_model, task_of

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """What a fit returns: history per epoch, metrics per evaluated part, timing."""

    history: list[EpochRow]
    metrics: dict[str, dict[str, Any]]
    best_epoch: int
    stop_reason: str
    train_seconds: float
    parameters: int
    precision: str  # what the forward passes computed in: 'float32', 'bfloat16' or 'float16'
    probabilities: dict[str, np.ndarray]  # per scored part, one row per image
    ood: OodDetector | None = None  # what refuses non-micrographs (see train.ood), None without a validation part
    ood_scores: dict[str, np.ndarray] = field(default_factory=dict)  # per scored part, per image (over 1: refused)


def score_parts(
    model: nn.Module,
    dataset: Dataset,
    split: dict[str, np.ndarray],
    preprocess: Preprocess,
    device: torch.device,
    tc: TrainConfig,
    class_weights: np.ndarray | None,
    probabilities_of: Callable[[np.ndarray], tuple[np.ndarray, float]] | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray]]:
    """Metrics (image- and specimen-level, with intervals over specimens) and probabilities of every part
    but 'train', scored as the run asks (test-time augmentation, precision); probabilities_of(idx),
    when given, computes (probabilities, loss) another way (e.g. from cached features)."""
    metrics, probabilities = {}, {}
    for part, idx in split.items():
        if part == "train" or len(idx) == 0:
            continue
        t0 = time.perf_counter()
        probs, loss = (
            probabilities_of or (lambda i: _evaluate(model, dataset, i, preprocess, device, tc, class_weights))
        )(idx)
        scores = score_metrics(
            probs, dataset.labels[idx], dataset.specimens[idx], dataset.classes, tc.seed, tc.specimen_rule
        )
        metrics[part] = scores | {"loss": loss, "tta": tc.tta, "seconds": time.perf_counter() - t0}
        probabilities[part] = probs
    return metrics, probabilities


def _evaluate(
    model: nn.Module,
    dataset: Dataset,
    idx: np.ndarray,
    preprocess: Preprocess,
    device: torch.device,
    tc: TrainConfig,
    class_weights: np.ndarray | None,
) -> tuple[np.ndarray, float]:
    return evaluate(
        model,
        dataset.images[idx],
        dataset.labels[idx],
        preprocess,
        device,
        tta=tc.tta,
        amp=tc.amp,
        channels_last=tc.channels_last,
        class_weights=class_weights,
    )


@dataclass
class _Progress:
    """Where a fit stands: its history, the epoch it continues from, its time, the best weights so far."""

    history: list[EpochRow] = field(default_factory=list)
    start_epoch: int = 0
    train_seconds: float = 0.0
    best_state: dict[str, torch.Tensor] | None = None


def _resume(learner: Learner, saved: tuple[dict[str, Any], dict[str, torch.Tensor] | None] | None) -> _Progress:
    """A fresh fit's progress, or (saved: last.pt and the best weights) that of the interrupted fit,
    whose training state is loaded into learner."""
    if saved is None:
        return _Progress()
    state, best = saved
    learner.load(state)
    history = [from_dict(EpochRow, row, "last.pt's history") for row in state["history"]]
    return _Progress(history, state["epoch"] + 1, state["train_seconds"], best)


def _history_row(task: Task, learner: Learner, source: Source, epoch: int, stats: dict[str, float]) -> EpochRow:
    """One epoch's row of history.csv: its training stats, and the scored model on the validation part."""
    val_probs, val_loss = source.probabilities(task.val_idx)
    val = classification_metrics(task.dataset.labels[task.val_idx], val_probs.argmax(1), task.dataset.classes)
    return EpochRow(
        epoch=epoch + 1,
        lr=learner.step.scheduler.get_last_lr()[0],
        train_loss=stats["loss"],
        train_accuracy=stats["accuracy"],
        val_loss=val_loss,
        val_accuracy=val["accuracy"],
        val_f1=val["f1"],
        images_per_s=stats["images"] / stats["seconds"] if stats["seconds"] else 0.0,
        seconds=stats["seconds"],
    )


def _save(run: RunDir, task: Task, learner: Learner, progress: _Progress, epoch: int, best: bool) -> None:
    """best.pt with the best epoch's weights (when best: the epoch improved on it, or the fit ends),
    last.pt with this epoch's and what a resume needs."""
    checkpoint = checkpoint_of(
        learner.scored,
        task.config,
        task.dataset.classes,
        task.preprocess,
        task.class_prior,
        epoch,
        learner.stopper.best,
    )
    if best and progress.best_state is not None:
        run.save_best(checkpoint | {"state_dict": progress.best_state, "epoch": learner.stopper.best_epoch})
    progress_state = {"history": [to_dict(h) for h in progress.history], "train_seconds": progress.train_seconds}
    run.save_last(checkpoint, learner.training_state() | progress_state)


def _check_finite(loss: float, epoch: int, tc: TrainConfig) -> None:
    """Stop a fit whose training loss is no longer a number: nothing after it would mean anything."""
    if not math.isfinite(loss):
        raise DefungiError(
            f"the training loss became {loss} in epoch {epoch + 1} of {tc.model} (lr {tc.lr:g}); "
            "lower --lr, or use --set train.amp=false, and train into a new --out"
        )


def _train(
    task: Task,
    learner: Learner,
    source: Source,
    progress: _Progress,
    run: RunDir | None,
    sync: distributed.Sync,
    on_epoch: Callable[[], None],
) -> None:
    """The epochs from progress.start_epoch until the budget is used or early stopping ends them:
    every rank trains and takes rank 0's history row; rank 0 keeps the best weights and checkpoints
    them every epoch (a head on cached features, whose epochs take a fraction of a second, at its end
    only: its checkpoints took longer than its training); on_epoch is told of each epoch (the job's progress)."""
    tc, stopper = task.config.train, learner.stopper
    stopped = bool(stopper.reason)
    each_epoch = not isinstance(source, Features)  # a head on cached features: its fit takes seconds; saved at its end
    for epoch in range(progress.start_epoch, tc.epochs):
        if stopped:
            break
        task.threads.choose()
        stats = train_one_epoch(
            source.forward, source.batches(epoch), task.steps_per_epoch, learner.step, f"epoch {epoch + 1}/{tc.epochs}"
        )
        _check_finite(stats["loss"], epoch, tc)
        row = sync.epoch(stats, functools.partial(_history_row, task, learner, source, epoch))
        progress.history.append(row)
        progress.train_seconds += row.seconds
        improved = stopper.improved(row.val_f1)
        stopped = stopper.step(row.val_f1, epoch)
        log.info(
            "epoch %d/%d  loss %.3f  val loss %.3f  val acc %.3f  val F1 %.3f  %.0f img/s%s",
            epoch + 1,
            tc.epochs,
            row.train_loss,
            row.val_loss,
            row.val_accuracy,
            row.val_f1,
            row.images_per_s,
            "  *" if improved else "",
        )
        if improved and sync.main:
            progress.best_state = {k: v.detach().clone() for k, v in learner.scored.state_dict().items()}
        if run is not None and sync.main and each_epoch:
            _save(run, task, learner, progress, epoch, improved)
        on_epoch()
    if run is not None and sync.main and not each_epoch and progress.history:
        _save(run, task, learner, progress, len(progress.history) - 1, True)
    if stopper.reason:
        log.info("early stop: %s", stopper.reason)


def _scoring(source: Source) -> Callable[[np.ndarray], tuple[np.ndarray, float]] | None:
    """How the parts are scored: through the batch source without test-time augmentation; with it, from
    the cached inputs of all 8 flips/rotations where the source holds them (no image passes through the
    frozen backbone again), else on the images (score_parts' own way)."""
    if not source.task.config.train.tta:
        return source.probabilities
    if isinstance(source, Features) and len(source.features) == 8:
        return functools.partial(source.probabilities, views=8)
    return None


def _result(
    task: Task, learner: Learner, source: Source, progress: _Progress, split: dict[str, np.ndarray]
) -> FitResult:
    """Score every part but 'train' with the best epoch's weights (train.restore_best) or the last's:
    as _scoring says (test-time augmentation from the cache where it holds all 8 views)."""
    tc = task.config.train
    if tc.restore_best and progress.best_state is not None:
        learner.scored.load_state_dict(progress.best_state)
    metrics, probabilities = score_parts(
        learner.scored, task.dataset, split, task.preprocess, task.device, tc, task.class_weights, _scoring(source)
    )
    detector, ood_scores = _ood(task, source, split)
    return FitResult(
        progress.history,
        metrics,
        learner.stopper.best_epoch + 1,
        learner.stopper.reason or "epoch budget used",
        progress.train_seconds,
        sum(p.numel() for p in learner.model.parameters()),
        precision_name(task.device, tc.amp),
        probabilities,
        detector,
        ood_scores,
    )


def _ood(task: Task, source: Source, split: dict[str, np.ndarray]) -> tuple[OodDetector | None, dict[str, np.ndarray]]:
    """The scored model's refusal of non-micrographs (see train.ood): fitted on what it reads of the
    training part, its thresholds set on the validation part; and the score of every image of the
    other parts. None (nothing refused) without train.ood, or when the validation part is too small
    to set them."""
    if not task.config.train.ood:
        return None, {}
    if len(task.val_idx) < held_out_needed():
        log.warning(
            "no refusal of non-micrographs: %d validation images are too few to set its threshold (%d needed)",
            len(task.val_idx),
            held_out_needed(),
        )
        return None, {}
    at = model_readings(model_entry(task.config.train.model).parts)
    readings = {part: source.read(at, idx) for part, idx in split.items() if len(idx)}
    detector = fit_detector(readings["train"], task.dataset.labels[task.train_idx], readings["val"], at)
    assert detector is not None  # enough validation images for the quantile
    log.info(
        "refusal of non-micrographs: Mahalanobis distances of %s (%.0f%% of %d validation images under its threshold)",
        " and ".join(f"the {r.kind} of {r.module}" for r in at),
        100 * detector.quantile,
        detector.held_out,
    )
    return detector, {part: detector.scores(r) for part, r in readings.items() if part != "train"}


def fit(
    config: Config,
    dataset: Dataset,
    split: dict[str, np.ndarray],
    run: RunDir | None = None,
    sync: distributed.Sync | None = None,
) -> FitResult | None:
    """Train on split['train'], early-stop on split['val'] macro-F1, evaluate every other part.

    Extra parts (e.g. 'train_eval', a sample of the training images) are evaluated too. With a
    run folder, checkpoints go there every epoch and an interrupted fit continues from the last
    one. The best epoch's weights are scored (train.restore_best), or the last epoch's.
    Under torchrun every rank calls fit with a Sync of its own: every rank trains its share of
    each batch and resumes from rank 0's last.pt; rank 0 alone validates, writes checkpoints and
    scores (the other ranks return None).
    """
    sync = sync if sync is not None else distributed.Sync()
    saved = sync.start(lambda: run.resume_state(torch.device("cpu")) if run is not None else None).saved
    task = task_of(config, dataset, split)
    learner = learner_of(task, new_model(task, fresh=saved is None))
    progress = _resume(learner, saved)
    if saved is not None:
        log.info("resuming %s at epoch %d/%d", run.root, progress.start_epoch + 1, config.train.epochs)
    ticket = meter.on_fit(config, split)
    # after a resume: the cached inputs are those of the loaded backbone
    source = source_of(task, learner, ticket.features)
    _train(task, learner, source, progress, run, sync, ticket.epoch)
    result = sync.end(lambda: _result(task, learner, source, progress, split))
    ticket.done()
    return result
