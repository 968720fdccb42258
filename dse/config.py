"""Typed schemas of the Hydra configs in `conf/` and their registration with Hydra's ConfigStore."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dse.pruning import PruningConfig

__all__ = ["PruningConfig", "SpaceConfig", "StudyConfig", "SweepConfig", "SAMPLERS", "PRUNERS", "register_schemas", "to_object"]

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
        if not self.seeds:
            raise ValueError(f"space {self.name!r}: seeds={self.seeds} must list at least one seed")


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
    max_retry: int = 3
    sampler_seed: int = 0

    def __post_init__(self) -> None:
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


@dataclass
class SweepConfig:
    """How a machine runs the sweep (`sweep:` in `conf/sweep.yaml`)."""

    workers: int = 0  # worker processes on this machine; 0 = one per CPU core (one per GPU on CUDA)
    threads: int = 0  # torch threads per worker; 0 = cores / workers
    seeds: int | None = None  # use only the first N seeds of the space (budget presets set this)
    budget: str = "paper"  # the budget preset's name (part of the default study name)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.workers < 0 or self.threads < 0:
            raise ValueError(f"sweep workers={self.workers} and threads={self.threads} must be >= 0 (0 = auto)")
        if self.seeds is not None and self.seeds < 1:
            raise ValueError(f"sweep seeds={self.seeds} must be >= 1 or null (all the space's seeds)")


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
