"""Typed schemas of the Hydra configs in `conf/`, the "changes no result" mark, and their registration with Hydra."""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dse.metrics import ARCHITECTURE, METRICS, PAPER, check_metric, metric
from dse.models import ModelConfig
from dse.optim import SCHEDULES, optimizer_kwargs
from dse.pruning import PruningConfig

__all__ = [
    "DATASET_NAMES",
    "LAYOUTS",
    "DataConfig",
    "OBJECTIVES",
    "PRUNERS",
    "RUNTIME",
    "SAMPLERS",
    "PruningConfig",
    "SpaceConfig",
    "StudyConfig",
    "SweepConfig",
    "TargetConfig",
    "TrainConfig",
    "changes_result",
    "check_study_name",
    "finite",
    "load_target",
    "register_schemas",
    "to_object",
]

SAMPLERS = ("grid", "tpe", "nsga2")
PRUNERS = ("none", "pareto", "median", "hyperband", "successive_halving")
OPTUNA_PRUNERS = PRUNERS[2:]  # Optuna's own: single-objective studies only
# The paper's objectives, in order: metric name -> direction (every metric: dse.metrics). Accuracies are fractions.
OBJECTIVES = {m: METRICS[m].direction for m in PAPER}
DATASET_NAMES = ("cifar10", "cifar100", "fashion_mnist")  # dse.data reads each
LAYOUTS = ("channels_last", "contiguous")  # memory formats the trainer can train in
# Field metadata of a setting that changes where or how fast a run computes, never what it computes: left out of
# a study's definition, a trial's run folder key and what a checkpoint must agree on (dse.identity).
RUNTIME = {"changes_result": False}
_NAME = re.compile(r"\w[\w.-]*")  # \w: letters and digits of any script, and _


def changes_result(field_: Any) -> bool:
    """Whether a schema field (a `dataclasses.Field`) changes what a run computes (it is not marked `RUNTIME`)."""
    return field_.metadata.get("changes_result", True)


def check_study_name(name: str) -> str:
    """A study name is a file name: letters, digits, `_`, `-` and `.` (not `..`), starting with a letter,
    digit or `_`; it never leaves the folders it names (`studies/<name>.db`, `reports/<name>/`)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"study name={name!r} must be letters, digits, '_', '-' and '.' (not '..'), starting with a letter, "
            "digit or '_', e.g. width-cifar10-quick"
        )
    return name


@dataclass
class DataConfig:
    """Which dataset, where it lives, and how it is split. The schema of `conf/data/*.yaml`."""

    name: str = "cifar10"
    root: str = field(default="data", metadata=RUNTIME)
    val_size: int = 5000  # images held out of the official training set, drawn with `seed`
    subset: int | None = None  # keep only this many training images (quick runs)
    seed: int = 0  # fixes the split (not the training order: that is the trainer's seed)
    download: bool = field(default=False, metadata=RUNTIME)  # let torchvision download a missing dataset into `root`

    def __post_init__(self) -> None:
        if self.name not in DATASET_NAMES:
            raise ValueError(f"data name={self.name!r} is unknown; allowed: {', '.join(DATASET_NAMES)}")
        if self.val_size < 0:
            raise ValueError(f"data val_size={self.val_size} must be >= 0")
        if self.subset is not None and self.subset <= 0:
            raise ValueError(f"data subset={self.subset} must be > 0 or null (all)")


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
    seed: int = 0  # batch order, augmentation and dropout masks (seed the model's init yourself)
    threads: int = field(default=0, metadata=RUNTIME)  # torch intra-op threads; 0 keeps torch's default
    device: str = field(default="auto", metadata=RUNTIME)  # auto (cuda when available) | cpu | cuda | cuda:N
    memory_format: str = "auto"  # channels_last | contiguous (NCHW) | auto: the study's stored choice, else channels_last on CUDA, NCHW on CPUs (dse.layouts)
    amp: bool = True  # bf16 autocast where the hardware has bf16 units: CUDA, CPUs with AMX or AVX512-BF16
    # torch.compile the forward pass (steps then run eagerly, not in a CUDA graph)
    compile: bool = field(default=False, metadata=RUNTIME)
    # on CUDA: capture forward, backward and optimizer step once, replay it every batch
    cuda_graph: bool = field(default=True, metadata=RUNTIME)
    # resumed from when it exists, written after every `checkpoint_every` epochs
    checkpoint: str | None = field(default=None, metadata=RUNTIME)
    checkpoint_every: int = field(default=1, metadata=RUNTIME)
    eval_batch_size: int = field(default=512, metadata=RUNTIME)
    progress: bool = field(default=True, metadata=RUNTIME)

    def __post_init__(self) -> None:
        optimizer_kwargs(self)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"train schedule={self.schedule!r} is unknown; allowed: {', '.join(SCHEDULES)}")
        if self.memory_format not in ("auto", *LAYOUTS):
            allowed = ", ".join(("auto", *LAYOUTS))
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
        self.check_grid(self.name, self.grid)
        self.check_search(self.name, self.search)

    @staticmethod
    def check_grid(name: str, grid: Any) -> None:
        """A grid maps each key to a non-empty list of finite values; raises ValueError naming the bad entry."""
        if not isinstance(grid, dict):
            raise ValueError(f"space {name!r}: grid={grid!r} must map keys to lists, e.g. {{model.width: [0.2, 0.4]}}")
        for key, values in grid.items():
            if not isinstance(values, list) or not values or not all(map(finite, values)):
                raise ValueError(f"space {name!r}: grid {key}={values!r} must be a non-empty list of finite values")

    @staticmethod
    def check_search(name: str, search: Any) -> None:
        """A TPE/NSGA-II search maps each key to a distribution; raises ValueError naming the bad entry."""
        if not isinstance(search, dict):
            example = "{model.width: {low: 0.2, high: 2}}"
            raise ValueError(f"space {name!r}: search={search!r} must map keys to distributions, e.g. {example}")
        for key, dist in search.items():
            _check_distribution(name, key, dist)


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
class TargetConfig:
    """What ships, as three metric names (`conf/target/*.yaml`): the accuracy, size and latency that the default
    objectives, the pareto pruner's size and latency, and the report's and deploy's fronts read."""

    name: str = "paper"
    accuracy: str = "val_acc"
    size: str = "size_mb"
    latency: str = "latency_ms"

    def __post_init__(self) -> None:
        for role in ("accuracy", "size", "latency"):
            check_metric(getattr(self, role), f"target {self.name!r} {role}")

    @property
    def objectives(self) -> list[str]:
        return [self.accuracy, self.size, self.latency]


@dataclass
class StudyConfig:
    """Where trials land (`conf/study/*.yaml`). `storage=None` is SQLite at `studies/<name>.db`."""

    name: str = "study"
    storage: str | None = None  # any SQLAlchemy URL, e.g. postgresql://user@host/db
    workdir: str | None = None  # checkpoints and artifacts; default studies/<name>/ (share it across machines)
    max_size_kb: float | None = None  # over-budget models are pruned before any training (budgets: size_kb)
    max_latency_ms: float | None = None  # the paper's shorthand of budgets: {latency_ms: ...}
    budgets: Any = None  # a dict (Any: a command line sets it whole): metric name -> upper limit, e.g. {int8_kb: 100}
    target: TargetConfig = field(default_factory=TargetConfig)
    objectives: list[str] = field(default_factory=lambda: list(OBJECTIVES))  # any 1-3 metric names, in this order
    # export every trial to ONNX (fp32, int8), evaluate both in ONNX Runtime, time each architecture there
    deployed: bool = field(default=True, metadata=RUNTIME)
    pruner: str = "none"
    pruning: PruningConfig = field(default_factory=PruningConfig)
    heartbeat_interval: int = 60  # seconds; a trial silent for grace_period is failed and retried
    grace_period: int = 180
    max_retry: int = 3  # retries of a trial that failed (an error, or its worker died) within one run
    storage_retry_seconds: float = 300  # a database server's calls are retried this long while it is unreachable
    sampler_seed: int = 0

    def __post_init__(self) -> None:
        check_study_name(self.name)
        if self.pruner not in PRUNERS:
            raise ValueError(f"study pruner={self.pruner!r} is unknown; allowed: {', '.join(PRUNERS)}")
        for m in self.objectives:
            check_metric(m, "study objectives")
        if not 1 <= len(self.objectives) <= 3 or len(set(self.objectives)) != len(self.objectives):
            raise ValueError(f"study objectives={self.objectives} must be 1 to 3 distinct metric names")
        costs = [n for n, m in METRICS.items() if m.direction == "minimize"]
        if not isinstance(self.budgets, (dict, type(None))):
            raise ValueError(
                f"study budgets={self.budgets!r} must be a mapping of metric name to limit, e.g. {{int8_kb: 100}}"
            )
        self.budgets = dict(self.budgets or {})
        for m, limit in self.budgets.items():
            check_metric(m, "study budgets (upper limits)", costs)
            if not (isinstance(limit, (int, float)) and math.isfinite(limit) and limit > 0):
                raise ValueError(f"study budgets {m}={limit!r} must be a number > 0")
        accuracies = [n for n, m in METRICS.items() if m.direction == "maximize"]
        if self.pruner == "pareto" and not set(accuracies) & set(self.objectives):
            raise ValueError(f"study pruner='pareto' needs an accuracy among the objectives ({', '.join(accuracies)})")
        if not self.deployed:
            needs = [m for m in (*self.objectives, *self.budgets) if metric(m).deployed]
            if needs:
                raise ValueError(f"study deployed=false records no {', '.join(needs)}; drop them or set deployed=true")
        if self.pruner in OPTUNA_PRUNERS and len(self.objectives) > 1:
            raise ValueError(
                f"study pruner={self.pruner!r} works on single-objective studies only (e.g. study.objectives=[val_acc]); "
                "multi-objective studies take pruner=pareto or none"
            )
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

    def limits(self) -> dict[str, float]:
        """Every budget by metric name: `budgets` with the shorthands `max_size_kb` (size_kb) and `max_latency_ms`."""
        out = dict(self.budgets)
        for key, name in (("max_size_kb", "size_kb"), ("max_latency_ms", "latency_ms")):
            if getattr(self, key) is not None:
                out[name] = min(getattr(self, key), out.get(name, math.inf))
        return out

    def before_training(self) -> dict[str, float]:
        """The budgets the architecture alone decides: checked before any training."""
        return {m: v for m, v in self.limits().items() if metric(m).known == ARCHITECTURE}


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


TARGETS_DIR = Path(__file__).resolve().parents[1] / "conf" / "target"


def load_target(name: str) -> TargetConfig:
    """A target of `conf/target/` by name (the report's and deploy's `--target`); an unknown one lists them."""
    names = sorted(p.stem for p in TARGETS_DIR.glob("*.yaml"))
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        raise ValueError(
            f"target {name!r} is unknown; allowed: {', '.join(names)}"
            + (f"; did you mean {close[0]}?" if close else "")
        )
    return to_object(TargetConfig, OmegaConf.load(TARGETS_DIR / f"{name}.yaml"))


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

    store = ConfigStore.instance()
    for group, schema in (
        ("model", ModelConfig),
        ("data", DataConfig),
        ("train", TrainConfig),
        ("space", SpaceConfig),
        ("study", StudyConfig),
    ):
        store.store(group=group, name="schema", node=schema)
