"""One fit: config + data + split -> trained weights, history and metrics of the scored parts."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from timm.utils import ModelEmaV3

from defungi.config import Config, TrainConfig
from defungi.data.augment import augment_batch, balanced_order, mix_batch
from defungi.data.dataset import Dataset
from defungi.data.scan import default_cache_dir
from defungi.experiments.rundir import RunDir
from defungi.models import create_model
from defungi.models.pretrained import (
    head_name,
    imagenet_state_dict,
    load_backbone,
    normalization,
    read_weights,
    tail_from,
)
from defungi.train import distributed
from defungi.train.callbacks import EarlyStopping
from defungi.train.loop import (
    Preprocess,
    TrainStep,
    autocast,
    autocast_dtype,
    batches,
    evaluate,
    mean_nll,
    module_inputs,
    precision_name,
    train_one_epoch,
)
from defungi.train.metrics import classification_metrics, prior_weights, scored, weighted
from defungi.train.runtime import resolve_device, seed_everything
from defungi.utils import atomic_save_npy, exclusive_lock

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


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    weight_decay: float,
    head: str | None = None,
    backbone_lr_scale: float = 1.0,
) -> torch.optim.Optimizer:
    """AdamW or SGD with Nesterov momentum; no weight decay on norms and biases; frozen weights left
    out. With the head's name, the other (backbone) weights learn at backbone_lr_scale x lr."""
    groups = []
    for backbone in (False, True):
        params = [
            p
            for n, p in model.named_parameters()
            if p.requires_grad and (head is not None and not n.startswith(f"{head}.")) == backbone
        ]
        rate = lr * (backbone_lr_scale if backbone else 1.0)
        groups += [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay, "lr": rate},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lr": rate},
        ]
    groups = [g for g in groups if g["params"]]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    raise ValueError(f"unknown optimizer '{name}'; use adamw or sgd")


def build_scheduler(
    optimizer: torch.optim.Optimizer, name: str, total_steps: int, warmup_fraction: float
) -> torch.optim.lr_scheduler.LRScheduler:
    """One-cycle (peaking at each parameter group's rate), or linear warm-up then cosine decay,
    stepped once per batch."""
    total_steps = max(total_steps, 10)  # one-cycle needs a few steps per phase (tiny test fits)
    if name == "onecycle":
        peaks = [g["lr"] for g in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=peaks, total_steps=total_steps, pct_start=warmup_fraction
        )
    if name == "cosine":
        warmup = max(1, int(total_steps * warmup_fraction))
        return torch.optim.lr_scheduler.SequentialLR(
            optimizer,
            [
                torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup),
                torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup)),
            ],
            milestones=[warmup],
        )
    raise ValueError(f"unknown schedule '{name}'; use onecycle or cosine")


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
        scores = scored(probs, data.labels[idx], data.groups[idx], data.classes, seed=tc.seed)
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


@dataclass
class _Fit:
    """A fit in progress: what it trains, what it scores, and where it stands."""

    config: Config
    data: Dataset
    train_idx: np.ndarray
    val_idx: np.ndarray
    device: torch.device
    preprocess: Preprocess
    class_prior: list[float] | None
    model: nn.Module
    trainer: nn.Module  # what the training steps call: the model, or DDP around it (torchrun)
    ema: ModelEmaV3 | None
    step: TrainStep
    steps_per_epoch: int
    stopper: EarlyStopping
    head: str | None = None  # the head's module name, when the backbone is frozen or learns slower
    train_from: str | None = None  # frozen backbone: the first module that trains (the head, or e.g. blocks.5)
    features: list[np.ndarray] = field(default_factory=list)  # frozen backbone: that module's input, per view
    tails: list[nn.Module] = field(default_factory=list)  # what runs from train_from on: trained, [scored]
    history: list[dict[str, float]] = field(default_factory=list)
    start_epoch: int = 0
    train_seconds: float = 0.0
    best_state: dict[str, torch.Tensor] | None = None

    @property
    def scored(self) -> nn.Module:
        """The weights that are evaluated and saved: the moving average when there is one."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def class_weights(self) -> np.ndarray | None:
        return prior_weights(self.class_prior, self.config.train.prior_weight)

    def checkpoint(self, epoch: int) -> dict[str, Any]:
        return RunDir.checkpoint(
            self.scored, self.config, self.data.classes, self.preprocess, self.class_prior, epoch, self.stopper.best
        )

    def resume(self, run: RunDir) -> None:
        """Continue from run's last.pt, if there is one (under torchrun: rank 0's, sent to every rank,
        whose machines need not hold the run folder)."""
        rank = distributed.world()
        if rank.launched:
            saved = distributed.from_main(run.resume_state(torch.device("cpu")) if rank.main else None)
        else:
            saved = run.resume_state(self.device)
        if saved is None:
            return
        state, self.best_state = saved
        self.model.load_state_dict(state["train_state_dict"])
        self.scored.load_state_dict(state["state_dict"])
        self.step.optimizer.load_state_dict(state["optimizer"])
        self.step.scheduler.load_state_dict(state["scheduler"])
        self.stopper.load_state_dict(state["early_stopping"])
        self.history, self.start_epoch, self.train_seconds = (
            state["history"],
            state["epoch"] + 1,
            state["train_seconds"],
        )
        log.info("resuming %s at epoch %d/%d", run.root, self.start_epoch + 1, self.config.train.epochs)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Positions into the training part that one epoch visits: class-balanced, seeded per epoch."""
        tc, n = self.config.train, len(self.train_idx)
        rng = np.random.default_rng([tc.seed, epoch])
        return balanced_order(self.data.labels[self.train_idx], n, rng) if tc.balance else rng.permutation(n)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """Train one class-balanced, augmented epoch (of the modules from train_from on, on cached
        inputs, when the backbone is frozen); score the validation part; return its history row."""
        if self.features:
            return self.train_cached_epoch(epoch)
        tc, data, rank = self.config.train, self.data, distributed.world()
        generator = torch.Generator().manual_seed(tc.seed * 100_003 + epoch + rank.rank * 7_919)
        picks = distributed.shard(self.epoch_order(epoch), tc.batch_size)
        n_classes = len(data.classes)

        def augment(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return mix_batch(augment_batch(x, tc.augment, generator), y, n_classes, tc.mix, tc.mix_alpha, generator)

        stats = train_one_epoch(
            self.trainer,
            batches(data.images, data.labels, self.train_idx[picks], tc.batch_size // rank.size, drop_last=True),
            self.steps_per_epoch,
            self.step,
            self.preprocess,
            augment,
            desc=f"epoch {epoch + 1}/{tc.epochs}",
        )
        stats = distributed.reduce_stats(stats)
        self.train_seconds += stats["seconds"]
        if not rank.main:  # rank 0 validates; every rank takes its row (early stopping reads it)
            return distributed.from_main(None)
        val_idx = self.val_idx
        val_probs, val_loss = evaluate(
            self.scored,
            data.images[val_idx],
            data.labels[val_idx],
            self.preprocess,
            self.device,
            amp=tc.amp,
            channels_last=tc.channels_last,
            class_weights=self.class_weights,
        )
        return distributed.from_main(self.history_row(epoch, stats, val_probs, val_loss))

    def history_row(
        self, epoch: int, stats: dict[str, float], val_probs: np.ndarray, val_loss: float
    ) -> dict[str, float]:
        """One epoch's row of history.csv, from its training stats and validation probabilities."""
        val = classification_metrics(self.data.labels[self.val_idx], val_probs.argmax(1), self.data.classes)
        return {
            "epoch": epoch + 1,
            "lr": self.step.scheduler.get_last_lr()[0],
            "train_loss": stats["loss"],
            "train_accuracy": stats["accuracy"],
            "val_loss": val_loss,
            "val_accuracy": val["accuracy"],
            "val_f1": val["f1"],
            "images_per_s": stats["images"] / stats["seconds"] if stats["seconds"] else 0.0,
            "seconds": stats["seconds"],
        }

    def cache_inputs(self) -> None:
        """Compute (or read from the cache) the input of train_from for every image, per view."""
        self.features = [
            _cached_inputs(self.config, self.data, self.model, self.train_from, self.preprocess, self.device, view)
            for view in range(self.config.train.cached_views)
        ]

    def cached_batch(self, idx: np.ndarray, views: np.ndarray | None = None) -> torch.Tensor:
        """The cached inputs of images idx (of their views, or as they are), on the device (channels
        last where configured)."""
        views = np.zeros(len(idx), dtype=int) if views is None else views
        batch = np.empty((len(idx), *self.features[0].shape[1:]), dtype=np.float32)
        for view in np.unique(views):
            batch[views == view] = self.features[view][idx[views == view]]
        x = torch.from_numpy(batch).to(self.device)
        return (
            x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 and self.config.train.channels_last else x
        )

    def train_cached_epoch(self, epoch: int) -> dict[str, float]:
        """One class-balanced epoch of the modules from train_from on, on the frozen backbone's cached
        output (augmented only by the cached flips/rotations: one per image, drawn per epoch)."""
        tc, data, step = self.config.train, self.data, self.step
        order, tail = self.train_idx[self.epoch_order(epoch)], self.tails[0]
        views = np.random.default_rng([tc.seed, epoch, 1]).integers(tc.cached_views, size=len(order))
        tail.train()
        start, total, correct, seen = time.perf_counter(), 0.0, 0, 0
        for i in range(0, len(order) - tc.batch_size + 1, tc.batch_size):
            pick = np.argsort(order[i : i + tc.batch_size]) + i
            idx = order[pick]
            x, y = self.cached_batch(idx, views[pick]), torch.from_numpy(data.labels[idx]).to(self.device)
            with autocast(self.device, tc.amp):
                logits = tail(x).float()
            loss = step.criterion(logits, y)
            step.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            step.optimizer.step()
            step.scheduler.step()
            if step.on_step is not None:
                step.on_step()
            total, correct, seen = (
                total + loss.item() * len(y),
                correct + int((logits.argmax(1) == y).sum()),
                seen + len(y),
            )
        stats = {
            "loss": total / max(seen, 1),
            "accuracy": correct / max(seen, 1),
            "images": seen,
            "seconds": time.perf_counter() - start,
        }
        self.train_seconds += stats["seconds"]
        return self.history_row(epoch, stats, *self.cached_probabilities(self.val_idx))

    @torch.no_grad()
    def cached_probabilities(self, idx: np.ndarray) -> tuple[np.ndarray, float]:
        """(probabilities, loss) of the scored model from train_from on, on the cached inputs of
        images idx: what the whole model computes on them without test-time augmentation."""
        tail, out = self.tails[-1].eval(), []
        for start in range(0, len(idx), 256):
            with autocast(self.device, self.config.train.amp):
                out.append(torch.softmax(tail(self.cached_batch(idx[start : start + 256])).float(), 1).cpu().numpy())
        probs = weighted(np.concatenate(out) if out else np.zeros((0, len(self.data.classes))), self.class_weights)
        return probs, mean_nll(probs, self.data.labels[idx])


def _initial_weights(model: nn.Module, tc: TrainConfig) -> None:
    """Pretrained weights into everything but the head: from a file, or the model's ImageNet ones."""
    if tc.weights:
        load_backbone(model, read_weights(tc.weights), f"--weights {tc.weights}")
    elif tc.pretrained:
        load_backbone(model, imagenet_state_dict(tc.model), f"the ImageNet weights of {tc.model}")


def _cached_inputs(
    config: Config,
    data: Dataset,
    model: nn.Module,
    module: str,
    preprocess: Preprocess,
    device: torch.device,
    view: int = 0,
) -> np.ndarray:
    """The input of the model's module (the head: its features) for every image's view-th flip/rotation,
    computed once per (image files, model and its weights, module, preprocessing, precision, view) in
    the user cache, so that CV folds and re-runs share them; read memory-mapped."""
    tc = config.train
    if tc.weights:
        stat = Path(tc.weights).expanduser().stat()
        source = f"{Path(tc.weights).expanduser().resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    else:
        source = "imagenet"  # freeze_backbone needs pretrained weights (config.validate)
    prep = dataclasses.asdict(preprocess)
    if preprocess.normalize in ("image", "luma"):  # per-image normalisation: mean/std unused
        prep = {k: v for k, v in prep.items() if k not in ("mean", "std")}
    files = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in data.paths]
    precision = precision_name(device, tc.amp)
    what = [tc.model, tc.model_args, source, module, prep, precision, files] + ([view] if view else [])
    key = hashlib.sha1(json.dumps(what).encode())
    path = default_cache_dir() / "features" / f"{key.hexdigest()[:16]}.npy"
    with exclusive_lock(path.with_suffix(".lock")):
        if not path.exists():
            t0 = time.perf_counter()
            feats = module_inputs(
                model,
                model.get_submodule(module),
                data.images,
                preprocess,
                device,
                amp=tc.amp,
                channels_last=tc.channels_last,
                view=view,
            )
            atomic_save_npy(path, feats)
            log.info(
                "inputs of %s for %d images (view %d) in %.0f s, cached in %s",
                module,
                len(feats),
                view,
                time.perf_counter() - t0,
                path,
            )
    return np.load(path, mmap_mode="r")


def _start(config: Config, data: Dataset, split: dict[str, np.ndarray], fresh: bool) -> _Fit:
    """Seed, then build the model (with its pretrained weights, unless the fit resumes), weight
    average, optimiser, schedule and stopping for a fit."""
    tc = config.train
    seed_everything(tc.seed)
    device = distributed.setup(resolve_device(tc.device))
    train_idx = split["train"]
    if config.data.normalize == "pretrained":
        mean, std = normalization(tc.model)
    else:
        mean, std = channel_stats(data.images, train_idx)
    preprocess = Preprocess(data.images.shape[1], mean, std, config.data.normalize)
    counts = np.bincount(data.labels[train_idx], minlength=len(data.classes))
    class_prior = (counts / counts.sum()).tolist() if tc.balance else None
    model = create_model(tc.model, num_classes=len(data.classes), **tc.model_args)
    if fresh:
        _initial_weights(model, tc)
    model = model.to(device, memory_format=torch.channels_last if tc.channels_last else torch.contiguous_format)
    head = head_name(model) if tc.freeze_backbone or tc.backbone_lr_scale != 1 else None
    train_from = (tc.train_from or head) if tc.freeze_backbone else None
    tails: list[nn.Module] = []  # what runs from train_from on: in the trained model (and its weight average)
    if train_from is not None:  # random inputs from their own generator: the global one is left alone
        size = preprocess.image_size
        example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
        tails.append(tail_from(model, train_from, example))
        trains = {id(p) for p in tails[0].parameters()}
        for p in model.parameters():
            p.requires_grad = id(p) in trains
    trainer = distributed.wrap(model, device)
    optimizer = build_optimizer(model, tc.optimizer, tc.lr, tc.weight_decay, head, tc.backbone_lr_scale)
    ema = ModelEmaV3(model, decay=tc.ema_decay, use_warmup=True) if tc.ema_decay > 0 else None
    if tails and ema is not None:
        tails.append(tail_from(ema.module, train_from, example))
    steps_per_epoch = max(1, len(train_idx) // tc.batch_size)
    scheduler = build_scheduler(optimizer, tc.schedule, tc.epochs * steps_per_epoch, tc.warmup_fraction)
    # autocast decides per device (bf16/fp16 on CUDA, bf16 on CPUs with native bf16); fp16 needs loss scaling
    scaler = torch.amp.GradScaler("cuda", enabled=autocast_dtype(device, tc.amp) == torch.float16)
    step = TrainStep(
        optimizer,
        scheduler,
        nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing),
        device,
        tc.amp,
        scaler,
        tc.channels_last,
        (lambda: ema.update(model, step=scheduler.last_epoch)) if ema is not None else None,
    )
    stopper = EarlyStopping(tc.patience_epochs, tc.min_epochs)
    return _Fit(
        config,
        data,
        train_idx,
        split["val"],
        device,
        preprocess,
        class_prior,
        model,
        trainer,
        ema,
        step,
        steps_per_epoch,
        stopper,
        head,
        train_from,
        tails=tails,
    )


def fit(config: Config, data: Dataset, split: dict[str, np.ndarray], run: RunDir | None = None) -> FitResult | None:
    """Train on split['train'], early-stop on split['val'] macro-F1, evaluate every other part.

    Extra parts (e.g. 'train_eval', a sample of the training images) are evaluated too. With a
    run folder, checkpoints go there every epoch and an interrupted fit continues from the last
    one. The best epoch's weights are scored (train.restore_best), or the last epoch's.
    Under torchrun every rank trains its share of each batch; rank 0 alone validates, writes
    checkpoints and scores (the other ranks return None).
    """
    tc = config.train
    state = _start(config, data, split, fresh=run is None or not run.layout.last.exists())
    if run is not None:
        state.resume(run)
    if tc.freeze_backbone:  # after a resume, so that the features are those of the loaded backbone
        state.cache_inputs()
    main = distributed.world().main
    stopped = bool(state.stopper.reason)
    for epoch in range(state.start_epoch, tc.epochs):
        if stopped:
            break
        row = state.train_epoch(epoch)
        state.history.append(row)
        improved = state.stopper.improved(row["val_f1"])
        stopped = state.stopper.step(row["val_f1"], epoch)
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
        if improved and main:
            state.best_state = {k: v.detach().clone() for k, v in state.scored.state_dict().items()}
        if run is not None and main:
            if improved:
                run.save_best(state.checkpoint(epoch))
            run.save_last(
                state.checkpoint(epoch),
                {
                    "train_state_dict": state.model.state_dict(),
                    "optimizer": state.step.optimizer.state_dict(),
                    "scheduler": state.step.scheduler.state_dict(),
                    "early_stopping": state.stopper.state_dict(),
                    "history": state.history,
                    "train_seconds": state.train_seconds,
                },
            )
    if state.stopper.reason:
        log.info("early stop: %s", state.stopper.reason)
    if not main:
        return None
    if tc.restore_best and state.best_state is not None:
        state.scored.load_state_dict(state.best_state)
    cached = state.cached_probabilities if state.features and not tc.tta else None
    metrics, probabilities = score_parts(
        state.scored, data, split, state.preprocess, state.device, tc, state.class_weights, cached
    )
    n_params = sum(p.numel() for p in state.model.parameters())
    stop_reason = state.stopper.reason or "epoch budget used"
    precision = precision_name(state.device, tc.amp)
    return FitResult(
        state.history,
        metrics,
        state.stopper.best_epoch + 1,
        stop_reason,
        state.train_seconds,
        n_params,
        precision,
        probabilities,
    )
