"""The sweep: Hydra composes each trial's config, Optuna drives the trials (a grid queue, or TPE/NSGA-II)
through the shared trainer, several workers per machine, our own heartbeats and resumable trials."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import itertools
import json
import multiprocessing
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna
import sqlalchemy
import torch
from omegaconf import DictConfig, OmegaConf
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

import dse
from dse.config import SpaceConfig, StudyConfig, SweepConfig, finite, register_schemas, to_object
from dse.data import DataConfig, DataError, Splits, load_data
from dse import identity
from dse.identity import architecture
from dse.latency import build, ensure, training_turns
from dse.measure import ModelProfile, count_macs, profile
from dse.models import ModelConfig, build_model, config_from_name, paper_name, resolve_config
from dse.progress import INTERRUPTED, duration, list_studies, save_curves_chart, start_line, summary, trial_line, watching
from dse.pruning import History, decide, histories, rungs
from dse.study import (
    Heartbeat,
    StudyError,
    TrialLost,
    check_ours,
    check_storage,
    check_workdir,
    claim_workdir,
    create_or_check_study,
    default_storage,
    open_storage,
    storage_lock,
    study_workdir,
    transient,
)
from dse.train import (
    Member, TrainConfig, TrainingDiverged, TrainResult, group_key, pick_group_size, resolve_device,
    train_group,
)  # fmt: skip

__all__ = [
    "Plan", "Outcome", "plan_sweep", "prepare_study", "run_sweep", "trial_overrides", "trial_identity",
    "run_folder", "enqueue_missing", "requeue", "fail_stale", "claim_trial", "claim_trials", "setup_trial", "fuse_key",
    "train_trials", "record_result", "finish_trial", "fail_trial", "run_trials", "hold_run_dir", "group_size", "work",
    "tally", "main",
]  # fmt: skip

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
REPO = CONF_DIR.parent
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
ALIVE = (TrialState.RUNNING, TrialState.WAITING)


@dataclass
class Plan:
    """Everything a worker needs, decided and validated once by the main process (picklable)."""

    study_name: str
    storage: str
    workdir: str
    static: list[str]  # the space's own overrides that the command line does not set
    cli: list[str]  # the command line's overrides
    fixed: list[str]  # the resolved study name and storage, the same for every trial
    space: dict
    study: dict
    workers: int
    threads: int
    progress: bool
    group_size: int | None  # trials a worker claims and trains together; None: measured by each worker (auto)
    grid: list[dict] = field(default_factory=list)  # the fixed params of every grid trial
    cost: list[float] = field(default_factory=list)  # each grid trial's training MACs: queued largest first
    definition: dict = field(default_factory=dict)  # what makes the study's trials comparable (dse.study)
    archs: dict[str, dict] = field(default_factory=dict)  # the grid's inference graphs: latency key -> spec

    def overrides(self, params: dict) -> list[str]:
        """A trial's Hydra overrides: space < point extras < command line < study < the trial's knobs."""
        static, varying = trial_overrides(params, self.space_cfg)
        return merge_overrides(self.static, static, self.cli, self.fixed, varying)

    def choices(self, key: str) -> list:
        """Every value a grid param takes, in order."""
        return list(dict.fromkeys(p[key] for p in self.grid))

    @property
    def space_cfg(self) -> SpaceConfig:
        return SpaceConfig(**self.space)

    @property
    def study_cfg(self) -> StudyConfig:
        return to_object(StudyConfig, self.study)


# ---------------------------------------------------------------- overrides and configs


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def _quote(text: str) -> str:
    """A string as a quoted Hydra override value (URLs with `?a=b`, names in any script)."""
    from hydra.core.override_parser.types import Quote, QuotedString

    return QuotedString(text=text, quote=Quote.single).with_quotes()


def _hydra_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    if isinstance(value, str) and not re.fullmatch(r"[A-Za-z0-9_.\-]+", value):  # what Hydra reads unquoted
        return _quote(value)
    return str(value)


def _param_value(value: Any) -> Any:
    """Optuna categorical choices must be scalars: lists become '1,2,8,1'."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value


def merge_overrides(*groups: list[str]) -> list[str]:
    """Concatenate override lists; a later override of the same key replaces an earlier one."""
    merged: dict[str, str] = {}
    for group in groups:
        for override in group:
            merged.pop(_key(override), None)
            merged[_key(override)] = override
    return list(merged.values())


def model_overrides(cfg: ModelConfig) -> list[str]:
    """Hydra overrides that select a model config: its conf/model group and the knobs the name fixes."""
    out = [f"model={cfg.name}"]
    if cfg.blocks is not None:
        out.append(f"model.blocks={_hydra_value(list(cfg.blocks))}")
    if cfg.width is not None:
        out.append(f"model.width={cfg.width}")
    return out


def point_label(point: Any) -> str:
    name, extra = _point_parts(point)
    return name if not extra else f"{name} [{' '.join(extra)}]"


def _point_parts(point: Any) -> tuple[str, list[str]]:
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
            name, extra = _point_parts(point)
            varying += model_overrides(config_from_name(name))
            static += extra
        else:
            choices = space.grid.get(key) or space.search.get(key, {}).get("choices")
            if choices:
                value = next(c for c in choices if _param_value(c) == value)
            varying.append(f"{key}={_hydra_value(value)}")
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


def training_cost(setup: TrialSetup, splits: Splits) -> float:
    """Forward MACs of one epoch's training images times epochs: what orders the grid queue (not a time)."""
    with torch.device("meta"):  # counts without weights or compute
        model = build_model(setup.model, num_classes=splits.num_classes, in_channels=splits.in_channels)
        macs, _ = count_macs(model, tuple(splits.train_x.shape[1:]))
    return float(macs * len(splits.train_x) * setup.train.epochs)


# ---------------------------------------------------------------- planning (main process)


def grid_params(space: SpaceConfig, seeds: list[int]) -> list[dict]:
    """Every grid trial's params: the cartesian product of `grid` (or each point) times the seeds."""
    if space.points:
        labels = [point_label(p) for p in space.points]
        if len(set(labels)) != len(labels):
            raise ValueError(f"space {space.name!r} lists a point twice")
        cells = [{"point": label} for label in labels]
    else:
        keys = list(space.grid)
        cells = [dict(zip(keys, map(_param_value, combo))) for combo in itertools.product(*space.grid.values())]
    return [{**cell, "seed": seed} for cell in cells for seed in seeds]


def _cell_label(params: dict) -> str:
    return params.get("point") or ", ".join(f"{k}={v}" for k, v in params.items() if k != "seed")


def plan_sweep(cfg: DictConfig, cli: list[str]) -> Plan:
    """Validate the whole sweep (every grid trial's config, the storage, the data) and define its study,
    before any trial runs or anything is written."""
    if "space" not in cfg:
        spaces = sorted(p.stem for p in (CONF_DIR / "space").glob("*.yaml"))
        raise ValueError(f"no search space given; add +space=NAME, one of: {', '.join(spaces)}")
    space = to_object(SpaceConfig, cfg.space)
    study = to_object(StudyConfig, cfg.study)
    sweep = to_object(SweepConfig, cfg.sweep)
    seeds = space.seeds[: sweep.seeds] if sweep.seeds else space.seeds
    static = [o for o in space.overrides if _key(o) not in {_key(c) for c in cli}]
    storage = study.storage or default_storage(study.name)
    workdir = study_workdir(study.name, storage, study.workdir)
    if study.workdir:
        check_workdir(workdir)
    fixed = [f"study.name={_quote(study.name)}", f"study.storage={_quote(storage)}"]
    _check_cli(space, cli, merge_overrides(static, cli, fixed))
    cores = os.cpu_count() or 1
    workers = sweep.workers or (torch.cuda.device_count() or cores)
    plan = Plan(
        study_name=study.name, storage=storage, workdir=str(workdir),
        static=static, cli=cli, fixed=fixed, space=asdict(space), study=asdict(study), workers=workers,
        threads=sweep.threads or max(1, cores // workers), progress=sweep.progress, group_size=sweep.group_size,
        grid=grid_params(space, seeds) if space.sampler == "grid" else [],
    )
    if plan.grid:
        cells = plan.grid[:: len(seeds)]
        setups = {_cell_label(p): typed(compose(plan.overrides(p)))
                  for p in tqdm(cells, desc="checking configs", leave=False, disable=len(plan.grid) < 20)}  # fmt: skip
        _check_distinct(space, setups)
    else:
        setups = _check_search(space, merge_overrides(static, cli, fixed))
    check_storage(storage, writable=True)
    data = {_data_key(s.data): s.data for s in setups.values()}
    # Downloads a missing dataset now, or stops with why, before any trial starts.
    loaded = {key: load_data(cfg) for key, cfg in data.items()}
    for setup in setups.values():
        _check_data(setup, loaded[_data_key(setup.data)], study)
    if plan.grid:
        plan.cost = [training_cost(s, loaded[_data_key(s.data)]) for s in setups.values() for _ in seeds]
        plan.archs = dict(_architecture(s, loaded[_data_key(s.data)]) for s in setups.values())
    plan.definition = _definition(space, seeds, study, setups)
    return plan


def _architecture(setup: TrialSetup, splits: Splits) -> tuple[str, dict]:
    return architecture(setup.model, tuple(splits.train_x.shape[1:]), splits.num_classes)


def _data_key(data: DataConfig) -> str:
    return json.dumps(asdict(data), sort_keys=True)


def _swept(space: SpaceConfig) -> dict[str, str]:
    """The keys the space sets for every trial -> how to change them instead."""
    keys = {"train.seed": "space.seeds=[...]"}
    keys.update({k: f"space.grid={{{k}:[...]}}" for k in space.grid})
    keys.update({k: f"space.search={{{k}:{{...}}}}" for k in space.search})
    if space.points:
        keys.update(dict.fromkeys(("model", "model.blocks", "model.width"), "space.points=[...]"))
    return keys


def _check_cli(space: SpaceConfig, cli: list[str], base: list[str]) -> None:
    """A command-line override of a key the space sweeps would be dropped silently: refuse it, and say
    what is wrong with its value too."""
    swept = _swept(space)
    clash = [o for o in cli if _key(o) in swept]
    if not clash:
        return
    try:
        typed(compose(base))
        besides = ""
    except ValueError as e:
        besides = f"; besides, {e}"
    how = ", ".join(dict.fromkeys(swept[_key(o)] for o in clash))
    raise ValueError(
        f"{' '.join(clash)}: space {space.name!r} sets {', '.join(_key(o) for o in clash)} for every trial, so the "
        f"command line cannot; change the space instead ({how}){besides}"
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
        raise ValueError(f"data val_size={setup.data.val_size}: the sweep optimises validation accuracy; set data.val_size > 0")


def _check_search(space: SpaceConfig, base: list[str]) -> dict[str, TrialSetup]:
    """Each choice and each range end of a TPE/NSGA-II space composes into a valid config; labelled
    'base', or 'key=value' for the choices of a config group (`train: {choices: [sgd, adam]}`)."""
    setups = {"base": typed(compose(base))}
    for key, dist in space.search.items():
        values = list(dist["choices"]) if "choices" in dist else [dist["low"], dist["high"]]
        for value in values:
            setup = typed(compose(merge_overrides(base, [f"{key}={_hydra_value(value)}"])))
            if "." not in key:  # a config group: each choice brings its own settings
                setups[f"{key}={_param_value(value)}"] = setup
    return setups


def _drop(tree: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.get(part, {})
    tree.pop(leaf, None)


def _definition(space: SpaceConfig, seeds: list[int], study: StudyConfig, setups: dict[str, TrialSetup]) -> dict:
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
    definition = {
        "space": {"sampler": space.sampler, "grid": space.grid, "points": space.points, "search": space.search},
        "seeds": seeds,
        "objectives": study.objectives,
        "pruner": study.pruner,
        "pruning": asdict(study.pruning) if study.pruner == "pareto" else None,
        "max_size_kb": study.max_size_kb,
        "max_latency_ms": study.max_latency_ms,
        "configs": configs,
    }
    return json.loads(json.dumps(definition))


def make_sampler(plan: Plan, worker: int = 0) -> optuna.samplers.BaseSampler:
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


# ---------------------------------------------------------------- the queue: points, chains, retries
# A chain is one grid point x seed (or one sampled TPE/NSGA-II trial) and its retries: the trials that
# share its fixed params (or its `dse:chain` attribute). Each chain should end with one finished trial.


def _params_key(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


def _chain(t: FrozenTrial) -> str:
    attrs = t.system_attrs
    return attrs.get("dse:chain") or (_params_key(attrs["fixed_params"]) if "fixed_params" in attrs else str(t.number))


def _chains(trials: list[FrozenTrial]) -> dict[str, list[FrozenTrial]]:
    out: dict[str, list[FrozenTrial]] = {}
    for t in trials:
        out.setdefault(_chain(t), []).append(t)
    return out


def _chain_state(trials: list[FrozenTrial]) -> TrialState | None:
    """COMPLETE or PRUNED once any trial finished; else RUNNING/WAITING while one is alive; else FAIL."""
    states = {t.state for t in trials}
    return next((s for s in (*FINISHED, *ALIVE, TrialState.FAIL) if s in states), None)


def _queue(study: optuna.Study, params: dict, chain: str, failures: int, retry_of: FrozenTrial | None = None) -> None:
    attrs = {"fixed_params": params, "dse:chain": chain, "dse:failures": failures}
    if retry_of is not None:
        attrs["dse:retry_of"] = retry_of.number
    values = retry_of.intermediate_values if retry_of is not None else None  # a resumed trial reports later epochs only
    study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, system_attrs=attrs, intermediate_values=values))


def enqueue_missing(study: optuna.Study, plan: Plan) -> int:
    """Queue every grid trial that has no finished, running or queued trial, the costliest first so that
    parallel workers do not end waiting on one big model; queue again each chain whose retries a former
    run used up (a new run gets a fresh `max_retry`). Hold `storage_lock`. Returns how many."""
    chains = _chains(study.get_trials(deepcopy=False))
    failed = lambda key: _chain_state(chains.get(key, [])) in (None, TrialState.FAIL)
    if plan.grid:
        cost = plan.cost or [0.0] * len(plan.grid)
        ranked = sorted(zip(plan.grid, cost), key=lambda pc: -pc[1])  # stable: equal costs keep the grid's order
        todo = [p for p, _ in ranked if failed(_params_key(p))]
        for params in todo:
            _queue(study, params, _params_key(params), 0)
        return len(todo)
    todo = [trials[-1] for key, trials in chains.items() if failed(key)]
    for t in todo:
        _queue(study, t.system_attrs.get("fixed_params") or t.params, _chain(t), 0, t)
    return len(todo)


def requeue(study: optuna.Study, trial: FrozenTrial, *, counted: bool, max_retry: int) -> bool:
    """Queue a retry of a failed trial with its params (it resumes from the trial's checkpoint), unless it
    failed `max_retry` times already. A `counted` failure is the trial's own (an error, its worker died);
    an interruption (the sweep stopped, a lost heartbeat) does not use up a retry."""
    failures = trial.system_attrs.get("dse:failures", 0) + counted
    if failures > max_retry:
        return False
    _queue(study, trial.system_attrs.get("fixed_params") or trial.params, _chain(trial), failures, trial)
    return True


def _stale_callback(max_retry: int) -> Callable[[optuna.Study, FrozenTrial], None]:
    """What `fail_stale_trials` does with a trial whose heartbeat lapsed: retry it, not counted."""
    return lambda study, trial: requeue(study, trial, counted=False, max_retry=max_retry)


def fail_stale(study: optuna.Study, storage: RDBStorage, plan: Plan) -> None:
    """Fail and retry the running trials nobody works on: those whose heartbeat lapsed (Optuna's check), and
    those claimed but never taken up (no `worker` attribute after the grace period: the claim's reply was
    lost in an outage, or its worker died at once), which have no heartbeat Optuna could find stale."""
    optuna.storages.fail_stale_trials(study)
    cfg = plan.study_cfg
    limit = datetime.datetime.now() - datetime.timedelta(seconds=cfg.grace_period)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if "worker" not in t.user_attrs and t.datetime_start is not None and t.datetime_start < limit:
            with contextlib.suppress(UpdateFinishedTrialError):  # another process failed it first
                if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                    requeue(study, t, counted=False, max_retry=cfg.max_retry)


# ---------------------------------------------------------------- run folders


@contextlib.contextmanager
def hold_run_dir(run_dir: Path, check: Callable[[], None]) -> Iterator[None]:
    """Hold the run folder's lock file while training in it, so two processes never write one folder (a
    retry that starts while the original still trains waits here, checking it still owns its trial).
    Temp files of checkpoint writes that were killed are removed once the folder is ours."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "a") as lock:
        waited = False
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    tqdm.write(f"waiting for {run_dir}: another process still trains this config there")
                    waited = True
                check()
                time.sleep(1)
        for tmp in run_dir.glob(".checkpoint.pt.*.tmp"):
            tmp.unlink(missing_ok=True)
        yield


# ---------------------------------------------------------------- a trial's lifecycle (worker processes)
# claim_trials -> setup_trial -> train_trials -> record_result -> finish_trial, or fail_trial; run_trials
# strings them together for the trials a worker claimed at once (`sweep.trials_per_gpu`; one is a group of one).


def _provenance(resolved: dict) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", False
    import torchvision

    return {
        "config": resolved,
        "git_commit": commit + ("-dirty" if dirty else ""),
        "versions": {
            "dse": dse.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "optuna": optuna.__version__,
        },
        "host": socket.gethostname(),
    }


def _run_dir(plan: Plan, setup: TrialSetup) -> Path:
    """A trial's run folder: the same computation (a retried trial too) maps to the same checkpoint."""
    return Path(plan.workdir) / "runs" / identity.trial_key(trial_identity(setup))


def run_folder(plan: Plan, params: dict) -> Path:
    """Where the trial with these params trains and keeps its checkpoint."""
    return _run_dir(plan, typed(compose(plan.overrides(params))))


def _set_attrs(trial: optuna.Trial, attrs: dict) -> None:
    for key, value in attrs.items():
        trial.set_user_attr(key, value)


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def claim_trial(study: optuna.Study, storage: RDBStorage, plan: Plan) -> optuna.Trial | None:
    """The next trial for this worker, marked RUNNING: a queued one first (grid trials, retries), else for a
    TPE/NSGA-II space a new sampled one while the space has room. None when there is none to take (never
    an empty trial). A queued grid trial whose point another trial already covers is dropped as a duplicate."""
    trials = study.get_trials(deepcopy=False)
    for t in (t for t in trials if t.state == TrialState.WAITING):
        try:  # one worker wins: the state changes under the storage's row lock (BEGIN IMMEDIATE on SQLite)
            if not storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                continue
        except UpdateFinishedTrialError:
            continue
        trial = optuna.Trial(study, t._trial_id)
        if plan.grid:  # the point's first live or finished trial keeps it
            kept = min((o for o in _chains(trials)[_chain(t)] if o.state in (*FINISHED, *ALIVE)),
                       key=lambda o: (o.state not in FINISHED, o.number))
            if kept.number != t.number:
                _tell(study, trial, state=TrialState.FAIL, reason=f"duplicate of trial {kept.number} (same grid point)")
                return None
        return trial
    if not plan.grid and len(_chains(trials)) < plan.space_cfg.n_trials:
        return study.ask()
    return None


def claim_trials(study: optuna.Study, storage: RDBStorage, plan: Plan, size: int) -> list[optuna.Trial]:
    """Up to `size` trials for this worker, the next ones of the queue (`claim_trial` each: a grid cell's seeds
    are queued together, so they tend to be claimed, and fused, together)."""
    claimed: list[optuna.Trial] = []
    while len(claimed) < size and (trial := claim_trial(study, storage, plan)) is not None:
        claimed.append(trial)
    return claimed


@dataclass
class TrialRun:
    """A set-up trial: its config, data, model and measurements, and where it trains."""

    trial: optuna.Trial
    setup: TrialSetup
    splits: Splits
    model: torch.nn.Module
    prof: ModelProfile
    latency_ms: float  # the architecture's figure (dse.latency), not the trial's own
    run_dir: Path
    started: float


def _worker_setup(setup: TrialSetup, plan: Plan) -> TrialSetup:
    """The trainer's settings this worker decides (they change no result): its threads, a bar for one worker."""
    setup.train.threads = plan.threads
    setup.train.progress = setup.train.progress and plan.progress and plan.workers == 1
    return setup


def _load(setup: TrialSetup, cache: dict) -> Splits:
    """The trial's data; the worker keeps the last dataset it loaded."""
    key = _data_key(setup.data)
    if key not in cache:
        cache.clear()
        cache[key] = load_data(setup.data)
    return cache[key]


def setup_trial(trial: optuna.Trial, plan: Plan, cache: dict) -> TrialRun:
    """Fix the trial's params, compose its config, load its data (cached), build and profile its model and
    record all that; raises optuna.TrialPruned for a model over the size or latency budget."""
    started = time.perf_counter()
    space = plan.space_cfg
    if space.sampler == "grid":
        params = _fixed_params(trial)
        for key in params:
            trial.suggest_categorical(key, plan.choices(key))
    else:
        params = _suggest(trial, space)
    overrides = plan.overrides(params)
    setup = _worker_setup(typed(compose(overrides)), plan)
    splits = _load(setup, cache)
    torch.manual_seed(setup.train.seed)
    model = build_model(setup.model, num_classes=splits.num_classes, in_channels=splits.in_channels)
    prof = profile(model, tuple(splits.train_x.shape[1:]), latency=False)
    latency = _latency(trial, setup, splits, model)
    full = setup.full
    _set_attrs(trial, {
        "paper_name": paper_name(setup.model), "family": full.name, "blocks": full.blocks, "width": full.width,
        "dropout": full.dropout, "activation": full.activation, "inplace": full.inplace,
        "dataset": setup.data.name, "optimizer": setup.train.optimizer, "lr": setup.train.lr,
        "epochs_planned": setup.train.epochs, "seed": setup.train.seed,
        "params": prof.params, "macs": prof.macs, "size_bytes": prof.size_bytes, "size_mb": prof.size_mb,
        "int8_mb": prof.int8_mb, **latency, "overrides": overrides, "provenance": _provenance(setup.resolved),
    })
    study_cfg = plan.study_cfg
    limits = [(prof.size_bytes / 1e3, study_cfg.max_size_kb, "size", "KB"), (latency["latency_ms"], study_cfg.max_latency_ms, "latency", "ms")]
    for value, limit, what, unit in limits:
        if limit:  # Optuna's constraint (<= 0 is feasible), set before training so that a pruned trial has it too
            trial.set_constraint(f"{what}_{unit.lower()}", value - limit)
    over = [f"{what} {value:.1f} {unit} > {limit:g} {unit}" for value, limit, what, unit in limits if limit and value > limit]
    if over:
        reason = "over budget: " + ", ".join(over)
        trial.set_user_attr("pruned_reason", reason)
        raise optuna.TrialPruned(reason)
    return TrialRun(trial, setup, splits, model, prof, latency["latency_ms"], _run_dir(plan, setup), started)


def _latency(trial: optuna.Trial, setup: TrialSetup, splits: Splits, model: torch.nn.Module) -> dict:
    """The trial's latency attributes: its architecture's figure in the study, measured now (training on this
    machine paused) if no trial of that architecture was measured before."""
    key, _ = _architecture(setup, splits)
    how = "by a worker at the first trial of the architecture, training on this machine paused"
    figure = ensure(trial.study, {key: lambda: (model, tuple(splits.train_x.shape[1:]))}, how)[key]
    return {"latency_ms": figure["ms"], "latency_iqr_ms": figure["iqr_ms"], "latency_threads": figure["threads"],
            "latency_under_load": figure["under_load"], "latency_key": key}


def _on_epoch(run: TrialRun, plan: Plan, check: Callable[[], None], boundary: Callable[[], None],
              leave: Callable[[Exception], None]):
    """The trial's per-epoch callback: check that it is still ours (`check` raises TrialLost), let a waiting
    latency measurement run (`boundary`), record the curves so far (for the dashboard and the pruner), let the
    pruner decide; what it raises goes to `leave` first."""
    trial, study_cfg = run.trial, plan.study_cfg
    live: list[dict] = []
    rung_epochs = set(rungs(study_cfg.pruning, run.setup.train.epochs))

    def report(record) -> None:
        check()
        boundary()  # a latency measurement waiting on this machine runs now
        live.append(asdict(record))
        trial.set_user_attr("curves", live)
        _report_epoch(trial, record.epoch, record.val_acc)
        if study_cfg.pruner == "pareto" and record.epoch in rung_epochs:
            _prune_if_dominated(trial, record, run.prof.size_mb, run.latency_ms, study_cfg)
        elif study_cfg.pruner not in ("none", "pareto"):
            if trial.should_prune():
                _record_pruned(trial, record.epoch, record.val_acc, None, f"{study_cfg.pruner} pruner at epoch {record.epoch}")

    def on_epoch(record) -> None:
        try:
            report(record)
        except Exception as e:  # pruned, taken over, ...: the trial leaves its group
            leave(e)
            raise

    return on_epoch


def fuse_key(run: TrialRun) -> tuple:
    """What set-up trials must share to train together: their data and `dse.train.group_key` (the model's
    structure and the training step's settings; seeds, dropout p, optimizers and lr may differ)."""
    return _data_key(run.setup.data), group_key(run.model, run.setup.train)


def _groups(runs: list[TrialRun]) -> list[list[TrialRun]]:
    """The runs in groups that fuse, in claim order. Two runs of one folder (a TPE trial sampled twice) never
    share a group: the second trains in a later group and resumes the first's checkpoint, as it would alone."""
    groups: list[list[TrialRun]] = []
    for run in runs:
        fits = lambda g: fuse_key(g[0]) == fuse_key(run) and all(r.run_dir != run.run_dir for r in g)
        group = next((g for g in groups if fits(g)), None)
        if group is None:
            groups.append([run])
        else:
            group.append(run)
    return groups


def train_trials(runs: list[TrialRun], plan: Plan, checks: list[Callable[[], None]],
                 left: Callable[[TrialRun, Exception], None] | None = None) -> list[TrainResult | Exception]:
    """Train set-up trials that fuse (one `fuse_key`) as one group (`dse.train.train_group`), each in its run
    folder (held locked), resuming its checkpoint; after each epoch each checks it is still ours (its `check`),
    records its curves and lets the pruner decide. A trial that leaves the group then (pruned, taken over, ...)
    lets go of its folder and goes to `left` at once; the others go on. Returns, per trial, its TrainResult or
    the exception it left with."""
    outcomes: list[TrainResult | Exception | None] = [None] * len(runs)
    with contextlib.ExitStack() as stack:
        folders = [stack.enter_context(contextlib.ExitStack()) for _ in runs]  # one per run: released when it leaves

        def leave(i: int, e: Exception) -> None:
            folders[i].close()
            if left is not None:
                left(runs[i], e)

        for i, (run, check) in enumerate(zip(runs, checks)):
            try:
                check()  # it may have waited for an earlier group
                folders[i].enter_context(hold_run_dir(run.run_dir, check))
            except Exception as e:  # taken over meanwhile
                outcomes[i] = e
        if all(o is not None for o in outcomes):
            return outcomes
        # The run folders first: a process waiting for one must not hold up latency measurements meanwhile.
        boundary = stack.enter_context(training_turns())
        members = {i: Member(run.model, run.setup.train, run.run_dir / "checkpoint.pt",
                             _on_epoch(run, plan, check, boundary, lambda e, i=i: leave(i, e)))
                   for i, (run, check) in enumerate(zip(runs, checks)) if outcomes[i] is None}  # fmt: skip
        results = train_group(list(members.values()), runs[0].splits)
        for i, result in zip(members, results):
            outcomes[i] = result
    return outcomes


def _report_epoch(trial: optuna.Trial, epoch: int, val_acc: float) -> None:
    """The epoch's validation accuracy as an Optuna intermediate value (the dashboard's curves; Optuna's own
    pruners read it). `Trial.report` refuses multi-objective studies, so those write through the storage."""
    if len(trial.study.directions) == 1:
        trial.report(val_acc, epoch)
    else:
        trial.storage.set_trial_intermediate_value(trial._trial_id, epoch, val_acc)


def record_result(run: TrialRun, result: TrainResult, plan: Plan, train_started: float) -> list[float]:
    """Record a finished training (curves, test accuracy, speed, artifacts); return the objective values."""
    trial = run.trial
    curves = [asdict(r) for r in result.epochs]
    train_seconds = sum(r["seconds"] for r in curves[result.resumed_from:]) if curves else 0.0
    _set_attrs(trial, {
        "curves": curves, "test_acc": result.test_acc, "s_per_epoch": result.seconds_per_epoch,
        "images_per_s": curves[-1]["images_per_s"] if curves else None, "resumed_from": result.resumed_from,
        "split": result.split, "device": str(result.device), "precision": result.precision,
        "memory_format": result.memory_format, "train_seconds": train_seconds,
        "train_call_seconds": time.perf_counter() - train_started,  # training + evaluation; the rest is overhead
    })
    _upload(trial, plan, run.run_dir, curves)
    trial.set_user_attr("trial_seconds", time.perf_counter() - run.started)
    metrics = {"val_acc": result.epochs[-1].val_acc, "size_mb": run.prof.size_mb, "latency_ms": run.latency_ms}
    return [metrics[m] for m in plan.study_cfg.objectives]


def _tell(study: optuna.Study, trial: optuna.Trial, *, values: list[float] | None = None,
          state: TrialState | None = None, reason: str | None = None) -> FrozenTrial | None:
    """Finish a trial; None when another worker finished it first (it failed the trial as stale)."""
    try:
        if reason is not None:
            trial.set_user_attr("fail_reason", reason)
        return study.tell(trial, values, state=state)
    except (UpdateFinishedTrialError, ValueError):
        if study._storage.get_trial(trial._trial_id).state == TrialState.RUNNING:
            raise  # a real error (e.g. a value Optuna refuses), not a takeover
        return None


def finish_trial(study: optuna.Study, trial: optuna.Trial, values: list[float] | None = None) -> FrozenTrial | None:
    """COMPLETE with `values`, or PRUNED without; None when the trial was taken over meanwhile."""
    return _tell(study, trial, values=values, state=TrialState.COMPLETE if values is not None else TrialState.PRUNED)


def fail_trial(study: optuna.Study, trial: optuna.Trial, reason: str, *, counted: bool, max_retry: int) -> str:
    """FAIL the trial with its reason and queue its retry (see `requeue`); says what happened."""
    frozen = _tell(study, trial, state=TrialState.FAIL, reason=reason)
    if frozen is None:
        return "taken over by another worker"
    if requeue(study, frozen, counted=counted, max_retry=max_retry):
        return "retry queued" + (f" ({frozen.system_attrs.get('dse:failures', 0) + 1} of {max_retry})" if counted else "")
    return f"no retry left (study.max_retry={max_retry})"


def run_trials(study: optuna.Study, trials: list[optuna.Trial], plan: Plan, cache: dict, beat: Heartbeat,
               raw: RDBStorage, worker: int = 0) -> None:
    """Claimed trials from set-up to their end states, their heartbeats beating meanwhile. Those that fuse
    (`fuse_key`) train as one group; groups that do not train one after the other (whether separate CUDA
    streams would gain over that is unmeasured). Each trial ends on its own and at once: pruned, failed (its
    retry queued), taken over or finished, while the others go on."""
    grace, max_retry = plan.study_cfg.grace_period, plan.study_cfg.max_retry
    for trial in trials:
        beat.add(trial._trial_id, patience=plan.study_cfg.storage_retry_seconds)  # a heartbeat exists before "worker"
    going = {t._trial_id: t for t in trials}  # not ended yet

    def end(trial: optuna.Trial, outcome: TrainResult | BaseException, run: TrialRun | None = None, started: float = 0.0):
        if trial._trial_id in going:
            _end_trial(study, trial, outcome, plan, run, started, worker)
            beat.remove(trial._trial_id)
            del going[trial._trial_id]

    try:
        for trial in trials:  # all marked before any set-up, which takes a while (see fail_stale)
            trial.set_user_attr("worker", _worker_id())
        runs = []
        for trial in trials:
            try:
                runs.append(setup_trial(trial, plan, cache))
            except Exception as e:  # over budget (TrialPruned), a config that fails, ...
                end(trial, e)
        for group in _groups(runs):
            started = time.perf_counter()
            checks = [lambda r=run: check_ours(raw, r.trial._trial_id, beat, grace) for run in group]
            try:
                outcomes = train_trials(group, plan, checks, left=lambda run, e: end(run.trial, e))
            except Exception as e:  # the whole group failed (out of memory, say): so did each trial still in it
                outcomes = [e] * len(group)
            for run, outcome in zip(group, outcomes):
                end(run.trial, outcome, run, started)
    except BaseException:  # Ctrl-C, SystemExit, the storage gone: not the trials' fault
        for trial in going.values():
            with contextlib.suppress(Exception):
                fail_trial(study, trial, INTERRUPTED, counted=False, max_retry=max_retry)
        raise
    finally:
        for trial in trials:
            beat.remove(trial._trial_id)


def _end_trial(study: optuna.Study, trial: optuna.Trial, outcome: TrainResult | BaseException, plan: Plan,
               run: TrialRun | None, started: float, worker: int) -> None:
    """Finish a trial with its outcome: COMPLETE with its recorded result, PRUNED, or FAIL with its retry queued
    (not counted against `max_retry` when it was taken over); one line says which."""
    max_retry, frozen, note = plan.study_cfg.max_retry, None, ""
    try:
        if isinstance(outcome, TrainingDiverged):
            trial.set_user_attr("pruned_reason", f"diverged: {outcome}")
            raise optuna.TrialPruned(f"diverged: {outcome}")
        if isinstance(outcome, BaseException):
            raise outcome
        frozen = finish_trial(study, trial, record_result(run, outcome, plan, started))
    except optuna.TrialPruned:
        frozen = finish_trial(study, trial)
    except (TrialLost, UpdateFinishedTrialError) as e:  # the trial was taken over: its retry carries on
        note = fail_trial(study, trial, f"stopped: {e}", counted=False, max_retry=max_retry)
    except Exception as e:  # the trial's own failure (a bad checkpoint, a full disk, ...)
        note = fail_trial(study, trial, f"{type(e).__name__}: {e}", counted=True, max_retry=max_retry)
    if not plan.progress:  # else the main process's progress bar prints the line (progress.watching)
        note = note or ("" if frozen else "taken over by another worker, whose retry records the result")
        line = trial_line(frozen or study._storage.get_trial(trial._trial_id), worker)
        tqdm.write(line + (f"; {note}" if note else ""))


def _prune_if_dominated(trial: optuna.Trial, record, size: float, latency: float, cfg: StudyConfig) -> None:
    """The pareto pruner: its evidence is the shared study (finished and running trials), never this process."""
    others = trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
    me = History(trial.number, size, latency, {record.epoch: record.val_acc})
    decision = decide(me, record.epoch, histories(others), cfg.pruning)
    if decision is not None:
        _record_pruned(trial, decision.epoch, decision.accuracy, decision.dominated_by, decision.reason())


def _record_pruned(trial: optuna.Trial, epoch: int, accuracy: float, by: int | None, reason: str) -> None:
    _set_attrs(trial, {"pruned_at_epoch": epoch, "pruned_val_acc": accuracy, "dominated_by": by, "pruned_reason": reason})
    raise optuna.TrialPruned(reason)


def _fixed_params(trial: optuna.Trial) -> dict:
    """The params a queued (enqueued or retried) trial was created with; empty for a sampled one."""
    return trial.storage.get_trial_system_attrs(trial._trial_id).get("fixed_params", {})


def _suggest(trial: optuna.Trial, space: SpaceConfig) -> dict:
    params = dict(_fixed_params(trial))  # a retried trial keeps its params
    for key, dist in space.search.items():
        if "choices" in dist:
            params[key] = trial.suggest_categorical(key, [_param_value(c) for c in dist["choices"]])
        else:
            params[key] = trial.suggest_float(key, dist["low"], dist["high"], log=bool(dist.get("log")))
    params["seed"] = space.seeds[0]
    return params


def _upload(trial: optuna.Trial, plan: Plan, run_dir: Path, curves: list[dict]) -> None:
    from optuna.artifacts import FileSystemArtifactStore, upload_artifact

    store_dir = Path(plan.workdir) / "artifacts"
    store_dir.mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(str(store_dir))
    curves_path = run_dir / "curves.json"
    curves_path.write_text(json.dumps(curves, indent=1))
    for path, mimetype in ((run_dir / "checkpoint.pt", "application/octet-stream"), (curves_path, "application/json")):
        artifact_id = upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial, mimetype=mimetype)
        trial.set_user_attr(f"artifact_{path.stem}", artifact_id)


def _todo(study: optuna.Study, plan: Plan) -> str:
    """'work' if a trial can start, 'wait' while others run (they may die and be retried), else 'done'."""
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    if TrialState.WAITING in states or not plan.grid and len(_chains(trials)) < plan.space_cfg.n_trials:
        return "work"
    return "wait" if TrialState.RUNNING in states else "done"


def _open(plan: Plan, *, retries: bool = True) -> RDBStorage:
    """The study's storage as a worker uses it: stale trials are retried; storage calls retried (or not,
    for the heartbeat thread and the ownership check, which must not block)."""
    cfg = plan.study_cfg
    return open_storage(plan.storage, heartbeat_interval=cfg.heartbeat_interval, grace_period=cfg.grace_period,
                        on_stale=_stale_callback(cfg.max_retry), retry_seconds=cfg.storage_retry_seconds if retries else 0)


def work(plan: Plan, worker: int = 0) -> int:
    """One worker: claim and run trials until the space is done; return how many this worker ran."""
    torch.set_num_threads(plan.threads)
    if torch.cuda.is_available():  # workers split the GPUs round-robin ("auto" and "cuda" use this one)
        torch.cuda.set_device(worker % torch.cuda.device_count())
    storage, raw = _open(plan), _open(plan, retries=False)
    study = optuna.load_study(
        study_name=plan.study_name, storage=storage, sampler=make_sampler(plan, worker), pruner=make_pruner(plan)
    )
    cache: dict = {}
    ran, size = 0, plan.group_size
    with Heartbeat(raw, plan.study_cfg.heartbeat_interval) as beat:
        while True:
            fail_stale(study, storage, plan)
            todo = _todo(study, plan)
            if todo == "done":
                return ran
            if todo == "work" and size is None:
                size = group_size(plan, cache, worker)
            trials = claim_trials(study, storage, plan, size) if todo == "work" else []
            if not trials:
                time.sleep(min(plan.study_cfg.heartbeat_interval, 5) if todo == "wait" else 0.1)
                continue
            run_trials(study, trials, plan, cache, beat, raw, worker)
            ran += len(trials)


def group_size(plan: Plan, cache: dict, worker: int = 0) -> int:
    """How many trials this worker claims and trains together: `sweep.trials_per_gpu`, or for auto what
    `dse.train.pick_group_size` measures on this worker's device for the space's costliest trial config (the
    most memory; smaller models may gain more), sizes up to the space's trial count; one line says so."""
    if plan.group_size is not None:
        return plan.group_size
    params = max(zip(plan.cost, plan.grid), key=lambda cp: cp[0])[1] if plan.grid else {}  # TPE/NSGA-II: the base config
    setup = _worker_setup(typed(compose(plan.overrides(params))), plan)
    total = len(plan.grid) or plan.space_cfg.n_trials
    try:
        splits = _load(setup, cache)
        torch.manual_seed(setup.train.seed)
        model = build_model(setup.model, num_classes=splits.num_classes, in_channels=splits.in_channels)
        size, rates = pick_group_size(model, splits, setup.train, sizes=[s for s in (1, 2, 4, 8, 16) if s <= max(total, 1)])
    except Exception as e:  # noqa: BLE001 - a probe that fails costs speed, not trials: their own errors are recorded
        tqdm.write(f"[worker {worker}] sweep.trials_per_gpu=auto: 1 (the probe failed: {type(e).__name__}: {e})")
        return 1
    measured = ", ".join(f"{n}: {rate:.0f}" for n, rate in rates.items())
    tqdm.write(f"[worker {worker}] sweep.trials_per_gpu=auto: {size} on {resolve_device(setup.train.device)} "
               f"(training images/s of {paper_name(setup.model)} by group size, {measured}; the largest adding 10 % is kept)")
    return size


def _interrupted(signum, frame) -> None:
    """Ctrl-C: stop at once, quietly. A second Ctrl-C does not break the cleanup (the running trial is failed
    as interrupted and queued again: it resumes from its checkpoint); Optuna logs no traceback for it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    raise KeyboardInterrupt


def _worker_entry(plan: Plan, worker: int) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial replaces Optuna's
    signal.signal(signal.SIGINT, _interrupted)
    register_schemas()
    try:
        work(plan, worker)
    except KeyboardInterrupt:
        sys.exit(130)
    except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as e:
        if not transient(e):
            raise
        raise SystemExit(f"[worker {worker}] stopped: storage unreachable for over {plan.study_cfg.storage_retry_seconds:g} s "
                         "(study.storage_retry_seconds)") from None


# ---------------------------------------------------------------- the command


@dataclass
class Outcome:
    """Where the space stands after a run: trials by end state, why the last ones failed, workers that died."""

    total: int
    complete: int
    pruned: int
    failed: int  # retries used up
    left: int  # not finished: queued, running, or never started
    reasons: list[str] = field(default_factory=list)
    workers: list[str] = field(default_factory=list)  # "worker 1 exited with code -9"

    @property
    def ok(self) -> bool:
        return not (self.failed or self.left or self.workers)

    def counts(self) -> str:
        return f"{self.complete} complete, {self.pruned} pruned, {self.failed} failed, {self.left} left"

    def problems(self) -> str:
        parts = [f"{n} of {self.total} trials {what}" for n, what in
                 ((self.failed, "FAILED with no retry left"), (self.left, "not finished")) if n]  # fmt: skip
        if self.reasons:
            parts.append("last failures: " + "; ".join(self.reasons))
        parts += self.workers
        return ", ".join(parts) + ". Fix the cause and run the same command again: finished trials are kept"


def tally(study: optuna.Study, plan: Plan, workers: list[str] = ()) -> Outcome:
    """Count the space's trials by chain (a point x seed and its retries): finished, failed for good, left."""
    trials = study.get_trials(deepcopy=False)
    chains = _chains(trials)
    if plan.grid:
        chains = {key: chains.get(key, []) for key in map(_params_key, plan.grid)}
    total = len(plan.grid) or plan.space_cfg.n_trials
    states = [_chain_state(ts) for ts in chains.values()]
    complete, pruned, failed = (states.count(s) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
    last = [ts[-1] for ts in chains.values() if _chain_state(ts) == TrialState.FAIL]
    reasons = [f"trial {t.number}: {_reason(t)}" for t in sorted(last, key=lambda t: t.number)[-3:]]
    return Outcome(total, complete, pruned, failed, max(0, total - complete - pruned - failed), reasons, list(workers))


def _reason(t: FrozenTrial) -> str:
    reason = t.user_attrs.get("fail_reason") or "its worker stopped sending heartbeats (killed, or lost the storage)"
    return reason.splitlines()[0][:300]


def prepare_study(plan: Plan) -> tuple[optuna.Study, int]:
    """Create the study or check this run against its definition, retry stale trials and queue what is
    missing; return the study and how many trials were queued. Sweeps of one study that start at once
    take turns here (`storage_lock`): one creates and queues, the others find it done."""
    storage = _open(plan)
    with storage_lock(plan.storage):
        study = create_or_check_study(plan.study_name, storage, objectives=plan.study_cfg.objectives,
                                      definition=plan.definition, sampler=make_sampler(plan), user_attrs={
            "space": plan.space, "tables": plan.space["tables"], "command_line": plan.cli, "created_by": f"dse {dse.__version__}",
        })  # fmt: skip
        fail_stale(study, storage, plan)
        return study, enqueue_missing(study, plan)


def run_sweep(plan: Plan) -> Outcome:
    """Prepare the study, measure the grid's latencies, run the workers with a progress bar, print a summary
    (counts, the front, the next commands); return the outcome."""
    study, _ = prepare_study(plan)
    claim_workdir(Path(plan.workdir))
    total = len(plan.grid) if plan.grid else plan.space_cfg.n_trials
    print(start_line(study, plan.storage, total, plan.workers, plan.threads), flush=True)
    started = time.perf_counter()
    if _todo(study, plan) == "done":
        print("nothing to do: every trial of the space is finished", flush=True)
        outcome = tally(study, plan)
        print(summary(study, plan.storage, outcome.counts()), flush=True)
        return outcome
    measure_grid_latency(study, plan)
    costs = {_params_key(p): c for p, c in zip(plan.grid, plan.cost or [1.0] * len(plan.grid))}
    died: list[str] = []
    with watching(study, costs=costs, n_trials=total, enabled=plan.progress):
        if plan.workers == 1:
            work(plan)
        else:
            context = multiprocessing.get_context("spawn")
            procs = [context.Process(target=_worker_entry, args=(plan, i), daemon=False) for i in range(plan.workers)]
            for p in procs:
                p.start()
            _wait(procs, lambda: _reap(study, procs, plan, died))
    save_curves_chart(study)
    outcome = tally(study, plan, died)
    print(summary(study, plan.storage, f"done in {duration(time.perf_counter() - started)}: {outcome.counts()}"), flush=True)
    print(f"checkpoints and artifacts: {Path(plan.workdir)}", flush=True)
    return outcome


def measure_grid_latency(study: optuna.Study, plan: Plan) -> None:
    """Before any training: the latency of every architecture of the grid the study has no figure of, in one
    sitting in this process (interleaved, so they compare), training of other sweeps on this machine paused."""
    if not plan.archs:
        return
    how = "before training, in one sitting by the sweep's main process, training on this machine paused"
    figures = ensure(study, {k: (lambda spec=spec: build(spec)) for k, spec in plan.archs.items()}, how)
    loaded = sum(f["under_load"] for f in figures.values())
    ms = [f["ms"] for f in figures.values()]
    print(f"latency of the {len(figures)} architecture(s): {min(ms):.3f}-{max(ms):.3f} ms batch-1 CPU"
          + (f"; {loaded} measured under load (other processes kept the cores busy)" if loaded else ""), flush=True)


def _reap(study: optuna.Study, procs: list, plan: Plan, died: list[str]) -> None:
    """A worker that died (killed, out of memory) fails its running trials at once, as their own failure."""
    for i, p in enumerate(procs):
        if p.exitcode in (None, 0) or any(d.startswith(f"worker {i} ") for d in died):
            continue
        died.append(f"worker {i} exited with code {p.exitcode}")
        host_pid = f"{socket.gethostname()}:{p.pid}"
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.user_attrs.get("worker") == host_pid:
                note = fail_trial(study, optuna.Trial(study, t._trial_id), f"its worker process died (exit code {p.exitcode})",
                                  counted=True, max_retry=plan.study_cfg.max_retry)
                tqdm.write(f"[worker {i}] died (exit code {p.exitcode}) in trial {t.number}; {note}")


def _wait(procs: list, on_tick: Callable[[], None]) -> None:
    """Wait for the worker processes, calling `on_tick` meanwhile and once at the end; on Ctrl-C, pass it on
    to them, give them time to fail their trials (as interrupted: queued again), then stop the ones still
    running."""
    try:
        while any(p.is_alive() for p in procs):
            time.sleep(0.5)
            on_tick()
    except KeyboardInterrupt:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGINT)
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
        raise
    finally:
        for p in procs:
            p.join()
    on_tick()


def _main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    signal.signal(signal.SIGINT, _interrupted)
    cli = list(HydraConfig.get().overrides.task)
    try:
        plan = plan_sweep(cfg, cli)
        outcome = run_sweep(plan)
    except (ValueError, StudyError, DataError) as e:
        raise SystemExit(f"dse.sweep: {e}") from None
    except KeyboardInterrupt:
        print("dse.sweep: interrupted; finished trials are kept in the study; run the same command again to resume "
              "(interrupted trials continue from their last checkpoint)", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as e:
        if not transient(e):
            raise
        raise SystemExit(f"dse.sweep: the storage was unreachable for over study.storage_retry_seconds; "
                         f"run the same command again to resume ({type(e).__name__})") from None
    if not outcome.ok:
        raise SystemExit(f"dse.sweep: {outcome.problems()}")


def main() -> None:
    """`python -m dse.sweep +space=NAME [overrides]`, or `python -m dse.sweep --list [NAME]`."""
    import hydra

    if "--list" in sys.argv[1:]:  # before Hydra, which would take it for an override
        raise SystemExit(list_studies(sys.argv[1:]))
    register_schemas()
    hydra.main(version_base="1.3", config_path="../conf", config_name="sweep")(_main)()


if __name__ == "__main__":
    main()
