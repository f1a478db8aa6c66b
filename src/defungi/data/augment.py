"""Batched tensor augmentation and class balancing, applied on uint8 batches already in memory."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import betaincinv

AUGMENTS = ("none", "basic", "strong")


def dihedral(batch: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the 8 flips/rotations of an NCHW batch (k in 0..7)."""
    if k >= 4:
        batch = batch.flip(3)
    return torch.rot90(batch, k % 4, (2, 3)) if k % 4 else batch


def random_dihedral(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image gets one of the 8 flips/rotations at random."""
    ks = torch.randint(0, 8, (batch.shape[0],), generator=generator)  # CPU indices work on any device
    out = torch.empty_like(batch)
    for k in range(8):
        idx = (ks == k).nonzero().flatten()
        if len(idx):
            out[idx] = dihedral(batch[idx], k)
    return out


def colour_jitter(batch: torch.Tensor, generator: torch.Generator, strength: float) -> torch.Tensor:
    """Per-image brightness, contrast and per-channel gain on a normalised batch."""
    n, c = batch.shape[:2]
    shape = (n, 1, 1, 1)

    def uniform(size: tuple[int, ...]) -> torch.Tensor:
        """Draws in [-1, 1) from the seeded CPU generator (the same on any device), moved to the batch."""
        return (2 * torch.rand(size, generator=generator) - 1).to(batch.device)

    contrast = 1 + strength * uniform(shape)
    brightness = strength * uniform(shape)
    gain = 1 + 0.5 * strength * uniform((n, c, 1, 1))
    return batch * contrast * gain + brightness


def random_resized_crop(batch: torch.Tensor, generator: torch.Generator, min_scale: float = 0.5) -> torch.Tensor:
    """Zoom each image into a random square covering min_scale..1 of its area (one grid_sample)."""
    n = batch.shape[0]
    scale = torch.sqrt(min_scale + (1 - min_scale) * torch.rand(n, generator=generator))
    shift = (1 - scale)[:, None] * (2 * torch.rand((n, 2), generator=generator) - 1)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(batch.dtype), list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid.to(batch.device), mode="bilinear", padding_mode="reflection", align_corners=False)


def augment_batch(batch: torch.Tensor, level: str, generator: torch.Generator) -> torch.Tensor:
    """Apply the named augmentation level to a normalised float NCHW batch."""
    if level == "none":
        return batch
    if level not in AUGMENTS:
        raise ValueError(f"unknown augmentation '{level}'; use one of {AUGMENTS}")
    if level == "strong":
        batch = random_resized_crop(batch, generator)
    batch = random_dihedral(batch, generator)
    return colour_jitter(batch, generator, 0.1 if level == "basic" else 0.2)


def balanced_order(labels: np.ndarray, n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Positions drawn so that every class is equally likely: minorities are oversampled.

    Every image of every class appears before any is repeated within its class, so majority
    classes are not thrown away at random and minority images recur evenly.
    """
    classes = np.unique(labels)
    per_class = -(-n_samples // len(classes))
    parts = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        reps = -(-per_class // len(members))
        pool = np.concatenate([rng.permutation(members) for _ in range(reps)])[:per_class]
        parts.append(pool)
    order = np.concatenate(parts)
    return rng.permutation(order)[:n_samples]


MIXES = ("none", "mixup", "cutmix", "both")


def mix_batch(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, mode: str, alpha: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp or CutMix (or either, half the batches each): blended images and soft targets."""
    target = F.one_hot(y, num_classes).float()
    if mode == "none" or x.shape[0] < 2:
        return x, target
    if mode not in MIXES:
        raise ValueError(f"unknown mix '{mode}'; use one of {MIXES}")
    draws = torch.rand(3, generator=generator)
    lam = float(betaincinv(alpha, alpha, float(draws[0])))  # a Beta(alpha, alpha) draw from the seeded generator
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
    use_cutmix = mode == "cutmix" or (mode == "both" and draws[1] < 0.5)
    if use_cutmix:
        h, w = x.shape[2:]
        cut_h, cut_w = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
        cy, cx = int(draws[2] * h), int(torch.rand(1, generator=generator) * w)
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        x = x.clone()
        x[:, :, top:bottom, left:right] = x[perm, :, top:bottom, left:right]
        lam = 1 - (bottom - top) * (right - left) / (h * w)
    else:
        x = lam * x + (1 - lam) * x[perm]
    return x, lam * target + (1 - lam) * target[perm]
