"""Running a planned sweep: measure the grid's latencies and check its budgets, prepare the study (create or check
it, queue what is missing), run the workers (this process, or spawned ones that are reaped when they die; Ctrl-C
passed on) under a progress bar, and sum up."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import sqlalchemy
from optuna.trial import TrialState
from tqdm.auto import tqdm

import dse
from dse.config import register_schemas
from dse.latency import ATTR, build, ensure, figures
from dse.metrics import split_metric
from dse.storage import StudyError, live_trial, storage_lock, transient
from dse.study import claim_workdir, create_or_check_study, load_study
from dse.sweep.plan import Plan, check_budgets, make_sampler
from dse.sweep.progress import duration, save_curves_chart, start_line, summary, watching
from dse.sweep.queue import Outcome, enqueue_missing, fail_stale, fail_trial, next_step, sweep_storage, tally
from dse.sweep.worker import Seams, work
from dse.targets import TEMPLATE_ATTR, unmeasured_targets

__all__ = ["check_targets", "prepare_study", "run_sweep", "measure_grid_latency", "keep_figures", "reap", "interrupted"]


def prepare_study(plan: Plan, *, seams: Seams = Seams()) -> tuple[optuna.Study, int]:
    """Create the study or check this run against its definition, retry stale trials and queue what is
    missing; return the study and how many trials were queued. Sweeps of one study that start at once
    take turns here (`storage_lock`): one creates and queues, the others find it done."""
    storage = seams.storage(sweep_storage(plan))
    with storage_lock(plan.storage):
        study = create_or_check_study(
            plan.study_name,
            storage,
            objectives=plan.study_cfg.objectives,
            definition=plan.definition,
            sampler=make_sampler(plan),
            user_attrs={
                "space": plan.space,
                "tables": plan.space["tables"],
                "command_line": plan.cli,
                "created_by": f"dse {dse.__version__}",
            },
        )
        fail_stale(study, storage, plan)
        return study, enqueue_missing(study, plan)


def run_sweep(plan: Plan, *, seams: Seams = Seams()) -> Outcome:
    """Measure the grid's latencies and check its budgets (a grid whose every trial is over one is refused
    before anything is written), prepare the study, run the workers with a progress bar, print a summary
    (counts, the front, the next commands); return the outcome. `seams` reach a sweep of one worker, which
    runs in this process."""
    if seams != Seams() and plan.workers != 1:
        raise ValueError(f"seams reach the worker in this process only; plan.workers={plan.workers} must be 1")
    measured = measure_grid_latency(plan)
    budget = check_budgets(plan, {k: f["ms"] for k, f in measured.items()})
    study, _ = prepare_study(plan, seams=seams)
    keep_figures(study, measured)
    check_targets(study, plan)
    claim_workdir(Path(plan.workdir))
    print(start_line(study, plan.storage, plan.total, plan.workers, plan.threads), flush=True)
    if budget:
        print(budget, flush=True)
    started = time.perf_counter()
    if next_step(study, plan) == "done":
        print("nothing to do: every trial of the space is finished", flush=True)
        outcome = tally(study, plan)
        print(summary(study, plan.storage, outcome.counts()), flush=True)
        return outcome
    died: list[str] = []
    with watching(study, costs=plan.costs(), n_trials=plan.total, enabled=plan.progress):
        if plan.workers == 1:
            work(plan, seams=seams)
        else:
            context = multiprocessing.get_context("spawn")
            procs = [context.Process(target=_worker_entry, args=(plan, i), daemon=False) for i in range(plan.workers)]
            for p in procs:
                p.start()
            _wait(procs, lambda: reap(study, procs, plan, died))
    save_curves_chart(study)
    outcome = tally(study, plan, died)
    print(
        summary(study, plan.storage, f"done in {duration(time.perf_counter() - started)}: {outcome.counts()}"),
        flush=True,
    )
    print(f"checkpoints and artifacts: {Path(plan.workdir)}", flush=True)
    return outcome


def check_targets(study: optuna.Study, plan: Plan) -> None:
    """Objectives and budgets that name a target machine (`latency_int8_ms@bluebox`) need a predictor, fitted on
    architectures a latency kit measured there: without them the sweep stops before any trial, saying how to get
    them (the study keeps an architecture of the space, `TEMPLATE_ATTR`, that the kit draws its calibration on)."""
    names = list(dict.fromkeys([*plan.study_cfg.objectives, *plan.study_cfg.limits()]))
    missing = unmeasured_targets(study, names)
    if not missing:
        return
    study.set_user_attr(TEMPLATE_ATTR, plan.template)
    target = split_metric(missing[0])[1]
    s = plan.study_name
    raise ValueError(
        f"{', '.join(missing)}: study {s!r} has fewer than 3 architectures measured on {target}, too few to "
        f"predict the rest; first: python -m dse.deploy latency-kit --study {s} --storage {plan.storage} --out "
        f"kits/{s}, run kits/{s}/latency_runner.py on {target}, python -m dse.deploy import-latency "
        f"kits/{s}/latency.json --study {s} --storage {plan.storage} --target {target}; then run this sweep again"
    )


def measure_grid_latency(plan: Plan) -> dict[str, dict]:
    """Before any training and before anything is written: the latency figure of every architecture of the grid
    (key -> figure), those the study holds read, the others measured in one sitting in this process (interleaved,
    so they compare), training of other sweeps on this machine paused. They are measured into a study in memory:
    `keep_figures` stores them once the study is created or checked, so a grid refused for its latency budget
    leaves no study behind (one defined with that budget would refuse the next run's)."""
    if not plan.archs:
        return {}
    scratch = optuna.create_study(study_name=plan.study_name)  # in memory
    for key, figure in _held_figures(plan).items():
        scratch.set_user_attr(ATTR + key, figure)
    how = "before training, in one sitting by the sweep's main process, training on this machine paused"
    measured = ensure(
        scratch,
        {k: (lambda spec=spec: build(spec)) for k, spec in plan.archs.items()},
        how,
        ort=plan.study_cfg.deployed,
    )  # ONNX Runtime fp32 and int8 too
    loaded = sum(f["under_load"] for f in measured.values())
    ms = [f["ms"] for f in measured.values()]
    print(
        f"latency of the {len(measured)} architecture(s): {min(ms):.3f}-{max(ms):.3f} ms batch-1 CPU"
        + (f"; {loaded} measured under load (other processes kept the cores busy)" if loaded else ""),
        flush=True,
    )
    return measured


def _held_figures(plan: Plan) -> dict[str, dict]:
    """The latency figures the study holds already; none when it does not exist yet."""
    try:
        return figures(load_study(plan.study_name, plan.storage).user_attrs)
    except StudyError:
        return {}


def keep_figures(study: optuna.Study, measured: dict[str, dict]) -> None:
    """Store on the study the figures it lacks (those `measure_grid_latency` measured)."""
    held = figures(study.user_attrs)
    for key, figure in measured.items():
        if key not in held:
            study.set_user_attr(ATTR + key, figure)


def interrupted(signum, frame) -> None:
    """Ctrl-C: stop at once, quietly. A second Ctrl-C does not break the cleanup (the running trial is failed
    as interrupted and queued again: it resumes from its checkpoint); Optuna logs no traceback for it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    raise KeyboardInterrupt


def _worker_entry(plan: Plan, worker: int) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial replaces Optuna's
    signal.signal(signal.SIGINT, interrupted)
    register_schemas()
    try:
        work(plan, worker)
    except KeyboardInterrupt:
        sys.exit(130)
    except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as e:
        if not transient(e):
            raise
        raise SystemExit(
            f"[worker {worker}] stopped: storage unreachable for over {plan.study_cfg.storage_retry_seconds:g} s "
            "(study.storage_retry_seconds)"
        ) from None


def reap(study: optuna.Study, procs: list, plan: Plan, died: list[str]) -> None:
    """A worker that died (killed, out of memory) fails its running trials at once, as their own failure."""
    for i, p in enumerate(procs):
        if p.exitcode in (None, 0) or any(d.startswith(f"worker {i} ") for d in died):
            continue
        died.append(f"worker {i} exited with code {p.exitcode}")
        host_pid = f"{socket.gethostname()}:{p.pid}"
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.user_attrs.get("worker") == host_pid:
                note = fail_trial(
                    study,
                    live_trial(study, t),
                    f"its worker process died (exit code {p.exitcode})",
                    counted=True,
                    max_retry=plan.study_cfg.max_retry,
                )
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
