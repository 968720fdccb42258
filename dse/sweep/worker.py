"""A worker: claim trials, set them up, train those that fuse as one group and end each trial as soon as the trainer
yields its outcome (COMPLETE with its result, PRUNED, or FAIL with its retry queued), until the space is done."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from tqdm.auto import tqdm

from dse.autotune import pick_group_size
from dse.fused import group_key
from dse.latency import training_turns
from dse.layouts import Numerics
from dse.models import build_model, paper_name
from dse.step import resolve_device
from dse.storage import Heartbeat, TrialLost, check_ours, read_trial, tell, trial_id
from dse.sweep.compose import compose, data_key, typed
from dse.sweep.plan import GRID, Plan, make_pruner, make_sampler
from dse.sweep.progress import trial_line
from dse.sweep.queue import INTERRUPTED, claim_trials, fail_stale, fail_trial, next_step, sweep_storage
from dse.sweep.trial import (
    ReadyTrial,
    epoch_reporter,
    hold_run_dir,
    load_cached,
    over_budget,
    record_result,
    setup_trial,
    worker_id,
    worker_settings,
)
from dse.train import Failed, Finished, Member, Stopped, TrainingDiverged, train_group
from dse.train import Outcome as TrainOutcome  # one member's end (the sweep's own Outcome is a run's tally)

__all__ = ["Seams", "fuse_key", "group_ready", "train_together", "end_trial", "run_trials", "work", "group_size"]


def _unchanged(storage: RDBStorage) -> RDBStorage:
    return storage


@dataclass(frozen=True)
class Seams:
    """Where a test reaches into a sweep run in this process (`sweep.workers=1`): a wrapper around the storage the
    sweep opens (to slow its reads, say), the check that a worker still owns its trial, the checkpoint writer
    (`Member.writer`: a full disk), a layout timing (`dse.autotune.pick_memory_format`'s signature) whose answer a
    study stores as advice beside its choice and which must change no result. The defaults are the real ones; the
    timing is off by default: it trains a batch in channels_last, which crashes torch 2.14 on some CPUs (AVX2)."""

    storage: Callable[[RDBStorage], RDBStorage] = _unchanged
    check: Callable[[RDBStorage, int, Heartbeat, float], None] = check_ours
    writer: Callable[[Path, dict], None] | None = None
    probe: Callable[..., str] | None = None


def fuse_key(ready: ReadyTrial) -> tuple:
    """What set-up trials must share to train together: their data, `group_key` (the model's structure and
    the training step's settings; seeds, dropout p, optimizers and lr may differ) and the study's numerics choice."""
    return data_key(ready.setup.data), group_key(ready.model, ready.setup.train), ready.numerics


def group_ready(ready: list[ReadyTrial]) -> list[list[ReadyTrial]]:
    """The trials in groups that fuse, in claim order. Two trials of one folder (a TPE trial sampled twice) never
    share a group: the second trains in a later group and resumes the first's checkpoint, as it would alone."""
    groups: list[list[ReadyTrial]] = []
    for r in ready:
        key = fuse_key(r)
        group = next((g for g in groups if fuse_key(g[0]) == key and all(o.folder != r.folder for o in g)), None)
        if group is None:
            groups.append([r])
        else:
            group.append(r)
    return groups


def _outcomes(members: Sequence[Member], splits, numerics: Numerics) -> Iterator[tuple[int, TrainOutcome]]:
    """`train_group`'s outcomes, computed as the study's choice says (layout for `auto`, vmapped or not); when the
    whole group fails (out of memory, say), each member still in it fails with that error."""
    left = set(range(len(members)))
    try:
        group = train_group(members, splits, vmapped=numerics.vmapped, layout=numerics.memory_format)
        with contextlib.closing(group) as outcomes:
            for i, outcome in outcomes:
                left.discard(i)
                yield i, outcome
    except Exception as e:
        for i in sorted(left):
            yield i, Failed(e)


def train_together(
    group: list[ReadyTrial],
    plan: Plan,
    seams: Seams,
    checks: list[Callable[[], None]],
    end: Callable[[ReadyTrial, TrainOutcome, float], None],
) -> None:
    """Train set-up trials that fuse (one `fuse_key`) as one group, each in its run folder (held locked), resuming
    its checkpoint; after each epoch each checks it is still ours (its `check`), records its curves and lets the
    pruner decide. Each trial lets go of its folder and goes to `end` as soon as the trainer yields its outcome;
    the others go on."""
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        folders = [stack.enter_context(contextlib.ExitStack()) for _ in group]  # one per trial: released when it ends
        held = []
        for i, (ready, check) in enumerate(zip(group, checks)):
            try:
                check()  # it may have waited for an earlier group
                folders[i].enter_context(hold_run_dir(ready.folder, check))
                held.append(i)
            except Exception as e:  # taken over meanwhile
                end(ready, Failed(e), started)
        if not held:
            return
        # The run folders first: a process waiting for one must not hold up latency measurements meanwhile.
        boundary = stack.enter_context(training_turns())
        members = [
            Member(
                group[i].model,
                group[i].setup.train,
                group[i].folder / "checkpoint.pt",
                epoch_reporter(group[i], plan, checks[i], boundary),
                writer=seams.writer,
            )
            for i in held
        ]
        with contextlib.closing(_outcomes(members, group[held[0]].splits, group[held[0]].numerics)) as outcomes:
            for j, outcome in outcomes:
                folders[held[j]].close()
                end(group[held[j]], outcome, started)


def end_trial(
    study: optuna.Study,
    trial: optuna.Trial,
    outcome: TrainOutcome,
    plan: Plan,
    *,
    ready: ReadyTrial | None = None,
    started: float = 0.0,
    worker: int = 0,
) -> None:
    """End a trial with its outcome: Finished -> its result recorded, COMPLETE; Stopped -> PRUNED (its reason is
    recorded); Failed -> PRUNED when it diverged, else FAIL with its retry queued, not counted against
    `max_retry` when the trial was taken over (TrialLost) or the sweep stopped. One line says which."""
    max_retry, frozen, note = plan.study_cfg.max_retry, None, ""
    try:
        if isinstance(outcome, Finished):
            values = record_result(ready, outcome.result, plan, started)
            frozen = tell(study, trial, values=values, state=TrialState.COMPLETE)
        elif isinstance(outcome, Stopped):
            frozen = tell(study, trial, state=TrialState.PRUNED)
        else:
            frozen, note = _end_failed(study, trial, outcome.error, max_retry)
    except (TrialLost, UpdateFinishedTrialError) as e:  # taken over while its result was recorded
        note = fail_trial(study, trial, f"stopped: {e}", counted=False, max_retry=max_retry)
    except Exception as e:  # recording the result failed (a full disk, ...)
        note = fail_trial(study, trial, f"{type(e).__name__}: {e}", counted=True, max_retry=max_retry)
    if not plan.progress:  # else the main process's progress bar prints the line (progress.watching)
        note = note or ("" if frozen else "taken over by another worker, whose retry records the result")
        tqdm.write(trial_line(frozen or read_trial(trial), worker) + (f"; {note}" if note else ""))


def _end_failed(study: optuna.Study, trial: optuna.Trial, error: BaseException, max_retry: int):
    """(frozen trial, note) of a trial that failed with `error`."""
    if isinstance(error, TrainingDiverged):
        trial.set_user_attr("pruned_reason", f"diverged: {error}")
        return tell(study, trial, state=TrialState.PRUNED), ""
    if isinstance(error, optuna.TrialPruned):  # pruned the Optuna way (by a check, say)
        return tell(study, trial, state=TrialState.PRUNED), ""
    if isinstance(error, (TrialLost, UpdateFinishedTrialError)):  # taken over: its retry carries on
        return None, fail_trial(study, trial, f"stopped: {error}", counted=False, max_retry=max_retry)
    # the trial's own failure (a bad checkpoint, a full disk, a config that fails, ...)
    return None, fail_trial(study, trial, f"{type(error).__name__}: {error}", counted=True, max_retry=max_retry)


def run_trials(
    study: optuna.Study,
    trials: list[optuna.Trial],
    plan: Plan,
    cache: dict,
    beat: Heartbeat,
    raw: RDBStorage,
    *,
    seams: Seams = Seams(),
    worker: int = 0,
) -> None:
    """Claimed trials from set-up to their end states, their heartbeats beating meanwhile. Those that fuse
    (`fuse_key`) train as one group; groups that do not train one after the other (whether separate CUDA
    streams would gain over that is unmeasured). Each trial ends on its own and at once: pruned, failed (its
    retry queued), taken over or finished, while the others go on."""
    grace, max_retry = plan.study_cfg.grace_period, plan.study_cfg.max_retry
    for trial in trials:
        beat.add(trial_id(trial), patience=plan.study_cfg.storage_retry_seconds)  # a heartbeat exists before "worker"
    going = {trial_id(t): t for t in trials}  # not ended yet

    def end(trial: optuna.Trial, outcome: TrainOutcome, ready: ReadyTrial | None = None, started: float = 0.0) -> None:
        if trial_id(trial) in going:
            end_trial(study, trial, outcome, plan, ready=ready, started=started, worker=worker)
            beat.remove(trial_id(trial))
            del going[trial_id(trial)]

    try:
        for trial in trials:  # all marked before any set-up, which takes a while (see fail_stale)
            trial.set_user_attr("worker", worker_id())
        ready = []
        for trial in trials:
            try:
                r = setup_trial(trial, plan, cache, probe=seams.probe)
                reason = over_budget(r, plan)
            except Exception as e:  # a config that fails, the trial taken over, ...
                end(trial, Failed(e))
                continue
            if reason is None:
                ready.append(r)
            else:
                end(trial, Stopped(0, reason))
        for group in group_ready(ready):
            checks = [partial(seams.check, raw, trial_id(r.trial), beat, grace) for r in group]
            train_together(group, plan, seams, checks, lambda r, outcome, started: end(r.trial, outcome, r, started))
    except BaseException:  # Ctrl-C, SystemExit, the storage gone: not the trials' fault
        for trial in going.values():
            with contextlib.suppress(Exception):
                fail_trial(study, trial, INTERRUPTED, counted=False, max_retry=max_retry)
        raise
    finally:
        for trial in trials:
            beat.remove(trial_id(trial))


def work(plan: Plan, worker: int = 0, *, seams: Seams = Seams()) -> int:
    """One worker: claim and run trials until the space is done; return how many this worker ran."""
    torch.set_num_threads(plan.threads)
    if torch.cuda.is_available():  # workers split the GPUs round-robin ("auto" and "cuda" use this one)
        torch.cuda.set_device(worker % torch.cuda.device_count())
    storage, raw = seams.storage(sweep_storage(plan)), sweep_storage(plan, retries=False)
    study = optuna.load_study(
        study_name=plan.study_name, storage=storage, sampler=make_sampler(plan, worker), pruner=make_pruner(plan)
    )
    cache: dict = {}
    ran, size = 0, plan.group_size
    with Heartbeat(raw, plan.study_cfg.heartbeat_interval) as beat:
        while True:
            fail_stale(study, storage, plan)
            todo = next_step(study, plan)
            if todo == "done":
                return ran
            if todo == "work" and size is None:
                size = group_size(plan, cache, worker)
            trials = claim_trials(study, storage, plan, size) if todo == "work" else []
            if not trials:
                time.sleep(min(plan.study_cfg.heartbeat_interval, 5) if todo == "wait" else 0.1)
                continue
            run_trials(study, trials, plan, cache, beat, raw, seams=seams, worker=worker)
            ran += len(trials)


def group_size(plan: Plan, cache: dict, worker: int = 0) -> int:
    """How many trials this worker claims and trains together: `sweep.trials_per_gpu`, or for auto what
    `pick_group_size` measures on this worker's device for the space's costliest trial config (the most memory;
    smaller models may gain more), sizes up to the space's trial count; one line says so."""
    if plan.group_size is not None:
        return plan.group_size
    # the costliest grid trial; for a sampled space, the base config
    params = max(zip(plan.cost, plan.grid), key=lambda cp: cp[0])[1] if plan.mode == GRID else {}
    setup = worker_settings(typed(compose(plan.overrides(params))), plan)
    try:
        splits = load_cached(setup, cache)
        torch.manual_seed(setup.train.seed)
        model = build_model(setup.model, num_classes=splits.num_classes, in_channels=splits.in_channels)
        sizes = [s for s in (1, 2, 4, 8, 16) if s <= max(plan.total, 1)]
        size, rates = pick_group_size(model, splits, setup.train, sizes=sizes)
    except Exception as e:  # noqa: BLE001 - a probe that fails costs speed, not trials: their own errors are recorded
        tqdm.write(f"[worker {worker}] sweep.trials_per_gpu=auto: 1 (the probe failed: {type(e).__name__}: {e})")
        return 1
    measured = ", ".join(f"{n}: {rate:.0f}" for n, rate in rates.items())
    tqdm.write(
        f"[worker {worker}] sweep.trials_per_gpu=auto: {size} on {resolve_device(setup.train.device)} "
        f"(training images/s of {paper_name(setup.model)} by group size, {measured}; the largest adding 10 % is kept)"
    )
    return size
