"""ResNet (He et al., 2016) from torchvision, trained from scratch (the study's first model) or from
torchvision's ImageNet weights."""

from __future__ import annotations

import torch.nn as nn
import torchvision

from defungi.models.registry import Pretrained, register_model


@register_model(
    "resnet34", Pretrained(lambda: torchvision.models.ResNet34_Weights.IMAGENET1K_V1.get_state_dict(progress=False))
)
def resnet34(num_classes: int) -> nn.Module:
    """ResNet-34, randomly initialised, head sized to num_classes."""
    return torchvision.models.resnet34(weights=None, num_classes=num_classes)


@register_model(
    "resnet18", Pretrained(lambda: torchvision.models.ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=False))
)
def resnet18(num_classes: int) -> nn.Module:
    """ResNet-18, a lighter baseline."""
    return torchvision.models.resnet18(weights=None, num_classes=num_classes)
