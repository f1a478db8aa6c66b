"""Name -> model builder. Registered families first, any timm model name after."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import timm
import torch.nn as nn

from defungi.errors import DefungiError


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its builder and its default arguments."""

    name: str
    builder: Callable[..., nn.Module]
    defaults: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, **defaults: Any) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register `builder(num_classes, **kwargs)` under name with default kwargs."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = ModelEntry(name, builder, dict(defaults))
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
        return ModelEntry(
            name, lambda num_classes, **kw: timm.create_model(name, pretrained=False, num_classes=num_classes, **kw)
        )
    raise DefungiError(f"unknown model '{name}'; use one of {', '.join(list_models())} or a timm model name")


def create_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a freshly initialised model whose head has num_classes outputs."""
    entry = model_entry(name)
    try:
        return entry.builder(num_classes=num_classes, **{**entry.defaults, **kwargs})
    except TypeError as exc:
        raise DefungiError(f"bad arguments for model '{name}': {exc}") from None
