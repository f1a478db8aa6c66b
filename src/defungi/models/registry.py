"""Name -> model builder and what the model is made of. Registered families first, then the
resolvers' names (models.concat: 'a+b'), any timm model name after.

Importing the registry and the model files does not import torch (each builder imports its library
when it runs), so that the command line lists the model names where `predict --backend onnx` runs
without torch.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from defungi.errors import DefungiError

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Pretrained:
    """Where a model's ImageNet weights come from (a state dict, head included), and the input
    normalisation and size they were trained with (timm's pretrained_cfg habit)."""

    loader: Callable[[], dict[str, torch.Tensor]]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    input_size: int | None = None  # px, square


@dataclass(frozen=True)
class ModelParts:
    """A model's parts by module name, so that code outside the model file asks instead of guessing
    attribute names (timm's get_classifier() and feature_info habit)."""

    classifier: str  # the head: the linear layer with num_classes outputs, replaced for pretrained weights
    features: str  # its output is the last 4-D feature map, before global pooling (Grad-CAM)
    # the modules a frozen backbone's tail may train from, each running after the one before and the
    # head last; inside one that is an nn.Sequential, any of its modules (blocks.5) splits it further
    split_points: tuple[str, ...]
    # an earlier 4-D feature map, of a finer grid than features', for the finer explanation (serve.explain);
    # features itself where the model keeps one resolution throughout
    fine_features: str
    # a mid-level module whose output's channel means the refusal of non-micrographs reads beside the
    # head's input (train.ood): noise, flat fields and drawings stand out there, not in the pooled
    # features the head reads; None: the head's input alone (until measured for that model)
    middle: str | None = None


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its builder, its parts, its default arguments, its ImageNet weights if any."""

    name: str
    builder: Callable[..., nn.Module]
    parts: ModelParts
    defaults: dict[str, Any] = field(default_factory=dict)
    pretrained: Pretrained | None = None

    @property
    def input_size(self) -> int | None:
        """The image side its pretrained weights were trained at (None without weights: no native size)."""
        return self.pretrained.input_size if self.pretrained is not None else None

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The input mean and std its pretrained weights were trained with (ImageNet's without weights)."""
        if self.pretrained is None:
            return IMAGENET_MEAN, IMAGENET_STD
        return self.pretrained.mean, self.pretrained.std


_REGISTRY: dict[str, ModelEntry] = {}
_RESOLVERS: list[Callable[[str], ModelEntry | None]] = []


def register_model(
    name: str, parts: ModelParts, pretrained: Pretrained | None = None, **defaults: Any
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register `builder(num_classes, **kwargs)` under name with its parts, default
    kwargs (and where its ImageNet weights come from)."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = ModelEntry(name, builder, parts, dict(defaults), pretrained)
        return builder

    return wrap


def list_models() -> list[str]:
    """Registered names (any timm model name works too, and pretrained ones joined by '+')."""
    return sorted(_REGISTRY)


@functools.cache
def _timm_entry(name: str) -> ModelEntry:
    """A pass-through entry for a timm model, from timm's own description of it (its classifier,
    feature_info and pretrained_cfg), read off a copy built on the meta device: no memory, no init."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    names = {id(module): key for key, module in model.named_modules()}
    head = model.get_classifier()
    classifier = names[id(head[0] if isinstance(head, tuple) else head)]  # distilled models: the class head
    stages = [info["module"] for info in model.feature_info]
    fine = stages[-2] if len(stages) > 1 else stages[-1]  # the stage before the last: a finer grid
    cfg = model.pretrained_cfg
    return ModelEntry(
        name,
        lambda num_classes, **kw: timm.create_model(name, pretrained=False, num_classes=num_classes, **kw),
        ModelParts(classifier, stages[-1], tuple(dict.fromkeys([*stages, classifier])), fine),
        pretrained=Pretrained(
            lambda: timm.create_model(name, pretrained=True).state_dict(),
            tuple(cfg["mean"]),
            tuple(cfg["std"]),
            cfg["input_size"][-1],
        ),
    )


def register_resolver(resolve: Callable[[str], ModelEntry | None]) -> Callable[[str], ModelEntry | None]:
    """Decorator: a function from a model name to its entry (None: not a name it knows), asked for
    names not registered (models.concat: 'a+b')."""
    _RESOLVERS.append(resolve)
    return resolve


def model_entry(name: str) -> ModelEntry:
    """The registry entry for name, or a resolver's ('a+b' joins pretrained models); timm names get a
    pass-through entry."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    for resolve in _RESOLVERS:
        if (entry := resolve(name)) is not None:
            return entry
    import timm

    if name in timm.list_models():
        return _timm_entry(name)
    raise DefungiError(
        f"unknown model '{name}'; use one of {', '.join(list_models())}, a timm model name, "
        "or pretrained ones joined by '+'"
    )


def model_args(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The registry's defaults of a model merged with kwargs: the arguments it is built with."""
    return {**model_entry(name).defaults, **kwargs}


def create_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a freshly initialised model whose head has num_classes outputs."""
    entry = model_entry(name)
    try:
        return entry.builder(num_classes=num_classes, **{**entry.defaults, **kwargs})
    except (TypeError, ValueError, RuntimeError, ZeroDivisionError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DefungiError(f"bad arguments for model '{name}' (train.model_args {kwargs}): {first}") from None


def check_model(name: str, kwargs: dict[str, Any]) -> None:
    """Refuse a model name or arguments that cannot build, in one line, before any work: the model is
    built on the meta device (no memory, no weights)."""
    import torch

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        create_model(name, 2, **kwargs)
