"""Several models as one: trained models scored by their mean probability (Ensemble), heads that share
one frozen trunk (SharedTrunk: the trunk runs once per image), or backbones side by side under one
head (Concat)."""

from __future__ import annotations

import copy
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
        return mean_probability([m(x) for m in self.members])


def mean_probability(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """The log of the members' mean softmax, so that a softmax of it is their mean probability."""
    probs = torch.stack([out.float().softmax(dim=1) for out in logits]).mean(dim=0)
    return probs.clamp_min(1e-12).log()


class SharedTrunk(nn.Module):
    """Heads trained on one frozen trunk (the folds or seeds of a frozen backbone): the trunk (the model
    with its head replaced by nn.Identity, so that its modules keep their names) runs once per image,
    each head reads its output; the heads' log mean softmax as Ensemble returns it (one head: its logits)."""

    def __init__(self, trunk: nn.Module, heads: Sequence[nn.Module]) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(self.trunk(x))

    def combine(self, features: torch.Tensor) -> torch.Tensor:
        """The heads on the trunk's output."""
        if len(self.heads) == 1:
            return self.heads[0](features)
        return mean_probability([head(features) for head in self.heads])


def members(model: nn.Module) -> list[nn.Module]:
    """The models inside model whose modules a reading names, in the order its forward runs them: an
    ensemble's members, the shared trunk, or the model itself."""
    if isinstance(model, SharedTrunk):
        return [model.trunk]
    return list(model.members) if isinstance(model, Ensemble) else [model]


def shared_trunk(model: nn.Module, states: Sequence[dict[str, torch.Tensor]], head: str) -> SharedTrunk | None:
    """model's trunk under heads whose weights are those of states (one state dict per part, model's
    architecture), when every weight but the head's (the module named head) is the same in all: the
    trunk is built once, each other part gives only its head. None otherwise."""
    prefix = f"{head}."
    first = {k: v for k, v in states[0].items() if not k.startswith(prefix)}
    for state in states[1:]:
        trunk = {k: v for k, v in state.items() if not k.startswith(prefix)}
        if trunk.keys() != first.keys() or not all(torch.equal(trunk[k], first[k]) for k in first):
            return None
    heads = []
    for state in states:
        part = copy.deepcopy(model.get_submodule(head))
        part.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
        heads.append(part)
    trunk = model
    parent, _, name = head.rpartition(".")
    setattr(trunk.get_submodule(parent) if parent else trunk, name, nn.Identity())
    return SharedTrunk(trunk, heads)


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
