"""Several trained models scored as one: the mean of their class probabilities."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn


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
