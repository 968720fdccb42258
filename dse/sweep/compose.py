"""A trial's config: the Hydra override grammar (merging, quoting, a trial's params as overrides), composing
`conf/sweep.yaml` and its typed, checked dataclasses."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dse import identity
from dse.config import DataConfig, SpaceConfig, TrainConfig, finite, register_schemas, to_object
from dse.models import ModelConfig, build_model, config_from_name, resolve_config

__all__ = [
    "CONF_DIR", "REPO", "TrialSetup", "override_key", "quote", "hydra_value", "param_value", "merge_overrides",
    "model_overrides", "point_label", "point_parts", "trial_overrides", "compose", "typed", "trial_identity",
    "data_key",
]  # fmt: skip

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
REPO = CONF_DIR.parent


def override_key(override: str) -> str:
    """The key an override sets: 'model.width' of '+model.width=0.2'."""
    return override.lstrip("+~").split("=", 1)[0]


def quote(text: str) -> str:
    """A string as a quoted Hydra override value (URLs with `?a=b`, names in any script)."""
    from hydra.core.override_parser.types import Quote, QuotedString

    return QuotedString(text=text, quote=Quote.single).with_quotes()


def hydra_value(value: Any) -> str:
    """A Python value as Hydra reads it back from an override."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, str) and not re.fullmatch(r"[A-Za-z0-9_.\-]+", value):  # what Hydra reads unquoted
        return quote(value)
    return str(value)


def param_value(value: Any) -> Any:
    """Optuna categorical choices must be scalars: lists become '1,2,8,1'."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value


def merge_overrides(*groups: list[str]) -> list[str]:
    """Concatenate override lists; a later override of the same key replaces an earlier one."""
    merged: dict[str, str] = {}
    for group in groups:
        for override in group:
            merged.pop(override_key(override), None)
            merged[override_key(override)] = override
    return list(merged.values())


def model_overrides(cfg: ModelConfig) -> list[str]:
    """Hydra overrides that select a model config: its conf/model group and the knobs the name fixes."""
    out = [f"model={cfg.name}"]
    if cfg.blocks is not None:
        out.append(f"model.blocks={hydra_value(list(cfg.blocks))}")
    if cfg.width is not None:
        out.append(f"model.width={cfg.width}")
    return out


def point_label(point: Any) -> str:
    """How a space point is named in a trial's params: its model name, with its extra overrides."""
    name, extra = point_parts(point)
    return name if not extra else f"{name} [{' '.join(extra)}]"


def point_parts(point: Any) -> tuple[str, list[str]]:
    """(model name, extra overrides) of a space point."""
    if isinstance(point, str):
        return point, []
    if isinstance(point, dict) and isinstance(point.get("model"), str) and set(point) <= {"model", "overrides"}:
        return point["model"], list(point.get("overrides", []))
    raise ValueError(f"space point {point!r} must be a model name or {{model: NAME, overrides: [...]}}")


def trial_overrides(params: dict, space: SpaceConfig) -> tuple[list[str], list[str]]:
    """(static, varying) Hydra overrides for a trial's params: static ones (a point's extra overrides)
    yield to the command line; varying ones (the swept knobs, the seed) always win."""
    static, varying = [], []
    for key, value in params.items():
        if key == "seed":
            varying.append(f"train.seed={value}")
        elif key == "point":
            point = {point_label(p): p for p in space.points}[value]
            name, extra = point_parts(point)
            varying += model_overrides(config_from_name(name))
            static += extra
        else:
            choices = space.grid.get(key) or space.search.get(key, {}).get("choices")
            if choices:
                value = next(c for c in choices if param_value(c) == value)
            varying.append(f"{key}={hydra_value(value)}")
    return static, varying


def compose(overrides: list[str]) -> DictConfig:
    """The `conf/sweep.yaml` config with these overrides (works inside and outside @hydra.main)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return hydra_compose("sweep", overrides=overrides)
    register_schemas()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra_compose("sweep", overrides=overrides)


@dataclass
class TrialSetup:
    """A trial's composed config as typed dataclasses."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    resolved: dict
    full: ModelConfig  # the model config with every knob filled in (what it builds)


def typed(cfg: DictConfig) -> TrialSetup:
    """The composed config as typed dataclasses; bad values raise ValueError naming them."""
    model = to_object(ModelConfig, cfg.model)
    data = to_object(DataConfig, cfg.data)
    train_cfg = to_object(TrainConfig, cfg.train)
    for group, node in (("model", model), ("data", data), ("train", train_cfg)):
        bad = {k: v for k, v in asdict(node).items() if not finite(v)}
        if bad:
            raise ValueError(f"{', '.join(f'{group}.{k}={v!r}' for k, v in bad.items())} must be finite")
    full = resolve_config(model)
    try:
        with torch.device("meta"):  # builds every layer (checks every knob) without allocating weights
            build_model(model, num_classes=10, in_channels=1 if data.name == "fashion_mnist" else 3)
    except (RuntimeError, OverflowError, MemoryError) as e:  # e.g. a width so large that sizes overflow
        raise ValueError(f"model {model.name} with {model.overrides()} cannot be built: {str(e).splitlines()[0]}") from None
    return TrialSetup(model, data, train_cfg, OmegaConf.to_container(cfg, resolve=True), full)


def trial_identity(setup: TrialSetup, *, seed: bool = True) -> dict:
    """What a trial computes (`dse.identity.trial_identity`)."""
    return identity.trial_identity(setup.model, setup.data, setup.train, seed=seed)


def data_key(data: DataConfig) -> str:
    """A dataset config as a key: trials with one key share their loaded data."""
    return json.dumps(asdict(data), sort_keys=True)
