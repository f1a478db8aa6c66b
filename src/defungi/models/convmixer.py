"""ConvMixer (Trockman & Kolter, 2022): patch embedding, then `depth` mixer blocks.

Each mixer is a residual depthwise convolution (kernel k) followed by a pointwise convolution,
each with GELU and batch norm; then global pooling and a linear head. timm's implementation.
"""

from __future__ import annotations

import torch.nn as nn
from timm.models.convmixer import ConvMixer

from defungi.models.registry import register_model


@register_model("convmixer", dim=256, depth=8, kernel_size=7, patch_size=4)
def convmixer(num_classes: int, dim: int, depth: int, kernel_size: int, patch_size: int) -> nn.Module:
    """ConvMixer with width dim, depth mixers, depthwise kernel_size and patch_size."""
    return ConvMixer(dim=dim, depth=depth, kernel_size=kernel_size, patch_size=patch_size, num_classes=num_classes)


register_model("convmixer-8", dim=256, depth=8, kernel_size=7, patch_size=4)(convmixer)
register_model("convmixer-16", dim=256, depth=16, kernel_size=7, patch_size=4)(convmixer)
