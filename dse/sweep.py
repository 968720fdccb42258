"""The sweep: Hydra composes each trial's config, Optuna drives the trials (a grid queue, or TPE/NSGA-II)
through the shared trainer, several workers per machine, heartbeats and resumable trials."""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState
from tqdm.auto import tqdm

import dse
from dse.checkpoint import CheckpointError
from dse.config import SpaceConfig, StudyConfig, SweepConfig, register_schemas, to_object
from dse.data import DataConfig, DataError, Splits, load_data
from dse.measure import count_macs, profile
from dse.models import ModelConfig, build_model, config_from_name, paper_name, resolve_config
from dse.pruning import History, decide, histories, rungs
from dse.study import (
    StudyError,
    check_storage,
    create_or_check_study,
    default_storage,
    open_storage,
    study_workdir,
)
from dse.train import TrainConfig, TrainingDiverged, train

__all__ = ["Plan", "plan_sweep", "run_sweep", "trial_overrides", "work", "main"]

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# Heartbeats, their retry callback and fail_stale_trials are marked experimental; we rely on them knowingly.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
REPO = CONF_DIR.parent
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class QueueDrained(RuntimeError):
    """Another worker took the last queued grid trial between our check and our ask."""


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
    grid: list[dict] = field(default_factory=list)  # the fixed params of every grid trial
    cost: list[float] = field(default_factory=list)  # each grid trial's training MACs: queued largest first

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


def _hydra_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
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


def typed(cfg: DictConfig) -> TrialSetup:
    """The composed config as typed dataclasses; bad values raise ValueError naming them."""
    model = to_object(ModelConfig, cfg.model)
    data = to_object(DataConfig, cfg.data)
    train_cfg = to_object(TrainConfig, cfg.train)
    resolve_config(model)
    with torch.device("meta"):  # builds every layer (checks every knob) without allocating weights
        build_model(model, num_classes=10, in_channels=1 if data.name == "fashion_mnist" else 3)
    return TrialSetup(model, data, train_cfg, OmegaConf.to_container(cfg, resolve=True))


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


def plan_sweep(cfg: DictConfig, cli: list[str]) -> Plan:
    """Validate the whole sweep (every grid trial's config, the storage, the study) before any trial runs."""
    if "space" not in cfg:
        spaces = sorted(p.stem for p in (CONF_DIR / "space").glob("*.yaml"))
        raise ValueError(f"no search space given; add +space=NAME, one of: {', '.join(spaces)}")
    space = to_object(SpaceConfig, cfg.space)
    study = to_object(StudyConfig, cfg.study)
    sweep = to_object(SweepConfig, cfg.sweep)
    seeds = space.seeds[: sweep.seeds] if sweep.seeds else space.seeds
    static = [o for o in space.overrides if _key(o) not in {_key(c) for c in cli}]
    storage = study.storage or default_storage(study.name)
    fixed = [f"study.name={study.name}", f"study.storage={storage}"]
    cores = os.cpu_count() or 1
    workers = sweep.workers or (torch.cuda.device_count() or cores)
    plan = Plan(
        study_name=study.name, storage=storage, workdir=str(study_workdir(study.name, storage, study.workdir)),
        static=static, cli=cli, fixed=fixed, space=asdict(space), study=asdict(study), workers=workers,
        threads=sweep.threads or max(1, cores // workers), progress=sweep.progress,
        grid=grid_params(space, seeds) if space.sampler == "grid" else [],
    )
    if plan.grid:
        setups = [typed(compose(plan.overrides(p))) for p in tqdm(plan.grid[:: len(seeds)], desc="checking configs", leave=False, disable=len(plan.grid) < 20)]
    else:
        setups = _check_search(space, merge_overrides(static, cli, fixed))
    check_storage(storage)
    data = {_data_key(s.data): s.data for s in setups}
    # Downloads a missing dataset now, or stops with why, before any trial starts.
    loaded = {key: load_data(cfg) for key, cfg in data.items()}
    if plan.grid:
        plan.cost = [training_cost(s, loaded[_data_key(s.data)]) for s in setups for _ in seeds]
    return plan


def _data_key(data: DataConfig) -> str:
    return json.dumps(asdict(data), sort_keys=True)


def _check_search(space: SpaceConfig, base: list[str]) -> list[TrialSetup]:
    """Each choice and each range end of a TPE/NSGA-II space composes into a valid config."""
    setups = [typed(compose(base))]
    for key, dist in space.search.items():
        if "choices" in dist:
            values = list(dist["choices"])
        elif {"low", "high"} <= set(dist):
            if not dist["low"] < dist["high"]:
                raise ValueError(f"space {space.name!r}: {key} low={dist['low']} must be < high={dist['high']}")
            values = [dist["low"], dist["high"]]
        else:
            raise ValueError(f"space {space.name!r}: {key}={dist} needs choices: [...] or low/high")
        for value in values:
            setups.append(typed(compose(merge_overrides(base, [f"{key}={_hydra_value(value)}"]))))
    return setups


def make_sampler(plan: Plan, worker: int = 0) -> optuna.samplers.BaseSampler:
    space, study = plan.space_cfg, plan.study_cfg
    seed = study.sampler_seed + worker
    # Budgets reach the sampler as the constraints each trial sets (Trial.set_constraint, in `objective`).
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


def enqueue_grid(study: optuna.Study, plan: Plan) -> int:
    """Queue every grid trial that has no trial yet (finished, running or queued), the costliest first so
    that parallel workers do not end waiting on one big model; return how many."""
    have = {
        json.dumps(t.params or t.system_attrs.get("fixed_params", {}), sort_keys=True)
        for t in study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING, TrialState.WAITING))
    }
    cost = plan.cost or [0.0] * len(plan.grid)
    ranked = sorted(zip(plan.grid, cost), key=lambda pc: -pc[1])  # stable: equal costs keep the grid's order
    todo = [p for p, _ in ranked if json.dumps(p, sort_keys=True) not in have]
    for params in todo:
        study.enqueue_trial(params)
    return len(todo)


# ---------------------------------------------------------------- the trial (worker processes)


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


def _run_key(overrides: list[str]) -> str:
    """A trial's run folder: the same config (a retried trial too) maps to the same checkpoint."""
    return hashlib.sha256("\n".join(sorted(overrides)).encode()).hexdigest()[:16]


def _set_attrs(trial: optuna.Trial, attrs: dict) -> None:
    for key, value in attrs.items():
        trial.set_user_attr(key, value)


def objective(trial: optuna.Trial, plan: Plan, cache: dict) -> tuple[float, float, float]:
    """Build, profile (budgets checked before training), train, record; return the three objectives."""
    started = time.perf_counter()
    space = plan.space_cfg
    if space.sampler == "grid":
        params = _fixed_params(trial)
        if not params:
            raise QueueDrained("no queued grid trial was left for this worker")
        for key in params:
            trial.suggest_categorical(key, plan.choices(key))
    else:
        params = _suggest(trial, space)
    overrides = plan.overrides(params)
    setup = typed(compose(overrides))
    key = json.dumps(asdict(setup.data), sort_keys=True)
    if key not in cache:
        cache.clear()
        cache[key] = load_data(setup.data)
    splits = cache[key]
    torch.manual_seed(setup.train.seed)
    model = build_model(setup.model, num_classes=splits.num_classes, in_channels=splits.in_channels)
    prof = profile(model, tuple(splits.train_x.shape[1:]), threads=1)
    full = resolve_config(setup.model)
    _set_attrs(trial, {
        "worker": f"{socket.gethostname()}:{os.getpid()}", "paper_name": paper_name(setup.model), "family": full.name, "blocks": full.blocks, "width": full.width,
        "dropout": full.dropout, "activation": full.activation, "inplace": full.inplace,
        "dataset": setup.data.name, "optimizer": setup.train.optimizer, "lr": setup.train.lr,
        "epochs_planned": setup.train.epochs, "seed": setup.train.seed,
        "params": prof.params, "macs": prof.macs, "size_bytes": prof.size_bytes, "size_mb": prof.size_mb,
        "int8_mb": prof.int8_mb, "latency_ms": prof.latency_ms, "latency_iqr_ms": prof.latency_iqr_ms,
        "latency_threads": prof.threads, "overrides": overrides, "provenance": _provenance(setup.resolved),
    })
    study_cfg = plan.study_cfg
    limits = [(prof.size_bytes / 1e3, study_cfg.max_size_kb, "size", "KB"), (prof.latency_ms, study_cfg.max_latency_ms, "latency", "ms")]
    for value, limit, what, unit in limits:
        if limit:  # Optuna's constraint (<= 0 is feasible), set before training so that a pruned trial has it too
            trial.set_constraint(f"{what}_{unit.lower()}", value - limit)
    over = [f"{what} {value:.1f} {unit} > {limit:g} {unit}" for value, limit, what, unit in limits if limit and value > limit]
    if over:
        reason = "over budget: " + ", ".join(over)
        trial.set_user_attr("pruned_reason", reason)
        raise optuna.TrialPruned(reason)
    run_dir = Path(plan.workdir) / "runs" / _run_key(overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = run_dir / "checkpoint.pt"

    live: list[dict] = []
    rung_epochs = set(rungs(study_cfg.pruning, setup.train.epochs))

    def on_epoch(record) -> None:  # the curves so far, for the dashboard and the pruner
        live.append(asdict(record))
        trial.set_user_attr("curves", live)
        if study_cfg.pruner == "pareto" and record.epoch in rung_epochs:
            _prune_if_dominated(trial, record, prof.size_mb, prof.latency_ms, study_cfg)
        elif study_cfg.pruner not in ("none", "pareto"):
            trial.report(record.val_acc, record.epoch)
            if trial.should_prune():
                _record_pruned(trial, record.epoch, record.val_acc, None, f"{study_cfg.pruner} pruner at epoch {record.epoch}")

    train_cfg = setup.train
    train_cfg.threads = plan.threads
    train_cfg.progress = train_cfg.progress and plan.progress and plan.workers == 1
    train_started = time.perf_counter()
    try:
        result = train(model, splits, train_cfg, checkpoint_path=checkpoint, on_epoch=on_epoch)
    except TrainingDiverged as e:
        trial.set_user_attr("pruned_reason", f"diverged: {e}")
        raise optuna.TrialPruned(f"diverged: {e}") from None
    curves = [asdict(r) for r in result.epochs]
    train_seconds = sum(r["seconds"] for r in curves[result.resumed_from:]) if curves else 0.0
    _set_attrs(trial, {
        "curves": curves, "test_acc": result.test_acc, "s_per_epoch": result.seconds_per_epoch,
        "images_per_s": curves[-1]["images_per_s"] if curves else None, "resumed_from": result.resumed_from,
        "split": result.split, "device": str(result.device), "precision": result.precision,
        "memory_format": result.memory_format, "train_seconds": train_seconds,
        "train_call_seconds": time.perf_counter() - train_started,  # training + evaluation; the rest is overhead
    })
    _upload(trial, plan, run_dir, curves)
    trial.set_user_attr("trial_seconds", time.perf_counter() - started)
    metrics = {"val_acc": result.epochs[-1].val_acc, "size_mb": prof.size_mb, "latency_ms": prof.latency_ms}
    return tuple(metrics[m] for m in study_cfg.objectives)


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
    states = [t.state for t in study.get_trials(deepcopy=False)]
    waiting, running = states.count(TrialState.WAITING), states.count(TrialState.RUNNING)
    if plan.space_cfg.sampler == "grid":
        return "work" if waiting else "wait" if running else "done"
    finished = sum(s in FINISHED for s in states)
    if waiting or finished + running < plan.space_cfg.n_trials:
        return "work"
    return "wait" if running else "done"


def work(plan: Plan, worker: int = 0) -> int:
    """One worker: run trials until the space is done; return how many this worker ran."""
    torch.set_num_threads(plan.threads)
    if torch.cuda.is_available():  # workers split the GPUs round-robin ("auto" and "cuda" use this one)
        torch.cuda.set_device(worker % torch.cuda.device_count())
    study_cfg = plan.study_cfg
    storage = open_storage(plan.storage, heartbeat_interval=study_cfg.heartbeat_interval,
                           grace_period=study_cfg.grace_period, max_retry=study_cfg.max_retry)
    study = optuna.load_study(
        study_name=plan.study_name, storage=storage, sampler=make_sampler(plan, worker), pruner=make_pruner(plan)
    )
    cache: dict = {}
    ran = 0
    while True:
        optuna.storages.fail_stale_trials(study)
        todo = _todo(study, plan)
        if todo == "done":
            return ran
        if todo == "wait":
            time.sleep(min(study_cfg.heartbeat_interval, 5))
            continue
        study.optimize(
            lambda t: objective(t, plan, cache), n_trials=1, gc_after_trial=False,
            catch=(QueueDrained, CheckpointError, ValueError),
            callbacks=[lambda _, t: _log_trial(t, worker)],
        )
        ran += 1


def _log_trial(t: optuna.trial.FrozenTrial, worker: int) -> None:
    """One line per finished trial."""
    a = t.user_attrs
    if t.state == TrialState.COMPLETE:
        what = (f"val {100 * a['curves'][-1]['val_acc']:.2f}%  test {100 * a.get('test_acc', float('nan')):.2f}%  "
                f"{a['size_mb']:.3f} MB  {a['latency_ms']:.2f} ms  {a.get('s_per_epoch', 0):.1f} s/epoch")
    else:
        what = a.get("pruned_reason", t.state.name)
    tqdm.write(f"[worker {worker}] trial {t.number} {a.get('paper_name', '')} seed {a.get('seed', '')}: {what}")


def _worker_entry(plan: Plan, worker: int) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial replaces Optuna's
    register_schemas()
    work(plan, worker)


# ---------------------------------------------------------------- the command


def run_sweep(plan: Plan) -> optuna.Study:
    """Create or check the study, queue the grid, run the workers, print a summary."""
    study_cfg = plan.study_cfg
    storage = open_storage(plan.storage, heartbeat_interval=study_cfg.heartbeat_interval,
                           grace_period=study_cfg.grace_period, max_retry=study_cfg.max_retry)
    study = create_or_check_study(plan.study_name, storage, objectives=study_cfg.objectives, sampler=make_sampler(plan), user_attrs={
        "space": plan.space, "tables": plan.space["tables"], "command_line": plan.cli, "created_by": f"dse {dse.__version__}",
    })
    queued = enqueue_grid(study, plan) if plan.grid else 0
    total = len(plan.grid) if plan.grid else plan.space_cfg.n_trials
    done = sum(t.state in FINISHED for t in study.get_trials(deepcopy=False))
    print(f"study {plan.study_name!r} in {plan.storage}: {total} trials in the space, {done} finished, {queued} queued now; "
          f"{plan.workers} worker(s) x {plan.threads} thread(s)", flush=True)
    started = time.perf_counter()
    optuna.storages.fail_stale_trials(study)
    if _todo(study, plan) == "done":
        print("nothing to do: every trial of the space is finished", flush=True)
        return study
    if plan.workers == 1:
        work(plan)
    else:
        context = multiprocessing.get_context("spawn")
        procs = [context.Process(target=_worker_entry, args=(plan, i), daemon=False) for i in range(plan.workers)]
        for p in procs:
            p.start()
        _watch(study, procs, total, plan.progress)
    finished = [t for t in study.get_trials(deepcopy=False) if t.state in FINISHED]
    print(f"done in {time.perf_counter() - started:.1f} s: {sum(t.state == TrialState.COMPLETE for t in finished)} complete, "
          f"{sum(t.state == TrialState.PRUNED for t in finished)} pruned; artifacts in {Path(plan.workdir) / 'artifacts'}", flush=True)
    return study


def _watch(study: optuna.Study, procs: list, total: int, progress: bool) -> None:
    bar = tqdm(total=total, desc="trials", unit="trial", disable=not progress)
    try:
        while any(p.is_alive() for p in procs):
            time.sleep(2)
            finished = sum(t.state in FINISHED for t in study.get_trials(deepcopy=False))
            bar.update(min(finished, total) - bar.n)
    finally:
        for p in procs:
            p.join()
        bar.close()


def _main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cli = list(HydraConfig.get().overrides.task)
    try:
        plan = plan_sweep(cfg, cli)
        run_sweep(plan)
    except (ValueError, StudyError, DataError) as e:
        raise SystemExit(f"dse.sweep: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit("dse.sweep: interrupted; run the same command again to resume") from None


def main() -> None:
    """`python -m dse.sweep +space=NAME [overrides]`."""
    import hydra

    register_schemas()
    hydra.main(version_base="1.3", config_path="../conf", config_name="sweep")(_main)()


if __name__ == "__main__":
    main()
