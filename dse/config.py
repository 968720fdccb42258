"""Typed schemas of the Hydra configs in `conf/` and their registration with Hydra's ConfigStore."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dse.pruning import PruningConfig

__all__ = ["finite", "PruningConfig", "SpaceConfig", "StudyConfig", "SweepConfig", "SAMPLERS", "PRUNERS", "register_schemas", "to_object"]

SAMPLERS = ("grid", "tpe", "nsga2")
PRUNERS = ("none", "pareto", "median", "hyperband", "successive_halving")
OPTUNA_PRUNERS = PRUNERS[2:]  # Optuna's own: single-objective studies only
METRICS = ("val_acc", "size_mb", "latency_ms")


@dataclass
class SpaceConfig:
    """A search space (`conf/space/*.yaml`): what varies, how it is sampled, and its default budget.

    `grid` is a cartesian product of Hydra overrides (`model.width: [0.2, 0.4]`, `train: [sgd, adam]`);
    `points` are explicit models (paper or registry names, or `{model: NAME, overrides: [...]}`);
    `search` holds distributions for TPE/NSGA-II (`{low, high, log}` or `{choices: [...]}`).
    Every grid point and point runs once per seed in `seeds` (the paper averages 3 runs).
    """

    name: str = "custom"
    tables: list[str] = field(default_factory=list)  # the paper's tables this space reproduces
    sampler: str = "grid"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    grid: dict[str, list[Any]] = field(default_factory=dict)
    points: list[Any] = field(default_factory=list)
    search: dict[str, Any] = field(default_factory=dict)
    n_trials: int = 0  # tpe/nsga2: trials in the study when done
    overrides: list[str] = field(default_factory=list)  # for every trial, e.g. ["data=cifar100"]

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"space sampler={self.sampler!r} is unknown; allowed: {', '.join(SAMPLERS)}")
        if self.sampler == "grid" and not (self.grid or self.points):
            raise ValueError(f"space {self.name!r}: a grid space needs `grid` or `points`")
        if self.sampler != "grid" and (not self.search or self.n_trials < 1):
            raise ValueError(f"space {self.name!r}: sampler={self.sampler!r} needs `search` and n_trials >= 1")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"space {self.name!r}: seeds={self.seeds} must list at least one seed, each once")
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values or not all(map(finite, values)):
                raise ValueError(f"space {self.name!r}: grid {key}={values!r} must be a non-empty list of finite values")
        for key, dist in self.search.items():
            _check_distribution(self.name, key, dist)


def finite(value: Any) -> bool:
    """No inf or nan anywhere in a value (a number, or lists and dicts of them)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(map(finite, value.values()))
    if isinstance(value, (list, tuple)):
        return all(map(finite, value))
    return True


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_distribution(space: str, key: str, dist: Any) -> None:
    """A TPE/NSGA-II distribution: {choices: [...]} or {low, high, log}, with finite numbers."""
    where = f"space {space!r}: search {key}={dist!r}"
    if isinstance(dist, dict) and set(dist) == {"choices"}:
        if not isinstance(dist["choices"], list) or not dist["choices"] or not all(map(finite, dist["choices"])):
            raise ValueError(f"{where}: choices must be a non-empty list of finite values")
        return
    if not isinstance(dist, dict) or not {"low", "high"} <= set(dist) <= {"low", "high", "log"}:
        raise ValueError(f"{where} needs choices: [...] or low, high and optionally log")
    low, high, log = dist["low"], dist["high"], dist.get("log", False)
    if not (_number(low) and _number(high)) or not low < high:
        raise ValueError(f"{where}: low={low!r} and high={high!r} must be finite numbers with low < high")
    if not isinstance(log, bool):
        raise ValueError(f"{where}: log={log!r} must be true or false")
    if log and low <= 0:
        raise ValueError(f"{where}: log=true needs low={low!r} > 0")


@dataclass
class StudyConfig:
    """Where trials land (`conf/study/*.yaml`). `storage=None` is SQLite at `studies/<name>.db`."""

    name: str = "study"
    storage: str | None = None  # any SQLAlchemy URL, e.g. postgresql://user@host/db
    workdir: str | None = None  # checkpoints and artifacts; default studies/<name>/ (share it across machines)
    max_size_kb: float | None = None  # over-budget models are pruned before any training
    max_latency_ms: float | None = None
    objectives: list[str] = field(default_factory=lambda: list(METRICS))  # optimised, in this order
    pruner: str = "none"
    pruning: PruningConfig = field(default_factory=PruningConfig)
    heartbeat_interval: int = 60  # seconds; a trial silent for grace_period is failed and retried
    grace_period: int = 180
    max_retry: int = 3  # retries of a trial that failed (an error, or its worker died) within one run
    storage_retry_seconds: float = 300  # a database server's calls are retried this long while it is unreachable
    sampler_seed: int = 0

    def __post_init__(self) -> None:
        from dse.study import check_study_name  # here: dse.study imports optuna, which `dse.train` does without

        check_study_name(self.name)
        if self.pruner not in PRUNERS:
            raise ValueError(f"study pruner={self.pruner!r} is unknown; allowed: {', '.join(PRUNERS)}")
        bad = [m for m in self.objectives if m not in METRICS]
        if bad or not self.objectives or len(set(self.objectives)) != len(self.objectives):
            raise ValueError(f"study objectives={self.objectives} must be distinct names from {', '.join(METRICS)}")
        if self.pruner in OPTUNA_PRUNERS and len(self.objectives) > 1:
            raise ValueError(
                f"study pruner={self.pruner!r} works on single-objective studies only (e.g. study.objectives=[val_acc]); "
                "multi-objective studies take pruner=pareto or none"
            )
        if self.pruner == "pareto" and "val_acc" not in self.objectives:
            raise ValueError("study pruner='pareto' needs val_acc among the objectives")
        for key in ("max_size_kb", "max_latency_ms"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ValueError(f"study {key}={value!r} must be > 0 or null")
        if self.heartbeat_interval < 1 or self.grace_period <= self.heartbeat_interval:
            raise ValueError(
                f"study heartbeat_interval={self.heartbeat_interval} must be >= 1 and "
                f"grace_period={self.grace_period} larger than it"
            )
        if self.max_retry < 0 or not self.storage_retry_seconds >= 0:
            raise ValueError(
                f"study max_retry={self.max_retry} and storage_retry_seconds={self.storage_retry_seconds} must be >= 0"
            )


@dataclass
class SweepConfig:
    """How a machine runs the sweep (`sweep:` in `conf/sweep.yaml`)."""

    workers: int = 0  # worker processes on this machine; 0 = one per CPU core (one per GPU on CUDA)
    threads: int = 0  # torch threads per worker; 0 = cores / workers
    seeds: int | None = None  # use only the first N seeds of the space (budget presets set this)
    budget: str = "paper"  # the budget preset's name (part of the default study name)
    progress: bool = True
    trials_per_gpu: str = "auto"  # trials a worker trains together (fused); auto: timed on its device

    def __post_init__(self) -> None:
        if self.workers < 0 or self.threads < 0:
            raise ValueError(f"sweep workers={self.workers} and threads={self.threads} must be >= 0 (0 = auto)")
        if self.seeds is not None and self.seeds < 1:
            raise ValueError(f"sweep seeds={self.seeds} must be >= 1 or null (all the space's seeds)")
        value = self.trials_per_gpu
        if value != "auto" and not (re.fullmatch("[0-9]+", value) and int(value) >= 1):
            raise ValueError(f"sweep trials_per_gpu={value!r} is not allowed; allowed: auto or a whole number >= 1")

    @property
    def group_size(self) -> int | None:
        """`trials_per_gpu` as a number; None for auto."""
        return None if self.trials_per_gpu == "auto" else int(self.trials_per_gpu)


def to_object(schema: type, node: DictConfig | dict | None) -> Any:
    """A config node as its schema's dataclass: unknown keys and wrong types raise ValueError naming them."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        if isinstance(node, DictConfig):  # resolve interpolations against the whole config first
            node = OmegaConf.to_container(node, resolve=True)
        merged = OmegaConf.merge(OmegaConf.structured(schema), node or {})
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ValueError(f"{schema.__name__}: {e}".splitlines()[0]) from None


def register_schemas() -> None:
    """Register every group's schema, so `defaults: [schema]` in a group file type-checks it."""
    from hydra.core.config_store import ConfigStore

    from dse.data import DataConfig
    from dse.models import ModelConfig
    from dse.train import TrainConfig

    store = ConfigStore.instance()
    for group, schema in (
        ("model", ModelConfig),
        ("data", DataConfig),
        ("train", TrainConfig),
        ("space", SpaceConfig),
        ("study", StudyConfig),
    ):
        store.store(group=group, name="schema", node=schema)
