"""SqueezeNext for CIFAR (the authors' baseline convention) and the four-stage skeleton its variants share."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from dse.models.registry import check_blocks, check_width, register_model

__all__ = ["Unit", "build_squeezenext", "squeezenext", "squeezenext_23_1x", "squeezenext_23_2x", "squeezenext_23v5_1x"]

# A unit is one "basic block" of the paper: conv(in, out, kernel, stride) with its norm and activation.
Unit = Callable[[int, int, tuple[int, int], int], nn.Module]
STAGE_CHANNELS = (32, 64, 128, 256)


def conv(i: int, o: int, kernel: tuple[int, int], stride: int = 1, *, bias: bool = True) -> nn.Conv2d:
    """A convolution padded to keep the spatial size (at stride 1)."""
    return nn.Conv2d(i, o, kernel, stride, padding=(kernel[0] // 2, kernel[1] // 2), bias=bias)


def conv_bn_relu(i: int, o: int, kernel: tuple[int, int], stride: int = 1) -> nn.Module:
    """SqueezeNext's basic block: conv (with bias) -> BN -> ReLU."""
    return nn.Sequential(conv(i, o, kernel, stride), nn.BatchNorm2d(o), nn.ReLU(inplace=True))


class Bottleneck(nn.Module):
    """Two-stage squeeze (1x1, 1x1), separable 3x3 (1x3 and 3x1 in `separable` order), 1x1 expand, skip."""

    def __init__(self, i: int, o: int, stride: int, unit: Unit, act: nn.Module, separable: Sequence[tuple[int, int]]):
        super().__init__()
        r = 1.0 if stride == 2 else 0.25 if i > o else 0.5
        a, b = int(i * r), int(i * r * 0.5)
        if b < 1:
            raise ValueError(f"a {i}->{o} channel bottleneck would squeeze to {b} channels")
        k1, k2 = separable
        self.body = nn.Sequential(
            unit(i, a, (1, 1), stride),
            unit(a, b, (1, 1), 1),
            unit(b, a, k1, 1),
            unit(a, a, k2, 1),
            unit(a, o, (1, 1), 1),
        )
        identity = stride == 1 and i == o
        self.shortcut = nn.Identity() if identity else nn.Sequential(conv(i, o, (1, 1), stride), nn.BatchNorm2d(o))
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


def build_squeezenext(
    *,
    blocks: Sequence[int],
    width: float,
    num_classes: int,
    in_channels: int,
    unit: Unit,
    act: Callable[[], nn.Module],
    separable: Sequence[tuple[int, int]] = ((1, 3), (3, 1)),
    downsample: str = "stride",
    dropout: float = 0.0,
) -> nn.Sequential:
    """The CIFAR four-stage skeleton: 3x3 stem, stages of `blocks` bottlenecks with int(width*[32, 64, 128,
    256]) channels, a 1x1 head conv to int(width*128), global average pool, optional dropout, linear.

    `downsample="stride"` halves the resolution in the first block of stages 2-4 (SqueezeNext);
    `"maxpool"` puts a 2x2 max-pool after the first block of every stage (Modified SqueezeNext).
    """
    blocks, width = check_blocks(blocks), check_width(width)
    channels = [int(width * c) for c in (64, *STAGE_CHANNELS, 128)]
    i = channels[0]
    layers: list[tuple[str, nn.Module]] = [("stem", unit(in_channels, i, (3, 3), 1))]
    for s, (n, o) in enumerate(zip(blocks, channels[1:5]), start=1):
        stage = []
        for b in range(n):
            stride = 2 if b == 0 and s > 1 and downsample == "stride" else 1
            try:
                stage.append(Bottleneck(i, o, stride, unit, act(), separable))
            except ValueError as e:
                raise ValueError(f"{width=} is too small: {e} (use width >= 0.125)") from None
            if b == 0 and downsample == "maxpool":
                stage.append(nn.MaxPool2d(2))
            i = o
        layers.append((f"stage{s}", nn.Sequential(*stage)))
    head = channels[5]
    layers += [
        ("head", unit(i, head, (1, 1), 1)),
        ("pool", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("dropout", nn.Dropout(dropout) if dropout > 0 else nn.Identity()),
        ("fc", nn.Linear(head, num_classes)),
    ]
    return nn.Sequential(OrderedDict(layers))


@register_model(family="squeezenext")
def squeezenext(
    *, num_classes: int, in_channels: int, blocks: Sequence[int] = (6, 6, 8, 1), width: float = 1.0
) -> nn.Module:
    """SqueezeNext, CIFAR variant: any stage counts and width (defaults: SqueezeNext-23-1x)."""
    return build_squeezenext(
        blocks=blocks,
        width=width,
        num_classes=num_classes,
        in_channels=in_channels,
        unit=conv_bn_relu,
        act=lambda: nn.ReLU(inplace=True),
    )


@register_model(family="squeezenext")
def squeezenext_23_1x(*, num_classes: int, in_channels: int, blocks=(6, 6, 8, 1), width: float = 1.0) -> nn.Module:
    """SqueezeNext-23-1x: stage counts 6 6 8 1, width 1.0 (the paper's Table 1 baseline)."""
    return squeezenext(num_classes=num_classes, in_channels=in_channels, blocks=blocks, width=width)


@register_model(family="squeezenext")
def squeezenext_23_2x(*, num_classes: int, in_channels: int, blocks=(6, 6, 8, 1), width: float = 2.0) -> nn.Module:
    """SqueezeNext-23-2x: stage counts 6 6 8 1, width 2.0."""
    return squeezenext(num_classes=num_classes, in_channels=in_channels, blocks=blocks, width=width)


@register_model(family="squeezenext")
def squeezenext_23v5_1x(*, num_classes: int, in_channels: int, blocks=(2, 4, 14, 1), width: float = 1.0) -> nn.Module:
    """SqueezeNext-23v5-1x: stage counts 2 4 14 1 (the original SqueezeNext paper's v5), width 1.0."""
    return squeezenext(num_classes=num_classes, in_channels=in_channels, blocks=blocks, width=width)
