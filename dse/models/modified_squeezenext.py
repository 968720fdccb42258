"""Modified SqueezeNext (the paper's section 2.3): conv(1x1)-BN-ReLU blocks, max-pool after each stage's first block."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn

from dse.models.registry import register_model
from dse.models.squeezenext import build_squeezenext, conv

__all__ = ["modified_squeezenext"]


def conv_bn_relu_noscale(i: int, o: int, kernel: tuple[int, int], stride: int = 1) -> nn.Module:
    """The paper's Figure 2 (right): conv -> BN without the scale layer (no affine) -> ReLU in place."""
    return nn.Sequential(conv(i, o, kernel, stride, bias=False), nn.BatchNorm2d(o, affine=False), nn.ReLU(inplace=True))


@register_model(family="modified_squeezenext")
def modified_squeezenext(
    *, num_classes: int, in_channels: int, blocks: Sequence[int] = (6, 6, 8, 1), width: float = 1.0
) -> nn.Module:
    """Modified SqueezeNext: the first block of every stage feeds a 2x2 max-pool (Figure 3, right), the
    other blocks do not (Figure 3, left); no strided convolutions."""
    return build_squeezenext(
        blocks=blocks,
        width=width,
        num_classes=num_classes,
        in_channels=in_channels,
        unit=conv_bn_relu_noscale,
        act=lambda: nn.ReLU(inplace=True),
        downsample="maxpool",
    )
