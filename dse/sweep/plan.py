"""Planning a sweep in its main process: every grid trial's params, checks of the whole space before anything runs,
the study's definition, and the Plan every worker gets (grid or sampled, decided once), with its sampler and pruner."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import optuna
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from dse.config import SpaceConfig, StudyConfig, SweepConfig, TargetConfig, to_object
from dse.data import Splits, load_data
from dse.identity import architecture
from dse.latency import build
from dse.measure import count_macs, state_dict_bytes
from dse.models import ModelConfig, build_model, paper_name
from dse.storage import check_storage
from dse.study import check_workdir, default_storage, study_workdir
from dse.sweep.compose import (
    TrialSetup,
    compose,
    data_key,
    group_options,
    hydra_value,
    key_problem,
    merge_overrides,
    override_key,
    param_value,
    point_label,
    portable,
    quote,
    trial_identity,
    trial_overrides,
    typed,
)

__all__ = [
    "GRID",
    "SAMPLED",
    "Plan",
    "grid_params",
    "params_key",
    "usable_cpus",
    "workers_and_threads",
    "draft_plan",
    "plan_sweep",
    "training_cost",
    "check_budgets",
    "definition",
    "make_sampler",
    "make_pruner",
]

GRID, SAMPLED = "grid", "sampled"  # a plan's modes: a queue of every grid trial, or trials TPE/NSGA-II sample


@dataclass
class Plan:
    """Everything a worker needs, decided and validated once by the main process (picklable)."""

    study_name: str
    storage: str
    workdir: str
    static: list[str]  # the space's own overrides that the command line does not set
    cli: list[str]  # the command line's overrides, portable: config folders and a space file's path absolute
    fixed: list[str]  # the resolved study name and storage, the same for every trial
    space: dict
    study: dict
    workers: int
    threads: int
    progress: bool
    group_size: int | None  # trials a worker claims and trains together; None: measured by each worker (auto)
    mode: str = GRID  # GRID: every trial is queued (`grid`); SAMPLED: the sampler proposes trials up to `total`
    total: int = 0  # trials in the space when it is done
    grid: list[dict] = field(default_factory=list)  # the fixed params of every grid trial
    seeds: list[int] = field(default_factory=list)  # the seeds every grid cell runs with
    cost: list[float] = field(default_factory=list)  # each grid trial's training MACs: queued largest first
    definition: dict = field(default_factory=dict)  # what makes the study's trials comparable (dse.study)
    archs: dict[str, dict] = field(default_factory=dict)  # the grid's inference graphs: latency key -> spec
    arch_of: list[str] = field(default_factory=list)  # each grid trial's key in `archs`
    template: dict = field(default_factory=dict)  # one architecture's spec: what a latency kit draws others on

    def overrides(self, params: dict) -> list[str]:
        """A trial's Hydra overrides: space < point extras < command line < study < the trial's knobs."""
        static, varying = trial_overrides(params, self.space_cfg)
        return merge_overrides(self.static, static, self.cli, self.fixed, varying)

    def choices(self, key: str) -> list:
        """Every value a grid param takes, in order."""
        return list(dict.fromkeys(p[key] for p in self.grid))

    def costs(self) -> dict[str, float]:
        """Each grid trial's training cost by its params key (`params_key`); empty for a sampled space."""
        return {params_key(p): c for p, c in zip(self.grid, self.cost or [1.0] * len(self.grid))}

    @property
    def space_cfg(self) -> SpaceConfig:
        return SpaceConfig(**self.space)

    @property
    def study_cfg(self) -> StudyConfig:
        return to_object(StudyConfig, self.study)


def params_key(params: dict) -> str:
    """A trial's params as a key (a grid point x seed)."""
    return json.dumps(params, sort_keys=True)


def grid_params(space: SpaceConfig, seeds: list[int]) -> list[dict]:
    """Every grid trial's params: the cartesian product of `grid` (or each point) times the seeds."""
    if space.points:
        labels = [point_label(p) for p in space.points]
        if len(set(labels)) != len(labels):
            raise ValueError(f"space {space.name!r} lists a point twice")
        cells = [{"point": label} for label in labels]
    else:
        keys = list(space.grid)
        cells = [dict(zip(keys, map(param_value, combo))) for combo in itertools.product(*space.grid.values())]
    return [{**cell, "seed": seed} for cell in cells for seed in seeds]


def _cell_label(params: dict) -> str:
    return params.get("point") or ", ".join(f"{k}={v}" for k, v in params.items() if k != "seed")


def usable_cpus() -> set[int]:
    """The CPUs this process may run on (`taskset`, cgroup cpusets), not every core of the machine."""
    try:
        return os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


def workers_and_threads(workers: int, threads: int, cpus: set[int], gpus: int = 0) -> tuple[int, int]:
    """`sweep.workers` and `sweep.threads`, their 0 (auto) resolved: a worker per GPU, else per usable CPU, and the
    usable CPUs shared out among the workers."""
    cores = max(1, len(cpus))
    workers = workers or gpus or cores
    return workers, threads or max(1, cores // workers)


def draft_plan(cfg: DictConfig, cli: list[str]) -> Plan:
    """The Plan as far as the config alone decides it, reading no data and writing nothing: the space and its mode
    (grid or sampled), every grid trial's params and the space's total, the study's name, storage and workdir,
    the overrides every trial starts from, workers and threads. Refuses a command line that sets a swept key, and
    a grid or search over a key no config has."""
    cli = portable(cli)  # the workers compose from these in other processes
    if "space" not in cfg:
        spaces = group_options("space", cli)
        raise ValueError(f"no search space given; add +space=NAME (one of: {', '.join(spaces)}) or +space=PATH.yaml")
    space = to_object(SpaceConfig, cfg.space)
    _check_keys(space, cli)
    study = to_object(StudyConfig, cfg.study)
    sweep = to_object(SweepConfig, cfg.sweep)
    seeds = space.seeds[: sweep.seeds] if sweep.seeds else space.seeds
    static = [o for o in space.overrides if override_key(o) not in {override_key(c) for c in cli}]
    storage = study.storage or default_storage(study.name)
    workdir = study_workdir(study.name, storage, study.workdir)
    if study.workdir:
        check_workdir(workdir)
    fixed = [f"study.name={quote(study.name)}", f"study.storage={quote(storage)}"]
    _check_cli(space, cli, merge_overrides(static, cli, fixed))
    workers, threads = workers_and_threads(sweep.workers, sweep.threads, usable_cpus(), torch.cuda.device_count())
    mode = GRID if space.sampler == "grid" else SAMPLED
    grid = grid_params(space, seeds) if mode == GRID else []
    return Plan(
        study_name=study.name,
        storage=storage,
        workdir=str(workdir),
        static=static,
        cli=cli,
        fixed=fixed,
        space=asdict(space),
        study=asdict(study),
        workers=workers,
        threads=threads,
        progress=sweep.progress,
        group_size=sweep.group_size,
        mode=mode,
        total=len(grid) if mode == GRID else space.n_trials,
        grid=grid,
        seeds=seeds,
    )


def plan_sweep(cfg: DictConfig, cli: list[str]) -> Plan:
    """Validate the whole sweep (every grid trial's config, the storage, the data) and define its study,
    before any trial runs or anything is written."""
    plan = draft_plan(cfg, cli)
    space, study = plan.space_cfg, plan.study_cfg
    if plan.mode == GRID:
        cells = plan.grid[:: len(plan.seeds)]
        setups = {
            _cell_label(p): typed(compose(plan.overrides(p)))
            for p in tqdm(cells, desc="checking configs", leave=False, disable=len(plan.grid) < 20)
        }
        _check_distinct(space, setups)
    else:
        setups = _check_search(space, merge_overrides(plan.static, plan.cli, plan.fixed))
    check_storage(plan.storage, writable=True)
    data = {data_key(s.data): s.data for s in setups.values()}
    # Downloads a missing dataset now, or stops with why, before any trial starts.
    loaded = {key: load_data(cfg) for key, cfg in data.items()}
    for setup in setups.values():
        _check_data(setup, loaded[data_key(setup.data)], study)
    if plan.mode == GRID:
        plan.cost = [training_cost(s, loaded[data_key(s.data)]) for s in setups.values() for _ in plan.seeds]
        keys = [_architecture(s, loaded[data_key(s.data)]) for s in setups.values()]
        plan.archs = dict(keys)
        plan.arch_of = [key for key, _ in keys for _ in plan.seeds]
        check_budgets(plan)
    first = next(iter(setups.values()))
    plan.template = _architecture(first, loaded[data_key(first.data)])[1]
    plan.definition = definition(space, plan.seeds, study, setups)
    return plan


def check_budgets(plan: Plan, latency_ms: Mapping[str, float] | None = None) -> str:
    """A grid's trials against the study's budgets before any is trained: fp32 `state_dict` size (every
    architecture built once, weights do not change it) and, given the measured `latency_ms` by architecture key,
    latency. A grid whose every trial is over a budget is refused (ValueError naming the smallest figure the space
    has); else one line saying how many trials are over (pruned without training), or '' when none is."""
    study = plan.study_cfg
    if plan.mode != GRID or not plan.arch_of or not (study.max_size_kb or study.max_latency_ms and latency_ms):
        return ""
    budgets = []  # (setting, limit, unit, figure by architecture key)
    if study.max_size_kb:
        sizes = {k: state_dict_bytes(build(spec)[0]) / 1e3 for k, spec in plan.archs.items()}
        budgets.append(("max_size_kb", study.max_size_kb, "KB", "smallest model", sizes))
    if study.max_latency_ms and latency_ms:
        budgets.append(("max_latency_ms", study.max_latency_ms, "ms", "fastest architecture", latency_ms))
    over = [False] * len(plan.arch_of)
    counts = []
    for setting, limit, unit, best, figure in budgets:
        key = min(plan.arch_of, key=lambda k: figure[k])
        if figure[key] > limit:
            name = paper_name(ModelConfig(**plan.archs[key]["model"]))
            raise ValueError(
                f"study.{setting}={limit:g}: every trial of space {plan.space['name']!r} is over it; the {best} of the "
                f"space, {name}, has {figure[key]:.{1 if unit == 'KB' else 3}f} {unit}; raise study.{setting} or "
                "sweep a space of smaller models"
            )
        mine = [figure[k] > limit for k in plan.arch_of]
        over = [a or b for a, b in zip(over, mine)]
        counts.append(f"{sum(mine)} over study.{setting}={limit:g}" if any(mine) else "")
    if not any(over):
        return ""
    return (
        f"budget: {sum(over)} of {len(over)} trials are over it ({', '.join(c for c in counts if c)}); they are "
        "pruned without training"
    )


def training_cost(setup: TrialSetup, splits: Splits) -> float:
    """Forward MACs of one epoch's training images times epochs: what orders the grid queue (not a time)."""
    with torch.device("meta"):  # counts without weights or compute
        model = build_model(setup.model, num_classes=splits.num_classes, in_channels=splits.in_channels)
        macs, _ = count_macs(model, tuple(splits.train_x.shape[1:]))
    return float(macs * len(splits.train_x) * setup.train.epochs)


def _architecture(setup: TrialSetup, splits: Splits) -> tuple[str, dict]:
    return architecture(setup.model, tuple(splits.train_x.shape[1:]), splits.num_classes)


def _swept(space: SpaceConfig) -> dict[str, str]:
    """The keys the space sets for every trial -> how to change them instead."""
    keys = {"train.seed": "space.seeds=[...]"}
    keys.update({k: f"space.grid={{{k}:[...]}}" for k in space.grid})
    keys.update({k: f"space.search={{{k}:{{...}}}}" for k in space.search})
    if space.points:
        keys.update(dict.fromkeys(("model", "model.blocks", "model.width"), "space.points=[...]"))
    return keys


def _check_keys(space: SpaceConfig, cli: list[str]) -> None:
    """Every key a grid or search varies is a config key or group (`model.width`, `train`)."""
    for kind, keys in (("grid", space.grid), ("search", space.search)):
        for key in keys:
            problem = key_problem(key, cli)
            if problem:
                raise ValueError(f"space {space.name!r}: {kind} key {key}: {problem}")


def _check_cli(space: SpaceConfig, cli: list[str], base: list[str]) -> None:
    """A command-line override of a key the space sweeps would be dropped silently: refuse it, and say
    what is wrong with its value too."""
    swept = _swept(space)
    clash = [o for o in cli if override_key(o) in swept]
    if not clash:
        return
    try:
        typed(compose(base))
        besides = ""
    except ValueError as e:
        besides = f"; besides, {e}"
    how = ", ".join(dict.fromkeys(swept[override_key(o)] for o in clash))
    raise ValueError(
        f"{' '.join(clash)}: space {space.name!r} sets {', '.join(override_key(o) for o in clash)} for every trial, "
        f"so the command line cannot; change the space instead ({how}){besides}"
    )


def _check_distinct(space: SpaceConfig, setups: dict[str, TrialSetup]) -> None:
    """Two grid cells that compose to the same trial would train one config twice (e.g. a command-line
    override of what tells two points apart)."""
    seen: dict[str, str] = {}
    for label, setup in setups.items():
        key = json.dumps(trial_identity(setup), sort_keys=True)
        if key in seen:
            raise ValueError(
                f"space {space.name!r}: {seen[key]!r} and {label!r} are the same trial config with these overrides; "
                "drop the override that makes them equal"
            )
        seen[key] = label


def _check_data(setup: TrialSetup, splits: Splits, study: StudyConfig) -> None:
    n, bs = len(splits.train_x), setup.train.batch_size
    if n < bs:
        raise ValueError(
            f"train batch_size={bs} is more than the {n} training images of {setup.data.name} "
            f"(data.subset={setup.data.subset}, val_size={setup.data.val_size}); lower train.batch_size or use more images"
        )
    if not len(splits.val_x) and ("val_acc" in study.objectives or study.pruner != "none"):
        raise ValueError(
            f"data val_size={setup.data.val_size}: the sweep optimises validation accuracy; set data.val_size > 0"
        )


def _check_search(space: SpaceConfig, base: list[str]) -> dict[str, TrialSetup]:
    """Each choice and each range end of a TPE/NSGA-II space composes into a valid config; labelled
    'base', or 'key=value' for the choices of a config group (`train: {choices: [sgd, adam]}`)."""
    setups = {"base": typed(compose(base))}
    for key, dist in space.search.items():
        values = list(dist["choices"]) if "choices" in dist else [dist["low"], dist["high"]]
        for value in values:
            setup = typed(compose(merge_overrides(base, [f"{key}={hydra_value(value)}"])))
            if "." not in key:  # a config group: each choice brings its own settings
                setups[f"{key}={param_value(value)}"] = setup
    return setups


def _drop(tree: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.get(part, {})
    tree.pop(leaf, None)


def definition(space: SpaceConfig, seeds: list[int], study: StudyConfig, setups: dict[str, TrialSetup]) -> dict:
    """What makes the study's trials comparable: the space, the seeds, the objectives, pruning and budgets,
    and what each grid cell's trials compute (a TPE/NSGA-II space: the base config and each group choice,
    without the searched keys). How many trials a TPE/NSGA-II study runs is not in it: it may grow."""
    configs = {}
    for label, setup in setups.items():
        config = trial_identity(setup, seed=False)
        for key in space.search:
            if "." in key:  # a searched knob (a searched config group keeps its choice's settings)
                _drop(config, key)
        configs[label] = config
    out = {
        "space": {"sampler": space.sampler, "grid": space.grid, "points": space.points, "search": space.search},
        "seeds": seeds,
        "objectives": study.objectives,
        "pruner": study.pruner,
        "pruning": asdict(study.pruning) if study.pruner == "pareto" else None,
        "max_size_kb": study.max_size_kb,
        "max_latency_ms": study.max_latency_ms,
        "configs": configs,
    }
    # Set only where they differ from an older dse's (which had neither), so its studies still resume.
    if study.budgets:
        out["budgets"] = study.budgets
    if study.pruner == "pareto" and study.target.objectives != TargetConfig().objectives:
        out["pruning_target"] = asdict(study.target)
    return json.loads(json.dumps(out))


def make_sampler(plan: Plan, worker: int = 0) -> optuna.samplers.BaseSampler:
    """The space's sampler, seeded per worker (a grid's trials are queued: its sampler only sees fixed params)."""
    space, study = plan.space_cfg, plan.study_cfg
    seed = study.sampler_seed + worker
    # Budgets reach the sampler as the constraints each trial sets (Trial.set_constraint, in `setup_trial`).
    if space.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True)


def make_pruner(plan: Plan) -> optuna.pruners.BasePruner | None:
    """Optuna's own pruners (single-objective studies); the pareto pruner runs inside the objective."""
    name = plan.study_cfg.pruner
    if name == "median":
        return optuna.pruners.MedianPruner(n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1)
    return None
