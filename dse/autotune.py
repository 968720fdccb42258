"""How a run is tuned to its machine: the layout `train.memory_format=auto` stands for (a fixed rule per device type,
never a clock), and the probes that time layouts (advice only) and group sizes (a choice that changes no number)."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from dse.config import TrainConfig
from dse.data import Splits, batches, member_batches
from dse.step import StepMode, mixed_precision, resolve_device, step_mode, sync, time_steps

__all__ = [
    "AUTO_LAYOUT",
    "MEMORY_FORMATS",
    "auto_layout",
    "best_group_size",
    "choose_memory_format",
    "faster_layout",
    "pick_group_size",
    "pick_memory_format",
]

MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
# What `train.memory_format=auto` trains in, by device type, where no study stores a choice (dse.layouts). A rule,
# not a timing: a probe under load answered differently from run to run, and in bf16 the layout changes the numbers
# (kernels round differently), so two runs of one command computed different things. channels_last on CUDA:
# cuDNN's tensor-core convolutions are NHWC; NCHW on the CPU: torch's default, which every CPU kernel has (oneDNN's
# channels_last kernels lose for the few channels of narrow models on some CPUs). Not a speed claim: the probe's
# opinion is stored beside a study's choice (dse.layouts), and `train.memory_format=` pins either.
AUTO_LAYOUT = {"cuda": "channels_last", "cpu": "contiguous"}


def pick_memory_format(model: nn.Module, x: Tensor, y: Tensor, autocast, *, repeats: int = 2) -> str:
    """The faster layout for training `model` on the batch (x, y): times forward+backward of a copy in each.

    It follows the clock, so under load it may answer differently from run to run: it is advice (`faster_layout`,
    stored beside a study's choice), never what `auto` trains in. The model, its gradients and torch's RNG are left
    as they were.
    """
    probes = {
        name: (copy.deepcopy(model).to(memory_format=fmt).train(), x.contiguous(memory_format=fmt))
        for name, fmt in MEMORY_FORMATS.items()
    }
    best = dict.fromkeys(probes, math.inf)
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        for i in range(repeats + 1):  # the first round warms up
            for name, (probe, xb) in probes.items():  # interleaved: a busy neighbour slows both alike
                sync(x.device)
                start = time.perf_counter()
                with autocast:
                    loss = F.cross_entropy(probe(xb), y)
                loss.backward()
                sync(x.device)
                if i:
                    best[name] = min(best[name], time.perf_counter() - start)
    return min(best, key=best.get)


def auto_layout(device: torch.device) -> str:
    """The layout `train.memory_format=auto` stands for on `device` where nothing else decides it (`AUTO_LAYOUT`;
    other device types: NCHW, torch's default)."""
    return AUTO_LAYOUT.get(device.type, "contiguous")


def choose_memory_format(
    cfg: TrainConfig, device: torch.device, *, saved: str | None = None, auto: str | None = None
) -> str:
    """The layout a run trains in: `saved`, the one its checkpoint was written in (layouts round differently: a
    resumed run keeps it, whatever decided it, a timing by an older dse included); else a pinned
    `cfg.memory_format`; else, for `auto`, `auto` (a study's stored choice, `dse.layouts`) or `auto_layout`."""
    if saved in MEMORY_FORMATS:
        return saved
    if cfg.memory_format != "auto":
        return cfg.memory_format
    return auto if auto in MEMORY_FORMATS else auto_layout(device)


def faster_layout(model: nn.Module, splits: Splits, cfg: TrainConfig, *, probe=pick_memory_format) -> str:
    """What `probe` (by default `pick_memory_format`, a timing) says is the faster layout for training a copy of
    `model` as `cfg` says on its device, on the first training batch. Advice: it never decides what a run computes."""
    device = resolve_device(cfg.device)
    n = cfg.batch_size
    x, y = next(
        batches(splits.train_x[:n].to(device), splits.train_y[:n].to(device), n, mean=splits.mean, std=splits.std)
    )
    return probe(copy.deepcopy(model).to(device), x, y, mixed_precision(cfg, device))


def pick_group_size(
    model: nn.Module,
    splits: Splits,
    cfg: TrainConfig,
    *,
    sizes: Sequence[int] = (1, 2, 4, 8, 16),
    min_gain: float = 0.1,
    steps: int = 10,
    vmapped: bool | None = None,
) -> tuple[int, dict[int, float]]:
    """How many trials like (`model`, `cfg`) to train as one group: the aggregate training images/s of groups
    of copies of `model` for each size in turn, stepping as `train_group` does (CUDA graphs included; vmapped
    as `vmapped` says, by default as on the device) on the first batch; the largest size that still adds
    `min_gain` (10 %) over the size before and fits in memory. Returns that size and the images/s measured per
    size; `model` is left as it was."""
    cfg = replace(cfg, checkpoint=None, progress=False)
    device = resolve_device(cfg.device)
    splits = splits.to(device)
    mode = step_mode([cfg], device, vmapped=vmapped, quiet=True)
    probe = copy.deepcopy(model).to(device)
    layout = choose_memory_format(cfg, device)
    rates: dict[int, float] = {}
    for size in sizes:
        try:
            rates[size] = _group_rate([copy.deepcopy(probe) for _ in range(size)], splits, cfg, layout, mode, steps)
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if best_group_size(rates, min_gain) != size:
            break
    return best_group_size(rates, min_gain), rates


def best_group_size(rates: dict[int, float], min_gain: float = 0.1) -> int:
    """The largest group size whose images/s is at least `min_gain` above that of the size before it, and so on
    down from the smallest size measured."""
    sizes = sorted(rates)
    best = sizes[0]
    for size in sizes[1:]:
        if rates[size] < (1 + min_gain) * rates[best]:
            break
        best = size
    return best


def _group_rate(
    models: list[nn.Module], splits: Splits, cfg: TrainConfig, layout: str, mode: StepMode, steps: int
) -> float:
    """Aggregate training images/s of the models as one group on the first training batch."""
    learners = [mode.learner(m.to(memory_format=MEMORY_FORMATS[layout]), cfg) for m in models]
    n = cfg.batch_size
    x, y = next(
        member_batches(
            splits.train_x[:n],
            splits.train_y[:n],
            n,
            mean=splits.mean,
            std=splits.std,
            seeds=[0] * len(models),
            epochs=[0] * len(models),
            augment=cfg.augment,
            channels_last=layout == "channels_last",
        )
    )
    return len(models) * n * steps / time_steps(mode, learners, x, y, steps)
