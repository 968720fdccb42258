"""The checkpoint format: one file per trial, built and restored here, written atomically, read by the trainer and
deploy."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "checkpoint_state",
    "load_checkpoint",
    "load_model_state",
    "load_optimizer_state",
    "optimizer_state",
    "restore_checkpoint",
    "save_checkpoint",
]

# A dict with: format, epoch (finished epochs), memory_format, model (state_dict), optimizer (state_dict, lr as
# floats), records (EpochRecord dicts) and run (what a resumed run must agree on). Version 2: dropout masks come
# from (seed, epoch), no torch RNG state is kept.
CHECKPOINT_FORMAT = "dse.train/2"
# Formats whose `model` entry is a state_dict of the trial's model (all so far): deploy reads them all.
_MODEL_FORMATS = ("dse.train/1", CHECKPOINT_FORMAT)


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable or belongs to another run; the message says which file and what to do."""


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


def _read(path: str | os.PathLike) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types on a truncated or foreign file
        raise CheckpointError(
            f"checkpoint {str(path)!r} is unreadable ({type(e).__name__}); "
            "it is truncated or not a dse checkpoint: delete it to start over, or set train.checkpoint elsewhere"
        ) from e
    return state if isinstance(state, dict) else {}


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint the trainer can resume from, loaded on the CPU with weights_only=True; raises CheckpointError."""
    state = _read(path)
    found = state.get("format")
    if isinstance(found, str) and found.startswith("dse.train/") and found != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has the older format {found!r}; this trainer writes {CHECKPOINT_FORMAT!r} "
            "(dropout now draws from the trial's seed): delete it to train that trial again from the start"
        )
    if found != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{str(path)!r} is not a {CHECKPOINT_FORMAT} checkpoint; delete it or set train.checkpoint elsewhere"
        )
    return state


def load_model_state(path: str | os.PathLike) -> dict:
    """The model state_dict of a checkpoint of any trainer version (what deploy needs); raises CheckpointError."""
    state = _read(path)
    if state.get("format") not in _MODEL_FORMATS:
        raise CheckpointError(f"{str(path)!r} is not a dse checkpoint (formats {', '.join(_MODEL_FORMATS)})")
    return state["model"]


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state_dict with plain-number learning rates (a graphed run keeps them in device tensors)."""
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        if isinstance(group["lr"], Tensor):
            group["lr"] = group["lr"].item()
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a saved optimizer state into one built for this run, keeping this run's lr object and its
    capturable/fused/foreach mode (a checkpoint written eagerly may resume in a CUDA graph, and back)."""
    runtime = ("lr", "capturable", "fused", "foreach")
    groups = [
        {**saved, **{k: ours[k] for k in runtime if k in ours}}
        for saved, ours in zip(state["param_groups"], optimizer.param_groups)
    ]
    optimizer.load_state_dict({**state, "param_groups": groups})


def checkpoint_state(
    epoch: int,
    model: nn.Module,
    average: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    records: list[dict],
    run: dict,
    memory_format: str,
) -> dict:
    """What a checkpoint holds after `epoch` finished epochs: "model" is the weights that are evaluated (and
    deployed), the average's when there is one, with the trained ones under "trained"; `records` are the epochs'
    records as dicts, `run` what a resumed run must agree on (`dse.identity.run_identity`). The learning rate,
    the average's decay and the dropout masks are pure functions of (seed, step): no scheduler or RNG state."""

    def weights(m: nn.Module) -> dict:
        return {k: v.clone() for k, v in m.state_dict().items()}  # a fused member's tensors are views of the stacks

    trained = {"trained": weights(model)} if average is not None else {}
    return {
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "memory_format": memory_format,  # an `auto` choice is kept on resume: layouts round differently
        "model": weights(average if average is not None else model),
        **trained,
        "optimizer": optimizer_state(optimizer),
        "records": records,
        "run": run,
    }


def restore_checkpoint(
    state: dict, path: str, model: nn.Module, average: nn.Module | None, optimizer: torch.optim.Optimizer, run: dict
) -> tuple[int, list[dict]]:
    """Load a checkpoint (`load_checkpoint`) into the run's model, average and optimizer; return its finished
    epochs and their records. Raises CheckpointError when it belongs to another run (naming what differs) or
    was written for another model."""
    if state["run"] != run:
        ours, theirs = run, state["run"]
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
        load_optimizer_state(optimizer, state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))  # skip the heading
        raise CheckpointError(
            f"checkpoint {path!r} was written for another model ({first}); "
            "delete it to start over, or set train.checkpoint elsewhere"
        ) from e
    return state["epoch"], state["records"]
