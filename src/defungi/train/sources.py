"""A fit's batch source: the images (augmented and mixed), or with a frozen backbone the cached input
of the first module that trains, per image and view, from the backbone's one pass (train.frozen);
and the frozen-feature path's entry points for a config (pretrained_pass, cold_features,
frozen_features). A source gives forward, batches(epoch), probabilities(idx) and read(readings, idx)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from defungi.config import Config
from defungi.data.augment import augment_batch, mix_batch
from defungi.data.dataset import Dataset
from defungi.errors import DefungiError
from defungi.models import model_entry
from defungi.stats.metrics import mean_nll, weighted
from defungi.train import distributed
from defungi.train.frozen import FrozenPass, frozen_pass
from defungi.train.loop import (
    Batch,
    batches,
    evaluate,
    feature_batches,
    feature_rows,
    hooked_inputs,
    image_batches,
    image_inputs,
    probabilities,
)
from defungi.train.ood import Reading
from defungi.train.runtime import resolve_device
from defungi.train.task import Learner, Task, preprocess_of


@dataclass
class Images:
    """A fit's batch source on the images: augmented and mixed, this rank's share of every global
    batch; validated by the scored model on the images."""

    task: Task
    learner: Learner

    @property
    def forward(self) -> nn.Module:
        return self.learner.trainer

    def batches(self, epoch: int) -> Iterator[Batch]:
        """One epoch's class-balanced training batches, augmented from a generator seeded per epoch and rank."""
        task, tc, rank = self.task, self.task.config.train, distributed.world()
        generator = torch.Generator().manual_seed(tc.seed * 100_003 + epoch + rank.rank * 7_919)
        n_classes = len(task.dataset.classes)

        def augment(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return mix_batch(augment_batch(x, tc.augment, generator), y, n_classes, tc.mix, tc.mix_alpha, generator)

        picks = task.train_idx[distributed.shard(task.epoch_order(epoch), tc.batch_size)]
        local = batches(task.dataset.images, task.dataset.labels, picks, tc.batch_size // rank.size, drop_last=True)
        return image_batches(local, task.preprocess, task.device, tc.channels_last, augment)

    def probabilities(self, idx: np.ndarray) -> tuple[np.ndarray, float]:
        """(probabilities, loss) of the scored model on images idx, without test-time augmentation."""
        task, tc = self.task, self.task.config.train
        return evaluate(
            self.learner.scored,
            task.dataset.images[idx],
            task.dataset.labels[idx],
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
        inputs = image_inputs(task.dataset.images, task.preprocess, task.device, batch_size, tc.channels_last, idx)
        modules = [r.hook(scored) for r in readings]
        return hooked_inputs(scored, modules, inputs, -(-len(idx) // batch_size), task.device, tc.amp)


@dataclass
class Features:
    """A fit's batch source with a frozen backbone: the cached input of train_from, per image one of
    its cached flips/rotations drawn per epoch; validated by the scored tail on the images as they are."""

    task: Task
    learner: Learner
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
            self.features, task.dataset.labels, order, views, tc.batch_size, task.device, tc.channels_last
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
        return probs, mean_nll(probs, task.dataset.labels[idx])

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
Source = Images | Features


def source_of(task: Task, learner: Learner, computed: Callable[[int], None]) -> Source:
    """What the fit trains on: the images, or with a frozen backbone the input of train_from for every
    image, per view, with the refusal detector's readings before train_from (view 0), all from one
    pass of the backbone's weights as they are now over the images the cache lacks; computed(n)
    after each pass over n images."""
    if learner.train_from is None:
        return Images(task, learner)
    start, features, frozen = Reading(learner.train_from, "input"), [], {}
    for view in range(task.config.train.cached_views):
        backbone = frozen_pass(
            task.config, len(task.dataset.classes), task.preprocess, task.device, view, learner.model, learner.tails[0]
        )
        cached = backbone.cached(task.dataset.images, task.dataset.keys, view, computed)
        read = dict(zip(backbone.readings, cached, strict=True))
        features.append(read.pop(start))
        frozen |= read
    return Features(task, learner, features, frozen)


def pretrained_pass(config: Config, dataset: Dataset, view: int = 0) -> FrozenPass:
    """The pass that a frozen-backbone config's fits read data's images with (see frozen_pass)."""
    if not config.train.freeze_backbone:
        raise DefungiError("a frozen backbone's features need a config with train.freeze_backbone (a transfer profile)")
    preprocess = preprocess_of(config, dataset, np.arange(len(dataset.labels)))
    return frozen_pass(config, len(dataset.classes), preprocess, resolve_device(config.train.device), view)


def cold_features(config: Config, dataset: Dataset) -> int:
    """Images a frozen-backbone config still has to pass through its backbone before its first fit:
    per cached view, those the user cache lacks a reading of (0 for other configs)."""
    if not config.train.freeze_backbone:
        return 0
    views = range(config.train.cached_views)
    return sum(pretrained_pass(config, dataset, view).missing(dataset.keys, view) for view in views)


def frozen_features(config: Config, dataset: Dataset, view: int = 0) -> np.ndarray:
    """The cached input of the first module that trains (the head's features) of a frozen-backbone
    config, for every image of data (as load_dataset ordered them): what its fits train on, read from
    the user cache (computed there once when missing). The frozen part's preprocessing and weights
    do not depend on the split, so every fold of a cross-validation shares them."""
    backbone = pretrained_pass(config, dataset, view)
    start = Reading(config.train.train_from or model_entry(config.train.model).parts.classifier, "input")
    return backbone.cached(dataset.images, dataset.keys, view)[backbone.readings.index(start)]
