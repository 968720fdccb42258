"""The sweep: grid trials land once each in the study DB, several workers share it, killed workers'
trials are retried and resume, bad input is refused before any trial with the DB left untouched."""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest
from conftest import free_port, write_cifar
from optuna.trial import TrialState

from dse.storage import StudyError, TrialLost, before_trial_reads, check_ours
from dse.study import OBJECTIVES
from dse.sweep import (
    Seams,
    compose,
    group_size,
    hold_run_dir,
    merge_overrides,
    plan_sweep,
    prepare_study,
    reap,
    run_folder,
    run_sweep,
    sweep_storage,
)
from dse.sweep.plan import check_budgets
from dse.sweep.queue import fail_stale

REPO = Path(__file__).resolve().parents[1]
# Every plot optuna-dashboard renders on the server (optuna_dashboard/_app.py: get_plot).
PLOTS = ("contour", "slice", "parallel_coordinate", "rank", "edf", "timeline", "pareto_front")
WARNINGS = ("FutureWarning", "DeprecationWarning", "ExperimentalWarning")  # none may reach a sweep's output
ATTRS = {
    "paper_name",
    "blocks",
    "width",
    "params",
    "macs",
    "size_bytes",
    "size_mb",
    "int8_mb",
    "latency_ms",
    "s_per_epoch",
    "precision",
    "memory_format",
    "curves",
    "seed",
    "test_acc",
    "provenance",
    "artifact_checkpoint",
    "artifact_curves",
}


def tiny(data_root: Path, db: Path, *extra: str) -> list[str]:
    """Overrides for a tiny width sweep: 2 widths x 2 seeds, one short epoch on generated CIFAR data."""
    return [
        "+space=width",
        "budget=quick",
        f"data.root={data_root}",
        "data.subset=null",
        "data.val_size=40",
        "train.epochs=1",
        "train.batch_size=32",
        "space.grid={model.width:[0.125,0.2]}",
        "space.seeds=[0,1]",
        "sweep.seeds=2",
        f"study.storage=sqlite:///{db}",
        "study.heartbeat_interval=1",
        "study.grace_period=3",
        "train.memory_format=contiguous",  # no layout timing: quicker
        "sweep.trials_per_gpu=1",  # no group-size probe: quicker (auto has its own test)
        "sweep.threads=1",  # two threads per worker ran 20-40x slower on a loaded 2-core machine
        *extra,
    ]


def run_cli(overrides: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dse.sweep", *overrides], cwd=REPO, capture_output=True, text=True, timeout=600, **kwargs
    )


def trials(db: Path, name: str = "width-cifar10-quick") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{db}").get_trials()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_cifar(root, "cifar10", n_train=160, n_test=40)
    return root


@pytest.fixture(scope="module")
def swept(data_root, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A finished tiny sweep, run by two worker processes on one SQLite DB."""
    db = tmp_path_factory.mktemp("study") / "tiny.db"
    result = run_cli(tiny(data_root, db, "sweep.workers=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    return db, result


def test_two_workers_finish_every_trial_once(swept):
    db, result = swept
    done = trials(db)
    assert "database is locked" not in result.stderr
    assert [t.state for t in done] == [TrialState.COMPLETE] * 4
    assert sorted(t.number for t in done) == [0, 1, 2, 3]
    assert sorted((t.params["model.width"], t.params["seed"]) for t in done) == [
        (0.125, 0),
        (0.125, 1),
        (0.2, 0),
        (0.2, 1),
    ]
    by_number = sorted(done, key=lambda t: t.number)
    assert [t.params["model.width"] for t in by_number] == [0.2, 0.2, 0.125, 0.125]  # costliest queued first
    for t in done:
        assert ATTRS <= set(t.user_attrs), ATTRS - set(t.user_attrs)
        assert t.values[0] == t.user_attrs["curves"][-1]["val_acc"]
        assert t.values[1] == t.user_attrs["size_mb"] and t.values[2] == t.user_attrs["latency_ms"]
        assert t.user_attrs["paper_name"] == f"Shallow SqueezeNext-06-{t.params['model.width']:g}x"
        assert t.user_attrs["provenance"]["config"]["model"]["width"] == t.params["model.width"]
        assert t.user_attrs["provenance"]["versions"]["torch"]
    study = optuna.load_study(study_name="width-cifar10-quick", storage=f"sqlite:///{db}")
    assert study.metric_names == list(OBJECTIVES)
    artifacts = db.with_suffix("") / "artifacts"
    assert len(list(artifacts.iterdir())) == 16  # a checkpoint, the curves, the fp32 and the int8 ONNX file per trial


def test_rerun_trains_nothing_new(swept, data_root):
    db, _ = swept
    before = [(t.number, t.datetime_complete) for t in trials(db)]
    result = run_cli(tiny(data_root, db, "sweep.workers=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "nothing to do" in result.stdout
    assert [(t.number, t.datetime_complete) for t in trials(db)] == before


def test_killed_worker_trial_is_retried_and_resumes(tmp_path):
    root = tmp_path / "data"
    write_cifar(root, "cifar10", n_train=800, n_test=40)
    db = tmp_path / "kill.db"
    overrides = tiny(
        root,
        db,
        "sweep.workers=1",
        "train.epochs=4",
        "space.grid={model.width:[0.3]}",
        "space.seeds=[0]",
        "sweep.seeds=1",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "dse.sweep", *overrides],
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    runs = db.with_suffix("") / "runs"
    deadline = time.time() + 300
    while not list(runs.glob("*/checkpoint.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [t.state for t in trials(db)] == [TrialState.RUNNING]

    result = run_cli(overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    states = [t.state for t in trials(db)]
    assert states == [TrialState.FAIL, TrialState.COMPLETE], states
    retried = trials(db)[1]
    assert retried.params == trials(db)[0].params
    assert retried.user_attrs["resumed_from"] >= 1
    assert len(retried.user_attrs["curves"]) == 4
    assert retried.system_attrs["dse:failures"] == 0  # a stopped sweep is no failure of the trial: no retry used up


def test_four_workers_on_postgresql_with_a_query_string_and_a_non_ascii_name(postgres, data_root, tmp_path):
    url = f"{postgres.url}?application_name=dse&sslmode=disable"  # re-passed to Hydra's compose: must be quoted
    result = run_cli(
        tiny(
            data_root,
            Path("unused.db"),
            "sweep.workers=4",
            f"study.storage='{url}'",
            "study.name='étude-4'",
            f"study.workdir={tmp_path / 'pgwork'}",
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="étude-4", storage=postgres.url)
    done = study.get_trials()
    assert [t.state for t in done] == [TrialState.COMPLETE] * 4
    assert len({(t.params["model.width"], t.params["seed"]) for t in done}) == 4
    assert (tmp_path / "pgwork" / ".dse-workdir").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["+space=nope"], "Could not find 'space/nope'"),
        (["train.optimizer=adamw"], "optimizer='adamw' is unknown; allowed: sgd, adam, adamax, adagrad, adabound"),
        (["train=adamw"], "Could not find 'train/adamw'"),
        (["model.activation=tanh"], "activation='tanh' is not allowed; allowed: 'elu', 'relu'"),
        (["space.grid={model.width:[0.2,-1]}"], "width=-1.0 must be > 0"),
        (["model.blocks=[1,1,1]"], "blocks=[1, 1, 1] must be four positive integers"),
        (["study.storage=postgresql://nobody@127.0.0.1:9/none"], "cannot reach storage"),
        (["data.root=/nonexistent/data", "data.download=false"], "CIFAR-10 not found: looked for data_batch_1"),
        (["study.name=other"], "exists in"),
        (["train.epochs=2"], "defined otherwise (its value -> this run's): train.epochs: 1 -> 2 (in 2 configs)"),
        (["study.name=../x"], "study name='../x' must be letters, digits"),
    ],
)
def test_bad_input_is_refused_and_db_untouched(swept, data_root, extra, message):
    db, _ = swept
    study = "other"
    if not any(s.study_name == study for s in optuna.get_all_study_summaries(f"sqlite:///{db}")):
        optuna.create_study(study_name=study, storage=f"sqlite:///{db}", direction="maximize")
    before = _db_bytes(db)
    overrides = [o for o in tiny(data_root, db) if not (extra[0].startswith("+space") and o.startswith("+space"))]
    result = run_cli([*overrides, *extra])
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert _db_bytes(db) == before


def _db_bytes(db: Path) -> bytes:
    """The DB file's bytes with its write-ahead log folded in (a reader's close may fold it in too)."""
    with sqlite3.connect(db) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return db.read_bytes()


def test_over_budget_model_is_pruned_before_training_without_warnings(tmp_path, data_root):
    db = tmp_path / "budget.db"
    overrides = merge_overrides(
        tiny(data_root, db),
        [
            "space.grid={model.width:[0.125,0.4]}",
            "space.seeds=[0]",
            "sweep.seeds=1",
            "sweep.workers=1",
            "study.max_size_kb=150",
        ],
    )
    result = run_cli(overrides, env={**os.environ, "PYTHONWARNINGS": "default"})  # DeprecationWarnings shown too
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert not [w for w in WARNINGS if w in output], output[-3000:]
    by_width = {t.params["model.width"]: t for t in trials(db)}
    small, large = by_width[0.125], by_width[0.4]
    assert small.state == TrialState.COMPLETE and small.constraints["size_kb"] < 0
    assert large.state == TrialState.PRUNED and "curves" not in large.user_attrs
    assert large.user_attrs["pruned_reason"].startswith("over budget: size_kb 233.")
    assert large.constraints["size_kb"] == pytest.approx(large.user_attrs["size_bytes"] / 1e3 - 150)


def test_dashboard_serves_the_study(swept):
    db, _ = swept
    port = free_port()
    dashboard = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent)) or shutil.which(
        "optuna-dashboard"
    )
    if dashboard is None:
        pytest.skip("optuna-dashboard is not installed")
    proc = subprocess.Popen(
        [
            dashboard,
            f"sqlite:///{db}",
            "--port",
            str(port),
            "--artifact-dir",
            str(db.with_suffix("") / "artifacts"),
            "--quiet",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        studies = _get_json(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
        study = next(s for s in studies if s["study_name"] == "width-cifar10-quick")
        detail = _get_json(f"http://127.0.0.1:{port}/api/studies/{study['study_id']}")
        assert detail["objective_names"] == list(OBJECTIVES)
        assert len(detail["trials"]) == 4
        assert {t["state"] for t in detail["trials"]} == {"Complete"}
        assert all(len(t["artifacts"]) == 4 for t in detail["trials"])  # checkpoint, curves, fp32 and int8 ONNX
        for plot in PLOTS:  # rendered by the server with plotly (HTTP 500 without it)
            figure = _get_json(f"http://127.0.0.1:{port}/api/studies/{study['study_id']}/plot/{plot}")
            assert figure["data"], plot
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _get_json(url: str) -> dict:
    deadline = time.time() + 60
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError:  # the server answered: an error status is the result, not a wait
            raise
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


# ---------------------------------------------------------------- planning refuses before anything runs


def _plan(data_root: Path, db: Path, *extra: str):
    args = tiny(data_root, db, *extra)
    if "+space=open" in extra:
        args = [a for a in args if a not in ("+space=width", "space.grid={model.width:[0.125,0.2]}")]
    return plan_sweep(compose(args), args)


@pytest.mark.parametrize(
    "extra, messages",
    [
        (["space.grid={model.width:[1e9]}"], ["model shallow_squeezenext with", "cannot be built"]),
        (["space.grid={model.width:[inf]}"], ["grid model.width=[inf] must be a non-empty list of finite values"]),
        (["space.grid={model.width:[nan]}"], ["grid model.width=[nan] must be a non-empty list of finite values"]),
        (["train.lr=inf"], ["train.lr=inf must be finite"]),
        (["data.subset=3"], ["train batch_size=32 is more than the 3 training images of cifar10 (data.subset=3"]),
        (["data.val_size=0"], ["data val_size=0: the sweep optimises validation accuracy"]),
        (["model.width=-1"], ["model.width=-1: space 'width' sets model.width", "besides, width=-1.0 must be > 0"]),
        (["train.seed=5"], ["train.seed=5: space 'width' sets train.seed for every trial", "space.seeds=[...]"]),
        (["sweep.trials_per_gpu=0"], ["sweep trials_per_gpu='0' is not allowed; allowed: auto or a whole number >= 1"]),
        (["sweep.trials_per_gpu=two"], ["sweep trials_per_gpu='two' is not allowed"]),
        (
            ["+space=open", "space.search={model.width:{low:x,high:1}}"],
            ["low='x' and high=1 must be finite numbers with low < high"],
        ),
        (["+space=open", "space.search={model.width:{low:0.1,high:1,log:yes}}"], ["log='yes' must be true or false"]),
        (["+space=open", "space.search={model.width:{low:0,high:1,log:true}}"], ["log=true needs low=0 > 0"]),
    ],
)
def test_plan_refuses_bad_values_naming_them(data_root, tmp_path, extra, messages):
    with pytest.raises(ValueError) as e:
        _plan(data_root, tmp_path / "x.db", *extra)
    for message in messages:
        assert message in str(e.value)
    assert not (tmp_path / "x.db").exists()


def test_points_made_equal_by_an_override_are_refused(data_root, tmp_path):
    space = (
        "space.points=[{model:Shallow SqueezeNext-06-0.2x,overrides:['model.dropout=0.1']},Shallow SqueezeNext-06-0.2x]"
    )
    with pytest.raises(ValueError, match="are the same trial config"):
        _plan(data_root, tmp_path / "x.db", space, "model.dropout=0.3")


def test_run_folder_depends_only_on_what_the_trial_computes(data_root, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(data_root, moved)
    a = _plan(data_root, tmp_path / "x.db")
    b = _plan(
        moved,
        tmp_path / "x.db",
        "sweep.workers=2",
        "sweep.progress=false",
        "study.heartbeat_interval=5",
        "study.grace_period=20",
        "train.eval_batch_size=64",
        "train.threads=2",
        "sweep.threads=2",
        "sweep.trials_per_gpu=2",
    )
    c = _plan(data_root, tmp_path / "x.db", "train.epochs=2")
    point = a.grid[0]
    assert run_folder(a, point) == run_folder(b, point) != run_folder(c, point)
    assert run_folder(a, point) != run_folder(a, a.grid[1])
    assert a.definition == b.definition != c.definition


def test_an_explicit_workdir_must_be_new_empty_or_dse_s(data_root, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not dse's")
    with pytest.raises(StudyError, match="non-empty folder that dse did not make"):
        _plan(data_root, tmp_path / "x.db", f"study.workdir={foreign}")
    (foreign / ".dse-workdir").touch()
    assert _plan(data_root, tmp_path / "x.db", f"study.workdir={foreign}").workdir == str(foreign)


# ---------------------------------------------------------------- exit codes, retries


def test_full_disk_fails_the_trials_and_the_outcome_then_a_rerun_finishes(tmp_path):
    import errno

    from sweeps import run_tiny_plan

    def full(path, state):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    args = ("+space=width", "space.grid={model.width:[0.125]}", "space.seeds=[0]", "sweep.seeds=1", "study.max_retry=1")
    outcome = run_tiny_plan(tmp_path, *args, name="full", seams=Seams(writer=full))
    assert not outcome.ok and (outcome.failed, outcome.left, outcome.complete) == (1, 0, 0)
    assert "No space left on device" in outcome.problems() and "1 of 1 trials FAILED" in outcome.problems()
    study = optuna.load_study(study_name="full", storage=f"sqlite:///{tmp_path / 'full.db'}")
    assert [(t.state, t.system_attrs["dse:failures"]) for t in study.trials] == [
        (TrialState.FAIL, 0),
        (TrialState.FAIL, 1),
    ]

    # the disk has room again: a rerun gets fresh retries and finishes
    outcome = run_tiny_plan(tmp_path, *args, name="full")
    assert outcome.ok and outcome.complete == 1
    assert [t.state for t in study.trials][-1] == TrialState.COMPLETE


def test_corrupt_checkpoint_exits_nonzero_with_the_reason(data_root, tmp_path):
    db = tmp_path / "corrupt.db"
    extra = (
        "space.grid={model.width:[0.125]}",
        "space.seeds=[0]",
        "sweep.seeds=1",
        "study.max_retry=0",
        "sweep.workers=1",
    )
    plan = _plan(data_root, db, *extra)
    folder = run_folder(plan, plan.grid[0])
    folder.mkdir(parents=True)
    (folder / "checkpoint.pt").write_bytes(b"not a checkpoint")
    (folder / ".checkpoint.pt.x1y2.tmp").write_bytes(b"a write that was killed")
    result = run_cli(tiny(data_root, db, *extra))
    assert result.returncode == 1
    assert "1 of 1 trials FAILED with no retry left" in result.stderr and "is unreadable" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (folder / ".checkpoint.pt.x1y2.tmp").exists()


def test_a_duplicate_queued_trial_is_dropped_not_trained(tmp_path):
    from sweeps import run_tiny_plan

    args = ("+space=width", "space.grid={model.width:[0.125]}", "space.seeds=[0]", "sweep.seeds=1")
    run_tiny_plan(tmp_path, *args, name="dup")
    study = optuna.load_study(study_name="dup", storage=f"sqlite:///{tmp_path / 'dup.db'}")
    study.enqueue_trial(study.trials[0].params)  # as a second, unlocked enqueuer would
    outcome = run_tiny_plan(tmp_path, *args, name="dup")
    assert outcome.ok
    states = [(t.state, t.user_attrs.get("fail_reason")) for t in study.trials]
    assert states == [(TrialState.COMPLETE, None), (TrialState.FAIL, "duplicate of trial 0 (same grid point)")]


def test_a_dead_worker_s_trial_fails_at_once_and_counts_as_a_failure(data_root, tmp_path):
    import multiprocessing

    plan = _plan(data_root, tmp_path / "dead.db", "study.max_retry=2")
    study = optuna.create_study(study_name=plan.study_name, storage=sweep_storage(plan))
    process = multiprocessing.get_context("spawn").Process(target=os._exit, args=(9,))
    process.start()
    process.join()
    trial = study.ask()
    trial.set_user_attr("worker", f"{socket.gethostname()}:{process.pid}")
    died: list[str] = []
    reap(study, [process], plan, died)
    assert died == ["worker 0 exited with code 9"]
    failed, retry = study.get_trials()
    assert (
        failed.state == TrialState.FAIL and failed.user_attrs["fail_reason"] == "its worker process died (exit code 9)"
    )
    assert retry.state == TrialState.WAITING and retry.system_attrs["dse:failures"] == 1


def test_a_claimed_trial_nobody_took_up_is_retried_after_the_grace_period(data_root, tmp_path):
    plan = _plan(data_root, tmp_path / "orphan.db")  # grace_period=3
    storage = sweep_storage(plan)
    study = optuna.create_study(study_name=plan.study_name, storage=storage)
    taken, _orphan = study.ask(), study.ask()  # the orphan: its claimer's reply was lost, or it died at once
    taken.set_user_attr("worker", "elsewhere:1")
    fail_stale(study, storage, plan)
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING] * 2
    time.sleep(3.5)
    fail_stale(study, storage, plan)
    states = [(t.number, t.state, t.system_attrs.get("dse:retry_of")) for t in study.get_trials()]
    assert states == [(0, TrialState.RUNNING, None), (1, TrialState.FAIL, None), (2, TrialState.WAITING, 1)]


# ---------------------------------------------------------------- run folders


def test_a_run_folder_is_held_by_one_process_at_a_time(tmp_path):
    folder = tmp_path / "run"
    events = []
    with hold_run_dir(folder, lambda: None):

        def second():
            checks = iter([None, TrialLost("taken over")])

            def check():
                if next(checks):
                    raise TrialLost("taken over")

            try:
                with hold_run_dir(folder, check):
                    events.append("second got it")
            except TrialLost:
                events.append("second gave up")

        thread = threading.Thread(target=second)
        thread.start()
        thread.join(timeout=30)
    assert events == ["second gave up"]
    with hold_run_dir(folder, lambda: None):
        pass  # free again once released


# ---------------------------------------------------------------- concurrency and outages


def _finished_once(study: optuna.Study, points: int) -> None:
    done = study.get_trials()
    assert [t.state for t in done] == [TrialState.COMPLETE] * points, [
        (t.number, t.state, t.user_attrs.get("fail_reason")) for t in done
    ]
    assert len({json.dumps(t.params, sort_keys=True) for t in done}) == points


def _slow_reads(storage):
    """The storage with its reads of a study's trials slowed down (a busy database)."""
    return before_trial_reads(storage, lambda: time.sleep(0.5))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_sweeps_starting_at_once_queue_and_train_each_point_once(backend, data_root, tmp_path, request):
    """Two sweeps of one new study (threads with their own connections and locks, as processes have) read
    what is queued at the same instant; reading is slowed so that, without the lock, both would queue it all."""
    storage = (
        request.getfixturevalue("postgres").url if backend == "postgresql" else f"sqlite:///{tmp_path / 'twice.db'}"
    )
    plan = _plan(
        data_root,
        tmp_path / "unused.db",
        f"study.storage={storage}",
        f"study.workdir={tmp_path / 'work'}",
        "sweep.workers=1",
    )
    barrier, queued = threading.Barrier(2), []

    def start() -> None:
        barrier.wait()
        queued.append(prepare_study(plan, seams=Seams(storage=_slow_reads))[1])

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(queued) == [0, 4]
    assert run_sweep(plan).ok
    _finished_once(optuna.load_study(study_name="width-cifar10-quick", storage=storage), 4)


@pytest.mark.slow
def test_a_postgresql_outage_during_a_run_trains_nothing_twice(postgres, tmp_path):
    """Stop the database for 3 s while two workers train (a beat fails for longer than the grace period)."""
    root = tmp_path / "data"
    write_cifar(root, "cifar10", n_train=600, n_test=40)
    command = [
        sys.executable,
        "-m",
        "dse.sweep",
        *tiny(
            root,
            tmp_path / "unused.db",
            "sweep.workers=2",
            "train.epochs=3",
            f"study.storage={postgres.url}",
            f"study.workdir={tmp_path / 'work'}",
            "study.grace_period=2",
            "study.storage_retry_seconds=60",
        ),
    ]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while (
        not list((tmp_path / "work" / "runs").glob("*/checkpoint.pt"))
        and time.time() < deadline
        and proc.poll() is None
    ):
        time.sleep(0.1)
    assert proc.poll() is None, "the sweep ended before the outage"
    postgres.stop()
    time.sleep(3)
    postgres.start()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    study = optuna.load_study(study_name="width-cifar10-quick", storage=postgres.url)
    by_point: dict[str, list] = {}
    for t in study.get_trials():
        by_point.setdefault(json.dumps(t.system_attrs["fixed_params"], sort_keys=True), []).append(t)
    assert len(by_point) == 4
    for runs in by_point.values():
        assert [t.state for t in runs].count(TrialState.COMPLETE) == 1
        trained = [
            r["epoch"]
            for t in runs
            for r in t.user_attrs.get("curves", [])
            if t.state != TrialState.COMPLETE or r["epoch"] > t.user_attrs["resumed_from"]
        ]
        assert len(trained) == len(set(trained)), f"an epoch was trained twice: {sorted(trained)}"


# ---------------------------------------------------------------- several trials per worker (fused groups)
# A grid of one architecture: dropout p and seed differ, so a worker's claimed trials fuse into one group.
FUSABLE = ("+space=dropout", "space.grid={model.dropout:[0.1,0.3]}", "space.seeds=[0,1]", "sweep.seeds=2")


def _by_params(tmp_path: Path, name: str) -> dict[str, optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / f'{name}.db'}")
    return {json.dumps(t.params, sort_keys=True): t for t in study.get_trials()}


def test_fused_trials_record_what_solo_trials_do(tmp_path):
    """The same grid with trials_per_gpu=1 and 4: one COMPLETE trial per point either way, the same user
    attributes, the same curves up to floating-point order (losses to 1e-3 relative, accuracies to one of
    the 40 validation or test images)."""
    from sweeps import run_tiny_plan

    for size in (1, 4):
        assert run_tiny_plan(tmp_path, *FUSABLE, f"sweep.trials_per_gpu={size}", name=f"n{size}").ok
    solo, fused = _by_params(tmp_path, "n1"), _by_params(tmp_path, "n4")
    assert solo.keys() == fused.keys() and len(solo) == 4
    for key, alone in solo.items():
        together = fused[key]
        assert alone.state == together.state == TrialState.COMPLETE
        assert set(alone.user_attrs) == set(together.user_attrs)
        assert [r["trials"] for r in alone.user_attrs["curves"]] == [1, 1]
        assert [r["trials"] for r in together.user_attrs["curves"]] == [4, 4]
        for a, b in zip(alone.user_attrs["curves"], together.user_attrs["curves"]):
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
            assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-3)
            assert b["val_acc"] == pytest.approx(a["val_acc"], abs=1 / 40 + 1e-9)
        assert together.user_attrs["test_acc"] == pytest.approx(alone.user_attrs["test_acc"], abs=1 / 40 + 1e-9)
        assert together.values[0] == together.user_attrs["curves"][-1]["val_acc"]


def test_trials_that_leave_their_group_end_at_once_and_the_others_finish(tmp_path):
    """A group of 3: after epoch 1, trial 1 is pruned and trial 2 fails (an error of its own); both end before
    trial 0's next epoch, which trial 0 trains alone; trial 2's retry resumes its epoch-1 checkpoint."""
    from sweeps import run_tiny_plan

    seen, calls = [], collections.Counter()

    def check(storage, trial_id, beat, grace):
        check_ours(storage, trial_id, beat, grace)
        number = storage.get_trial(trial_id).number
        calls[number] += 1
        if calls[number] == 1:  # the check before training
            return
        if number == 0:
            seen.append([t.state for t in optuna.load_study(study_name="leave", storage=storage).trials[1:3]])
        if number == 1:
            raise optuna.TrialPruned("pruned after epoch 1")
        if number == 2:
            raise RuntimeError("fails after epoch 1")

    point = ("space.grid={model.dropout:[0.1]}", "space.seeds=[0,1,2]", "sweep.seeds=3", "sweep.trials_per_gpu=3")
    assert run_tiny_plan(tmp_path, *FUSABLE, *point, name="leave", seams=Seams(check=check)).ok
    trials = optuna.load_study(study_name="leave", storage=f"sqlite:///{tmp_path / 'leave.db'}").get_trials()
    assert seen == [
        [TrialState.RUNNING] * 2,
        [TrialState.PRUNED, TrialState.FAIL],
    ]  # trial 0's checks after epochs 1, 2
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.COMPLETE]
    assert [r["trials"] for r in trials[0].user_attrs["curves"]] == [3, 1]
    assert trials[2].user_attrs["fail_reason"] == "RuntimeError: fails after epoch 1"
    retry = trials[3]
    assert retry.params == trials[2].params and retry.user_attrs["resumed_from"] == 1
    assert [r["trials"] for r in retry.user_attrs["curves"]] == [3, 1]


def test_auto_trials_per_gpu_measures_on_the_worker_s_device_and_says_so(data_root, tmp_path, capsys):
    plan = _plan(data_root, tmp_path / "x.db", "space.grid={model.width:[0.125]}", "sweep.trials_per_gpu=auto")
    assert plan.group_size is None
    size = group_size(plan, {})
    line = capsys.readouterr().out
    assert size in (1, 2)  # sizes up to the space's 2 trials
    assert (
        f"[worker 0] sweep.trials_per_gpu=auto: {size} on cpu (training images/s of Shallow SqueezeNext-06-0.125x"
        in line
    )
    assert "1: " in line and "2: " in line
    assert group_size(_plan(data_root, tmp_path / "x.db", "sweep.trials_per_gpu=3"), {}) == 3


def test_a_grid_over_its_size_budget_everywhere_is_refused_naming_the_smallest_model(data_root, tmp_path):
    db = tmp_path / "x.db"
    result = run_cli(tiny(data_root, db, "study.max_size_kb=1"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(
        "dse.sweep: study.max_size_kb=1: every trial of space 'width' is over it; the smallest "
        "model of the space, Shallow SqueezeNext-06-0.125x, has "
    )
    assert "latency of" not in result.stdout and not db.exists()  # refused before any measuring or writing


def test_a_grid_partly_over_its_budgets_says_how_many_before_it_starts(data_root, tmp_path):
    def plan(budget: str):
        args = merge_overrides(tiny(data_root, tmp_path / "x.db"), ["space.grid={model.width:[0.125,0.4]}", budget])
        return plan_sweep(compose(args), args)

    assert check_budgets(plan("study.max_size_kb=150")) == (
        "budget: 2 of 4 trials are over it (2 over study.max_size_kb=150); they are pruned without training"
    )
    timed = plan("study.max_latency_ms=1")  # the latency budget: checked once the grid's latencies are measured
    small, large = timed.archs
    assert check_budgets(timed) == ""
    assert check_budgets(timed, {small: 0.5, large: 3.0}) == (
        "budget: 2 of 4 trials are over it (2 over study.max_latency_ms=1); they are pruned without training"
    )
    with pytest.raises(
        ValueError,
        match="study.max_latency_ms=1: every trial of space 'width' is over it; the fastest "
        "architecture of the space, Shallow SqueezeNext-06-0.125x, has 1.500 ms",
    ):
        check_budgets(timed, {small: 1.5, large: 3.0})


def test_a_grid_over_its_latency_budget_everywhere_is_refused_before_the_study_is_written(data_root, tmp_path):
    db = tmp_path / "x.db"
    result = run_cli(tiny(data_root, db, "study.max_latency_ms=0.000001"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "latency of the 2 architecture(s)" in result.stdout  # measured, then refused before any training
    assert result.stderr.strip().startswith(
        "dse.sweep: study.max_latency_ms=1e-06: every trial of space 'width' is "
        "over it; the fastest architecture of the space, Shallow SqueezeNext-06-0."
    )
    assert not db.exists()  # so a rerun with a larger budget is no study "defined otherwise"


# ---------------------------------------------------------------- reproducibility: no clock changes a number


def _curves(study: optuna.Study) -> dict[str, list[tuple]]:
    """Each COMPLETE trial's per-epoch numbers (its timings left out), by params; each point COMPLETE once."""
    done = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    numbers = lambda t: [
        (r["epoch"], r["train_loss"], r["train_acc"], r["val_loss"], r["val_acc"]) for r in t.user_attrs["curves"]
    ]
    out = {json.dumps(t.params, sort_keys=True): numbers(t) for t in done}
    assert len(out) == len(done)
    return out


def test_the_same_sweep_twice_computes_the_same_whatever_the_layout_probe_says(tmp_path):
    """Two fresh studies of one command, `train.memory_format=auto`, the layout timing answering channels_last for
    the first and NCHW for the second: every trial's per-epoch losses and accuracies are identical, both trained in
    the rule's layout, and each study stores the choice with the probe's answer as advice only."""
    from sweeps import run_tiny_plan

    from dse.layouts import figures

    studies = {}
    for name, answer in (("first", "channels_last"), ("second", "contiguous")):
        seams = Seams(probe=lambda model, x, y, autocast, answer=answer: answer)
        assert run_tiny_plan(
            tmp_path, *FUSABLE, "train.memory_format=auto", "sweep.trials_per_gpu=4", name=name, seams=seams
        ).ok
        studies[name] = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / f'{name}.db'}")
    first, second = (_curves(studies[n]) for n in ("first", "second"))
    assert first == second and len(first) == 4
    for name, answer in (("first", "channels_last"), ("second", "contiguous")):
        [(key, figure)] = figures(studies[name].user_attrs).items()
        assert (figure["memory_format"], figure["vmapped"], figure["faster"]) == ("contiguous", False, answer)
        for t in studies[name].get_trials():
            assert (t.user_attrs["memory_format"], t.user_attrs["layout_key"]) == ("contiguous", key)
            assert t.user_attrs["device_kind"] == figure["device_kind"] and t.user_attrs["vmapped"] is False


def _auto_args(root: Path, tmp_path: Path, name: str, *extra: str) -> list[str]:
    """A tiny fusable dropout sweep (4 trials) in `train.memory_format=auto`, one worker, study `name`."""
    width = ("+space=width", "space.grid={model.width:[0.125,0.2]}")
    base = [a for a in tiny(root, tmp_path / f"{name}.db", *FUSABLE) if a not in width]
    return [
        *base,
        "train.memory_format=auto",
        "sweep.trials_per_gpu=4",
        "sweep.workers=1",
        "sweep.progress=false",
        f"study.name={name}",
        *extra,
    ]


def test_a_study_s_stored_choice_wins_over_the_rule(data_root, tmp_path):
    """A study that stores a choice for its architecture on this device kind (made by an older dse's rule, say:
    here vmapped groups on the CPU) trains every trial that starts in it: reruns, retries and other workers read the
    study, not the rule. (Not channels_last: training Shallow SqueezeNext in it crashes torch 2.14 on AVX2 CPUs.)"""
    import torch

    from dse.layouts import attr_key, device_kind, figures

    args = _auto_args(data_root, tmp_path, "kept")
    plan = plan_sweep(compose(args), args)
    study, _ = prepare_study(plan)
    key = attr_key(device_kind(torch.device("cpu")), next(iter(plan.archs)))
    stored = {"memory_format": "contiguous", "vmapped": True, "cuda_graph": False, "how": "by hand"}
    study.set_user_attr(key, stored)
    assert run_sweep(plan).ok
    assert figures(study.user_attrs) == {key: stored}
    attrs = {tuple(t.user_attrs[a] for a in ("memory_format", "vmapped", "layout_key")) for t in study.get_trials()}
    assert attrs == {("contiguous", True, key)}


@pytest.mark.slow
def test_a_killed_fused_group_restarted_ends_identical_to_an_uninterrupted_run(tmp_path):
    """A group of four trials (`train.memory_format=auto`) killed with SIGKILL after its first checkpoint and run
    again: every point COMPLETE once, with the per-epoch numbers of the same sweep run without a kill."""
    root = tmp_path / "data"
    write_cifar(root, "cifar10", n_train=480, n_test=40)

    def args(name: str) -> list[str]:
        return _auto_args(root, tmp_path, name, "train.epochs=3")

    assert run_sweep(plan_sweep(compose(args("whole")), args("whole"))).ok
    proc = subprocess.Popen(
        [sys.executable, "-m", "dse.sweep", *args("killed")],
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    runs = tmp_path / "killed" / "runs"
    deadline = time.time() + 300
    while len(list(runs.glob("*/checkpoint.pt"))) < 4 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    result = run_cli(args("killed"))
    assert result.returncode == 0, result.stderr[-3000:]
    whole, killed = (
        optuna.load_study(study_name=n, storage=f"sqlite:///{tmp_path / f'{n}.db'}") for n in ("whole", "killed")
    )
    assert _curves(killed) == _curves(whole) and len(_curves(whole)) == 4
    resumed = [t.user_attrs["resumed_from"] for t in killed.get_trials() if t.state == TrialState.COMPLETE]
    assert all(r >= 1 for r in resumed) and [t.state for t in killed.get_trials()].count(TrialState.FAIL) == 4


# ---------------------------------------------------------------- spaces of one's own, errors of one line

OWN_SPACE = """\
defaults:
  - schema
  - _self_
name: own
seeds: [0]
overrides: [model=shallow_squeezenext, "model.blocks=[1,1,1,1]"]
grid:
  model.width: [0.125, 0.2]
"""


def _without_space(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not o.startswith(("+space=", "space.grid=", "space.seeds="))]


@pytest.mark.parametrize("how", ["searchpath", "path"])
def test_a_space_file_outside_the_checkout_runs_with_two_workers(data_root, tmp_path, how):
    (tmp_path / "myconf" / "space").mkdir(parents=True)
    (tmp_path / "myconf" / "space" / "own.yaml").write_text(OWN_SPACE)
    db = tmp_path / "own.db"
    by = {"searchpath": ["+space=own", "hydra.searchpath=[file://myconf]"], "path": ["+space=myconf/space/own.yaml"]}
    space = by[how]
    args = [*_without_space(tiny(data_root, db, "sweep.workers=2")), *space]
    # From the user's folder (relative paths), with this checkout's dse: the workers must find the space too.
    result = subprocess.run(
        [sys.executable, "-m", "dse.sweep", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    done = trials(db, "own-cifar10-quick")
    assert [t.state for t in done] == [TrialState.COMPLETE] * 2
    assert sorted(t.params["model.width"] for t in done) == [0.125, 0.2]
    assert len({t.user_attrs["worker"] for t in done}) >= 1
    study = optuna.load_study(study_name="own-cifar10-quick", storage=f"sqlite:///{db}")
    assert study.user_attrs["definition"]["space"]["grid"] == {"model.width": [0.125, 0.2]}


def test_an_activation_by_width_grid_from_the_command_line_runs_and_its_trials_carry_both_params(tmp_path):
    from sweeps import run_tiny_sweep

    grid = "space.grid={model.activation:[elu,relu],model.width:[0.125,0.2]}"
    storage, name = run_tiny_sweep(tmp_path, "+space=activation", grid, "space.seeds=[0]", name="actwidth")
    done = optuna.load_study(study_name=name, storage=storage).get_trials()
    assert [t.state for t in done] == [TrialState.COMPLETE] * 4
    assert sorted((t.params["model.activation"], t.params["model.width"]) for t in done) == [
        ("elu", 0.125),
        ("elu", 0.2),
        ("relu", 0.125),
        ("relu", 0.2),
    ]
    assert all(set(t.params) == {"model.activation", "model.width", "seed"} for t in done)  # the file's grid replaced
    for t in done:
        assert t.user_attrs["activation"] == t.params["model.activation"]
        assert t.user_attrs["width"] == t.params["model.width"]


@pytest.mark.parametrize(
    "grid, message",
    [
        (
            "space.grid={model.widht:[0.2]}",
            "dse.sweep: space 'width': grid key model.widht: model has no key 'widht'; did you mean width?",
        ),
        ("space.grid={model.width:[]}", "dse.sweep: space 'width': grid model.width=[] must be a non-empty list"),
        ("space.grid={model.width:0.2}", "dse.sweep: space 'width': grid model.width=0.2 must be a non-empty list"),
    ],
)
def test_a_bad_grid_is_refused_with_one_line_before_the_db_is_touched(data_root, tmp_path, grid, message):
    db = tmp_path / "x.db"
    result = run_cli([*tiny(data_root, db), grid])
    assert result.returncode != 0
    assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith(message)
    assert not db.exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("+space=widht", "dse.sweep: +space=widht: Could not find 'space/widht'; did you mean width?"),
        ("data=cifar11", "dse.sweep: data=cifar11: Could not find 'data/cifar11'; did you mean cifar10?"),
        ("model.widht=0.5", "dse.sweep: model.widht=0.5: model has no key 'widht'; did you mean width?"),
        ("train.lrr=0.1", "dse.sweep: train.lrr=0.1: train has no key 'lrr'; did you mean lr?"),
    ],
)
def test_an_unknown_name_is_one_line_with_the_closest(data_root, tmp_path, override, message):
    overrides = tiny(data_root, tmp_path / "x.db")
    overrides = [o for o in overrides if not (override.startswith("+space") and o.startswith("+space"))]
    result = run_cli([*overrides, override])
    assert result.returncode != 0
    assert 1 <= len(result.stderr.splitlines()) <= 2 and result.stderr.startswith(message), result.stderr
    assert "schema" not in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr
    assert not (tmp_path / "x.db").exists()


def test_hydra_s_own_flags_still_reach_hydra():
    result = run_cli(["+space=width", "budget=quick", "--cfg", "job"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "name: width" in result.stdout and "epochs: 3" in result.stdout


def test_a_study_whose_space_file_changed_under_the_same_name_is_refused(data_root, tmp_path):
    space = tmp_path / "spaces" / "own.yaml"
    space.parent.mkdir()
    space.write_text(OWN_SPACE)
    db = tmp_path / "own.db"
    args = [*_without_space(tiny(data_root, db)), f"+space={space}"]
    prepare_study(plan_sweep(compose(args), args))
    prepare_study(plan_sweep(compose(args), args))  # the same file again: the same study
    space.write_text(OWN_SPACE.replace("[0.125, 0.2]", "[0.125, 0.3]"))
    with pytest.raises(StudyError, match=r"study 'own-cifar10-quick' .* was defined otherwise .*Nothing was written"):
        prepare_study(plan_sweep(compose(args), args))


def test_config_dir_adds_a_config_folder_as_hydra_s_flag_does(data_root, tmp_path):
    (tmp_path / "myconf" / "space").mkdir(parents=True)
    (tmp_path / "myconf" / "space" / "own.yaml").write_text(OWN_SPACE)
    args = [*_without_space(tiny(data_root, tmp_path / "x.db")), "+space=own", "space.grid={model.widht:[0.2]}"]
    result = run_cli(["--config-dir", str(tmp_path / "myconf"), *args])  # found, then refused for its grid's key
    assert result.returncode != 0 and result.stderr.startswith("dse.sweep: space 'own': grid key model.widht:")
    assert not (tmp_path / "x.db").exists()
