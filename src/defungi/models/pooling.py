"""Global average pooling over the inner cells of a feature map, for heads that should not read the
image's border ring: there a frozen ImageNet backbone's cells answer the image's edge (its zero
padding) and a microscope's vignetted corners rather than the specimen."""

from __future__ import annotations

import torch
import torch.nn as nn


def border_cells(side: int, border: float) -> int:
    """How many cells of a side-long row have their centre within border (a fraction of the side) of
    an edge; at least one cell is kept."""
    return min(sum((i + 0.5) / side < border for i in range(side)), (side - 1) // 2)


class InnerAvgPool(nn.Module):
    """N x C x H x W -> N x C: the mean over the cells further than border from every edge (7 x 7 at
    border 0.15: the inner 5 x 5). The crop follows the input's size, and exports to ONNX as a slice."""

    def __init__(self, border: float) -> None:
        super().__init__()
        self.border = border

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = (int(n) for n in x.shape[-2:])  # constants in a traced (exported) graph
        rows, cols = border_cells(height, self.border), border_cells(width, self.border)
        return x[:, :, rows : height - rows, cols : width - cols].mean((2, 3))

    def extra_repr(self) -> str:
        return f"border={self.border}"
