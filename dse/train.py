"""The one trainer: optimizers by name, the learning-rate schedule, the weight average (EMA), test-time flips,
per-epoch records, checkpoints, fused groups of trials (each its own model, trained together as one fused model)
and CUDA-graph training steps."""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from dse.config import TrainConfig
from dse.checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, save_checkpoint
from dse.data import DataConfig, DataError, Splits, batches, crop_padding, load_data, member_batches
from dse.fused import Forward, dropout_key, fused_forward, seed_dropouts, solo_forward, unfuse, unseed
from dse.identity import run_identity
from dse.optim import (
    GRAPH_OPTIONS, NOT_CAPTURABLE, OPTIMIZERS, SCHEDULES, average_into, ema_decay, learning_rate, make_optimizer,
    optimizer_kwargs, peak_lr, step_lrs, update_ema,
)  # fmt: skip

__all__ = [
    "GRAPH_OPTIONS",
    "MEMORY_FORMATS",
    "NOT_CAPTURABLE",
    "OPTIMIZERS",
    "SCHEDULES",
    "EpochRecord",
    "Failed",
    "Finished",
    "Member",
    "Outcome",
    "Stopped",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "TrainingStopped",
    "best_group_size",
    "ema_decay",
    "evaluate",
    "group_key",
    "learning_rate",
    "make_optimizer",
    "mixed_precision",
    "native_bf16",
    "peak_lr",
    "pick_group_size",
    "pick_memory_format",
    "train",
    "train_group",
    "train_step",
    "update_ema",
]

log = logging.getLogger(__name__)

MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
# Settings every member of a fused group shares: they fix the shape, device and mode of its training step.
_GROUP_SETTINGS = (
    "batch_size", "augment", "crop", "tta", "device", "memory_format", "amp", "compile", "cuda_graph", "threads",
    "eval_batch_size",
)  # fmt: skip
# Devices where a group's members run as one vmapped model. Elsewhere (the CPU) each member's modules run in turn
# on its slice of the stacked weights: vmap makes convolutions grouped ones, which oneDNN runs slower per image
# than the members' own convolutions (CPU groups of 2-4 stepped 0.5-0.8x the images/s of one trial; bench/trainer.py).
VMAP_DEVICES = ("cuda",)
_WARMUP_STEPS = 3  # eager steps on a side stream before a CUDA graph is captured (cuDNN and cuBLAS set-up)


class TrainingDiverged(RuntimeError):
    """The training loss stopped being finite."""


class TrainingStopped(RuntimeError):
    """`train`'s on_epoch asked to stop; the message is the reason it gave."""


@dataclass
class EpochRecord:
    """What one epoch did. `seconds` and `images_per_s` time the training pass alone; with `trials` > 1 the
    pass trained that many trials together, so the device did `trials` times `images_per_s`."""

    epoch: int  # 1-based
    lr: float  # the mean learning rate of its steps
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    seconds: float
    images_per_s: float
    eval_seconds: float
    trials: int = 1


@dataclass
class TrainResult:
    """Every epoch's record (earlier runs of a resumed training included) and the final test score."""

    epochs: list[EpochRecord]
    test_loss: float
    test_acc: float
    seconds_per_epoch: float  # mean training-pass seconds of the epochs run by this call (none run: the records')
    device: str
    precision: str  # "bf16 autocast" or "fp32"
    memory_format: str  # the layout trained in: channels_last or contiguous
    split: dict
    resumed_from: int  # epochs already done when this call started (0: a fresh run)
    cuda_graph: bool = False  # whether its last epoch replayed a captured CUDA graph

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Member:
    """One trial of a fused group: its own model (own init), config, checkpoint and per-epoch callback.

    `on_epoch(record)` runs after each epoch's checkpoint: it returns None to go on, or a reason to stop this
    member now (pruned, say); what it raises ends the member as Failed. `writer(path, state)` writes the
    member's checkpoints (None: `save_checkpoint`), the seam to inject a full disk."""

    model: nn.Module
    cfg: TrainConfig
    checkpoint_path: str | os.PathLike | None = None
    on_epoch: Callable[[EpochRecord], str | None] | None = None
    writer: Callable[[str, dict], None] | None = None


@dataclass(frozen=True)
class Finished:
    """The member trained all its epochs (or resumed a finished checkpoint) and was tested."""

    result: TrainResult


@dataclass(frozen=True)
class Stopped:
    """The member's on_epoch asked it to stop after `epoch` (1-based), giving `reason`."""

    epoch: int
    reason: str


@dataclass(frozen=True)
class Failed:
    """The member left with an error: TrainingDiverged, CheckpointError, OSError, what its on_epoch raised."""

    error: BaseException


Outcome = Union[Finished, Stopped, Failed]


def _optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state_dict with plain-number learning rates (a graphed run keeps them in device tensors)."""
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        if isinstance(group["lr"], Tensor):
            group["lr"] = group["lr"].item()
    return state


def _load_optimizer(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a saved optimizer state into one built for this run, keeping this run's lr object and its
    capturable/fused/foreach mode (a checkpoint written eagerly may resume in a CUDA graph, and back)."""
    runtime = ("lr", "capturable", "fused", "foreach")
    groups = [{**saved, **{k: ours[k] for k in runtime if k in ours}} for saved, ours in
              zip(state["param_groups"], optimizer.param_groups)]  # fmt: skip
    optimizer.load_state_dict({**state, "param_groups": groups})


# ---------------------------------------------------------------------------------------------- checkpoints


def _restore(state: dict, path: str, model: nn.Module, average, optimizer: torch.optim.Optimizer, identity: dict):
    if state["run"] != identity:
        ours, theirs = identity, state["run"]
        diff = [
            f"{group}.{k}: {theirs.get(group, {}).get(k)!r} there, {v!r} here"
            for group in ("train", "split")
            for k, v in ours[group].items()
            if theirs.get(group, {}).get(k) != v
        ] or ["num_classes"]
        raise CheckpointError(
            f"checkpoint {path!r} belongs to another run ({'; '.join(diff)}); "
            "delete it to start over, or set train.checkpoint elsewhere"
        )
    try:
        if average is not None:
            average.load_state_dict(state["model"])
        model.load_state_dict(state["trained"] if average is not None else state["model"])
        _load_optimizer(optimizer, state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))  # skip the heading
        raise CheckpointError(
            f"checkpoint {path!r} was written for another model ({first}); "
            "delete it to start over, or set train.checkpoint elsewhere"
        ) from e
    return state["epoch"], [EpochRecord(**r) for r in state["records"]]


def _state(epoch: int, model: nn.Module, average, optimizer, records, identity: dict, layout: str) -> dict:
    # The learning rate, the EMA's decay and the dropout masks are pure functions of (seed, step): no scheduler or
    # RNG state. "model" holds the weights that are evaluated (and deployed): the average's when there is one.
    def weights(m: nn.Module) -> dict:
        return {k: v.clone() for k, v in m.state_dict().items()}  # a fused member's tensors are views of the stacks

    trained = {"trained": weights(model)} if average is not None else {}
    return {
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "memory_format": layout,  # an `auto` choice is kept on resume: layouts round differently
        "model": weights(average if average is not None else model),
        **trained,
        "optimizer": _optimizer_state(optimizer),
        "records": [asdict(r) for r in records],
        "run": identity,
    }


# ---------------------------------------------------------------------------------------------- devices and layout


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"train device={name!r} is not a device; allowed: auto, cpu, cuda, cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train device={name!r} but CUDA is not available here; use device=auto or cpu")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively (any CUDA GPU we train on; a CPU with AMX or AVX512-BF16).
    Elsewhere bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        return True
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private, hence getattr
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def _uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.amp and native_bf16(device)


def mixed_precision(cfg: TrainConfig, device: torch.device, *, cache: bool = True) -> torch.autocast:
    """The autocast context the trainer runs forward passes in: bf16 when `cfg.amp` and the device has bf16 units.
    `cache=False` for code captured in a CUDA graph (autocast's weight cache must not outlive the capture)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=_uses_bf16(cfg, device), cache_enabled=cache)


def pick_memory_format(model: nn.Module, x: Tensor, y: Tensor, autocast, *, repeats: int = 2) -> str:
    """The faster layout for training `model` on the batch (x, y): times forward+backward of a copy in each.

    Like cudnn.benchmark, the choice follows the clock: NCHW wins for narrow models on some CPUs (oneDNN's
    channels_last kernels for few channels), channels_last for wide ones and on GPUs. The model, its
    gradients and torch's RNG are left as they were.
    """
    probes = {name: (copy.deepcopy(model).to(memory_format=fmt).train(), x.contiguous(memory_format=fmt))
              for name, fmt in MEMORY_FORMATS.items()}  # fmt: skip
    best = dict.fromkeys(probes, math.inf)
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        for i in range(repeats + 1):  # the first round warms up
            for name, (probe, xb) in probes.items():  # interleaved: a busy neighbour slows both alike
                _sync(x.device)
                start = time.perf_counter()
                with autocast:
                    loss = F.cross_entropy(probe(xb), y)
                loss.backward()
                _sync(x.device)
                if i:
                    best[name] = min(best[name], time.perf_counter() - start)
    return min(best, key=best.get)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _layout(cfg: TrainConfig, model: nn.Module, splits: Splits, autocast, saved: dict | None) -> str:
    if saved and saved.get("memory_format") in MEMORY_FORMATS:
        return saved["memory_format"]
    if cfg.memory_format != "auto":
        return cfg.memory_format
    n = cfg.batch_size
    x, y = next(batches(splits.train_x[:n], splits.train_y[:n], n, mean=splits.mean, std=splits.std))
    return pick_memory_format(model, x, y, autocast)


# ---------------------------------------------------------------------------------------------- steps


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn, x: Tensor, y: Tensor, autocast=None):
    """One plain forward, backward and optimizer step of one model; returns (logits, loss), both on the device."""
    with autocast or torch.autocast("cpu", enabled=False):
        logits = model(x)
        loss = loss_fn(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return logits, loss


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int = 512,
    channels_last: bool = False,
    autocast=None,
    tta: bool = False,
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of the model on uint8 images x, in eval mode; NaN for no images.
    With `tta` the logits are the mean of the model's on each image and on its left-right mirror."""
    model.eval()
    kw = dict(mean=mean, std=std, batch_size=batch_size, channels_last=channels_last, autocast=autocast, tta=tta)
    return _score(lambda xb: model(xb).unsqueeze(0), 1, x, y, **kw)[0]


@torch.no_grad()
def _score(forward, members: int, x: Tensor, y: Tensor, *, mean, std, batch_size, channels_last, autocast, tta):
    """[(mean cross-entropy, accuracy)] per member of `forward` (images -> members×N×classes logits)."""
    if len(x) == 0:
        return [(math.nan, math.nan)] * members
    loss_sum = torch.zeros(members, device=x.device)
    correct = torch.zeros(members, dtype=torch.int64, device=x.device)
    for xb, yb in batches(x, y, batch_size, mean=mean, std=std, channels_last=channels_last):
        with autocast or torch.autocast("cpu", enabled=False):
            logits = forward(xb).float()
            if tta:
                logits = (logits + forward(xb.flip(3)).float()) / 2
        loss_sum += F.cross_entropy(logits.transpose(1, 2), yb.expand(members, -1), reduction="none").sum(1)
        correct += (logits.argmax(-1) == yb).sum(1)
    losses, hits = torch.stack([loss_sum.double(), correct.double()]).tolist()  # one host sync
    return [(loss / len(x), hit / len(x)) for loss, hit in zip(losses, hits)]


def _losses(logits: Tensor, y: Tensor, smoothing: Tensor) -> Tensor:
    """Each member's mean cross-entropy over its batch with its own label smoothing (M×1): torch's formula."""
    logp = logits.log_softmax(-1)
    nll = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return ((1 - smoothing) * nll - smoothing * logp.mean(-1)).mean(-1)


# ---------------------------------------------------------------------------------------------- fused groups


@dataclass
class _Run:
    """A member while it trains: its optimizer, progress and, once it has left, its outcome."""

    member: Member
    path: str | None
    optimizer: torch.optim.Optimizer | None = None
    average: nn.Module | None = None  # the weight average (cfg.ema), evaluated and saved instead of the model
    identity: dict = field(default_factory=dict)
    done: int = 0  # finished epochs
    records: list[EpochRecord] = field(default_factory=list)
    dropouts: list = field(default_factory=list)  # (parent, attribute, nn.Dropout) swapped for SeededDropouts
    resumed_from: int = 0
    seconds: list[float] = field(default_factory=list)
    graphed: bool = False
    outcome: Outcome | None = None
    released: bool = False  # its model given back


@dataclass
class _Group:
    """The members training together now: one forward pass for all, each member's own optimizer."""

    runs: list[_Run]
    forward: Forward  # the members' models, trained
    evaluated: Forward  # the members' weight averages, or their models
    grads: list[Tensor]  # what backward accumulates into; each member's parameters hold views of them
    autocast: torch.autocast
    step: Tensor  # steps done this epoch, on the device (dropout masks, per-step learning rates)
    smoothing: Tensor  # M×1 label smoothing
    loss_sum: Tensor  # M
    correct: Tensor  # M
    graphed: bool = False  # steps read lr from `lr_table` and are captured in a CUDA graph after warm-up
    lr: Tensor | None = None  # M: the learning rates graphed optimizers read
    lr_table: Tensor | None = None  # M×steps: this epoch's learning rates
    averages: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (average, model) tensor pairs
    ema: Tensor | None = None  # M: this step's weight of the model in each member's average (1 - decay)
    ema_views: list[Tensor] = field(default_factory=list)  # `ema` shaped to broadcast over each pair
    ema_table: Tensor | None = None  # M×steps: this epoch's weights
    static: tuple[Tensor, Tensor] | None = None  # the graph's input buffers
    graph: Any = None  # torch.cuda.CUDAGraph once captured
    warm: int = 0
    side: Any = None  # the warm-up stream


def group_key(model: nn.Module, cfg: TrainConfig) -> tuple:
    """What trials must share to be trained as one fused group: the model's structure (module types with their
    settings, parameter and buffer shapes), the step's settings (batch size, augmentation and crop, test-time
    flips, device, layout, amp, compile, cuda_graph, threads, eval batch), whether they keep a weight average and
    whether their optimizer can be captured in a CUDA graph. Seeds, dropout p, the optimizer and its settings, lr,
    warm-up and schedule, weight decay, label smoothing, the average's decay and epochs may differ."""
    modules = tuple((type(m).__name__, "" if isinstance(m, nn.Dropout) else m.extra_repr()) for m in model.modules())
    tensors = tuple((name, tuple(t.shape), t.dtype) for name, t in [*model.named_parameters(), *model.named_buffers()])
    settings = tuple(getattr(cfg, k) for k in _GROUP_SETTINGS)
    return modules, tensors, settings, cfg.ema > 0, cfg.optimizer not in NOT_CAPTURABLE


def _check_group(members: Sequence[Member]) -> None:
    if not members:
        raise ValueError("train_group needs at least one member")
    if len({id(m.model) for m in members}) < len(members):
        raise ValueError("members of a group need models of their own; the same model object appears twice")
    first = group_key(members[0].model, members[0].cfg)
    for i, member in enumerate(members[1:], start=1):
        if group_key(member.model, member.cfg) != first:
            settings = [k for k in _GROUP_SETTINGS if getattr(member.cfg, k) != getattr(members[0].cfg, k)]
            what = f"train {', '.join(settings)}" if settings else "model structure, weight average or optimizer"
            raise ValueError(f"member {i} cannot be fused with member 0: its {what} differ; group by group_key()")


def _forward(models: list[nn.Module], compile: bool, *, grads: bool = True) -> tuple[Forward, dict[str, Tensor]]:
    if len(models) == 1:
        forward, tensors = solo_forward(models[0], grads=grads)
    else:
        vmapped = next(models[0].parameters()).device.type in VMAP_DEVICES
        forward, tensors = fused_forward(models, grads=grads, vmapped=vmapped)
    return torch.compile(forward) if compile else forward, tensors


def _assemble(runs: list[_Run], autocast, step: Tensor, graphed: bool, steps: int) -> _Group:
    cfg, m, device = runs[0].member.cfg, len(runs), step.device
    forward, tensors = _forward([run.member.model for run in runs], cfg.compile)
    group = _Group(
        runs, forward, forward, [t.grad for t in tensors.values() if t.requires_grad], autocast, step,
        smoothing=torch.tensor([[run.member.cfg.label_smoothing] for run in runs], device=device),
        loss_sum=torch.zeros(m, device=device), correct=torch.zeros(m, dtype=torch.int64, device=device),
    )  # fmt: skip
    if cfg.ema:
        group.evaluated, averages = _forward([run.average for run in runs], cfg.compile, grads=False)
        group.averages = [(average, tensors[name].detach()) for name, average in averages.items()]
        group.ema, group.ema_table = torch.zeros(m, device=device), torch.zeros(m, steps, device=device)
        group.ema_views = [group.ema.view(()) if m == 1 else group.ema.view(-1, *[1] * (a.dim() - 1))
                           for a, _ in group.averages]  # fmt: skip
    if graphed:
        group.graphed, group.side = True, torch.cuda.Stream(device)
        group.lr, group.lr_table = torch.zeros(m, device=device), torch.zeros(m, steps, device=device)
        for run, lr in zip(runs, group.lr.unbind()):
            for param_group in run.optimizer.param_groups:
                param_group["lr"] = lr
    return group


def _set_mode(group: _Group, training: bool) -> None:
    """Train or eval mode for the members' models; their weight averages are only ever evaluated."""
    for run in group.runs:
        run.member.model.train(training)
        if run.average is not None:
            run.average.eval()


def _begin_epoch(group: _Group, lrs: list[list[float]], steps: int) -> None:
    """Zero the epoch's counters, key each member's dropout by its (seed, epoch), load its learning rates and
    its average's weights."""
    for counter in (group.step, group.loss_sum, group.correct):
        counter.zero_()
    for run in group.runs:
        key = dropout_key(run.member.cfg.seed, run.done)
        for parent, attr, _ in run.dropouts:
            getattr(parent, attr).key.fill_(key)
    if group.lr_table is not None:
        group.lr_table.copy_(torch.tensor(lrs, dtype=group.lr_table.dtype))
    if group.ema_table is not None:
        weights = [[1 - ema_decay(run.member.cfg, run.done * steps + i) for i in range(steps)] for run in group.runs]
        group.ema_table.copy_(torch.tensor(weights, dtype=group.ema_table.dtype))


def _set_lrs(group: _Group, lrs: list[float]) -> None:
    for run, lr in zip(group.runs, lrs):
        for param_group in run.optimizer.param_groups:
            param_group["lr"] = lr


def _step(group: _Group, x: Tensor, y: Tensor) -> None:
    """One training step of every member: forward, each member's loss, backward, each member's optimizer step.
    Only device work, so that it can be captured in a CUDA graph and replayed."""
    torch._foreach_zero_(group.grads)
    if group.graphed:
        group.lr.copy_(group.lr_table.index_select(1, group.step).squeeze(1))
    with group.autocast:
        logits = group.forward(x, False)
    losses = _losses(logits.float(), y, group.smoothing)
    losses.sum().backward()
    for run in group.runs:
        run.optimizer.step()
    if group.averages:
        group.ema.copy_(group.ema_table.index_select(1, group.step).squeeze(1))
        with torch.no_grad():
            average_into(group.averages, group.ema_views)
    group.loss_sum += losses.detach() * y.shape[1]
    group.correct += (logits.argmax(-1) == y).sum(-1)
    group.step += 1


def _run_step(group: _Group, x: Tensor, y: Tensor) -> None:
    """A step eagerly, or: warm up on a side stream, capture the step in a CUDA graph, then replay it."""
    if not group.graphed:
        _step(group, x, y)
        return
    if group.static is None:
        group.static = (torch.empty_like(x), torch.empty_like(y))
    static_x, static_y = group.static
    static_x.copy_(x)
    static_y.copy_(y)
    if group.graph is not None:
        group.graph.replay()
        return
    group.side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(group.side):
        _step(group, static_x, static_y)
    torch.cuda.current_stream().wait_stream(group.side)
    group.warm += 1
    if group.warm == _WARMUP_STEPS:
        group.graph = _capture(group)
        group.graphed = group.graph is not None


def _capture(group: _Group) -> Any:
    """The step recorded in a CUDA graph (recording runs nothing); None, with the reason logged, where it fails."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            _step(group, *group.static)
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError as e:
        log.warning("dse.train: the training step cannot be captured in a CUDA graph (%s); training eagerly",
                    str(e).strip().splitlines()[0])  # fmt: skip
        return None
    return graph


def _graphable(cfgs: list[TrainConfig], device: torch.device, *, quiet: bool = False) -> bool:
    """Whether the group's steps will be captured in a CUDA graph; where they cannot, the log says why."""
    if device.type != "cuda" or not cfgs[0].cuda_graph:
        return False
    problems = ["train.compile=true runs compiled steps"] if cfgs[0].compile else []
    problems += sorted({NOT_CAPTURABLE[c.optimizer] for c in cfgs if c.optimizer in NOT_CAPTURABLE})
    if problems and not quiet:
        log.warning("dse.train: no CUDA graph: %s; training eagerly", "; ".join(problems))
    return not problems


def _train_pass(group: _Group, splits: Splits, cfg: TrainConfig, steps: int, channels_last: bool, bar):
    """One epoch of training steps for every member; returns (losses, accuracies, seconds, mean lrs)."""
    lrs = [step_lrs(run.member.cfg, run.done, steps) for run in group.runs]
    _begin_epoch(group, lrs, steps)
    _set_mode(group, True)
    start = time.perf_counter()
    data = member_batches(
        splits.train_x, splits.train_y, cfg.batch_size, mean=splits.mean, std=splits.std, augment=cfg.augment,
        seeds=[run.member.cfg.seed for run in group.runs], epochs=[run.done for run in group.runs],
        pad=crop_padding(cfg.crop, splits.train_x.shape[-2:]), channels_last=channels_last,
    )  # fmt: skip
    for i, (x, y) in enumerate(data):
        if not group.graphed:
            _set_lrs(group, [lr[i] for lr in lrs])
        _run_step(group, x, y)
        bar.update()
    losses, hits = torch.stack([group.loss_sum.double(), group.correct.double()]).tolist()  # the epoch's host sync
    seconds = time.perf_counter() - start
    seen = steps * cfg.batch_size
    mean_lrs = [math.fsum(lr) / steps for lr in lrs]
    return [loss / seen for loss in losses], [hit / seen for hit in hits], seconds, mean_lrs


def _end_epoch(run: _Run, record: EpochRecord, layout: str) -> None:
    """Record the epoch, write the checkpoint when due, then call on_epoch: the member leaves when on_epoch
    asks it to stop (pruned, ...) or when either raises (its checkpoint cannot be written, it was taken over,
    ...); the others go on."""
    member = run.member
    run.done += 1
    run.records.append(record)
    run.seconds.append(record.seconds)
    try:
        if run.path and (run.done % member.cfg.checkpoint_every == 0 or run.done == member.cfg.epochs):
            state = _state(run.done, member.model, run.average, run.optimizer, run.records, run.identity, layout)
            (member.writer or save_checkpoint)(run.path, state)
        reason = member.on_epoch(record) if member.on_epoch is not None else None
    except Exception as e:
        run.outcome = Failed(e)
        return
    if reason is not None:
        run.outcome = Stopped(run.done, reason)


def _group_epoch(group: _Group, splits: Splits, cfg: TrainConfig, steps: int, layout: str, eval_kw: dict, bar):
    runs = group.runs
    bar.set_description(f"epoch {min(r.done for r in runs) + 1}/{max(r.member.cfg.epochs for r in runs)}"
                        + (f" ({len(runs)} trials)" if len(runs) > 1 else ""))  # fmt: skip
    losses, accs, seconds, lrs = _train_pass(group, splits, cfg, steps, layout == "channels_last", bar)
    start = time.perf_counter()
    _set_mode(group, False)
    val = _score(_evaluated(group), len(runs), splits.val_x, splits.val_y, **eval_kw)
    eval_seconds = time.perf_counter() - start
    for run, loss, acc, lr, (val_loss, val_acc) in zip(runs, losses, accs, lrs, val):
        if not math.isfinite(loss):
            error = TrainingDiverged(f"train loss is {loss} in epoch {run.done + 1} at lr={lr:g}; lower train.lr")
            run.outcome = Failed(error)
            continue
        record = EpochRecord(
            epoch=run.done + 1, lr=lr, train_loss=loss, train_acc=acc, val_loss=val_loss, val_acc=val_acc,
            seconds=seconds, images_per_s=steps * cfg.batch_size / seconds, eval_seconds=eval_seconds, trials=len(runs),
        )  # fmt: skip
        run.graphed = group.graph is not None
        if len(runs) == 1:
            bar.set_postfix(loss=f"{loss:.3f}", val_acc=f"{val_acc:.4f}", refresh=False)
        _end_epoch(run, record, layout)


def _finish(group: _Group, splits: Splits, eval_kw: dict, context: dict) -> None:
    """Score the test set for the members whose epochs are all done, and hand them their results."""
    _set_mode(group, False)
    tests = _score(_evaluated(group), len(group.runs), splits.test_x, splits.test_y, **eval_kw)
    for run, (test_loss, test_acc) in zip(group.runs, tests):
        if run.done >= run.member.cfg.epochs:
            run.outcome = Finished(TrainResult(
                epochs=run.records, test_loss=test_loss, test_acc=test_acc,
                seconds_per_epoch=_mean(run.seconds or [r.seconds for r in run.records]),
                resumed_from=run.resumed_from, cuda_graph=run.graphed, **context,
            ))  # fmt: skip


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _open(member: Member, splits: Splits, layout: str, step: Tensor, graphed: bool, saved: dict | None) -> _Run:
    """A member ready to train: its model in the group's layout, its optimizer, its checkpoint restored."""
    path = str(member.checkpoint_path or member.cfg.checkpoint or "") or None
    model = member.model.to(memory_format=MEMORY_FORMATS[layout])
    optimizer = make_optimizer(model, member.cfg, graph=graphed)
    run = _Run(member, path, optimizer, identity=run_identity(member.cfg, splits.split, splits.num_classes))
    run.average = copy.deepcopy(model) if member.cfg.ema else None
    if saved is not None:
        run.done, run.records = _restore(saved, path, model, run.average, run.optimizer, run.identity)
        run.resumed_from = run.done
    run.dropouts = seed_dropouts(model, step)
    return run


def _checkpoint(member: Member) -> dict | Exception | None:
    """The member's checkpoint when it has one, or the CheckpointError that keeps it from starting."""
    path = member.checkpoint_path or member.cfg.checkpoint
    try:
        return load_checkpoint(path) if path and Path(path).exists() else None
    except CheckpointError as e:
        return e


def train_group(members: Sequence[Member], splits: Splits) -> Iterator[tuple[int, Outcome]]:
    """Train several trials together on `splits`: one fused model (their weights stacked; vmapped on CUDA, member
    by member elsewhere: `VMAP_DEVICES`), each member's own optimizer. Yields (member index, outcome) as soon as
    a member ends, right after the epoch it leaves in, the others going on; each member exactly once.

    Each member computes what it would compute trained alone by `train` (its init, data order, augmentation,
    dropout masks, optimizer and schedule), up to floating-point order, and writes the same checkpoints. A
    member ends Finished, Stopped (its on_epoch asked) or Failed: its loss stopped being finite
    (TrainingDiverged), its checkpoint is unreadable (CheckpointError) or cannot be written (OSError), its
    on_epoch raised. Members may resume from different epochs and have different numbers of epochs. All must
    share `group_key`; that and the batch size are checked before the first outcome is asked for. A member's
    model is given back (its own tensors and dropout modules; a Finished one holding its weight average) when
    it ends, and every model when the caller stops iterating.
    """
    _check_group(members)
    cfg = members[0].cfg
    device = resolve_device(cfg.device)
    if len(splits.train_x) < cfg.batch_size:
        raise ValueError(f"train batch_size={cfg.batch_size} is more than the {len(splits.train_x)} training images")
    return _train_group(members, splits, device)


def _train_group(members: Sequence[Member], splits: Splits, device: torch.device) -> Iterator[tuple[int, Outcome]]:
    cfg = members[0].cfg
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    splits = splits.to(device)
    graphed = _graphable([m.cfg for m in members], device)
    autocast = mixed_precision(cfg, device, cache=not graphed)
    step = torch.zeros(1, dtype=torch.int64, device=device)
    saved = [_checkpoint(m) for m in members]
    runs: list[_Run] = []
    try:
        for member in members:
            member.model.to(device)
        resumable = [s for s in saved if isinstance(s, dict)]
        layout = _layout(cfg, members[0].model, splits, autocast, resumable[0] if resumable else None)
        for member, state in zip(members, saved):
            if isinstance(state, CheckpointError):
                runs.append(_Run(member, None, outcome=Failed(state)))
                continue
            try:
                runs.append(_open(member, splits, layout, step, graphed, state))
            except CheckpointError as e:
                runs.append(_Run(member, None, outcome=Failed(e)))
        for i, run in enumerate(runs):
            if run.outcome is not None:
                _release(run)
                yield i, run.outcome
        context = dict(device=str(device), precision="bf16 autocast" if _uses_bf16(cfg, device) else "fp32",
                       memory_format=layout, split=dict(splits.split))  # fmt: skip
        for run in _train_runs(runs, splits, cfg, layout, autocast, step, graphed, context):
            _release(run)
            yield runs.index(run), run.outcome
    finally:
        for run in runs:
            if not run.released:
                _release(run)


def _release(run: _Run) -> None:
    """Give the member's model back as it was handed over, with the weights it ends with: its own tensors and
    dropout modules; a finished member's model holds its weight average (what was evaluated and saved)."""
    unseed(run.dropouts)
    unfuse(run.member.model)
    if run.average is not None:
        unfuse(run.average)
        if isinstance(run.outcome, Finished):
            run.member.model.load_state_dict(run.average.state_dict())
    run.released = True


def _train_runs(runs: list[_Run], splits: Splits, cfg: TrainConfig, layout: str, autocast, step, graphed, context):
    """Train groups of the runs still in until none is, yielding each run as it ends: a group is re-formed
    whenever a member leaves."""
    steps = len(splits.train_x) // cfg.batch_size
    eval_kw = dict(mean=splits.mean, std=splits.std, batch_size=cfg.eval_batch_size,
                   channels_last=layout == "channels_last", autocast=autocast, tta=cfg.tta)  # fmt: skip
    epochs_left = max((r.member.cfg.epochs - r.done for r in runs if r.outcome is None), default=0)
    with tqdm(total=steps * max(epochs_left, 0), disable=not cfg.progress, unit="batch", dynamic_ncols=True) as bar:
        while active := [r for r in runs if r.outcome is None]:
            group = _assemble(active, autocast, step, graphed, steps)
            while all(r.outcome is None for r in group.runs):
                if any(r.done >= r.member.cfg.epochs for r in group.runs):
                    _finish(group, splits, eval_kw, context)
                else:
                    _group_epoch(group, splits, cfg, steps, layout, eval_kw, bar)
                yield from (r for r in group.runs if r.outcome is not None)


def train(
    model: nn.Module,
    splits: Splits,
    cfg: TrainConfig,
    *,
    checkpoint_path: str | os.PathLike | None = None,
    on_epoch: Callable[[EpochRecord], str | None] | None = None,
) -> TrainResult:
    """Train `model` (moved in place to the device) on `splits` as `cfg` says; return the records.

    A group of one (`train_group`). With a checkpoint path (argument, else `cfg.checkpoint`) that exists,
    continues from its last finished epoch; a checkpoint is written after every `cfg.checkpoint_every` epochs
    and after the last. `on_epoch(record)` runs after each epoch's checkpoint; returning a reason stops the run
    with TrainingStopped(reason), and what it raises propagates. Training draws nothing from torch's global RNG.
    """
    [(_, outcome)] = list(train_group([Member(model, cfg, checkpoint_path, on_epoch)], splits))
    if isinstance(outcome, Stopped):
        raise TrainingStopped(outcome.reason)
    if isinstance(outcome, Failed):
        raise outcome.error
    return outcome.result


def pick_group_size(
    model: nn.Module,
    splits: Splits,
    cfg: TrainConfig,
    *,
    sizes: Sequence[int] = (1, 2, 4, 8, 16),
    min_gain: float = 0.1,
    steps: int = 10,
) -> tuple[int, dict[int, float]]:
    """How many trials like (`model`, `cfg`) to train as one group: the aggregate training images/s of groups
    of copies of `model` for each size in turn, stepping as `train_group` does (CUDA graphs included) on the
    first batch; the largest size that still adds `min_gain` (10 %) over the size before and fits in memory.
    Returns that size and the images/s measured per size; `model` is left as it was."""
    cfg = replace(cfg, checkpoint=None, progress=False)
    device = resolve_device(cfg.device)
    splits = splits.to(device)
    graphed = _graphable([cfg], device, quiet=True)
    autocast = mixed_precision(cfg, device, cache=not graphed)
    probe = copy.deepcopy(model).to(device)
    layout = _layout(cfg, probe, splits, autocast, None)
    rates: dict[int, float] = {}
    for size in sizes:
        try:
            rates[size] = _group_rate([copy.deepcopy(probe) for _ in range(size)], splits, cfg, layout, graphed, steps)
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


def _group_rate(models: list[nn.Module], splits: Splits, cfg: TrainConfig, layout: str, graphed: bool, steps: int):
    """Aggregate training images/s of the models as one group, timed after warm-up (and capture)."""
    step = torch.zeros(1, dtype=torch.int64, device=splits.device)
    runs = [_open(Member(m, cfg), splits, layout, step, graphed, None) for m in models]
    total = _WARMUP_STEPS + 1 + steps
    group = _assemble(runs, mixed_precision(cfg, splits.device, cache=not graphed), step, graphed, total)
    _begin_epoch(group, [[cfg.lr] * total] * len(runs), total)
    _set_mode(group, True)
    n = cfg.batch_size
    x, y = next(member_batches(splits.train_x[:n], splits.train_y[:n], n, mean=splits.mean, std=splits.std,
                               seeds=[0] * len(runs), epochs=[0] * len(runs), augment=cfg.augment,
                               channels_last=layout == "channels_last"))  # fmt: skip
    for i in range(total):
        if i == _WARMUP_STEPS + 1:
            _sync(splits.device)
            start = time.perf_counter()
        _run_step(group, x, y)
    _sync(splits.device)
    return len(runs) * n * steps / (time.perf_counter() - start)


def _evaluated(group: _Group) -> Callable[[Tensor], Tensor]:
    """What evaluation scores: every member's weight average (or model) on one batch of images."""
    return lambda x: group.evaluated(x, True)


# ---------------------------------------------------------------------------------------------- command line


def _summary(name: str, result: TrainResult, profile, checkpoint: str | None) -> str:
    last = result.epochs[-1] if result.epochs else None
    best_val = max((r.val_acc for r in result.epochs), default=math.nan)
    split = result.split
    lines = [
        f"model          {name}",
        f"data           {split['dataset']}: {split['train']} train / {split['val']} val / {split['test']} test "
        f"(split seed {split['seed']}, indices sha256 {split['indices_sha256']})",
        f"test accuracy  {100 * result.test_acc:.2f} %  (loss {result.test_loss:.4f})",
        f"val accuracy   {100 * (last.val_acc if last else math.nan):.2f} % last, {100 * best_val:.2f} % best",
        f"model size     {profile.size_mb:.3f} MB fp32 state_dict, {profile.params:,} parameters, "
        f"{profile.macs / 1e6:.1f} M MACs per image",
        f"s/epoch        {result.seconds_per_epoch:.2f} s training pass on {result.device}, {result.precision}, {result.memory_format}"
        f"{', CUDA graph' if result.cuda_graph else ''}"
        f" ({last.images_per_s if last else math.nan:.0f} images/s last epoch)",
        f"epochs         {len(result.epochs)} (resumed after {result.resumed_from})",
    ]
    if checkpoint:
        lines.append(f"checkpoint     {checkpoint}")
    return "\n".join(lines)


def _run(cfg) -> None:
    import json

    from hydra.core.hydra_config import HydraConfig

    from dse.config import to_object
    from dse.measure import profile
    from dse.models import ModelConfig, build_model, paper_name

    try:
        data_cfg = to_object(DataConfig, cfg.data)
        train_cfg = to_object(TrainConfig, cfg.train)
        model_cfg = to_object(ModelConfig, cfg.model)
    except ValueError as e:
        raise SystemExit(f"dse.train: {e}") from None
    out = Path(HydraConfig.get().runtime.output_dir)
    checkpoint = train_cfg.checkpoint or str(out / "checkpoint.pt")
    try:
        splits = load_data(data_cfg)
        if train_cfg.threads:
            torch.set_num_threads(train_cfg.threads)
        torch.manual_seed(train_cfg.seed)
        model = build_model(model_cfg, num_classes=splits.num_classes, in_channels=splits.in_channels)
        result = train(model, splits, train_cfg, checkpoint_path=checkpoint)
    except (ValueError, DataError, CheckpointError, TrainingDiverged) as e:
        raise SystemExit(f"dse.train: {e}") from None
    except KeyboardInterrupt:
        hint = f"resume with the same overrides and train.checkpoint={checkpoint}"
        raise SystemExit(f"dse.train: interrupted; {hint}") from None
    (out / "result.json").write_text(json.dumps(result.to_dict(), indent=1))
    size = profile(model.cpu(), tuple(splits.train_x.shape[1:]), latency=False)
    print(_summary(paper_name(model_cfg), result, size, checkpoint))


def main() -> None:
    """`python -m dse.train model=... data=... train=...`: one training, then a summary."""
    import hydra

    from dse.config import register_schemas

    register_schemas()
    conf = Path(__file__).resolve().parents[1] / "conf"
    hydra.main(version_base="1.3", config_path=str(conf), config_name="run")(_run)()


if __name__ == "__main__":
    # Run the imported module's main, so the schemas Hydra checks are dse.train's classes, not __main__'s copies.
    from dse.train import main as _main

    _main()
