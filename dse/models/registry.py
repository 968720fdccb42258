"""The model registry: names to builders, the typed model config, and input checks shared by all families."""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace

import torch.nn as nn

__all__ = [
    "ModelConfig",
    "register_model",
    "build_registered",
    "build_model",
    "list_models",
    "model_family",
    "resolve_config",
    "check_blocks",
    "check_width",
    "check_choice",
]

ACTIVATIONS = ("elu", "relu")


@dataclass
class ModelConfig:
    """What builds a model: a registered name plus the knobs it takes (None = the builder's default).

    This is the schema of `conf/model/*.yaml`; `num_classes` and `in_channels` come from the data.
    """

    name: str = "shallow_squeezenext"
    blocks: list[int] | None = None
    width: float | None = None
    dropout: float | None = None
    activation: str | None = None
    inplace: bool | None = None

    def overrides(self) -> dict:
        """The knobs that are set, as keyword arguments for the builder."""
        return {k: v for k, v in asdict(self).items() if k != "name" and v is not None}


@dataclass(frozen=True)
class _Entry:
    builder: Callable[..., nn.Module]
    family: str
    knobs: dict = field(default_factory=dict)  # knob -> default


_REGISTRY: dict[str, _Entry] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *, family: str | None = None):
    """Register a builder under its function name. Its keyword-only arguments (besides `num_classes`
    and `in_channels`) are the knobs a config may set; their defaults are the model's defaults."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        params = inspect.signature(fn).parameters
        knobs = {n: p.default for n, p in params.items() if n not in ("num_classes", "in_channels")}
        _REGISTRY[fn.__name__] = _Entry(fn, family or fn.__name__, knobs)
        return fn

    return wrap(fn) if fn is not None else wrap


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown model {name!r}; registered models: {', '.join(list_models())} "
            "(or a paper name such as 'Shallow SqueezeNext-06-0.4x')"
        )
    return _REGISTRY[name]


def model_family(name: str) -> str:
    """The family a registered model belongs to (e.g. 'shallow_squeezenext')."""
    return _entry(name).family


def resolve_config(cfg: ModelConfig) -> ModelConfig:
    """The config with every knob its builder takes filled in with the builder's default."""
    entry = _entry(cfg.name)
    _check_knobs(cfg.name, entry, cfg.overrides())
    full = {**entry.knobs, **cfg.overrides()}
    if "blocks" in full:
        full["blocks"] = list(full["blocks"])
    return replace(cfg, **{f.name: full.get(f.name) for f in fields(cfg) if f.name != "name"})


def _check_knobs(name: str, entry: _Entry, overrides: dict) -> None:
    unknown = sorted(set(overrides) - set(entry.knobs))
    if unknown:
        allowed = ", ".join(entry.knobs) or "none"
        raise ValueError(f"model {name!r} does not take {', '.join(unknown)}; it takes: {allowed}")


def build_registered(name: str, *, num_classes: int = 10, in_channels: int = 3, **overrides) -> nn.Module:
    """Build a model from a registered name; `overrides` set the builder's knobs (blocks, width, dropout, activation,
    inplace). `dse.models.create_model` also takes the paper's names."""
    entry = _entry(name)
    _check_knobs(name, entry, overrides)
    check_classes(num_classes, in_channels)
    return entry.builder(num_classes=num_classes, in_channels=in_channels, **overrides)


def build_model(cfg: ModelConfig, *, num_classes: int, in_channels: int) -> nn.Module:
    """Build the model a config describes."""
    return build_registered(cfg.name, num_classes=num_classes, in_channels=in_channels, **cfg.overrides())


def check_classes(num_classes: int, in_channels: int) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"{num_classes=} must be an integer >= 2")
    if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
        raise ValueError(f"{in_channels=} must be an integer >= 1")


def check_blocks(blocks: Sequence[int]) -> tuple[int, int, int, int]:
    """Stage counts (the paper's resolution multiplier R) must be four positive integers."""
    ok = (
        isinstance(blocks, Sequence)
        and not isinstance(blocks, str)
        and len(blocks) == 4
        and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in blocks)
    )
    if not ok:
        raise ValueError(f"{blocks=} must be four positive integers (blocks per stage), e.g. [1, 1, 1, 1]")
    return tuple(blocks)


def check_width(width: float) -> float:
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise ValueError(f"{width=} must be > 0 (the width multiplier, e.g. 0.4 or 1.5)")
    return float(width)


def check_choice(value: str, allowed: Sequence[str], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"{what}={value!r} is not allowed; allowed: {', '.join(map(repr, allowed))}")
    return value
