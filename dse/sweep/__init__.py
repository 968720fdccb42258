"""The sweep: Hydra composes each trial's config, Optuna drives the trials (a grid queue, or TPE/NSGA-II) through
the shared trainer, several workers per machine, our own heartbeats and resumable trials.

Rooms: `compose` (the override grammar, typed configs), `plan` (the Plan, checks, the study's definition), `queue`
(chains, retries, claims, the tally), `trial` (one trial's set-up, epochs and result), `worker` (the train-and-end
loop), `progress` (what the user sees), `run` (prepare, workers, summary), `__main__` (the command)."""

from dse.sweep.compose import TrialSetup, compose, merge_overrides, trial_identity, trial_overrides, typed
from dse.sweep.plan import GRID, SAMPLED, Plan, draft_plan, grid_params, params_key, plan_sweep
from dse.sweep.queue import (
    Outcome,
    claim_trials,
    enqueue_missing,
    fail_stale,
    fail_trial,
    requeue,
    sweep_storage,
    tally,
)
from dse.sweep.run import prepare_study, reap, run_sweep
from dse.sweep.trial import hold_run_dir, run_folder
from dse.sweep.worker import Seams, group_size, work

__all__ = [
    "GRID",
    "SAMPLED",
    "Outcome",
    "Plan",
    "Seams",
    "TrialSetup",
    "claim_trials",
    "compose",
    "draft_plan",
    "enqueue_missing",
    "fail_stale",
    "fail_trial",
    "grid_params",
    "group_size",
    "hold_run_dir",
    "merge_overrides",
    "params_key",
    "plan_sweep",
    "prepare_study",
    "reap",
    "requeue",
    "run_folder",
    "run_sweep",
    "sweep_storage",
    "tally",
    "trial_identity",
    "trial_overrides",
    "typed",
    "work",
]
