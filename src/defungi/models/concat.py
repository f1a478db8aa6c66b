"""Several pretrained backbones as one model: `efficientnet-lite0+efficientnet-lite2` runs each on the
image at its own native side and one linear head reads their pooled features side by side (issue #23:
frozen features of backbones whose errors differ, concatenated under one head).

The input comes at the largest member's native side (the entry's input_size); each member sees it
resized in the graph to its own side (models.ensemble.Concat), so that one preprocessing serves all.
A frozen concatenation trains its head on cached features like any frozen backbone. Its explanation
and refusal read the first member's maps. This file imports no torch (see registry).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from defungi.errors import DefungiError
from defungi.models.registry import ModelEntry, ModelParts, Pretrained, create_model, model_entry, register_resolver

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

SEPARATOR = "+"  # between the members' names


def _members(name: str) -> list[ModelEntry]:
    """The members' entries, refused in one line unless each has ImageNet weights of one normalisation."""
    entries = [model_entry(m) for m in name.split(SEPARATOR)]
    if len(entries) < 2 or any(e.pretrained is None or e.input_size is None for e in entries):
        raise DefungiError(
            f"model '{name}': join two or more models that have ImageNet weights with '+', "
            "e.g. efficientnet-lite0+efficientnet-lite2"
        )
    if len({e.normalization for e in entries}) > 1:
        raise DefungiError(f"model '{name}': its members expect different input normalisations; join models of one")
    return entries


def build(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """The concatenation of name's members (each built with kwargs, e.g. pool_border), freshly initialised."""
    import torch.nn as nn

    from defungi.models.ensemble import Concat

    entries = _members(name)
    members: list[nn.Module] = []
    features = 0
    for entry in entries:
        member = create_model(entry.name, num_classes=1, **kwargs)
        head = member.get_submodule(entry.parts.classifier)
        if not isinstance(head, nn.Linear):
            raise DefungiError(
                f"model '{name}': the head of {entry.name} is not one linear layer; join models whose is"
            )
        features += head.in_features
        member.set_submodule(entry.parts.classifier, nn.Identity())
        members.append(member)
    return Concat(members, [e.input_size for e in entries], features, num_classes)


def imagenet(name: str) -> dict[str, torch.Tensor]:
    """Each member's ImageNet weights (heads left out) under members.K."""
    state: dict[str, torch.Tensor] = {}
    for k, entry in enumerate(_members(name)):
        assert entry.pretrained is not None  # _members refuses members without weights
        head = f"{entry.parts.classifier}."
        state |= {f"members.{k}.{key}": v for key, v in entry.pretrained.loader().items() if not key.startswith(head)}
    return state


@register_resolver
def concat_entry(name: str) -> ModelEntry | None:
    """The registry entry of a concatenation (None for other names): the head alone splits it; Grad-CAM
    and the refusal read the first member's maps; ImageNet weights, normalisation and the largest side
    from the members."""
    if SEPARATOR not in name:
        return None
    entries = _members(name)
    first = entries[0].parts
    mean, std = entries[0].normalization
    # the members' own defaults are not stored in a run's model_args: none of the pretrained ones has any
    return ModelEntry(
        name,
        functools.partial(build, name),
        ModelParts(
            classifier="classifier",
            features=f"members.0.{first.features}",
            split_points=("classifier",),
            fine_features=f"members.0.{first.fine_features}",
            middle=f"members.0.{first.middle}" if first.middle else None,
        ),
        pretrained=Pretrained(functools.partial(imagenet, name), mean, std, max(e.input_size for e in entries)),
    )
