"""One fit: config + data + split -> trained weights, history and metrics of the scored parts."""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from timm.utils import ModelEmaV3

from defungi.config import Config, TrainConfig
from defungi.data.augment import augment_batch, balanced_order, mix_batch
from defungi.data.dataset import Dataset
from defungi.errors import DefungiError
from defungi.experiments import plan
from defungi.experiments.rundir import RunDir
from defungi.models import create_model, model_entry
from defungi.models.pretrained import initial_weights, tail_from
from defungi.stats.metrics import classification_metrics, mean_nll, prior_weights, scored, weighted
from defungi.train import distributed
from defungi.train.callbacks import EarlyStopping
from defungi.train.checkpoint import checkpoint_of
from defungi.train.frozen import FrozenPass, frozen_pass
from defungi.train.loop import (
    Batch,
    Preprocess,
    TrainStep,
    batches,
    build_optimizer,
    evaluate,
    feature_batches,
    feature_rows,
    hooked_inputs,
    image_batches,
    image_inputs,
    precision_name,
    probabilities,
    train_one_epoch,
    train_step,
    weight_average,
)
from defungi.train.ood import OodDetector, Reading, fit_detector, held_out_needed, model_readings
from defungi.train.runtime import Threads, resolve_device, seed_everything

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """What a fit returns: history per epoch, metrics per evaluated part, timing."""

    history: list[dict[str, float]]
    metrics: dict[str, dict[str, Any]]
    best_epoch: int
    stop_reason: str
    train_seconds: float
    parameters: int
    precision: str  # what the forward passes computed in: 'float32', 'bfloat16' or 'float16'
    probabilities: dict[str, np.ndarray]  # per scored part, one row per image
    ood: OodDetector | None = None  # what refuses non-micrographs (see train.ood), None without a validation part
    ood_scores: dict[str, np.ndarray] = field(default_factory=dict)  # per scored part, per image (over 1: refused)


def channel_stats(
    images: np.ndarray, idx: np.ndarray, max_images: int = 2000
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (0..1 scale) of up to max_images training images."""
    take = idx if len(idx) <= max_images else np.linspace(0, len(idx) - 1, max_images).astype(int)
    sample = np.asarray(images[np.sort(idx[take] if len(idx) > max_images else idx)], dtype=np.float32) / 255.0
    mean = sample.mean(axis=(0, 1, 2))
    std = sample.std(axis=(0, 1, 2)) + 1e-6
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def score_parts(
    model: nn.Module,
    data: Dataset,
    split: dict[str, np.ndarray],
    preprocess: Preprocess,
    device: torch.device,
    tc: TrainConfig,
    class_weights: np.ndarray | None,
    probabilities_of: Callable[[np.ndarray], tuple[np.ndarray, float]] | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray]]:
    """Metrics (image- and sample-level, with intervals over samples) and probabilities of every part
    but 'train', scored as the run asks (test-time augmentation, precision); probabilities_of(idx),
    when given, computes (probabilities, loss) another way (e.g. from cached features)."""
    metrics, probabilities = {}, {}
    for part, idx in split.items():
        if part == "train" or len(idx) == 0:
            continue
        t0 = time.perf_counter()
        probs, loss = (
            probabilities_of or (lambda i: _evaluate(model, data, i, preprocess, device, tc, class_weights))
        )(idx)
        scores = scored(probs, data.labels[idx], data.groups[idx], data.classes, tc.seed, tc.specimen_rule)
        metrics[part] = scores | {"loss": loss, "tta": tc.tta, "seconds": time.perf_counter() - t0}
        probabilities[part] = probs
    return metrics, probabilities


def _evaluate(
    model: nn.Module,
    data: Dataset,
    idx: np.ndarray,
    preprocess: Preprocess,
    device: torch.device,
    tc: TrainConfig,
    class_weights: np.ndarray | None,
) -> tuple[np.ndarray, float]:
    return evaluate(
        model,
        data.images[idx],
        data.labels[idx],
        preprocess,
        device,
        tta=tc.tta,
        amp=tc.amp,
        channels_last=tc.channels_last,
        class_weights=class_weights,
    )


@dataclass(frozen=True)
class _Task:
    """What a fit is about: the images and its parts, the device, the preprocessing, the class shares."""

    config: Config
    data: Dataset
    train_idx: np.ndarray
    val_idx: np.ndarray
    device: torch.device
    preprocess: Preprocess
    class_prior: list[float] | None  # training class shares, when trained class-balanced
    threads: Threads  # chosen again before each epoch, by how busy other processes keep the cores

    @property
    def class_weights(self) -> np.ndarray | None:
        return prior_weights(self.class_prior, self.config.train.prior_weight)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, len(self.train_idx) // self.config.train.batch_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Positions into the training part that one epoch visits: class-balanced, seeded per epoch."""
        tc, n = self.config.train, len(self.train_idx)
        rng = np.random.default_rng([tc.seed, epoch])
        return balanced_order(self.data.labels[self.train_idx], n, rng) if tc.balance else rng.permutation(n)


def _task(config: Config, data: Dataset, split: dict[str, np.ndarray]) -> _Task:
    """Seed, join the torchrun world, and settle the preprocessing (the training part's channel
    statistics, or those of the pretrained weights) and class shares of a fit."""
    tc = config.train
    seed_everything(tc.seed)
    device = distributed.setup(resolve_device(tc.device))
    threads = Threads(device)
    train_idx = split["train"]
    preprocess = _preprocess(config, data, train_idx)
    counts = np.bincount(data.labels[train_idx], minlength=len(data.classes))
    class_prior = (counts / counts.sum()).tolist() if tc.balance else None
    return _Task(config, data, train_idx, split["val"], device, preprocess, class_prior, threads)


def _preprocess(config: Config, data: Dataset, train_idx: np.ndarray) -> Preprocess:
    """A fit's input scaling: the pretrained weights' mean/std, or the training part's channel statistics."""
    if config.data.normalize == "pretrained":
        mean, std = model_entry(config.train.model).normalization
    else:
        mean, std = channel_stats(data.images, train_idx)
    return Preprocess(data.images.shape[1], mean, std, config.data.normalize)


@dataclass
class _Learner:
    """What a fit trains and scores: the model, its weight average, one optimisation step, early
    stopping; with a frozen backbone, what runs from train_from on."""

    model: nn.Module
    trainer: nn.Module  # what the training steps call: the model, or DDP around it (torchrun)
    ema: ModelEmaV3 | None
    step: TrainStep
    stopper: EarlyStopping
    train_from: str | None = None  # frozen backbone: the first module that trains (the head, or e.g. blocks.5)
    tails: list[nn.Module] = field(default_factory=list)  # what runs from train_from on: trained, [scored]

    @property
    def scored(self) -> nn.Module:
        """The weights that are evaluated and saved: the moving average when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def training_state(self) -> dict[str, Any]:
        """What last.pt holds for a resume besides the scored weights and the fit's progress."""
        return {
            "train_state_dict": self.model.state_dict(),
            "optimizer": self.step.optimizer.state_dict(),
            "scheduler": self.step.scheduler.state_dict(),
            "scaler": self.step.scaler.state_dict(),
            "early_stopping": self.stopper.state_dict(),
        }

    def load(self, state: dict[str, Any]) -> None:
        """Continue from a last.pt's state (see training_state)."""
        self.model.load_state_dict(state["train_state_dict"])
        self.scored.load_state_dict(state["state_dict"])
        self.step.optimizer.load_state_dict(state["optimizer"])
        self.step.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # a disabled scaler saves {}
            self.step.scaler.load_state_dict(state["scaler"])
        self.stopper.load_state_dict(state["early_stopping"])


def _model(task: _Task, fresh: bool) -> nn.Module:
    """The model on the device, with its pretrained weights unless the fit resumes."""
    tc = task.config.train
    model = create_model(tc.model, num_classes=len(task.data.classes), **tc.model_args)
    if fresh:
        initial_weights(model, tc.model, tc.weights, tc.pretrained)
    return model.to(task.device, memory_format=torch.channels_last if tc.channels_last else torch.contiguous_format)


def _learner(task: _Task, model: nn.Module) -> _Learner:
    """The model's training: the modules that train (all, or those from train_from on), optimiser,
    schedule, loss scaling, weight average and early stopping."""
    tc = task.config.train
    head = model_entry(tc.model).parts.classifier if tc.freeze_backbone or tc.backbone_lr_scale != 1 else None
    train_from = (tc.train_from or head) if tc.freeze_backbone else None
    # random inputs that check the tails, from their own generator: the global one is left alone
    size = task.preprocess.image_size
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(task.device)
    tails = [] if train_from is None else [tail_from(model, tc.model, train_from, example)]
    if tails:
        trains = {id(p) for p in tails[0].parameters()}
        for p in model.parameters():
            p.requires_grad = id(p) in trains
    trainer = distributed.wrap(model, task.device)
    optimizer = build_optimizer(model, tc.optimizer, tc.lr, tc.weight_decay, head, tc.backbone_lr_scale)
    ema = weight_average(model, tc)
    if tails and ema is not None:
        tails.append(tail_from(ema.module, tc.model, train_from, example))
    step = train_step(tc, model, optimizer, tc.epochs * task.steps_per_epoch, task.device, ema)
    stopper = EarlyStopping(tc.patience_epochs, tc.min_epochs)
    return _Learner(model, trainer, ema, step, stopper, train_from, tails)


@dataclass
class _Images:
    """A fit's batch source on the images: augmented and mixed, this rank's share of every global
    batch; validated by the scored model on the images."""

    task: _Task
    learner: _Learner

    @property
    def forward(self) -> nn.Module:
        return self.learner.trainer

    def batches(self, epoch: int) -> Iterator[Batch]:
        """One epoch's class-balanced training batches, augmented from a generator seeded per epoch and rank."""
        task, tc, rank = self.task, self.task.config.train, distributed.world()
        generator = torch.Generator().manual_seed(tc.seed * 100_003 + epoch + rank.rank * 7_919)
        n_classes = len(task.data.classes)

        def augment(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return mix_batch(augment_batch(x, tc.augment, generator), y, n_classes, tc.mix, tc.mix_alpha, generator)

        picks = task.train_idx[distributed.shard(task.epoch_order(epoch), tc.batch_size)]
        local = batches(task.data.images, task.data.labels, picks, tc.batch_size // rank.size, drop_last=True)
        return image_batches(local, task.preprocess, task.device, tc.channels_last, augment)

    def probabilities(self, idx: np.ndarray) -> tuple[np.ndarray, float]:
        """(probabilities, loss) of the scored model on images idx, without test-time augmentation."""
        task, tc = self.task, self.task.config.train
        return evaluate(
            self.learner.scored,
            task.data.images[idx],
            task.data.labels[idx],
            task.preprocess,
            task.device,
            amp=tc.amp,
            channels_last=tc.channels_last,
            class_weights=task.class_weights,
        )

    def read(self, readings: Sequence[Reading], idx: np.ndarray, batch_size: int = 128) -> list[np.ndarray]:
        """What the refusal detector reads (see train.ood) of the scored model on images idx, as they
        are: each of readings, in one pass."""
        task, tc, scored = self.task, self.task.config.train, self.learner.scored
        inputs = image_inputs(task.data.images, task.preprocess, task.device, batch_size, tc.channels_last, idx)
        modules = [r.hook(scored) for r in readings]
        return hooked_inputs(scored, modules, inputs, -(-len(idx) // batch_size), task.device, tc.amp)


@dataclass
class _Features:
    """A fit's batch source with a frozen backbone: the cached input of train_from, per image one of
    its cached flips/rotations drawn per epoch; validated by the scored tail on the images as they are."""

    task: _Task
    learner: _Learner
    features: list[np.ndarray]  # the input of train_from for every image, per cached view
    frozen: dict[Reading, np.ndarray]  # the refusal detector's readings before train_from, every image as is

    @property
    def forward(self) -> nn.Module:
        return self.learner.tails[0]

    def batches(self, epoch: int) -> Iterator[Batch]:
        """One epoch's class-balanced training batches of cached inputs."""
        task, tc = self.task, self.task.config.train
        order = task.train_idx[task.epoch_order(epoch)]
        views = np.random.default_rng([tc.seed, epoch, 1]).integers(tc.cached_views, size=len(order))
        return feature_batches(
            self.features, task.data.labels, order, views, tc.batch_size, task.device, tc.channels_last
        )

    def inputs(self, idx: np.ndarray, batch_size: int, view: int = 0) -> Iterator[torch.Tensor]:
        """The cached inputs of train_from for images idx, of their view-th flip/rotation (0: as they
        are), batch by batch."""
        tc = self.task.config.train
        for start in range(0, len(idx), batch_size):
            rows = idx[start : start + batch_size]
            views = np.full(len(rows), view)
            yield feature_rows(self.features, rows, self.task.device, views, channels_last=tc.channels_last)

    def probabilities(self, idx: np.ndarray, batch_size: int = 256, views: int = 1) -> tuple[np.ndarray, float]:
        """(probabilities, loss) of the scored model from train_from on, on the cached inputs of images
        idx: what the whole model computes on them, without test-time augmentation, or (views=8, all
        eight cached) averaged over the 8 flips/rotations as test-time augmentation on the images does."""
        task, tc = self.task, self.task.config.train
        n_batches = -(-len(idx) // batch_size)
        tail = self.learner.tails[-1]
        per_view = [
            probabilities(tail, self.inputs(idx, batch_size, view), n_batches, task.device, tc.amp, desc="evaluate")
            for view in range(views)
        ]
        probs = weighted(sum(per_view) / views, task.class_weights)  # the prior's weights after the average
        return probs, mean_nll(probs, task.data.labels[idx])

    def read(self, readings: Sequence[Reading], idx: np.ndarray, batch_size: int = 256) -> list[np.ndarray]:
        """What the refusal detector reads (see train.ood) of the scored model on images idx, as they are:
        from the cached inputs through the scored tail (in one pass) where a reading lies in it (the
        head's input: the cached inputs themselves when the head is all that trains), else (a frozen
        module before train_from) from the readings that the backbone's one pass cached with the features."""
        task, tc, tail = self.task, self.task.config.train, self.learner.tails[-1]
        in_tail = {id(m) for m in tail.modules()}
        hooks = [r.hook(self.learner.scored) for r in readings]
        through = [i for i, (module, _) in enumerate(hooks) if id(module) in in_tail]
        inputs, n_batches = self.inputs(idx, batch_size), -(-len(idx) // batch_size)
        passed = hooked_inputs(tail, [hooks[i] for i in through], inputs, n_batches, task.device, tc.amp)
        read = dict(zip(through, passed, strict=True))
        return [read[i] if i in read else self.frozen[reading][idx] for i, reading in enumerate(readings)]


# a fit's batch source: forward, batches(epoch), probabilities(idx), read(readings, idx)
_Source = _Images | _Features


def _source(task: _Task, learner: _Learner, computed: Callable[[int], None]) -> _Source:
    """What the fit trains on: the images, or with a frozen backbone the input of train_from for every
    image, per view, with the refusal detector's readings before train_from (view 0), all from one
    pass of the backbone's weights as they are now over the images the cache lacks; computed(n)
    after each pass over n images."""
    if learner.train_from is None:
        return _Images(task, learner)
    start, features, frozen = Reading(learner.train_from, "input"), [], {}
    for view in range(task.config.train.cached_views):
        backbone = frozen_pass(
            task.config, len(task.data.classes), task.preprocess, task.device, view, learner.model, learner.tails[0]
        )
        cached = backbone.cached(task.data.images, task.data.keys, view, computed)
        read = dict(zip(backbone.readings, cached, strict=True))
        features.append(read.pop(start))
        frozen |= read
    return _Features(task, learner, features, frozen)


@dataclass
class _Progress:
    """Where a fit stands: its history, the epoch it continues from, its time, the best weights so far."""

    history: list[dict[str, float]] = field(default_factory=list)
    start_epoch: int = 0
    train_seconds: float = 0.0
    best_state: dict[str, torch.Tensor] | None = None


def _resume(learner: _Learner, saved: tuple[dict[str, Any], dict[str, torch.Tensor] | None] | None) -> _Progress:
    """A fresh fit's progress, or (saved: last.pt and the best weights) that of the interrupted fit,
    whose training state is loaded into learner."""
    if saved is None:
        return _Progress()
    state, best = saved
    learner.load(state)
    return _Progress(state["history"], state["epoch"] + 1, state["train_seconds"], best)


def _history_row(
    task: _Task, learner: _Learner, source: _Source, epoch: int, stats: dict[str, float]
) -> dict[str, float]:
    """One epoch's row of history.csv: its training stats, and the scored model on the validation part."""
    val_probs, val_loss = source.probabilities(task.val_idx)
    val = classification_metrics(task.data.labels[task.val_idx], val_probs.argmax(1), task.data.classes)
    return {
        "epoch": epoch + 1,
        "lr": learner.step.scheduler.get_last_lr()[0],
        "train_loss": stats["loss"],
        "train_accuracy": stats["accuracy"],
        "val_loss": val_loss,
        "val_accuracy": val["accuracy"],
        "val_f1": val["f1"],
        "images_per_s": stats["images"] / stats["seconds"] if stats["seconds"] else 0.0,
        "seconds": stats["seconds"],
    }


def _save(run: RunDir, task: _Task, learner: _Learner, progress: _Progress, epoch: int, best: bool) -> None:
    """best.pt with the best epoch's weights (when best: the epoch improved on it, or the fit ends),
    last.pt with this epoch's and what a resume needs."""
    checkpoint = checkpoint_of(
        learner.scored,
        task.config,
        task.data.classes,
        task.preprocess,
        task.class_prior,
        epoch,
        learner.stopper.best,
    )
    if best and progress.best_state is not None:
        run.save_best(checkpoint | {"state_dict": progress.best_state, "epoch": learner.stopper.best_epoch})
    progress_state = {"history": progress.history, "train_seconds": progress.train_seconds}
    run.save_last(checkpoint, learner.training_state() | progress_state)


def _check_finite(loss: float, epoch: int, tc: TrainConfig) -> None:
    """Stop a fit whose training loss is no longer a number: nothing after it would mean anything."""
    if not math.isfinite(loss):
        raise DefungiError(
            f"the training loss became {loss} in epoch {epoch + 1} of {tc.model} (lr {tc.lr:g}); "
            "lower --lr, or use --set train.amp=false, and train into a new --out"
        )


def _train(
    task: _Task,
    learner: _Learner,
    source: _Source,
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
    each_epoch = not isinstance(source, _Features)  # a head on cached features: its fit takes seconds; saved at its end
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
        progress.train_seconds += row["seconds"]
        improved = stopper.improved(row["val_f1"])
        stopped = stopper.step(row["val_f1"], epoch)
        log.info(
            "epoch %d/%d  loss %.3f  val loss %.3f  val acc %.3f  val F1 %.3f  %.0f img/s%s",
            epoch + 1,
            tc.epochs,
            row["train_loss"],
            row["val_loss"],
            row["val_accuracy"],
            row["val_f1"],
            row["images_per_s"],
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


def _scoring(source: _Source) -> Callable[[np.ndarray], tuple[np.ndarray, float]] | None:
    """How the parts are scored: through the batch source without test-time augmentation; with it, from
    the cached inputs of all 8 flips/rotations where the source holds them (no image passes through the
    frozen backbone again), else on the images (score_parts' own way)."""
    if not source.task.config.train.tta:
        return source.probabilities
    if isinstance(source, _Features) and len(source.features) == 8:
        return functools.partial(source.probabilities, views=8)
    return None


def _result(
    task: _Task, learner: _Learner, source: _Source, progress: _Progress, split: dict[str, np.ndarray]
) -> FitResult:
    """Score every part but 'train' with the best epoch's weights (train.restore_best) or the last's:
    as _scoring says (test-time augmentation from the cache where it holds all 8 views)."""
    tc = task.config.train
    if tc.restore_best and progress.best_state is not None:
        learner.scored.load_state_dict(progress.best_state)
    metrics, probabilities = score_parts(
        learner.scored, task.data, split, task.preprocess, task.device, tc, task.class_weights, _scoring(source)
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


def _ood(
    task: _Task, source: _Source, split: dict[str, np.ndarray]
) -> tuple[OodDetector | None, dict[str, np.ndarray]]:
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
    detector = fit_detector(readings["train"], task.data.labels[task.train_idx], readings["val"], at)
    assert detector is not None  # enough validation images for the quantile
    log.info(
        "refusal of non-micrographs: Mahalanobis distances of %s (%.0f%% of %d validation images under its threshold)",
        " and ".join(f"the {r.kind} of {r.module}" for r in at),
        100 * detector.quantile,
        detector.held_out,
    )
    return detector, {part: detector.scores(r) for part, r in readings.items() if part != "train"}


def _pretrained_pass(config: Config, data: Dataset, view: int = 0) -> FrozenPass:
    """The pass that a frozen-backbone config's fits read data's images with (see frozen_pass)."""
    if not config.train.freeze_backbone:
        raise DefungiError("a frozen backbone's features need a config with train.freeze_backbone (a transfer profile)")
    preprocess = _preprocess(config, data, np.arange(len(data.labels)))
    return frozen_pass(config, len(data.classes), preprocess, resolve_device(config.train.device), view)


def cold_features(config: Config, data: Dataset) -> int:
    """Images a frozen-backbone config still has to pass through its backbone before its first fit:
    per cached view, those the user cache lacks a reading of (0 for other configs)."""
    if not config.train.freeze_backbone:
        return 0
    views = range(config.train.cached_views)
    return sum(_pretrained_pass(config, data, view).missing(data.keys, view) for view in views)


def frozen_features(config: Config, data: Dataset, view: int = 0) -> np.ndarray:
    """The cached input of the first module that trains (the head's features) of a frozen-backbone
    config, for every image of data (as load_dataset ordered them): what its fits train on, read from
    the user cache (computed there once when missing). The frozen part's preprocessing and weights
    do not depend on the split, so every fold of a cross-validation shares them."""
    backbone = _pretrained_pass(config, data, view)
    start = Reading(config.train.train_from or model_entry(config.train.model).parts.classifier, "input")
    return backbone.cached(data.images, data.keys, view)[backbone.readings.index(start)]


def fit(
    config: Config,
    data: Dataset,
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
    task = _task(config, data, split)
    learner = _learner(task, _model(task, fresh=saved is None))
    progress = _resume(learner, saved)
    if saved is not None:
        log.info("resuming %s at epoch %d/%d", run.root, progress.start_epoch + 1, config.train.epochs)
    ticket = plan.on_fit(config, split)
    # after a resume: the cached inputs are those of the loaded backbone
    source = _source(task, learner, ticket.features)
    _train(task, learner, source, progress, run, sync, ticket.epoch)
    result = sync.end(lambda: _result(task, learner, source, progress, split))
    ticket.done()
    return result
