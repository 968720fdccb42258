"""Optimizers by name, the learning-rate schedule and the weight average (EMA)."""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any, Protocol

import adabound
import torch
import torch.nn as nn
from torch import Tensor

__all__ = [
    "GRAPH_OPTIONS",
    "NOT_CAPTURABLE",
    "OPTIMIZERS",
    "SCHEDULES",
    "average_into",
    "ema_decay",
    "learning_rate",
    "make_optimizer",
    "optimizer_kwargs",
    "peak_lr",
    "step_lrs",
]

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamax": torch.optim.Adamax,
    "adagrad": torch.optim.Adagrad,
    "adabound": adabound.AdaBound,
    "adadelta": torch.optim.Adadelta,
    "asgd": torch.optim.ASGD,
    "rmsprop": torch.optim.RMSprop,
    "rprop": torch.optim.Rprop,
}
# How each optimizer is built for CUDA-graph steps, where its lr lives in a device tensor: torch's SGD turns a
# tensor lr into a host number except in its fused CUDA kernel; the others keep their step counts on the device
# with capturable=True. Adagrad and AdaBound compute from host-side step counts, so their steps run eagerly.
GRAPH_OPTIONS: dict[str, dict[str, Any]] = {
    "sgd": {"fused": True},
    **{name: {"capturable": True} for name in ("adam", "adamax", "adadelta", "asgd", "rmsprop", "rprop")},
}
NOT_CAPTURABLE = {
    "adagrad": "torch's Adagrad keeps its step count on the host (it has no capturable mode)",
    "adabound": "AdaBound computes its bounds from a host-side step count",
}
SCHEDULES = ("step", "cosine", "linear")
# adabound 0.0.5 calls Tensor.add(Number, Tensor), an overload torch deprecates but still runs.
warnings.filterwarnings("ignore", message="This overload of add", category=UserWarning, module="adabound")


class Recipe(Protocol):
    """The fields of `dse.config.TrainConfig` this module reads."""

    optimizer: str
    lr: float
    optimizer_kwargs: dict[str, Any]
    weight_decay: float
    epochs: int
    batch_size: int
    lr_batch_size: int | None
    schedule: str
    warmup: float
    milestones: list[float]
    decay: float
    ema: float


def optimizer_kwargs(cfg: Recipe) -> dict[str, Any]:
    """The keyword arguments the named optimizer is built with; refuses names and keys it does not take."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"train optimizer={cfg.optimizer!r} is unknown; allowed: {', '.join(OPTIMIZERS)}")
    kwargs = {"lr": cfg.lr, **cfg.optimizer_kwargs}
    if cfg.weight_decay:
        kwargs["weight_decay"] = cfg.weight_decay
    accepted = set(inspect.signature(OPTIMIZERS[cfg.optimizer]).parameters) - {"params", "self"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(
            f"optimizer {cfg.optimizer!r} does not take {', '.join(unknown)}"
            f"{' (set train.weight_decay=0)' if 'weight_decay' in unknown else ''}; "
            f"it takes: {', '.join(sorted(accepted))}"
        )
    return kwargs


def make_optimizer(model: nn.Module, cfg: Recipe, *, graph: bool = False) -> torch.optim.Optimizer:
    """The optimizer `cfg.optimizer` over the model's parameters, with `cfg`'s lr, weight decay and kwargs;
    with `graph`, built to be captured in a CUDA graph (`GRAPH_OPTIONS`)."""
    extra = GRAPH_OPTIONS[cfg.optimizer] if graph else {}
    return OPTIMIZERS[cfg.optimizer](model.parameters(), **optimizer_kwargs(cfg), **extra)


def peak_lr(cfg: Recipe) -> float:
    """`cfg.lr`, scaled linearly to the batch size when `cfg.lr_batch_size` is set (Goyal et al., 2017)."""
    return cfg.lr * cfg.batch_size / cfg.lr_batch_size if cfg.lr_batch_size else cfg.lr


def learning_rate(cfg: Recipe, epoch: float) -> float:
    """The learning rate at 0-based `epoch`, fractional within an epoch (steps done / steps per epoch).

    A linear warm-up from 0 over the first `warmup` fraction of training, then the schedule: step decay by
    `decay` at each milestone, or cosine or linear decay from the peak to 0 at the end of training.
    """
    lr, progress = peak_lr(cfg), epoch / cfg.epochs
    if progress < cfg.warmup:
        return lr * progress / cfg.warmup
    if cfg.schedule == "step":
        return lr * cfg.decay ** sum(epoch >= round(m * cfg.epochs) for m in cfg.milestones)
    after = (progress - cfg.warmup) / (1 - cfg.warmup)  # 0 → 1 over the steps after the warm-up
    if cfg.schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * after))
    return lr * (1 - after)


def step_lrs(cfg: Recipe, epoch: int, steps: int) -> list[float]:
    """The learning rate of each step of 0-based `epoch`."""
    return [learning_rate(cfg, epoch + i / steps) for i in range(steps)]


def ema_decay(cfg: Recipe, step: int) -> float:
    """The weight average's decay at 0-based optimizer `step`: `cfg.ema`, but lower for the first steps
    (min(ema, (1 + step) / (10 + step)), TensorFlow's ExponentialMovingAverage with num_updates) so that
    the average soon forgets the random initialisation."""
    return min(cfg.ema, (1 + step) / (10 + step))


def average_into(pairs: list[tuple[Tensor, Tensor]], weights: list) -> None:
    """The weight average's update: a ← a + w·(m − a) for each floating-point pair (a, m) of average and model
    tensors, w = 1 − decay (a number, or a device tensor that broadcasts over a: one weight per fused member),
    and a ← m for integer ones (BatchNorm's batch counts)."""
    for (average, current), weight in zip(pairs, weights):
        if average.is_floating_point():
            average.lerp_(current, weight)
        else:
            average.copy_(current)
