"""SqueezeNet v1.0 and v1.1 (torchvision's layout) with a `num_classes` head and any input channels."""

from __future__ import annotations

import torch.nn as nn

from dse.models.registry import register_model

__all__ = ["squeezenet_v1_0", "squeezenet_v1_1"]


def build_squeezenet(version: str, *, num_classes: int, in_channels: int) -> nn.Module:
    """torchvision's SqueezeNet; the first conv is rebuilt when the input is not RGB."""
    # Imported here: torchvision.models pulls in torch._dynamo (1.5-2 s), which every process that lists the
    # registry (each sweep worker, each CLI) would pay for a family it rarely builds.
    from torchvision.models.squeezenet import SqueezeNet

    model = SqueezeNet(version=version, num_classes=num_classes)
    if in_channels != 3:
        old = model.features[0]
        model.features[0] = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride)
        nn.init.kaiming_uniform_(model.features[0].weight)  # torchvision's init for its convs
        nn.init.zeros_(model.features[0].bias)
    return model


@register_model(family="squeezenet")
def squeezenet_v1_0(*, num_classes: int, in_channels: int) -> nn.Module:
    """SqueezeNet v1.0 (7x7 stem, 96 channels)."""
    return build_squeezenet("1_0", num_classes=num_classes, in_channels=in_channels)


@register_model(family="squeezenet")
def squeezenet_v1_1(*, num_classes: int, in_channels: int) -> nn.Module:
    """SqueezeNet v1.1 (3x3 stem, 64 channels, earlier pooling)."""
    return build_squeezenet("1_1", num_classes=num_classes, in_channels=in_channels)
