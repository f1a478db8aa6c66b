"""ConvMixer (Trockman & Kolter, 2022): patch embedding, then `depth` mixer blocks.

Each mixer is a residual depthwise convolution (kernel k) followed by a pointwise convolution,
each with GELU and batch norm; then global pooling and a linear head. timm's implementation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from defungi.models.registry import ModelParts, register_model

if TYPE_CHECKING:
    import torch.nn as nn

# timm's ConvMixer runs stem, blocks (an nn.Sequential of the mixers), global_pool, head_drop, then head
PARTS = ModelParts(classifier="head", features="blocks", split_points=("blocks", "head"), fine_features="blocks")


@register_model("convmixer", PARTS, dim=256, depth=8, kernel_size=7, patch_size=4)
def convmixer(num_classes: int, dim: int, depth: int, kernel_size: int, patch_size: int) -> nn.Module:
    """ConvMixer with width dim, depth mixers, depthwise kernel_size and patch_size."""
    from timm.models.convmixer import ConvMixer

    return ConvMixer(dim=dim, depth=depth, kernel_size=kernel_size, patch_size=patch_size, num_classes=num_classes)


register_model("convmixer-8", PARTS, dim=256, depth=8, kernel_size=7, patch_size=4)(convmixer)
register_model("convmixer-16", PARTS, dim=256, depth=16, kernel_size=7, patch_size=4)(convmixer)
