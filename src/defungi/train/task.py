"""What a fit is about and what it trains: its Task (the images and parts, the device, the
preprocessing, the class shares) and its Learner (the model, its weight average, one optimisation
step, early stopping; with a frozen backbone, what runs from train_from on)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from timm.utils import ModelEmaV3

from defungi.config import Config
from defungi.data.augment import balanced_order
from defungi.data.dataset import Dataset
from defungi.models import create_model, model_entry
from defungi.models.pretrained import initial_weights, tail_example, tail_from
from defungi.stats.metrics import prior_weights
from defungi.train import distributed
from defungi.train.callbacks import EarlyStopping
from defungi.train.loop import Preprocess, TrainStep, build_optimizer, train_step, weight_average
from defungi.train.runtime import Threads, resolve_device, seed_everything


def channel_stats(
    images: np.ndarray, idx: np.ndarray, max_images: int = 2000
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (0..1 scale) of up to max_images training images."""
    take = idx if len(idx) <= max_images else np.linspace(0, len(idx) - 1, max_images).astype(int)
    sample = np.asarray(images[np.sort(idx[take] if len(idx) > max_images else idx)], dtype=np.float32) / 255.0
    mean = sample.mean(axis=(0, 1, 2))
    std = sample.std(axis=(0, 1, 2)) + 1e-6
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


@dataclass(frozen=True)
class Task:
    """What a fit is about: the images and its parts, the device, the preprocessing, the class shares."""

    config: Config
    dataset: Dataset
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
        return balanced_order(self.dataset.labels[self.train_idx], n, rng) if tc.balance else rng.permutation(n)


def task_of(config: Config, dataset: Dataset, split: dict[str, np.ndarray]) -> Task:
    """Seed, join the torchrun world, and settle the preprocessing (the training part's channel
    statistics, or those of the pretrained weights) and class shares of a fit."""
    tc = config.train
    seed_everything(tc.seed)
    device = distributed.setup(resolve_device(tc.device))
    threads = Threads(device)
    train_idx = split["train"]
    preprocess = preprocess_of(config, dataset, train_idx)
    counts = np.bincount(dataset.labels[train_idx], minlength=len(dataset.classes))
    class_prior = (counts / counts.sum()).tolist() if tc.balance else None
    return Task(config, dataset, train_idx, split["val"], device, preprocess, class_prior, threads)


def preprocess_of(config: Config, dataset: Dataset, train_idx: np.ndarray) -> Preprocess:
    """A fit's input scaling: the pretrained weights' mean/std, or the training part's channel statistics."""
    if config.data.normalize == "pretrained":
        mean, std = model_entry(config.train.model).normalization
    else:
        mean, std = channel_stats(dataset.images, train_idx)
    return Preprocess(dataset.images.shape[1], mean, std, config.data.normalize)


@dataclass
class Learner:
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


def new_model(task: Task, fresh: bool) -> nn.Module:
    """The model on the device, with its pretrained weights unless the fit resumes."""
    tc = task.config.train
    model = create_model(tc.model, num_classes=len(task.dataset.classes), **tc.model_args)
    if fresh:
        initial_weights(model, tc.model, tc.weights, tc.pretrained)
    return model.to(task.device, memory_format=torch.channels_last if tc.channels_last else torch.contiguous_format)


def learner_of(task: Task, model: nn.Module) -> Learner:
    """The model's training: the modules that train (all, or those from train_from on), optimiser,
    schedule, loss scaling, weight average and early stopping."""
    tc = task.config.train
    head = model_entry(tc.model).parts.classifier if tc.freeze_backbone or tc.backbone_lr_scale != 1 else None
    train_from = (tc.train_from or head) if tc.freeze_backbone else None
    example = tail_example(task.preprocess.image_size, task.device)
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
    return Learner(model, trainer, ema, step, stopper, train_from, tails)
