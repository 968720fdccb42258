"""Several trials' models as one: what may fuse (group_key), stacked weights, one forward pass (vmapped or member by
member), seeded dropout."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor
from torch.func import functional_call, vmap

from dse.config import TrainConfig
from dse.optim import NOT_CAPTURABLE

__all__ = [
    "GROUP_SETTINGS",
    "VMAP_DEVICES",
    "Forward",
    "SeededDropout",
    "check_group",
    "dropout_key",
    "fuse",
    "fused_forward",
    "group_forward",
    "group_key",
    "seed_dropouts",
    "solo_forward",
    "unfuse",
    "unseed",
    "vmaps_on",
]

# vmap runs adaptive_avg_pool2d of channels_last members one member at a time (no batching rule for its
# as_strided_): correct, a few more small kernels per step; the warning would repeat every epoch.
warnings.filterwarnings(
    "ignore",
    message="There is a performance drop because we have not yet implemented the batching rule for aten::as_strided_",
    category=UserWarning,
)

# Settings every member of a fused group shares: they fix the shape, device and mode of its training step.
GROUP_SETTINGS = (
    "batch_size",
    "augment",
    "crop",
    "tta",
    "device",
    "memory_format",
    "amp",
    "compile",
    "cuda_graph",
    "threads",
    "eval_batch_size",
)
# Devices where a group's members run as one vmapped model by default. Elsewhere (the CPU) each member's modules
# run in turn on its slice of the stacked weights: vmap makes convolutions grouped ones, which oneDNN runs slower
# per image than the members' own convolutions (CPU groups of 2-4 stepped 0.5-0.8x the images/s of one trial;
# bench/trainer.py).
VMAP_DEVICES = ("cuda",)

_M32 = 0xFFFFFFFF


def group_key(model: nn.Module, cfg: TrainConfig) -> tuple:
    """What trials must share to be trained as one fused group: the model's structure (module types with their
    settings, parameter and buffer shapes), the step's settings (batch size, augmentation and crop, test-time
    flips, device, layout, amp, compile, cuda_graph, threads, eval batch), whether they keep a weight average and
    whether their optimizer can be captured in a CUDA graph. Seeds, dropout p, the optimizer and its settings, lr,
    warm-up and schedule, weight decay, label smoothing, the average's decay and epochs may differ."""
    modules = tuple((type(m).__name__, "" if isinstance(m, nn.Dropout) else m.extra_repr()) for m in model.modules())
    tensors = tuple((name, tuple(t.shape), t.dtype) for name, t in [*model.named_parameters(), *model.named_buffers()])
    settings = tuple(getattr(cfg, k) for k in GROUP_SETTINGS)
    return modules, tensors, settings, cfg.ema > 0, cfg.optimizer not in NOT_CAPTURABLE


def check_group(models: Sequence[nn.Module], cfgs: Sequence[TrainConfig]) -> None:
    """Refuse a group that cannot train as one: none, a model twice, or members whose `group_key` differs."""
    if not models:
        raise ValueError("train_group needs at least one member")
    if len({id(m) for m in models}) < len(models):
        raise ValueError("members of a group need models of their own; the same model object appears twice")
    first = group_key(models[0], cfgs[0])
    for i, (model, cfg) in enumerate(zip(models[1:], cfgs[1:]), start=1):
        if group_key(model, cfg) != first:
            settings = [k for k in GROUP_SETTINGS if getattr(cfg, k) != getattr(cfgs[0], k)]
            what = f"train {', '.join(settings)}" if settings else "model structure, weight average or optimizer"
            raise ValueError(f"member {i} cannot be fused with member 0: its {what} differ; group by group_key()")


def vmaps_on(device: torch.device) -> bool:
    """Whether a group runs vmapped on `device` unless told otherwise (`VMAP_DEVICES`)."""
    return device.type in VMAP_DEVICES


def _mul32(h: Tensor, c: int) -> Tensor:
    """(h·c) mod 2**32 for int64 h < 2**32, c split in 16-bit halves so no product overflows int64."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _hash32(h: Tensor) -> Tensor:
    """lowbias32 (C. Wellons' hash prospector): a 32-bit integer hash, each output bit depending on every input bit."""
    h = _mul32(h ^ (h >> 16), 0x7FEB352D)
    h = _mul32(h ^ (h >> 15), 0x846CA68B)
    return h ^ (h >> 16)


class SeededDropout(nn.Module):
    """nn.Dropout whose mask is a hash of (key, step, site, element index) rather than a draw from torch's RNG.

    The trainer swaps a model's nn.Dropout modules for these while it trains: `key` comes from the trial's
    (seed, epoch) and `step` counts the epoch's steps on the device, so a trial gets the same masks trained
    alone or fused in a group (vmap hands each member its own `key` and `p`), eager or replayed in a CUDA graph.
    """

    def __init__(self, p: float, site: int, step: Tensor):
        super().__init__()
        self.register_buffer("p", torch.tensor(float(p), device=step.device), persistent=False)
        self.register_buffer("key", torch.zeros((), dtype=torch.int64, device=step.device), persistent=False)
        self.site, self.step = site, step

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        h = _hash32(_hash32(self.key ^ self.site) ^ self.step)
        bits = _hash32(h ^ torch.arange(x.numel(), device=x.device).view(x.shape))
        keep = (bits >> 8).float() * 2.0**-24 >= self.p  # uniform in [0, 1) with 24 bits
        return x * keep / (1 - self.p)


def seed_dropouts(model: nn.Module, step: Tensor) -> list[tuple[nn.Module, str, nn.Module]]:
    """Swap each nn.Dropout of `model` for a SeededDropout of the same p; returns what `unseed` puts back."""
    swapped = []
    for name, module in list(model.named_modules()):
        if type(module) is nn.Dropout:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, attr, SeededDropout(module.p, len(swapped), step))
            swapped.append((parent, attr, module))
    return swapped


def unseed(swapped: list[tuple[nn.Module, str, nn.Module]]) -> None:
    for parent, attr, module in swapped:
        setattr(parent, attr, module)


def dropout_key(seed: int, epoch: int) -> int:
    # Its own stream of (seed, epoch): the data's order and crops come from SeedSequence([seed, epoch]).
    return int(np.random.SeedSequence([seed, epoch, 1]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------------- stacking


def _stack(tensors: list[Tensor]) -> Tensor:
    """The tensors stacked along a new first dimension, each slice laid out as the first tensor is (NCHW or NHWC)."""
    first = tensors[0]
    if not (first.is_contiguous() or (first.dim() == 4 and first.is_contiguous(memory_format=torch.channels_last))):
        first = first.contiguous()
    out = torch.empty_strided(
        (len(tensors), *first.shape), (first.numel(), *first.stride()), dtype=first.dtype, device=first.device
    )
    for slot, t in zip(out, tensors):
        slot.copy_(t)
    return out


def fuse(models: list[nn.Module], *, grads: bool = True) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Stack the members' parameters (with zeroed gradients, when `grads`) and buffers, and make every member's
    own tensors views of the stacks, so that its model, optimizer and checkpoint keep working as if alone."""
    params, buffers = {}, {}
    for name, _ in models[0].named_parameters():
        owned = [m.get_parameter(name) for m in models]
        stacked = _stack([p.detach() for p in owned])
        if grads:
            stacked.requires_grad_()
            stacked.grad = torch.zeros_like(stacked)
        grad_views = stacked.grad.unbind() if grads else [None] * len(owned)
        for p, view, grad in zip(owned, stacked.detach().unbind(), grad_views):
            p.data, p.grad = view, grad
        params[name] = stacked
    for name, _ in models[0].named_buffers():
        module_name, _, attr = name.rpartition(".")
        stacked = _stack([m.get_buffer(name) for m in models])
        for m, view in zip(models, stacked.unbind()):
            setattr(m.get_submodule(module_name), attr, view)  # a registered buffer's name: nn.Module replaces it
        buffers[name] = stacked
    return params, buffers


def unfuse(model: nn.Module) -> None:
    """Give a member that trained in a group its own memory again (its tensors are views of the group's stacks)."""
    for p in model.parameters():
        p.data, p.grad = p.data.clone(), None
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            setattr(module, name, buffer.clone())


# A forward pass of M models: (M×B×C×H×W images, each its own batch, or B×C×H×W shared: True) -> M×B×K logits
Forward = Callable[[Tensor, bool], Tensor]


def fused_forward(
    models: list[nn.Module], *, grads: bool = True, vmapped: bool = True
) -> tuple[Forward, dict[str, Tensor]]:
    """One vmapped call of the first member's modules with every member's weights (convolutions become grouped
    convolutions, BatchNorm keeps per-member statistics), and the stacks by name: the parameters' ones are the
    tensors backward fills (when `grads`). With `vmapped=False` the first member's modules are called once per
    member on its slices of the stacks instead: the same result, the same stacks, but each member's own (ungrouped)
    kernels, which a CPU runs faster than grouped ones."""
    params, buffers = fuse(models, grads=grads)

    def call(p: dict, b: dict, x: Tensor) -> Tensor:
        return functional_call(models[0], (p, b), (x,))

    if not vmapped:

        def each(x: Tensor, shared: bool) -> Tensor:
            return torch.stack(
                [
                    call(
                        {k: v[i] for k, v in params.items()},
                        {k: v[i] for k, v in buffers.items()},
                        x if shared else x[i],
                    )
                    for i in range(len(models))
                ]
            )

        return each, {**params, **buffers}

    own_inputs, shared_inputs = vmap(call), vmap(call, in_dims=(0, 0, None))

    def forward(x: Tensor, shared: bool) -> Tensor:
        return (shared_inputs if shared else own_inputs)(params, buffers, x)

    return forward, {**params, **buffers}


def solo_forward(model: nn.Module, *, grads: bool = True) -> tuple[Forward, dict[str, Tensor]]:
    """The same for a group of one, which calls its model directly (no vmap), and its own tensors by name."""
    if grads:
        for p in model.parameters():
            p.grad = torch.zeros_like(p)

    def forward(x: Tensor, shared: bool) -> Tensor:
        return model(x if shared else x[0]).unsqueeze(0)

    return forward, {**dict(model.named_parameters()), **dict(model.named_buffers())}


def group_forward(models: list[nn.Module], *, vmapped: bool, grads: bool = True) -> tuple[Forward, dict[str, Tensor]]:
    """The forward pass of a group: `solo_forward` for one model, else `fused_forward` (vmapped or not)."""
    if len(models) == 1:
        return solo_forward(models[0], grads=grads)
    return fused_forward(models, grads=grads, vmapped=vmapped)
