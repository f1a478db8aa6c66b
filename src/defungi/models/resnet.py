"""ResNet (He et al., 2016) from torchvision, trained from scratch; the study's first model."""

from __future__ import annotations

import torch.nn as nn
import torchvision

from defungi.models.registry import register_model


@register_model("resnet34")
def resnet34(num_classes: int) -> nn.Module:
    """ResNet-34, randomly initialised, head sized to num_classes."""
    return torchvision.models.resnet34(weights=None, num_classes=num_classes)


@register_model("resnet18")
def resnet18(num_classes: int) -> nn.Module:
    """ResNet-18, a lighter baseline."""
    return torchvision.models.resnet18(weights=None, num_classes=num_classes)
