"""The one trainer: train() and train_group(), one flat loop over epochs and batches for a fused group of trials,
their per-epoch records and outcomes, scoring with test-time flips, and the `python -m dse.train` command line."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from dse.autotune import MEMORY_FORMATS, choose_memory_format
from dse.checkpoint import CheckpointError, checkpoint_state, load_checkpoint, restore_checkpoint, save_checkpoint
from dse.config import DataConfig, TrainConfig, register_schemas, to_object
from dse.data import DataError, Splits, batches, crop_padding, load_data, member_batches
from dse.fused import check_group
from dse.identity import run_identity
from dse.measure import profile
from dse.models import ModelConfig, build_model, paper_name
from dse.optim import step_lrs
from dse.step import Learner, StepMode, resolve_device, step_mode

log = logging.getLogger(__name__)

__all__ = [
    "EpochRecord",
    "Failed",
    "Finished",
    "Member",
    "Outcome",
    "Stopped",
    "TrainResult",
    "TrainingDiverged",
    "TrainingStopped",
    "evaluate",
    "main",
    "resolve_device",
    "train",
    "train_group",
]


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


Outcome = Finished | Stopped | Failed


@dataclass
class _Trainee:
    """A member while it trains: its learner (model, optimizer and average on the device), progress and outcome."""

    member: Member
    path: str | None  # its checkpoint
    identity: dict  # what its checkpoint must agree on
    learner: Learner | None = None  # None when its checkpoint kept it from starting
    done: int = 0  # finished epochs
    records: list[EpochRecord] = field(default_factory=list)
    resumed_from: int = 0
    seconds: list[float] = field(default_factory=list)  # training-pass seconds of the epochs this call ran
    graphed: bool = False  # whether its last epoch replayed a CUDA graph
    outcome: Outcome | None = None


def train_group(
    members: Sequence[Member], splits: Splits, *, vmapped: bool | None = None, layout: str | None = None
) -> Iterator[tuple[int, Outcome]]:
    """Train several trials together on `splits`: one fused model (their weights stacked; vmapped or member by
    member as `vmapped` says, by default vmapped on CUDA and member by member elsewhere: `dse.fused.VMAP_DEVICES`),
    each member's own optimizer. They train in the layout of a member's checkpoint, else a pinned
    `train.memory_format`, else the one `auto` stands for: `layout` (a study's stored choice, `dse.layouts`), by
    default `dse.autotune.auto_layout` (a rule, never a timing: what a trial computes must not follow the clock).
    Yields (member index, outcome) as soon as a member ends, right after the epoch it
    leaves in, the others going on; each member exactly once.

    Each member computes what it would compute trained alone by `train` (its init, data order, augmentation,
    dropout masks, optimizer and schedule), up to floating-point order, and writes the same checkpoints. A
    member ends Finished, Stopped (its on_epoch asked) or Failed: its loss stopped being finite
    (TrainingDiverged), its checkpoint is unreadable (CheckpointError) or cannot be written (OSError), its
    on_epoch raised. Members may resume from different epochs and have different numbers of epochs. All must
    share `group_key`; that, the device and the batch size are checked when it is called. A member's model is
    given back (its own tensors and dropout modules; a Finished one holding its weight average) as it ends, and
    every model when the caller stops iterating.
    """
    check_group([m.model for m in members], [m.cfg for m in members])
    cfg = members[0].cfg
    device = resolve_device(cfg.device)
    if len(splits.train_x) < cfg.batch_size:
        raise ValueError(f"train batch_size={cfg.batch_size} is more than the {len(splits.train_x)} training images")
    if layout is not None and layout not in MEMORY_FORMATS:
        raise ValueError(f"train_group layout={layout!r} is unknown; allowed: {', '.join(MEMORY_FORMATS)}")
    return _train_group(members, splits, step_mode([m.cfg for m in members], device, vmapped=vmapped), layout)


def _train_group(
    members: Sequence[Member], splits: Splits, mode: StepMode, auto: str | None
) -> Iterator[tuple[int, Outcome]]:
    """train_group's loop: start the members, then epochs of the group still in (re-formed whenever one leaves),
    each a pass over the batches and a validation, each member's end yielded as it comes."""
    cfg = members[0].cfg
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    splits = splits.to(mode.device)
    saved = [_saved_state(m) for m in members]
    trainees: list[_Trainee] = []
    try:
        for member in members:
            member.model.to(mode.device)
        resumable = next((s for s in saved if isinstance(s, dict)), {})
        layout = choose_memory_format(cfg, mode.device, saved=resumable.get("memory_format"), auto=auto)
        decided = choose_memory_format(cfg, mode.device, auto=auto)
        if layout != decided:  # a checkpoint of an older dse's timing, or of another device kind's choice
            log.warning(
                "dse.train: resuming in its checkpoint's layout %s, not %s (what %s stands for here): the "
                "layout changes the numbers, so its curves follow %s",
                layout,
                decided,
                f"train.memory_format={cfg.memory_format}",
                layout,
            )
        for i, (member, state) in enumerate(zip(members, saved)):
            trainees.append(_start(member, state, splits, mode, layout))
            if trainees[i].outcome is not None:
                yield _leave(i, trainees[i])
        steps = len(splits.train_x) // cfg.batch_size
        channels_last = layout == "channels_last"
        scoring = dict(
            mean=splits.mean,
            std=splits.std,
            batch_size=cfg.eval_batch_size,
            channels_last=channels_last,
            autocast=mode.autocast,
            tta=cfg.tta,
        )
        context = dict(
            device=str(mode.device), precision=mode.precision, memory_format=layout, split=dict(splits.split)
        )
        epochs_left = max((t.member.cfg.epochs - t.done for t in trainees if t.outcome is None), default=0)
        with tqdm(total=steps * max(epochs_left, 0), disable=not cfg.progress, unit="batch", dynamic_ncols=True) as bar:
            group: list[int] = []
            while active := [i for i, t in enumerate(trainees) if t.outcome is None]:
                if active != group:  # the first group, or one left: the others train on as a new group
                    group, going = active, [trainees[i] for i in active]
                    step = mode.step([t.learner for t in going], steps)
                if any(t.done >= t.member.cfg.epochs for t in going):  # test the finished ones, together
                    tests = evaluate(step.evaluator(), splits.test_x, splits.test_y, members=len(going), **scoring)
                    for i, t, (test_loss, test_acc) in zip(group, going, tests):
                        if t.done >= t.member.cfg.epochs:
                            t.outcome = Finished(_result(t, test_loss, test_acc, context))
                            yield _leave(i, t)
                    continue
                bar.set_description(
                    f"epoch {min(t.done for t in going) + 1}/{max(t.member.cfg.epochs for t in going)}"
                    + (f" ({len(going)} trials)" if len(going) > 1 else "")
                )
                lrs = [step_lrs(t.member.cfg, t.done, steps) for t in going]
                step.begin_epoch([t.done for t in going], lrs)
                start = time.perf_counter()
                for x, y in member_batches(
                    splits.train_x,
                    splits.train_y,
                    cfg.batch_size,
                    mean=splits.mean,
                    std=splits.std,
                    augment=cfg.augment,
                    seeds=[t.member.cfg.seed for t in going],
                    epochs=[t.done for t in going],
                    pad=crop_padding(cfg.crop, splits.train_x.shape[-2:]),
                    channels_last=channels_last,
                ):
                    step(x, y)
                    bar.update()
                losses, hits = step.totals()
                seconds = time.perf_counter() - start
                start = time.perf_counter()
                val = evaluate(step.evaluator(), splits.val_x, splits.val_y, members=len(going), **scoring)
                eval_seconds = time.perf_counter() - start
                seen = steps * cfg.batch_size
                for i, t, loss, hit, lr, (val_loss, val_acc) in zip(group, going, losses, hits, lrs, val):
                    record = EpochRecord(
                        epoch=t.done + 1,
                        lr=math.fsum(lr) / steps,
                        train_loss=loss / seen,
                        train_acc=hit / seen,
                        val_loss=val_loss,
                        val_acc=val_acc,
                        seconds=seconds,
                        images_per_s=seen / seconds,
                        eval_seconds=eval_seconds,
                        trials=len(going),
                    )
                    if len(going) == 1 and math.isfinite(record.train_loss):
                        bar.set_postfix(loss=f"{record.train_loss:.3f}", val_acc=f"{val_acc:.4f}", refresh=False)
                    t.outcome = _end_epoch(t, record, layout, step.graphed)
                    if t.outcome is not None:
                        yield _leave(i, t)
    finally:
        for t in trainees:
            if t.learner is not None:
                t.learner.release(averaged=isinstance(t.outcome, Finished))


def _saved_state(member: Member) -> dict | CheckpointError | None:
    """The member's checkpoint when it has one, or the CheckpointError that keeps it from starting."""
    path = member.checkpoint_path or member.cfg.checkpoint
    try:
        return load_checkpoint(path) if path and Path(path).exists() else None
    except CheckpointError as e:
        return e


def _start(
    member: Member, saved: dict | CheckpointError | None, splits: Splits, mode: StepMode, layout: str
) -> _Trainee:
    """A member ready to train: its model in the run's layout, its learner, its checkpoint restored; or, where its
    checkpoint is unreadable or another run's, a member that Failed."""
    path = str(member.checkpoint_path or member.cfg.checkpoint or "") or None
    trainee = _Trainee(member, path, run_identity(member.cfg, splits.split, splits.num_classes))
    if isinstance(saved, CheckpointError):
        trainee.outcome = Failed(saved)
        return trainee
    learner = trainee.learner = mode.learner(member.model.to(memory_format=MEMORY_FORMATS[layout]), member.cfg)
    if saved is not None:
        try:
            done, records = restore_checkpoint(
                saved, path, learner.model, learner.average, learner.optimizer, trainee.identity
            )
        except CheckpointError as e:
            trainee.outcome = Failed(e)
            return trainee
        trainee.done = trainee.resumed_from = done
        trainee.records = [EpochRecord(**r) for r in records]
    return trainee


def _leave(index: int, trainee: _Trainee) -> tuple[int, Outcome]:
    """A member that ended: its model given back, and its outcome."""
    if trainee.learner is not None:
        trainee.learner.release(averaged=isinstance(trainee.outcome, Finished))
    return index, trainee.outcome


def _end_epoch(trainee: _Trainee, record: EpochRecord, layout: str, graphed: bool) -> Outcome | None:
    """Record the epoch, write the checkpoint when due, then call on_epoch. The member ends when its loss is not
    finite, when on_epoch asks it to stop (pruned, ...) or when either raises (its checkpoint cannot be written, it
    was taken over, ...); the others go on."""
    member, learner = trainee.member, trainee.learner
    if not math.isfinite(record.train_loss):
        return Failed(
            TrainingDiverged(
                f"train loss is {record.train_loss} in epoch {record.epoch} at lr={record.lr:g}; lower train.lr"
            )
        )
    trainee.done += 1
    trainee.records.append(record)
    trainee.seconds.append(record.seconds)
    trainee.graphed = graphed
    try:
        if trainee.path and (trainee.done % member.cfg.checkpoint_every == 0 or trainee.done == member.cfg.epochs):
            state = checkpoint_state(
                trainee.done,
                learner.model,
                learner.average,
                learner.optimizer,
                [asdict(r) for r in trainee.records],
                trainee.identity,
                layout,
            )
            (member.writer or save_checkpoint)(trainee.path, state)
        reason = member.on_epoch(record) if member.on_epoch is not None else None
    except Exception as e:
        return Failed(e)
    return Stopped(trainee.done, reason) if reason is not None else None


def _result(trainee: _Trainee, test_loss: float, test_acc: float, context: dict) -> TrainResult:
    seconds = trainee.seconds or [r.seconds for r in trainee.records]
    return TrainResult(
        epochs=trainee.records,
        test_loss=test_loss,
        test_acc=test_acc,
        seconds_per_epoch=sum(seconds) / len(seconds) if seconds else math.nan,
        resumed_from=trainee.resumed_from,
        cuda_graph=trainee.graphed,
        **context,
    )


@torch.no_grad()
def evaluate(
    logits: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    *,
    members: int = 1,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int = 512,
    channels_last: bool = False,
    autocast=None,
    tta: bool = False,
) -> list[tuple[float, float]]:
    """(mean cross-entropy, accuracy) per member on uint8 images x, NaN for no images; `logits` maps a batch of
    N normalized images to members×N×classes logits (models in eval mode). With `tta` a member's logits are the
    mean of its logits on each image and on its left-right mirror."""
    if len(x) == 0:
        return [(math.nan, math.nan)] * members
    loss_sum = torch.zeros(members, device=x.device)
    correct = torch.zeros(members, dtype=torch.int64, device=x.device)
    for xb, yb in batches(x, y, batch_size, mean=mean, std=std, channels_last=channels_last):
        with autocast or torch.autocast("cpu", enabled=False):
            out = logits(xb).float()
            if tta:
                out = (out + logits(xb.flip(3)).float()) / 2
        loss_sum += F.cross_entropy(out.transpose(1, 2), yb.expand(members, -1), reduction="none").sum(1)
        correct += (out.argmax(-1) == yb).sum(1)
    losses, hits = torch.stack([loss_sum.double(), correct.double()]).tolist()  # one host sync
    return [(loss / len(x), hit / len(x)) for loss, hit in zip(losses, hits)]


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


def _command(cfg) -> None:
    """One training as the composed config `cfg` says, then its summary; bad input exits with a one-line message."""
    from hydra.core.hydra_config import HydraConfig  # Hydra only for the command line: the trainer runs without it

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

    register_schemas()
    conf = Path(__file__).resolve().parents[1] / "conf"
    hydra.main(version_base="1.3", config_path=str(conf), config_name="run")(_command)()


if __name__ == "__main__":
    # Run the imported module's main, so the schemas Hydra checks are dse.train's classes, not __main__'s copies.
    from dse.train import main as _main

    _main()
