"""The checkpoint format: one file per trial, written atomically by the trainer, read by the trainer and deploy."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "load_checkpoint", "load_model_state", "save_checkpoint"]

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
