"""ResNet (He et al., 2016) from torchvision, trained from scratch (the study's first model) or from
torchvision's ImageNet weights."""

from __future__ import annotations

from typing import TYPE_CHECKING

from defungi.models.registry import ModelParts, Pretrained, register_model

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

# torchvision's ResNet runs conv1, bn1, relu, maxpool, layer1-4 (each an nn.Sequential of blocks),
# avgpool, then fc on the flattened map
PARTS = ModelParts(
    classifier="fc",
    features="layer4",
    split_points=("layer1", "layer2", "layer3", "layer4", "fc"),
    fine_features="layer3",
)


def _resnet(arch: str, num_classes: int) -> nn.Module:
    """torchvision's ResNet by name, randomly initialised, head sized to num_classes."""
    import torchvision

    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def _imagenet(weights: str) -> Pretrained:
    """torchvision's ImageNet weights of that name (trained on 224 px crops, ImageNet's mean and std)."""

    def load() -> dict[str, torch.Tensor]:
        import torchvision

        return torchvision.models.get_weight(weights).get_state_dict(progress=False)

    return Pretrained(load, input_size=224)


@register_model("resnet34", PARTS, _imagenet("ResNet34_Weights.IMAGENET1K_V1"))
def resnet34(num_classes: int) -> nn.Module:
    """ResNet-34, randomly initialised, head sized to num_classes."""
    return _resnet("resnet34", num_classes)


@register_model("resnet18", PARTS, _imagenet("ResNet18_Weights.IMAGENET1K_V1"))
def resnet18(num_classes: int) -> nn.Module:
    """ResNet-18, a lighter baseline."""
    return _resnet("resnet18", num_classes)
