"""The trial queue, on a tmp SQLite study and a hand-built Plan (no data, no process): grid trials queued once,
costliest first; retries counted against max_retry (interruptions not); chains of a point and its retries; a
duplicate queued trial dropped at its claim; claims in queue order, each trial claimed by one worker however their
reads and claims interleave (SQLite and PostgreSQL); sampled spaces grow to their total; the tally."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from dse.config import SpaceConfig, StudyConfig
from dse.storage import before_trial_reads, open_storage
from dse.sweep import GRID, SAMPLED, Plan, claim_trials, enqueue_missing, params_key, requeue, tally
from dse.sweep.queue import chain_of, chain_state, chains, claim_trial, fail_trial, next_step

WIDTHS = [0.2, 0.4, 0.3]


def _plan(tmp_path, mode: str = GRID, *, max_retry: int = 2, n_trials: int = 3, storage: str | None = None) -> Plan:
    if mode == GRID:
        space = SpaceConfig(name="q", grid={"model.width": WIDTHS}, seeds=[0])
        grid = [{"model.width": w, "seed": 0} for w in WIDTHS]
    else:
        search = {"model.width": {"low": 0.1, "high": 1.0}}
        space = SpaceConfig(name="q", sampler="tpe", n_trials=n_trials, search=search)
        grid = []
    return Plan(
        study_name="q",
        storage=storage or f"sqlite:///{tmp_path / 'q.db'}",
        workdir=str(tmp_path / "q"),
        static=[],
        cli=[],
        fixed=[],
        space=asdict(space),
        study=asdict(StudyConfig(name="q", max_retry=max_retry)),
        workers=1,
        threads=1,
        progress=False,
        group_size=1,
        mode=mode,
        total=len(grid) or n_trials,
        grid=grid,
        seeds=[0],
        cost=[2.0, 5.0, 2.0] if mode == GRID else [],
    )


@pytest.fixture
def grid(tmp_path):
    plan = _plan(tmp_path)
    storage = open_storage(plan.storage)
    return plan, storage, optuna.create_study(study_name="q", storage=storage, directions=["maximize"])


def _widths(trials) -> list[float]:
    return [t.system_attrs["fixed_params"]["model.width"] for t in trials]


def test_grid_trials_are_queued_once_costliest_first(grid):
    plan, _, study = grid
    assert enqueue_missing(study, plan) == 3
    assert _widths(study.get_trials()) == [0.4, 0.2, 0.3]  # equal costs keep the grid's order
    assert all(t.state == TrialState.WAITING and t.system_attrs["dse:failures"] == 0 for t in study.get_trials())
    assert enqueue_missing(study, plan) == 0


def test_claims_follow_the_queue_and_stop_when_it_is_empty(grid):
    plan, storage, study = grid
    enqueue_missing(study, plan)
    first = claim_trials(study, storage, plan, 2)
    assert [t.number for t in first] == [0, 1] and next_step(study, plan) == "work"
    assert [t.number for t in claim_trials(study, storage, plan, 5)] == [2]
    assert claim_trials(study, storage, plan, 5) == [] and next_step(study, plan) == "wait"  # never an empty trial
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING] * 3 and len(study.get_trials()) == 3
    for trial in first:
        study.tell(trial, 0.5)
    study.tell(2, state=TrialState.PRUNED)
    assert next_step(study, plan) == "done"


def test_a_retry_counts_the_chain_s_failures_until_max_retry(grid):
    plan, storage, study = grid
    enqueue_missing(study, plan)
    trial = claim_trial(study, storage, plan)
    trial.report(0.3, 1)
    assert fail_trial(study, trial, "OSError: disk full", counted=True, max_retry=2) == "retry queued (1 of 2)"
    retry = study.get_trials()[-1]
    assert retry.state == TrialState.WAITING and retry.system_attrs["dse:failures"] == 1
    assert retry.system_attrs["dse:retry_of"] == trial.number and retry.intermediate_values == {1: 0.3}
    assert chain_of(retry) == chain_of(study.get_trials()[0]) == params_key({"model.width": 0.4, "seed": 0})
    failed = study.get_trials()[0]
    assert requeue(study, failed, counted=False, max_retry=2)  # an interruption uses up no retry
    assert study.get_trials()[-1].system_attrs["dse:failures"] == 0
    used_up = optuna.trial.create_trial(state=TrialState.FAIL, system_attrs={**failed.system_attrs, "dse:failures": 2})
    assert not requeue(study, used_up, counted=True, max_retry=2)
    assert requeue(study, used_up, counted=False, max_retry=2)


def test_a_chain_is_finished_once_any_trial_finished_else_alive_else_failed(grid):
    plan, storage, study = grid
    enqueue_missing(study, plan)
    trial = claim_trial(study, storage, plan)
    fail_trial(study, trial, "RuntimeError: x", counted=True, max_retry=0)
    by_chain = chains(study.get_trials())
    key = params_key({"model.width": 0.4, "seed": 0})
    assert chain_state(by_chain[key]) == TrialState.FAIL and chain_state([]) is None
    assert chain_state(by_chain[params_key({"model.width": 0.2, "seed": 0})]) == TrialState.WAITING
    assert enqueue_missing(study, plan) == 1  # a new run gets fresh retries for the failed chain
    assert study.get_trials()[-1].system_attrs["dse:failures"] == 0


def test_a_duplicate_queued_trial_is_dropped_at_its_claim(grid):
    plan, storage, study = grid
    enqueue_missing(study, plan)
    study.tell(claim_trial(study, storage, plan), 0.5)
    study.enqueue_trial({"model.width": 0.4, "seed": 0})  # as a second, unlocked enqueuer would
    assert [t.number for t in claim_trials(study, storage, plan, 2)] == [1, 2]
    assert claim_trial(study, storage, plan) is None
    dup = study.get_trials()[-1]
    assert (dup.state, dup.user_attrs["fail_reason"]) == (TrialState.FAIL, "duplicate of trial 0 (same grid point)")


def test_the_tally_counts_chains_not_trials(grid):
    plan, storage, study = grid
    enqueue_missing(study, plan)
    a, b, c = claim_trials(study, storage, plan, 3)
    study.tell(a, 0.5)
    fail_trial(study, b, "RuntimeError: first", counted=True, max_retry=1)  # retried: its chain is still alive
    fail_trial(study, c, "RuntimeError: for good", counted=True, max_retry=0)
    outcome = tally(study, plan)
    assert (outcome.total, outcome.complete, outcome.pruned, outcome.failed, outcome.left) == (3, 1, 0, 1, 1)
    assert outcome.reasons == ["trial 2: RuntimeError: for good"] and not outcome.ok
    assert outcome.counts() == "1 complete, 0 pruned, 1 failed, 1 left"
    assert "1 of 3 trials FAILED with no retry left, 1 of 3 trials not finished" in outcome.problems()


def test_a_sampled_space_asks_new_trials_up_to_its_total(tmp_path):
    plan = _plan(tmp_path, SAMPLED, n_trials=2)
    storage = open_storage(plan.storage)
    study = optuna.create_study(study_name="q", storage=storage, directions=["maximize"])
    assert enqueue_missing(study, plan) == 0 and next_step(study, plan) == "work"
    asked = claim_trials(study, storage, plan, 5)
    assert len(asked) == 2 and next_step(study, plan) == "wait"
    fail_trial(study, asked[0], "RuntimeError: x", counted=True, max_retry=0)  # no retry: its chain failed
    study.tell(asked[1], 0.5)
    assert next_step(study, plan) == "done" and tally(study, plan).failed == 1
    assert enqueue_missing(study, plan) == 1  # the failed chain again, as a retry of its last trial
    retry = study.get_trials()[-1]
    assert retry.system_attrs["dse:chain"] == str(asked[0].number) and retry.system_attrs["dse:retry_of"] == 0


def _claim_at_once(plan: Plan, workers: int, storage_for, *, before_claim=lambda: None) -> list[list[int]]:
    """Each of `workers` threads, with a storage of its own (`storage_for()`), claims one trial; their numbers.
    `before_claim` runs in each thread once its study is loaded, just before its claim."""

    def claim_one(_: int) -> list[int]:
        storage = storage_for()
        study = optuna.load_study(study_name=plan.study_name, storage=storage)
        before_claim()
        return [t.number for t in claim_trials(study, storage, plan, 1)]

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(claim_one, range(workers)))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_claimers_that_both_read_the_one_waiting_trial_it_goes_to_exactly_one(backend, tmp_path, request):
    url = request.getfixturevalue("postgres").url if backend == "postgresql" else None
    plan = _plan(tmp_path, storage=url)
    plan.grid, plan.cost, plan.total = plan.grid[:1], plan.cost[:1], 1
    study = optuna.create_study(study_name="q", storage=open_storage(plan.storage), directions=["maximize"])
    enqueue_missing(study, plan)
    both_read, armed = threading.Barrier(2, timeout=60), threading.local()

    def meet() -> None:  # each claimer, having read the queue, waits for the other's read: both see it WAITING
        if getattr(armed, "on", False):
            armed.on = False
            both_read.wait()

    claimed = _claim_at_once(
        plan,
        2,
        lambda: before_trial_reads(open_storage(plan.storage), meet, after=True),
        before_claim=lambda: setattr(armed, "on", True),
    )
    assert sorted(claimed) == [[], [0]]
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING] and len(study.get_trials()) == 1


def test_sqlite_claims_that_interleave_between_reading_and_claiming_take_each_trial_once(tmp_path):
    plan = _plan(tmp_path)
    study = optuna.create_study(study_name="q", storage=open_storage(plan.storage), directions=["maximize"])
    enqueue_missing(study, plan)

    def storage_for():
        storage = open_storage(plan.storage)

        @sqlalchemy.event.listens_for(storage.engine, "after_cursor_execute")
        def slow_read(conn, cursor, statement, parameters, context, executemany) -> None:
            if statement.lstrip().upper().startswith("SELECT") and "trials.trial_id = ?" in statement:
                time.sleep(0.3)  # a slow disk between reading a trial's state and claiming it: the others read now

        return storage

    claimed = _claim_at_once(plan, 3, storage_for)
    assert sorted(n for numbers in claimed for n in numbers) == [0, 1, 2]
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING] * 3
