"""What a run, a trial and an architecture are: keys derived from the schemas' "changes no result" marks."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, fields
from typing import Any

from dse.config import DataConfig, TrainConfig, changes_result
from dse.models import ModelConfig, resolve_config

__all__ = ["architecture", "computed", "run_identity", "trial_identity", "trial_key"]


def computed(node: Any) -> dict:
    """A schema instance's settings that change what a run computes (those not marked `dse.config.RUNTIME`)."""
    return {f.name: getattr(node, f.name) for f in fields(node) if changes_result(f)}


def _canonical(value: Any) -> Any:
    return json.loads(json.dumps(value))  # JSON types only (tuples -> lists), as a study or checkpoint stores it


def run_identity(cfg: TrainConfig, split: dict, num_classes: int) -> dict:
    """What a checkpoint must agree on to be resumed by a run: its training settings (seed included), the
    data split and the classes."""
    return {"train": _canonical(computed(cfg)), "split": dict(split), "num_classes": num_classes}


def trial_identity(model: ModelConfig, data: DataConfig, train: TrainConfig, *, seed: bool = True) -> dict:
    """What a trial computes: its resolved model, data and training settings; the training seed unless
    `seed=False` (a study's definition holds what every seed of a cell shares)."""
    settings = computed(train)
    if not seed:
        settings.pop("seed")
    return _canonical({"model": asdict(resolve_config(model)), "data": computed(data), "train": settings})


def trial_key(identity: dict) -> str:
    """A short stable key of a trial identity: the name of its run folder."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def architecture(model: ModelConfig, input_shape: Sequence[int], num_classes: int) -> tuple[str, dict]:
    """(key, spec) of a model's inference graph: its resolved config without dropout (an identity at inference),
    the input shape and the classes. The training recipe, seed and data do not enter it."""
    full = asdict(resolve_config(model))
    full.pop("dropout")
    spec = {"model": full, "input_shape": list(input_shape), "num_classes": int(num_classes)}
    return json.dumps(spec, sort_keys=True, separators=(",", ":")), spec
