"""Several models as one: trained models scored by their mean probability (Ensemble), or backbones
side by side under one head (Concat)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class Ensemble(nn.Module):
    """Returns log mean softmax of its members, so that a softmax of the output is their mean probability."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([m(x).float().softmax(dim=1) for m in self.members]).mean(dim=0)
        return probs.clamp_min(1e-12).log()


def members(model: nn.Module) -> list[nn.Module]:
    """The trained models inside model, in the order its forward runs them: an ensemble's members, or itself."""
    return list(model.members) if isinstance(model, Ensemble) else [model]


class Concat(nn.Module):
    """Backbones (heads removed) side by side: members[i] reads the input resized to
    side * sides[i] / max(sides) (bilinear: the antialiased resize does not export to ONNX, and 260 to
    224 px is a small step); one linear classifier reads their pooled features, concatenated in member
    order (models.concat)."""

    def __init__(self, members: Sequence[nn.Module], sides: Sequence[int], features: int, num_classes: int) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.sides = list(sides)
        self.classifier = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = int(x.shape[-1])  # a constant in a traced (exported) graph
        pooled = []
        for member, native in zip(self.members, self.sides, strict=True):
            own = round(side * native / max(self.sides))
            scaled = x if own == side else F.interpolate(x, size=(own, own), mode="bilinear")
            pooled.append(member(scaled))
        return self.classifier(torch.cat(pooled, dim=1))

    def extra_repr(self) -> str:
        return f"sides={self.sides}"
