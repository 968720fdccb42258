"""One trial in a worker: its set-up (params, config, data, model, measurements, budget, the study's numerics choice),
its run folder, its per-epoch reports (curves, intermediate values, the pruners' verdicts) and its recorded result."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState
from tqdm.auto import tqdm

import dse
from dse import identity, layouts
from dse.autotune import choose_memory_format, faster_layout
from dse.config import SpaceConfig
from dse.data import Splits, load_data
from dse.deployed import evaluate_deployed
from dse.identity import architecture
from dse.latency import ensure, trial_attrs
from dse.measure import ModelProfile, profile
from dse.metrics import METRICS, metric, split_metric
from dse.models import build_model, paper_name
from dse.pruning import History, decide, histories, rungs
from dse.step import resolve_device
from dse.storage import report_value
from dse.study import FINISHED
from dse.sweep.compose import REPO, TrialSetup, compose, data_key, param_value, trial_identity, typed
from dse.sweep.plan import GRID, Plan
from dse.sweep.queue import fixed_params
from dse.targets import figure_on_target
from dse.train import EpochRecord, TrainResult

__all__ = [
    "ReadyTrial",
    "worker_id",
    "worker_settings",
    "load_cached",
    "trial_folder",
    "run_folder",
    "hold_run_dir",
    "setup_trial",
    "over_budget",
    "epoch_reporter",
    "record_result",
]


@dataclass
class ReadyTrial:
    """A set-up trial: its config, data, model and measurements, and the folder it trains in."""

    trial: optuna.Trial
    setup: TrialSetup
    splits: Splits
    model: torch.nn.Module
    prof: ModelProfile
    latency_ms: float  # the architecture's figure (dse.latency), not the trial's own
    folder: Path
    started: float
    numerics: layouts.Numerics  # the study's choice for its architecture on this device kind (dse.layouts)
    known: dict = field(default_factory=dict)  # the metrics its architecture decides, by name (dse.metrics)


def worker_id() -> str:
    """This process as a trial's `worker` attribute names it: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def worker_settings(setup: TrialSetup, plan: Plan) -> TrialSetup:
    """The trainer's settings this worker decides (they change no result): its threads, a bar for one worker on a
    terminal (a log file gets no carriage returns)."""
    setup.train.threads = plan.threads
    setup.train.progress = setup.train.progress and plan.progress and plan.workers == 1 and sys.stderr.isatty()
    return setup


def load_cached(setup: TrialSetup, cache: dict) -> Splits:
    """The trial's data; the worker keeps the last dataset it loaded."""
    key = data_key(setup.data)
    if key not in cache:
        cache.clear()
        cache[key] = load_data(setup.data)
    return cache[key]


# ---------------------------------------------------------------- run folders


def trial_folder(plan: Plan, setup: TrialSetup) -> Path:
    """A trial's run folder: the same computation (a retried trial too) maps to the same checkpoint."""
    return Path(plan.workdir) / "runs" / identity.trial_key(trial_identity(setup))


def run_folder(plan: Plan, params: dict) -> Path:
    """Where the trial with these params trains and keeps its checkpoint."""
    return trial_folder(plan, typed(compose(plan.overrides(params))))


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


# ---------------------------------------------------------------- set-up


def setup_trial(trial: optuna.Trial, plan: Plan, cache: dict, *, probe: Callable[..., str] | None = None) -> ReadyTrial:
    """Fix the trial's params, compose its config, load its data (cached), build and profile its model, take the
    study's numerics choice for its architecture on this device kind (deciding it at the first such trial, with
    `probe`'s layout timing, if given, stored as advice) and record all that on the trial."""
    started = time.perf_counter()
    space = plan.space_cfg
    if plan.mode == GRID:
        params = fixed_params(trial)
        for key in params:
            trial.suggest_categorical(key, plan.choices(key))
    else:
        params = _suggest(trial, space)
    overrides = plan.overrides(params)
    setup = worker_settings(typed(compose(overrides)), plan)
    splits = load_cached(setup, cache)
    torch.manual_seed(setup.train.seed)
    model = build_model(setup.model, num_classes=splits.num_classes, in_channels=splits.in_channels)
    prof = profile(model, tuple(splits.train_x.shape[1:]), latency=False)
    shape = tuple(splits.train_x.shape[1:])
    key, spec = architecture(setup.model, shape, splits.num_classes)
    latency = _latency(trial, key, model, shape, plan.study_cfg.deployed)
    on_target = _on_target(trial, key, spec, plan)
    numerics, choice = _numerics(trial, setup, splits, model, probe)
    full = setup.full
    _set_attrs(
        trial,
        {
            "paper_name": paper_name(setup.model),
            "family": full.name,
            "blocks": full.blocks,
            "width": full.width,
            "dropout": full.dropout,
            "activation": full.activation,
            "inplace": full.inplace,
            "dataset": setup.data.name,
            "optimizer": setup.train.optimizer,
            "lr": setup.train.lr,
            "epochs_planned": setup.train.epochs,
            "seed": setup.train.seed,
            "params": prof.params,
            "macs": prof.macs,
            "size_bytes": prof.size_bytes,
            "size_mb": prof.size_mb,
            "size_kb": prof.size_bytes / 1e3,
            "int8_mb": prof.int8_mb,
            **latency,
            **on_target,
            **numerics,
            "overrides": overrides,
            "provenance": _provenance(setup.resolved),
        },
    )
    known = {
        "size_mb": prof.size_mb,
        "size_kb": prof.size_bytes / 1e3,
        **{k: v for k, v in latency.items() if k in METRICS},
        **{k: v for k, v in on_target.items() if not k.endswith("_predicted")},
    }
    return ReadyTrial(
        trial, setup, splits, model, prof, latency["latency_ms"], trial_folder(plan, setup), started, choice, known
    )


def over_budget(ready: ReadyTrial, plan: Plan) -> str | None:
    """Set the trial's budget constraints (Optuna's: <= 0 is feasible; set before training, so that a pruned trial
    has them too); the reason it is over budget, recorded as its `pruned_reason`, or None."""
    limits, trial = plan.study_cfg.before_training(), ready.trial
    for name, limit in limits.items():
        trial.set_constraint(name, ready.known[name] - limit)
    over = [
        f"{name} {ready.known[name]:.4g} > {limit:g} {metric(name).unit}"
        for name, limit in limits.items()
        if ready.known[name] > limit
    ]
    if not over:
        return None
    reason = "over budget: " + ", ".join(over)
    trial.set_user_attr("pruned_reason", reason)
    return reason


def _suggest(trial: optuna.Trial, space: SpaceConfig) -> dict:
    params = dict(fixed_params(trial))  # a retried trial keeps its params
    for key, dist in space.search.items():
        if "choices" in dist:
            params[key] = trial.suggest_categorical(key, [param_value(c) for c in dist["choices"]])
        else:
            params[key] = trial.suggest_float(key, dist["low"], dist["high"], log=bool(dist.get("log")))
    params["seed"] = space.seeds[0]
    return params


def _latency(trial: optuna.Trial, key: str, model: torch.nn.Module, shape: tuple, deployed: bool) -> dict:
    """The trial's latency attributes: its architecture's (`key`) figure in the study, measured now (training on this
    machine paused) if no trial of that architecture was measured before."""
    how = "by a worker at the first trial of the architecture, training on this machine paused"
    figure = ensure(trial.study, {key: lambda: (model, shape)}, how, ort=deployed)[key]
    return {**trial_attrs(figure), "latency_key": key}


def _on_target(trial: optuna.Trial, key: str, spec: dict, plan: Plan) -> dict:
    """The `latency_int8_ms@bluebox`-style metrics the study's objectives and budgets name, for the trial's
    architecture (`key`, `spec`): measured on that target by a latency kit, else predicted (`<name>_predicted` says
    which)."""
    study = plan.study_cfg
    names = [n for n in dict.fromkeys([*study.objectives, *study.limits()]) if split_metric(n)[1]]
    if not names:
        return {}
    out = {}
    for name in names:
        out[name], out[f"{name}_predicted"] = figure_on_target(trial.study, name, key, spec)
    return out


def _numerics(
    trial: optuna.Trial, setup: TrialSetup, splits: Splits, model: torch.nn.Module, probe
) -> tuple[dict, layouts.Numerics]:
    """The trial's numerics attributes (the layout it trains in unless its checkpoint says otherwise; the result
    records the one it did) and the study's choice for its architecture on this device kind (`dse.layouts`),
    decided now by the rule at the first such trial. A CUDA-graph choice overrides `train.cuda_graph` (it changes no
    key: graphed and eager steps differ only in the last bits), and a line says so when they differed."""
    device = resolve_device(setup.train.device)
    kind = layouts.device_kind(device)
    key, _ = architecture(setup.model, tuple(splits.train_x.shape[1:]), splits.num_classes)
    timed = probe is not None and setup.train.memory_format == "auto"
    advice = (lambda: faster_layout(model, splits, setup.train, probe=probe)) if timed else None
    attr, choice = layouts.ensure(trial.study, kind, key, lambda: layouts.rule(setup.train, device), advice=advice)
    if device.type == "cuda" and choice.cuda_graph != setup.train.cuda_graph:
        asked, stored = str(setup.train.cuda_graph).lower(), str(choice.cuda_graph).lower()
        tqdm.write(
            f"trial {trial.number}: train.cuda_graph={asked} is not the study's choice for this architecture "
            f"on {kind}; it steps as the study stores: cuda_graph={stored}"
        )
        setup.train.cuda_graph = choice.cuda_graph
    layout = choose_memory_format(setup.train, device, auto=choice.memory_format)
    return {
        "device_kind": kind,
        "layout_key": attr,
        "memory_format": layout,
        "vmapped": choice.vmapped,
        "cuda_graph": choice.cuda_graph,
    }, choice


def _provenance(resolved: dict) -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", False
    import torchvision

    return {
        "config": resolved,
        "git_commit": commit + ("-dirty" if dirty else ""),
        "versions": {
            "dse": dse.__version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "optuna": optuna.__version__,
        },
        "host": socket.gethostname(),
    }


def _set_attrs(trial: optuna.Trial, attrs: dict) -> None:
    for key, value in attrs.items():
        trial.set_user_attr(key, value)


# ---------------------------------------------------------------- per epoch, and the result


def epoch_reporter(
    ready: ReadyTrial, plan: Plan, check: Callable[[], None], boundary: Callable[[], None]
) -> Callable[[EpochRecord], str | None]:
    """The trial's per-epoch callback (`Member.on_epoch`): check that it is still ours (`check` raises TrialLost),
    let a waiting latency measurement run (`boundary`), record the curves so far (for the dashboard and the
    pruner), and return why the pruner stops the trial, or None to go on."""
    trial, study_cfg = ready.trial, plan.study_cfg
    live: list[dict] = []
    rung_epochs = set(rungs(study_cfg.pruning, ready.setup.train.epochs))

    def on_epoch(record: EpochRecord) -> str | None:
        check()
        boundary()  # a latency measurement waiting on this machine runs now
        live.append(asdict(record))
        trial.set_user_attr("curves", live)
        report_value(trial, record.epoch, record.val_acc)
        if study_cfg.pruner == "pareto" and record.epoch in rung_epochs:
            others = trial.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
            size, latency = study_cfg.target.size, study_cfg.target.latency  # the costs of what ships
            me = History(trial.number, ready.known[size], ready.known[latency], {record.epoch: record.val_acc})
            evidence = histories(others, size_key=size, latency_key=latency)  # the shared study's
            decision = decide(me, record.epoch, evidence, study_cfg.pruning)
            if decision is not None:
                return _pruned(trial, decision.epoch, decision.accuracy, decision.dominated_by, decision.reason())
        elif study_cfg.pruner not in ("none", "pareto") and trial.should_prune():
            return _pruned(
                trial, record.epoch, record.val_acc, None, f"{study_cfg.pruner} pruner at epoch {record.epoch}"
            )
        return None

    return on_epoch


def _pruned(trial: optuna.Trial, epoch: int, accuracy: float, by: int | None, reason: str) -> str:
    _set_attrs(
        trial, {"pruned_at_epoch": epoch, "pruned_val_acc": accuracy, "dominated_by": by, "pruned_reason": reason}
    )
    return reason


def record_result(ready: ReadyTrial, result: TrainResult, plan: Plan, train_started: float) -> list[float]:
    """Record a finished training (curves, test accuracy, speed, artifacts); return the objective values."""
    trial = ready.trial
    curves = [asdict(r) for r in result.epochs]
    train_seconds = sum(r["seconds"] for r in curves[result.resumed_from :]) if curves else 0.0
    _set_attrs(
        trial,
        {
            "curves": curves,
            "test_acc": result.test_acc,
            "s_per_epoch": result.seconds_per_epoch,
            "images_per_s": curves[-1]["images_per_s"] if curves else None,
            "resumed_from": result.resumed_from,
            "split": result.split,
            "device": str(result.device),
            "precision": result.precision,
            "memory_format": result.memory_format,
            "cuda_graph": result.cuda_graph,
            "train_seconds": train_seconds,
            "train_call_seconds": time.perf_counter() - train_started,  # training + evaluation; the rest is overhead
        },
    )
    # As it ships: the evaluated model (its weight average when on) in ONNX, fp32 and int8, through ONNX Runtime.
    deployed = (
        evaluate_deployed(ready.model, ready.splits, ready.folder, threads=plan.threads)
        if plan.study_cfg.deployed
        else None
    )
    _set_attrs(trial, deployed.attrs if deployed else {})
    files = {"onnx": deployed.fp32, "int8": deployed.int8} if deployed else {}
    _upload(trial, plan, ready.folder, curves, files)
    trial.set_user_attr("trial_seconds", time.perf_counter() - ready.started)
    metrics = {
        **ready.known,
        "val_acc": result.epochs[-1].val_acc,
        "test_acc": result.test_acc,
        **(deployed.attrs if deployed else {}),
    }
    return [metrics[m] for m in plan.study_cfg.objectives]


def _upload(trial: optuna.Trial, plan: Plan, run_dir: Path, curves: list[dict], files: dict[str, Path]) -> None:
    from optuna.artifacts import FileSystemArtifactStore, upload_artifact

    store_dir = Path(plan.workdir) / "artifacts"
    store_dir.mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(str(store_dir))
    curves_path = run_dir / "curves.json"
    curves_path.write_text(json.dumps(curves, indent=1))
    for path, mimetype in ((run_dir / "checkpoint.pt", "application/octet-stream"), (curves_path, "application/json")):
        artifact_id = upload_artifact(
            artifact_store=store, file_path=str(path), study_or_trial=trial, mimetype=mimetype
        )
        trial.set_user_attr(f"artifact_{path.stem}", artifact_id)
    for name, path in files.items():  # the ONNX files: `dse.deploy export` ships these very files
        artifact_id = upload_artifact(
            artifact_store=store, file_path=str(path), study_or_trial=trial, mimetype="application/octet-stream"
        )
        trial.set_user_attr(f"artifact_{name}", artifact_id)
