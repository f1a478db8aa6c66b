"""One training run: config + data + split -> trained model, history and test metrics."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from timm.utils import ModelEmaV3

from defungi.config import Config, TrainConfig
from defungi.data.augment import augment_batch, balanced_order, mix_batch
from defungi.data.dataset import Dataset
from defungi.models import create_model, model_entry
from defungi.train.callbacks import EarlyStopping
from defungi.train.loop import Preprocess, autocast_dtype, batches, evaluate, precision_name, prior_weights, train_one_epoch
from defungi.train.metrics import classification_metrics
from defungi.utils import atomic_torch_save, resolve_device, seed_everything

log = logging.getLogger(__name__)

CHECKPOINT_LAST = "last.pt"  # every epoch: model, optimiser, schedule, callbacks (for --resume)
CHECKPOINT_BEST = "best.pt"  # the weights with the best validation macro-F1 (for evaluate/predict)


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


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW or SGD with Nesterov momentum; no weight decay on norms and biases."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    raise ValueError(f"unknown optimizer '{name}'; use adamw or sgd")


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, lr: float, total_steps: int, warmup_fraction: float) -> torch.optim.lr_scheduler.LRScheduler:
    """One-cycle, or linear warm-up then cosine decay, stepped once per batch."""
    total_steps = max(total_steps, 10)  # one-cycle needs a few steps per phase (tiny test fits)
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps, pct_start=warmup_fraction)
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


def channel_stats(images: np.ndarray, idx: np.ndarray, max_images: int = 2000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (0..1 scale) of up to max_images training images."""
    take = idx if len(idx) <= max_images else np.linspace(0, len(idx) - 1, max_images).astype(int)
    sample = np.asarray(images[np.sort(idx[take] if len(idx) > max_images else idx)], dtype=np.float32) / 255.0
    mean = sample.mean(axis=(0, 1, 2))
    std = sample.std(axis=(0, 1, 2)) + 1e-6
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def model_args(config: Config) -> dict[str, Any]:
    """Registry defaults merged with the config's model_args (recorded in checkpoints)."""
    return {**model_entry(config.train.model).defaults, **config.train.model_args}


def checkpoint_payload(model: nn.Module, config: Config, classes: list[str], preprocess: Preprocess, class_prior: list[float] | None, epoch: int, best_metric: float) -> dict[str, Any]:
    """A self-describing checkpoint: enough to rebuild the model with no other file."""
    return {
        "model_name": config.train.model,
        "model_args": model_args(config),
        "classes": list(classes),
        "preprocess": {"image_size": preprocess.image_size, "mean": list(preprocess.mean), "std": list(preprocess.std), "normalize": preprocess.normalize},
        "config": config.to_dict(),
        "class_prior": class_prior,  # training class shares when trained class-balanced (see prior_weights)
        "epoch": epoch,
        "best_metric": best_metric,
        "state_dict": model.state_dict(),
    }


def score_parts(model: nn.Module, data: Dataset, split: dict[str, np.ndarray], preprocess: Preprocess, device: torch.device, tc: TrainConfig, class_weights: np.ndarray | None) -> dict[str, dict[str, Any]]:
    """Metrics of every part but 'train', scored as the run asks (test-time augmentation, precision)."""
    metrics = {}
    for part, idx in split.items():
        if part == "train" or len(idx) == 0:
            continue
        t0 = time.perf_counter()
        probs, loss = evaluate(model, data.images[idx], data.labels[idx], preprocess, device, tta=tc.tta, amp=tc.amp, channels_last=tc.channels_last, class_weights=class_weights)
        metrics[part] = classification_metrics(data.labels[idx], probs.argmax(1), data.classes) | {"loss": loss, "tta": tc.tta, "seconds": time.perf_counter() - t0}
    return metrics


def fit(config: Config, data: Dataset, split: dict[str, np.ndarray], out_dir: Path | None = None) -> FitResult:
    """Train on split['train'], early-stop on split['val'] macro-F1, evaluate every other part.

    Extra parts (e.g. 'train_eval', a sample of the training images) are evaluated too.

    With out_dir, checkpoints go there every epoch and an interrupted fit continues from the
    last one. The best weights are restored before the final evaluation.
    """
    tc = config.train
    seed_everything(tc.seed)
    device = resolve_device(tc.device)
    train_idx, val_idx = split["train"], split["val"]
    mean, std = channel_stats(data.images, train_idx)
    preprocess = Preprocess(data.images.shape[1], mean, std, config.data.normalize)
    counts = np.bincount(data.labels[train_idx], minlength=len(data.classes))
    class_prior = (counts / counts.sum()).tolist() if tc.balance else None
    class_weights = prior_weights(class_prior, tc.prior_weight)
    model = create_model(tc.model, num_classes=len(data.classes), **tc.model_args)
    model = model.to(device, memory_format=torch.channels_last if tc.channels_last else torch.contiguous_format)
    optimizer = build_optimizer(model, tc.optimizer, tc.lr, tc.weight_decay)
    # the weights that are evaluated and saved: an exponential moving average when ema_decay > 0
    ema = ModelEmaV3(model, decay=tc.ema_decay, use_warmup=True) if tc.ema_decay > 0 else None
    scored = ema.module if ema is not None else model
    steps_per_epoch = max(1, len(train_idx) // tc.batch_size)
    scheduler = build_scheduler(optimizer, tc.schedule, tc.lr, tc.epochs * steps_per_epoch, tc.warmup_fraction)
    criterion = nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing)
    # autocast decides per device (bf16/fp16 on CUDA, bf16 on CPUs with native bf16); fp16 needs loss scaling
    scaler = torch.amp.GradScaler("cuda", enabled=autocast_dtype(device, tc.amp) == torch.float16)
    stopper = EarlyStopping(tc.patience_epochs, tc.min_epochs)
    history: list[dict[str, float]] = []
    start_epoch, train_seconds = 0, 0.0
    last_path = out_dir / CHECKPOINT_LAST if out_dir else None
    best_state: dict[str, torch.Tensor] | None = None

    if last_path is not None and last_path.exists():
        state = torch.load(last_path, map_location=device, weights_only=True)
        model.load_state_dict(state["train_state_dict"])
        scored.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        stopper.load_state_dict(state["early_stopping"])
        history, start_epoch, train_seconds = state["history"], state["epoch"] + 1, state["train_seconds"]
        best_path = out_dir / CHECKPOINT_BEST
        if best_path.exists():
            best_state = torch.load(best_path, map_location=device, weights_only=True)["state_dict"]
        log.info("resuming %s at epoch %d/%d", out_dir, start_epoch + 1, tc.epochs)

    stopped = bool(stopper.reason)
    for epoch in range(start_epoch, tc.epochs):
        if stopped:
            break
        rng = np.random.default_rng([tc.seed, epoch])
        generator = torch.Generator().manual_seed(tc.seed * 100_003 + epoch)
        labels_train = data.labels[train_idx]
        picks = balanced_order(labels_train, len(train_idx), rng) if tc.balance else rng.permutation(len(train_idx))
        order = train_idx[picks]
        stats = train_one_epoch(
            model,
            batches(data.images, data.labels, order, tc.batch_size, drop_last=True),
            steps_per_epoch,
            optimizer,
            scheduler,
            criterion,
            preprocess,
            lambda x, y: mix_batch(augment_batch(x, tc.augment, generator), y, len(data.classes), tc.mix, tc.mix_alpha, generator),
            device,
            amp=tc.amp,
            scaler=scaler,
            channels_last=tc.channels_last,
            desc=f"epoch {epoch + 1}/{tc.epochs}",
            on_step=(lambda: ema.update(model, step=scheduler.last_epoch)) if ema is not None else None,
        )
        train_seconds += stats["seconds"]
        val_probs, val_loss = evaluate(scored, data.images[val_idx], data.labels[val_idx], preprocess, device, amp=tc.amp, channels_last=tc.channels_last, class_weights=class_weights)
        val = classification_metrics(data.labels[val_idx], val_probs.argmax(1), data.classes)
        row = {
            "epoch": epoch + 1,
            "lr": scheduler.get_last_lr()[0],
            "train_loss": stats["loss"],
            "train_accuracy": stats["accuracy"],
            "val_loss": val_loss,
            "val_accuracy": val["accuracy"],
            "val_f1": val["f1"],
            "images_per_s": stats["images"] / stats["seconds"],
            "seconds": stats["seconds"],
        }
        history.append(row)
        improved = stopper.improved(val["f1"])
        stopped = stopper.step(val["f1"], epoch)
        log.info("epoch %d/%d  loss %.3f  val loss %.3f  val acc %.3f  val F1 %.3f  %.0f img/s%s", epoch + 1, tc.epochs, stats["loss"], val_loss, val["accuracy"], val["f1"], row["images_per_s"], "  *" if improved else "")
        if improved:
            best_state = {k: v.detach().clone() for k, v in scored.state_dict().items()}
        if out_dir is not None:
            if improved:
                atomic_torch_save(checkpoint_payload(scored, config, data.classes, preprocess, class_prior, epoch, stopper.best), out_dir / CHECKPOINT_BEST)
            last = checkpoint_payload(scored, config, data.classes, preprocess, class_prior, epoch, stopper.best)
            last.update(train_state_dict=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), early_stopping=stopper.state_dict(), history=history, train_seconds=train_seconds)
            atomic_torch_save(last, out_dir / CHECKPOINT_LAST)
    if stopper.reason:
        log.info("early stop: %s", stopper.reason)

    if best_state is not None:
        scored.load_state_dict(best_state)
    metrics = score_parts(scored, data, split, preprocess, device, tc, class_weights)
    n_params = sum(p.numel() for p in model.parameters())
    return FitResult(history, metrics, stopper.best_epoch + 1, stopper.reason or "epoch budget used", train_seconds, n_params, precision_name(device, tc.amp))
