"""Name -> model builder. Registered families first, any timm model name after."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
import torch.nn as nn

from defungi.errors import DefungiError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Pretrained:
    """Where a model's ImageNet weights come from (a state dict, head included) and the input
    normalisation they were trained with (timm's pretrained_cfg habit)."""

    loader: Callable[[], dict[str, torch.Tensor]]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its builder, its default arguments, its ImageNet weights if any."""

    name: str
    builder: Callable[..., nn.Module]
    defaults: dict[str, Any] = field(default_factory=dict)
    pretrained: Pretrained | None = None


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str, pretrained: Pretrained | None = None, **defaults: Any
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register `builder(num_classes, **kwargs)` under name with default kwargs (and
    where its ImageNet weights come from)."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = ModelEntry(name, builder, dict(defaults), pretrained)
        return builder

    return wrap


def list_models() -> list[str]:
    """Registered names (any timm model name works too)."""
    return sorted(_REGISTRY)


def model_entry(name: str) -> ModelEntry:
    """The registry entry for name; timm names get a pass-through entry."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in timm.list_models():
        cfg = timm.models.get_pretrained_cfg(name)
        stats = {"mean": tuple(cfg.mean), "std": tuple(cfg.std)} if cfg is not None else {}
        return ModelEntry(
            name,
            lambda num_classes, **kw: timm.create_model(name, pretrained=False, num_classes=num_classes, **kw),
            pretrained=Pretrained(lambda: timm.create_model(name, pretrained=True).state_dict(), **stats),
        )
    raise DefungiError(f"unknown model '{name}'; use one of {', '.join(list_models())} or a timm model name")


def create_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a freshly initialised model whose head has num_classes outputs."""
    entry = model_entry(name)
    try:
        return entry.builder(num_classes=num_classes, **{**entry.defaults, **kwargs})
    except TypeError as exc:
        raise DefungiError(f"bad arguments for model '{name}': {exc}") from None
