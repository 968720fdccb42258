"""The one trainer: optimizers by name, the learning-rate schedule, the weight average (EMA), test-time flips,
per-epoch records, atomic checkpoints."""

from __future__ import annotations

import copy
import inspect
import math
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import adabound
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from dse.data import DataConfig, DataError, Splits, batches, crop_padding, load_data

__all__ = [
    "MEMORY_FORMATS",
    "OPTIMIZERS",
    "SCHEDULES",
    "CheckpointError",
    "EpochRecord",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "ema_decay",
    "evaluate",
    "learning_rate",
    "load_checkpoint",
    "make_optimizer",
    "peak_lr",
    "mixed_precision",
    "pick_memory_format",
    "native_bf16",
    "save_checkpoint",
    "train",
    "train_step",
    "update_ema",
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
SCHEDULES = ("step", "cosine", "linear")
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
# adabound 0.0.5 calls Tensor.add(Number, Tensor), an overload torch deprecates but still runs.
warnings.filterwarnings("ignore", message="This overload of add", category=UserWarning, module="adabound")

CHECKPOINT_FORMAT = "dse.train/1"
# Settings that do not change what a run computes: a checkpoint may be resumed with them changed.
_RESUMABLE_CHANGES = {"threads", "device", "compile", "checkpoint", "checkpoint_every", "progress", "eval_batch_size"}


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable or belongs to another run; the message says which file and what to do."""


class TrainingDiverged(RuntimeError):
    """The training loss stopped being finite."""


@dataclass
class TrainConfig:
    """How to train: the schema of `conf/train/*.yaml`, one file per optimizer with its own lr and kwargs.

    The shared defaults are the recipe of the paper and its baseline code: 200 epochs of batch 128, weight
    decay 5e-4, step decay ×0.2 at 30/60/80 % of the epochs (60/120/160 of 200), crop (pad 4 on 32×32)
    and flip, no warm-up, label smoothing, weight average or test-time flips. `conf/train/sgd.yaml` adds
    the paper's optimizer: SGD, lr 0.01, Nesterov momentum 0.9; `conf/train/fast.yaml` is the few-epoch recipe.
    """

    optimizer: str = "sgd"
    lr: float = 0.01
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. momentum, betas
    weight_decay: float = 5e-4
    epochs: int = 200
    batch_size: int = 128
    lr_batch_size: int | None = None  # lr is for this batch size: scaled by batch_size / lr_batch_size; null: as is
    schedule: str = "step"  # step | cosine | linear (cosine and linear decay to 0 at the last step)
    warmup: float = 0.0  # fraction of the steps over which lr rises linearly from 0, before the schedule
    milestones: list[float] = field(default_factory=lambda: [0.3, 0.6, 0.8])  # step: fractions of `epochs`
    decay: float = 0.2  # step: lr factor at each milestone
    label_smoothing: float = 0.0
    augment: bool = True  # random crop + horizontal flip
    crop: float = 0.125  # crop shift, a fraction of the image side: zero-pad round(crop·side) px (4 on 28 and 32)
    ema: float = 0.0  # per-step decay of a moving average of the weights that is evaluated and saved; 0: off
    tta: bool = False  # evaluate on each image and its mirror image (mean logits)
    seed: int = 0  # dropout, batch order and augmentation (seed the model's init yourself)
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    memory_format: str = "auto"  # channels_last | contiguous (NCHW) | auto: time both on the first batch, keep the faster
    amp: bool = True  # bf16 autocast where the hardware has bf16 units: CUDA, CPUs with AMX or AVX512-BF16
    compile: bool = False  # torch.compile the model
    checkpoint: str | None = None  # resumed from when it exists, written after every `checkpoint_every` epochs
    checkpoint_every: int = 1
    eval_batch_size: int = 512
    progress: bool = True

    def __post_init__(self) -> None:
        optimizer_kwargs(self)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"train schedule={self.schedule!r} is unknown; allowed: {', '.join(SCHEDULES)}")
        if self.memory_format not in ("auto", *MEMORY_FORMATS):
            allowed = ", ".join(("auto", *MEMORY_FORMATS))
            raise ValueError(f"train memory_format={self.memory_format!r} is unknown; allowed: {allowed}")
        for name in ("lr", "epochs", "batch_size", "eval_batch_size", "checkpoint_every", "decay"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train {name}={getattr(self, name)!r} must be > 0")
        if not all(0 < m <= 1 for m in self.milestones):
            raise ValueError(f"train milestones={self.milestones!r} must be fractions of epochs in (0, 1]")
        for name, high in (("label_smoothing", 1), ("warmup", 1), ("ema", 1), ("crop", 0.5)):
            if not 0 <= getattr(self, name) < high:
                raise ValueError(f"train {name}={getattr(self, name)!r} must be in [0, {high})")
        if self.lr_batch_size is not None and self.lr_batch_size <= 0:
            raise ValueError(f"train lr_batch_size={self.lr_batch_size!r} must be > 0 or null (lr as given)")
        for name in ("augment", "tta"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"train {name}={getattr(self, name)!r} must be true or false")
        if self.weight_decay < 0 or self.threads < 0:
            raise ValueError(f"train weight_decay={self.weight_decay!r} and threads={self.threads!r} must be >= 0")


@dataclass
class EpochRecord:
    """What one epoch did. `seconds` and `images_per_s` time the training pass alone."""

    epoch: int  # 1-based
    lr: float  # the mean learning rate of its steps
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    seconds: float
    images_per_s: float
    eval_seconds: float


@dataclass
class TrainResult:
    """Every epoch's record (earlier runs of a resumed training included) and the final test score."""

    epochs: list[EpochRecord]
    test_loss: float
    test_acc: float
    seconds_per_epoch: float  # mean training-pass seconds of the epochs run by this call
    device: str
    precision: str  # "bf16 autocast" or "fp32"
    memory_format: str  # the layout trained in: channels_last or contiguous
    split: dict
    resumed_from: int  # epochs already done when this call started (0: a fresh run)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- optimizers


def optimizer_kwargs(cfg: TrainConfig) -> dict[str, Any]:
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


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer `cfg.optimizer` over the model's parameters, with `cfg`'s lr, weight decay and kwargs."""
    return OPTIMIZERS[cfg.optimizer](model.parameters(), **optimizer_kwargs(cfg))


def peak_lr(cfg: TrainConfig) -> float:
    """`cfg.lr`, scaled linearly to the batch size when `cfg.lr_batch_size` is set (Goyal et al., 2017)."""
    return cfg.lr * cfg.batch_size / cfg.lr_batch_size if cfg.lr_batch_size else cfg.lr


def learning_rate(cfg: TrainConfig, epoch: float) -> float:
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


# ---------------------------------------------------------------------------------------------- weight average


def ema_decay(cfg: TrainConfig, step: int) -> float:
    """The weight average's decay at 0-based optimizer `step`: `cfg.ema`, but lower for the first steps
    (min(ema, (1 + step) / (10 + step)), TensorFlow's ExponentialMovingAverage with num_updates) so that
    the average soon forgets the random initialisation."""
    return min(cfg.ema, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(average: nn.Module, model: nn.Module, decay: float) -> None:
    """average ← decay·average + (1 − decay)·model over every parameter and buffer (BatchNorm statistics
    included): one foreach lerp for the floating-point tensors; integer buffers (batch counts) are copied."""
    pairs = list(zip(average.state_dict().values(), model.state_dict().values()))
    floats = [(a, m) for a, m in pairs if a.is_floating_point()]
    torch._foreach_lerp_([a for a, _ in floats], [m for _, m in floats], 1 - decay)
    for a, m in pairs:
        if not a.is_floating_point():
            a.copy_(m)


# ---------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write `state` with torch.save atomically: a temp file in the same folder, fsync, os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint written by `train`, loaded on the CPU with weights_only=True; raises CheckpointError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types on a truncated or foreign file
        raise CheckpointError(
            f"checkpoint {str(path)!r} is unreadable ({type(e).__name__}); "
            "it is truncated or not a dse checkpoint: delete it to start over, or set train.checkpoint elsewhere"
        ) from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{str(path)!r} is not a {CHECKPOINT_FORMAT} checkpoint; delete it or set train.checkpoint elsewhere"
        )
    return state


def _run_identity(cfg: TrainConfig, splits: Splits) -> dict:
    """What a checkpoint must agree on to be resumed by this run."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in _RESUMABLE_CHANGES}
    return {"train": settings, "split": dict(splits.split), "num_classes": splits.num_classes}


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
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))  # skip the heading
        raise CheckpointError(
            f"checkpoint {path!r} was written for another model ({first}); "
            "delete it to start over, or set train.checkpoint elsewhere"
        ) from e
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["epoch"], [EpochRecord(**r) for r in state["records"]]


def _state(epoch: int, model: nn.Module, average, optimizer, records, identity: dict, layout: str) -> dict:
    # The learning rate and the EMA's decay are pure functions of the step: there is no scheduler state to keep.
    # "model" holds the weights that are evaluated (and deployed): the average's when there is one.
    trained = {"trained": model.state_dict()} if average is not None else {}
    return {
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "memory_format": layout,  # an `auto` choice is kept on resume: layouts round differently
        "model": (average if average is not None else model).state_dict(),
        **trained,
        "optimizer": optimizer.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        "records": [asdict(r) for r in records],
        "run": identity,
    }


# ---------------------------------------------------------------------------------------------- training


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


def mixed_precision(cfg: TrainConfig, device: torch.device) -> torch.autocast:
    """The autocast context the trainer runs forward passes in: bf16 when `cfg.amp` and the device has bf16 units."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=_uses_bf16(cfg, device))


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


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn, x: Tensor, y: Tensor, autocast=None):
    """One forward, backward and optimizer step; returns (logits, loss), both still on the device."""
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
    if len(x) == 0:
        return math.nan, math.nan
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for xb, yb in batches(x, y, batch_size, mean=mean, std=std, channels_last=channels_last):
        with autocast or torch.autocast("cpu", enabled=False):
            logits = model(xb).float()
            if tta:
                logits = (logits + model(xb.flip(3)).float()) / 2
        loss_sum += F.cross_entropy(logits, yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    return loss_sum.item() / len(x), correct.item() / len(x)


def _train_epoch(
    model, average, optimizer, loss_fn, splits: Splits, cfg: TrainConfig, epoch: int, autocast, channels_last, bar
):
    """One epoch: a learning rate per step, the weight average (if any) updated after each step."""
    model.train()
    loss_sum = torch.zeros((), device=splits.device)
    correct = torch.zeros((), dtype=torch.int64, device=splits.device)
    seen, lrs = 0, []
    steps = len(splits.train_x) // cfg.batch_size
    pad = crop_padding(cfg.crop, splits.train_x.shape[-2:])
    start = time.perf_counter()
    for i, (x, y) in enumerate(batches(
        splits.train_x, splits.train_y, cfg.batch_size, mean=splits.mean, std=splits.std, train=True,
        augment=cfg.augment, seed=cfg.seed, epoch=epoch, pad=pad, channels_last=channels_last,
    )):  # fmt: skip
        lrs.append(learning_rate(cfg, epoch + i / steps))
        for group in optimizer.param_groups:
            group["lr"] = lrs[-1]
        logits, loss = train_step(model, optimizer, loss_fn, x, y, autocast)
        if average is not None:
            update_ema(average, model, ema_decay(cfg, epoch * steps + i))
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        bar.update()
    loss = loss_sum.item() / seen  # the one host sync of the epoch
    return loss, correct.item() / seen, math.fsum(lrs) / len(lrs), time.perf_counter() - start, seen


def train(
    model: nn.Module,
    splits: Splits,
    cfg: TrainConfig,
    *,
    checkpoint_path: str | os.PathLike | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> TrainResult:
    """Train `model` (moved in place to the device) on `splits` as `cfg` says; return the records.
    With `cfg.ema` the model ends with the weight average, the weights that were evaluated and saved.

    Seeds torch's global RNG with `cfg.seed` (dropout). With a checkpoint path (argument, else
    `cfg.checkpoint`) that exists, continues from its last finished epoch; a checkpoint is written
    after every `cfg.checkpoint_every` epochs and after the last. `on_epoch(record)` runs after each
    epoch's checkpoint; it may raise to stop the run (the exception propagates).
    """
    path = str(checkpoint_path or cfg.checkpoint or "") or None
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if len(splits.train_x) < cfg.batch_size:
        raise ValueError(f"train batch_size={cfg.batch_size} is more than the {len(splits.train_x)} training images")
    torch.manual_seed(cfg.seed)
    model.to(device)
    splits = splits.to(device)
    autocast = mixed_precision(cfg, device)
    saved = load_checkpoint(path) if path and Path(path).exists() else None
    layout = _layout(cfg, model, splits, autocast, saved)
    model.to(memory_format=MEMORY_FORMATS[layout])
    optimizer = make_optimizer(model, cfg)
    average = copy.deepcopy(model) if cfg.ema else None  # the weight average: evaluated and saved when on
    identity = _run_identity(cfg, splits)
    done, records = _restore(saved, path, model, average, optimizer, identity) if saved else (0, [])
    net = torch.compile(model) if cfg.compile else model
    evaluated = net
    if average is not None:  # the weight average is evaluated instead
        evaluated = torch.compile(average) if cfg.compile else average
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    channels_last = layout == "channels_last"
    eval_kw = dict(mean=splits.mean, std=splits.std, batch_size=cfg.eval_batch_size, channels_last=channels_last,
                   autocast=autocast, tta=cfg.tta)  # fmt: skip
    steps = len(splits.train_x) // cfg.batch_size
    seconds = []
    with tqdm(total=steps * (cfg.epochs - done), disable=not cfg.progress, unit="batch", dynamic_ncols=True) as bar:
        for epoch in range(done, cfg.epochs):
            bar.set_description(f"epoch {epoch + 1}/{cfg.epochs}")
            train_loss, train_acc, lr, secs, seen = _train_epoch(
                net, average, optimizer, loss_fn, splits, cfg, epoch, autocast, channels_last, bar
            )
            if not math.isfinite(train_loss):
                raise TrainingDiverged(f"train loss is {train_loss} in epoch {epoch + 1} at lr={lr:g}; lower train.lr")
            start = time.perf_counter()
            val_loss, val_acc = evaluate(evaluated, splits.val_x, splits.val_y, **eval_kw)
            record = EpochRecord(
                epoch=epoch + 1, lr=lr, train_loss=train_loss, train_acc=train_acc, val_loss=val_loss,
                val_acc=val_acc, seconds=secs, images_per_s=seen / secs, eval_seconds=time.perf_counter() - start,
            )  # fmt: skip
            records.append(record)
            seconds.append(secs)
            if path and ((epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs):
                save_checkpoint(path, _state(epoch + 1, model, average, optimizer, records, identity, layout))
            bar.set_postfix(loss=f"{train_loss:.3f}", val_acc=f"{val_acc:.4f}", refresh=False)
            if on_epoch is not None:
                on_epoch(record)
    test_loss, test_acc = evaluate(evaluated, splits.test_x, splits.test_y, **eval_kw)
    if average is not None:
        model.load_state_dict(average.state_dict())  # the caller's model ends as evaluated and saved
    return TrainResult(
        epochs=records,
        test_loss=test_loss,
        test_acc=test_acc,
        seconds_per_epoch=sum(seconds) / len(seconds) if seconds else math.nan,
        device=str(device),
        precision="bf16 autocast" if _uses_bf16(cfg, device) else "fp32",
        memory_format=layout,
        split=dict(splits.split),
        resumed_from=done,
    )


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
