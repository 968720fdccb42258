"""The trial queue: chains (a grid point x seed, or a sampled trial, with its retries), queueing what is missing,
retries and stale trials, claiming trials for a worker, and the tally of where the space stands.

A chain should end with one finished trial. Its trials share their fixed params (or their `dse:chain` attribute);
each retry counts the chain's failures (`dse:failures`) so that `study.max_retry` bounds them."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass, field

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from dse.storage import change_state, claim, open_storage, tell, trial_id
from dse.study import ALIVE, FINISHED
from dse.sweep.plan import GRID, Plan, params_key

__all__ = [
    "INTERRUPTED",
    "sweep_storage",
    "chain_of",
    "chains",
    "chain_state",
    "queue_trial",
    "enqueue_missing",
    "requeue",
    "stale_callback",
    "fail_stale",
    "fail_trial",
    "fixed_params",
    "claim_trial",
    "claim_trials",
    "next_step",
    "Outcome",
    "tally",
]

INTERRUPTED = "interrupted"  # the fail reason of a trial stopped by Ctrl-C: queued again, it gets no line


def sweep_storage(plan: Plan, *, retries: bool = True) -> RDBStorage:
    """The study's storage as the sweep uses it: stale trials are retried (`stale_callback`); storage calls retried
    (or not, for the heartbeat thread and the ownership check, which must not block)."""
    cfg = plan.study_cfg
    return open_storage(
        plan.storage,
        heartbeat_interval=cfg.heartbeat_interval,
        grace_period=cfg.grace_period,
        on_stale=stale_callback(cfg.max_retry),
        retry_seconds=cfg.storage_retry_seconds if retries else 0,
    )


def chain_of(t: FrozenTrial) -> str:
    """The chain a trial belongs to: its `dse:chain`, else its fixed params, else its own number."""
    attrs = t.system_attrs
    return attrs.get("dse:chain") or (params_key(attrs["fixed_params"]) if "fixed_params" in attrs else str(t.number))


def chains(trials: list[FrozenTrial]) -> dict[str, list[FrozenTrial]]:
    """The trials by chain, in trial order."""
    out: dict[str, list[FrozenTrial]] = {}
    for t in trials:
        out.setdefault(chain_of(t), []).append(t)
    return out


def chain_state(trials: list[FrozenTrial]) -> TrialState | None:
    """COMPLETE or PRUNED once any trial finished; else RUNNING/WAITING while one is alive; else FAIL."""
    states = {t.state for t in trials}
    return next((s for s in (*FINISHED, *ALIVE, TrialState.FAIL) if s in states), None)


def queue_trial(
    study: optuna.Study, params: dict, chain: str, failures: int, retry_of: FrozenTrial | None = None
) -> None:
    """Add a WAITING trial with these fixed params to the chain; a retry carries its predecessor's curves."""
    attrs = {"fixed_params": params, "dse:chain": chain, "dse:failures": failures}
    if retry_of is not None:
        attrs["dse:retry_of"] = retry_of.number
    values = retry_of.intermediate_values if retry_of is not None else None  # a resumed trial reports later epochs only
    study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, system_attrs=attrs, intermediate_values=values))


def enqueue_missing(study: optuna.Study, plan: Plan) -> int:
    """Queue every grid trial that has no finished, running or queued trial, the costliest first so that
    parallel workers do not end waiting on one big model; queue again each chain whose retries a former
    run used up (a new run gets a fresh `max_retry`). Hold `storage_lock`. Returns how many."""
    by_chain = chains(study.get_trials(deepcopy=False))
    failed = lambda key: chain_state(by_chain.get(key, [])) in (None, TrialState.FAIL)
    if plan.mode == GRID:
        cost = plan.cost or [0.0] * len(plan.grid)
        ranked = sorted(zip(plan.grid, cost), key=lambda pc: -pc[1])  # stable: equal costs keep the grid's order
        todo = [p for p, _ in ranked if failed(params_key(p))]
        for params in todo:
            queue_trial(study, params, params_key(params), 0)
        return len(todo)
    ended = [trials[-1] for key, trials in by_chain.items() if failed(key)]
    for t in ended:
        queue_trial(study, t.system_attrs.get("fixed_params") or t.params, chain_of(t), 0, t)
    return len(ended)


def requeue(study: optuna.Study, trial: FrozenTrial, *, counted: bool, max_retry: int) -> bool:
    """Queue a retry of a failed trial with its params (it resumes from the trial's checkpoint), unless it
    failed `max_retry` times already. A `counted` failure is the trial's own (an error, its worker died);
    an interruption (the sweep stopped, a lost heartbeat) does not use up a retry."""
    failures = trial.system_attrs.get("dse:failures", 0) + counted
    if failures > max_retry:
        return False
    queue_trial(study, trial.system_attrs.get("fixed_params") or trial.params, chain_of(trial), failures, trial)
    return True


def stale_callback(max_retry: int) -> Callable[[optuna.Study, FrozenTrial], None]:
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
            if change_state(storage, t, TrialState.FAIL):  # False: another process failed it first
                requeue(study, t, counted=False, max_retry=cfg.max_retry)


def fail_trial(study: optuna.Study, trial: optuna.Trial, reason: str, *, counted: bool, max_retry: int) -> str:
    """FAIL the trial with its reason and queue its retry (see `requeue`); says what happened."""
    frozen = tell(study, trial, state=TrialState.FAIL, reason=reason)
    if frozen is None:
        return "taken over by another worker"
    if requeue(study, frozen, counted=counted, max_retry=max_retry):
        return "retry queued" + (
            f" ({frozen.system_attrs.get('dse:failures', 0) + 1} of {max_retry})" if counted else ""
        )
    return f"no retry left (study.max_retry={max_retry})"


def fixed_params(trial: optuna.Trial) -> dict:
    """The params a queued (enqueued or retried) trial was created with; empty for a sampled one."""
    return trial.storage.get_trial_system_attrs(trial_id(trial)).get("fixed_params", {})


def claim_trial(study: optuna.Study, storage: RDBStorage, plan: Plan) -> optuna.Trial | None:
    """The next trial for this worker, marked RUNNING: a queued one first (grid trials, retries), else for a
    sampled space a new sampled one while the space has room. None when there is none to take (never an
    empty trial). A queued grid trial whose point another trial already covers is dropped as a duplicate."""
    trials = study.get_trials(deepcopy=False)
    for t in (t for t in trials if t.state == TrialState.WAITING):
        trial = claim(study, storage, t)
        if trial is None:
            continue
        if plan.mode == GRID:  # the point's first live or finished trial keeps it
            kept = min(
                (o for o in chains(trials)[chain_of(t)] if o.state in (*FINISHED, *ALIVE)),
                key=lambda o: (o.state not in FINISHED, o.number),
            )
            if kept.number != t.number:
                tell(study, trial, state=TrialState.FAIL, reason=f"duplicate of trial {kept.number} (same grid point)")
                return None
        return trial
    if plan.mode != GRID and len(chains(trials)) < plan.total:
        return study.ask()
    return None


def claim_trials(study: optuna.Study, storage: RDBStorage, plan: Plan, size: int) -> list[optuna.Trial]:
    """Up to `size` trials for this worker, the next ones of the queue (`claim_trial` each: a grid cell's seeds
    are queued together, so they tend to be claimed, and fused, together)."""
    claimed: list[optuna.Trial] = []
    while len(claimed) < size and (trial := claim_trial(study, storage, plan)) is not None:
        claimed.append(trial)
    return claimed


def next_step(study: optuna.Study, plan: Plan) -> str:
    """'work' if a trial can start, 'wait' while others run (they may die and be retried), else 'done'."""
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    if TrialState.WAITING in states or plan.mode != GRID and len(chains(trials)) < plan.total:
        return "work"
    return "wait" if TrialState.RUNNING in states else "done"


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
        parts = [
            f"{n} of {self.total} trials {what}"
            for n, what in ((self.failed, "FAILED with no retry left"), (self.left, "not finished"))
            if n
        ]
        if self.reasons:
            parts.append("last failures: " + "; ".join(self.reasons))
        parts += self.workers
        return ", ".join(parts) + ". Fix the cause and run the same command again: finished trials are kept"


def tally(study: optuna.Study, plan: Plan, workers: list[str] = ()) -> Outcome:
    """Count the space's trials by chain (a point x seed and its retries): finished, failed for good, left."""
    by_chain = chains(study.get_trials(deepcopy=False))
    if plan.mode == GRID:
        by_chain = {key: by_chain.get(key, []) for key in map(params_key, plan.grid)}
    states = [chain_state(ts) for ts in by_chain.values()]
    complete, pruned, failed = (states.count(s) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
    last = [ts[-1] for ts in by_chain.values() if chain_state(ts) == TrialState.FAIL]
    reasons = [f"trial {t.number}: {_reason(t)}" for t in sorted(last, key=lambda t: t.number)[-3:]]
    left = max(0, plan.total - complete - pruned - failed)
    return Outcome(plan.total, complete, pruned, failed, left, reasons, list(workers))


def _reason(t: FrozenTrial) -> str:
    reason = t.user_attrs.get("fail_reason") or "its worker stopped sending heartbeats (killed, or lost the storage)"
    return reason.splitlines()[0][:300]
