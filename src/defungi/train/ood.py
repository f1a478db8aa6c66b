"""Refusal of what is not a DeFungi micrograph (out of distribution): where the model is read, and
the score computed inside its forward pass.

The detector reads each image at one or two places of the model (`Reading`): the head's input (the
pooled features it classifies) and, where the model's registry entry names a middle module, the
channel means of that module's output, where noise, flat fields and drawings stand out far more
than in the pooled features. For each reading it takes the Mahalanobis distance to the nearest class
mean of the training micrographs, scaled by its own held-out quantile; the image's score is the largest
scaled distance over a threshold set on held-out micrographs. The arithmetic (the whitening fitted by
Ledoit-Wolf, the conformal thresholds and how many held-out micrographs they take, the refused and
flagged tiers over 1 and over REFUSE) is stats.refusal's; this module holds what runs in torch. With too
few held-out micrographs the fit flags and refuses nothing (as split-conformal sets hold every class then).

Every fit fits its own detector (`experiments.fit`); predict, evaluate, the page and the exported
ONNX graph score the image inside the same forward pass that classifies it (`OodHooks`), on the
image as it is (the first view under test-time augmentation). The fit sets the scales and the
threshold on the scores of that same module (`OodScore`), so that a held-out image scores alike there
and when answered. An ensemble (folds, seeds) refuses where the mean of its members' scores, each over
its own threshold, is over 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn as nn

from defungi.models.ensemble import members
from defungi.models.registry import ModelParts
from defungi.results.ood import OodCheck
from defungi.stats.refusal import (
    QUANTILE,
    REFUSE,
    held_out_needed,
    refusal_threshold,
    refusal_tiers,
    refused_share,
    whitening,
)
from defungi.train.loop import module_rows

ReadingKind = Literal["input", "channel means"]
READING_KINDS: tuple[ReadingKind, ...] = ("input", "channel means")


class Reading(NamedTuple):
    """Where the detector reads an image: a module's input (flattened: the head's pooled features), or
    its output's channel means (averaged over the feature map)."""

    module: str
    kind: ReadingKind

    def hook(self, model: nn.Module) -> tuple[nn.Module, bool]:
        """The module of model it reads, and whether its output's channel means (see hooked_inputs)."""
        return model.get_submodule(self.module), self.kind == "channel means"


def model_readings(parts: ModelParts) -> list[Reading]:
    """What a model's detector reads, in the order its forward pass reaches them."""
    middle = [Reading(parts.middle, "channel means")] if parts.middle else []
    return [*middle, Reading(parts.classifier, "input")]


@dataclass(frozen=True)
class Distance:
    """One reading's Mahalanobis distance to the nearest training class mean, min over classes c of
    |x @ projection - means[c]|, over its scale."""

    reading: Reading
    projection: np.ndarray  # features x features: whitens the shared covariance
    means: np.ndarray  # classes x features: the training class means, whitened
    scale: float  # the held-out quantile of this distance, so that readings of any size compare


@dataclass(frozen=True)
class OodDetector:
    """A fitted detector: an image's score is the largest of its scaled distances over the threshold."""

    distances: tuple[Distance, ...]
    threshold: float  # the largest scaled distance over which an image is refused
    quantile: float  # of the held-out values, where the scales and the threshold were set
    held_out: int  # micrographs they were set on

    @property
    def readings(self) -> list[Reading]:
        return [d.reading for d in self.distances]

    def scores(self, readings: Sequence[np.ndarray], batch_size: int = 1024) -> np.ndarray:
        """Each image's score (over 1: refused) from its readings (one array per reading, one row per image)."""
        scorer, n = OodScore(self), len(readings[0])
        out = []
        with torch.no_grad():
            for i in range(0, n, batch_size):
                out.append(
                    scorer([torch.from_numpy(np.asarray(r[i : i + batch_size], dtype=np.float32)) for r in readings])
                )
        return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def fit_detector(
    readings: Sequence[np.ndarray],
    labels: np.ndarray,
    held_out: Sequence[np.ndarray],
    at: Sequence[Reading],
    quantile: float = QUANTILE,
) -> OodDetector | None:
    """Per reading (at[i]: readings[i] of the training images, held_out[i] of held-out micrographs), the
    class means and within-class covariance (Ledoit-Wolf) of the training rows, and the held-out
    quantile of its distances as its scale; the threshold at the quantile of the held-out images'
    largest scaled distance. None when the held-out micrographs are too few for the quantile."""
    if len(held_out[0]) < held_out_needed(quantile):
        return None
    distances = []
    for reading, train, held in zip(at, readings, held_out, strict=True):
        projection, means = whitening(np.asarray(train).reshape(len(train), -1), labels)
        scaled = OodDetector((Distance(reading, projection, means, 1.0),), 1.0, quantile, 0).scores([held])
        distances.append(Distance(reading, projection, means, refusal_threshold(scaled, quantile)))
    combined = OodDetector(tuple(distances), 1.0, quantile, 0).scores(held_out)
    return OodDetector(tuple(distances), refusal_threshold(combined, quantile), quantile, len(combined))


class OodScore(nn.Module):
    """Readings (one tensor per reading, rows = images) -> the detector's score, in fp32; the arrays
    are buffers (constants of an exported graph)."""

    def __init__(self, detector: OodDetector) -> None:
        super().__init__()
        for i, d in enumerate(detector.distances):
            self.register_buffer(f"projection{i}", torch.from_numpy(np.asarray(d.projection, dtype=np.float32)))
            self.register_buffer(f"means{i}", torch.from_numpy(np.asarray(d.means, dtype=np.float32)))
        self.scales = [float(d.scale) for d in detector.distances]
        self.threshold = float(detector.threshold)

    def forward(self, readings: Sequence[torch.Tensor]) -> torch.Tensor:
        scaled = []
        for i, (x, scale) in enumerate(zip(readings, self.scales, strict=True)):
            z = x.flatten(1).float() @ getattr(self, f"projection{i}")
            scaled.append((z[:, None, :] - getattr(self, f"means{i}")[None]).square().sum(-1).amin(1).sqrt() / scale)
        return torch.stack(scaled).amax(0) / self.threshold


class OodHooks(nn.Module):
    """While entered (`with hooks:`), every forward pass of each member reads the image where that
    member's detector reads it and scores it; `images()` turns the calls into one score per image.
    Heads on a shared trunk (models.ensemble.SharedTrunk) read the trunk once: its readings are
    scored by every head's detector, and the call holds their mean."""

    def __init__(self, model: nn.Module, detectors: Sequence[OodDetector]) -> None:
        super().__init__()
        self.members = members(model)
        shared = len(self.members) == 1 and len(detectors) > 1
        if not shared and len(self.members) != len(detectors):
            raise ValueError(f"{len(self.members)} members but {len(detectors)} detectors")
        if shared and any(d.readings != detectors[0].readings for d in detectors):
            raise ValueError("detectors of heads on one trunk read different places")
        self.groups = [list(range(len(detectors)))] if shared else [[j] for j in range(len(detectors))]
        self.readings = [detectors[group[0]].readings for group in self.groups]
        self.scorers = nn.ModuleList(OodScore(d) for d in detectors)
        self.calls: list[torch.Tensor] = []
        self._seen: list[dict[int, torch.Tensor]] = []
        self._handles: list[Any] = []

    def __enter__(self) -> OodHooks:
        self.calls, self._seen = [], [{} for _ in self.members]
        for j, (member, readings) in enumerate(zip(self.members, self.readings, strict=True)):
            for i, reading in enumerate(readings):
                module = member.get_submodule(reading.module)
                if reading.kind == "input":
                    hook = module.register_forward_pre_hook(lambda _m, args, j=j, i=i: self._read(j, i, args[0]))
                else:
                    hook = module.register_forward_hook(lambda _m, _a, out, j=j, i=i: self._read(j, i, out))
                self._handles.append(hook)
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _read(self, member: int, i: int, tensor: torch.Tensor) -> None:
        """Keep one reading of a member's forward pass; score the image once all of them are in."""
        seen, readings = self._seen[member], self.readings[member]
        seen[i] = module_rows(tensor, readings[i].kind == "channel means").flatten(1)
        if len(seen) == len(readings):
            read = [seen[k] for k in range(len(readings))]
            with torch.autocast(tensor.device.type, enabled=False):  # distances in fp32 under mixed precision
                scores = [self.scorers[d](read) for d in self.groups[member]]
                self.calls.append(torch.stack(scores).mean(0))
            seen.clear()

    def images(self, views: int = 1) -> torch.Tensor:
        """Per image, the mean of the members' scores on its first view: the calls come per batch,
        views x members (a model's views run one after the other, its members in order)."""
        group, m = views * len(self.members), len(self.members)
        scores = [torch.stack(self.calls[i : i + m]).mean(0) for i in range(0, len(self.calls), group)]
        return torch.cat(scores) if scores else torch.zeros(0)


def ood_check(
    source: str, quantile: float, thresholds: list[float], ood: np.ndarray, specimens: np.ndarray, seed: int = 0
) -> OodCheck:
    """Held-out micrographs refused (score over REFUSE) and flagged (over 1, up to REFUSE), with intervals
    over specimens (each image's: specimens), and the specimens with at least one of each."""
    refused, flagged = refusal_tiers(ood)
    share, interval = refused_share(refused, specimens, seed=seed)
    flagged_share, flagged_interval = refused_share(flagged, specimens, seed=seed)
    return OodCheck(
        source,
        quantile,
        thresholds,
        len(ood),
        share,
        interval,
        refuse_over=REFUSE,
        flagged=flagged_share,
        flagged_interval=flagged_interval,
        specimens=len(np.unique(specimens)),
        specimens_refused=len(np.unique(specimens[refused])),
        specimens_flagged=len(np.unique(specimens[flagged])),
    )
