"""Shallow SqueezeNext (the paper's section 3): conv -> ELU (in place) -> BN blocks, dropout before the classifier."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.nn as nn

from dse.models.registry import ACTIVATIONS, check_choice, register_model
from dse.models.squeezenext import Unit, build_squeezenext, conv

__all__ = ["shallow_squeezenext"]


def make_activation(name: str, inplace: bool) -> Callable[[], nn.Module]:
    """A factory for the activation the paper sweeps: ELU or ReLU, in place or not."""
    check_choice(name, ACTIVATIONS, "activation")
    if not isinstance(inplace, bool):
        raise ValueError(f"{inplace=} must be true or false")
    cls = {"elu": nn.ELU, "relu": nn.ReLU}[name]
    return lambda: cls(inplace=inplace)


def conv_act_bn(act: Callable[[], nn.Module]) -> Unit:
    """The paper's Figure 6: conv -> activation -> BatchNorm (the activation sits between conv and BN)."""
    return lambda i, o, kernel, stride=1: nn.Sequential(conv(i, o, kernel, stride), act(), nn.BatchNorm2d(o))


@register_model(family="shallow_squeezenext")
def shallow_squeezenext(
    *,
    num_classes: int,
    in_channels: int,
    blocks: Sequence[int] = (1, 1, 1, 1),
    width: float = 1.0,
    dropout: float = 0.3,
    activation: str = "elu",
    inplace: bool = True,
) -> nn.Module:
    """Shallow SqueezeNext: stage counts R (`blocks`), width multiplier, dropout p, activation, in place.

    Bottlenecks use 1x1, 1x1, 3x1, 1x3, 1x1 convolutions (Figure 8) with an element-wise skip; no
    max-pooling; after the stages a 1x1 spatial-resolution conv, average pooling, dropout and the FC layer.
    """
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"{dropout=} must be in [0, 1)")
    act = make_activation(activation, inplace)
    return build_squeezenext(
        blocks=blocks,
        width=width,
        num_classes=num_classes,
        in_channels=in_channels,
        unit=conv_act_bn(act),
        act=act,
        separable=((3, 1), (1, 3)),
        dropout=float(dropout),
    )
