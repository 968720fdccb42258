"""The sweep: grid trials land once each in the study DB, several workers share it, killed workers'
trials are retried and resume, bad input is refused before any trial with the DB left untouched."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from dse.study import OBJECTIVES
from dse.sweep import compose, grid_params, merge_overrides, plan_sweep, run_sweep
from dse.config import SpaceConfig
from conftest import write_cifar

REPO = Path(__file__).resolve().parents[1]
# Every plot optuna-dashboard renders on the server (optuna_dashboard/_app.py: get_plot).
PLOTS = ("contour", "slice", "parallel_coordinate", "rank", "edf", "timeline", "pareto_front")
WARNINGS = ("FutureWarning", "DeprecationWarning", "ExperimentalWarning")  # none may reach a sweep's output
ATTRS = {
    "paper_name", "blocks", "width", "params", "macs", "size_bytes", "size_mb", "int8_mb", "latency_ms",
    "s_per_epoch", "precision", "memory_format", "curves", "seed", "test_acc", "provenance",
    "artifact_checkpoint", "artifact_curves",
}


def tiny(data_root: Path, db: Path, *extra: str) -> list[str]:
    """Overrides for a tiny width sweep: 2 widths x 2 seeds, one short epoch on generated CIFAR data."""
    return [
        "+space=width", "budget=quick", f"data.root={data_root}", "data.subset=null", "data.val_size=40",
        "train.epochs=1", "train.batch_size=32", "space.grid={model.width:[0.125,0.2]}", "space.seeds=[0,1]",
        "sweep.seeds=2", f"study.storage=sqlite:///{db}", "study.heartbeat_interval=1", "study.grace_period=3",
        *extra,
    ]


def run_cli(overrides: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dse.sweep", *overrides], cwd=REPO, capture_output=True, text=True, timeout=600, **kwargs)


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


def test_grid_params_cover_every_point_and_seed():
    space = SpaceConfig(name="s", grid={"model.width": [0.2, 0.4], "model.activation": ["elu", "relu"]}, seeds=[0, 1])
    params = grid_params(space, [0, 1])
    assert len(params) == 8 and len({json.dumps(p, sort_keys=True) for p in params}) == 8
    assert {"model.width": 0.4, "model.activation": "relu", "seed": 1} in params


def test_later_override_of_a_key_wins():
    assert merge_overrides(["data=cifar100", "model.width=0.2"], ["+data=fashion_mnist"]) == ["model.width=0.2", "+data=fashion_mnist"]


def test_two_workers_finish_every_trial_once(swept):
    db, result = swept
    done = trials(db)
    assert "database is locked" not in result.stderr
    assert [t.state for t in done] == [TrialState.COMPLETE] * 4
    assert sorted(t.number for t in done) == [0, 1, 2, 3]
    assert sorted((t.params["model.width"], t.params["seed"]) for t in done) == [(0.125, 0), (0.125, 1), (0.2, 0), (0.2, 1)]
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
    assert len(list(artifacts.iterdir())) == 8  # a checkpoint and the curves per trial


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
    overrides = tiny(root, db, "sweep.workers=1", "train.epochs=4", "space.grid={model.width:[0.3]}", "space.seeds=[0]", "sweep.seeds=1")
    proc = subprocess.Popen([sys.executable, "-m", "dse.sweep", *overrides], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


def _postgres_bin() -> Path | None:
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / "initdb").exists():
            return folder
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL cluster on a loopback port, run as an unprivileged user, stopped after."""
    pg = _postgres_bin()
    if pg is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) are not installed")
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[test]')")
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        if not shutil.which("runuser"):
            pytest.skip("running as root without runuser to drop privileges for initdb")
        as_user = ["runuser", "-u", "nobody", "--"]
    folder = Path(tempfile.mkdtemp(prefix="dse-pg-"))  # pytest's tmp folders are closed to other users
    os.chmod(folder, 0o777)
    data, port = folder / "data", _free_port()
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True, timeout=120)
    run(str(pg / "initdb"), "-D", str(data), "-U", "dse", "--auth=trust", "-E", "UTF8")
    run(str(pg / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w", "start",
        "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1")
    try:
        yield f"postgresql://dse@127.0.0.1:{port}/postgres"
    finally:
        run(str(pg / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def test_four_workers_on_postgresql(postgres, data_root):
    result = run_cli(tiny(data_root, Path("unused.db"), "sweep.workers=4", f"study.storage={postgres}", f"study.workdir={data_root.parent / 'pgwork'}"))
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="width-cifar10-quick", storage=postgres)
    done = study.get_trials()
    assert [t.state for t in done] == [TrialState.COMPLETE] * 4
    assert len({(t.params["model.width"], t.params["seed"]) for t in done}) == 4


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
    overrides = merge_overrides(tiny(data_root, db), ["space.grid={model.width:[0.125,0.4]}", "space.seeds=[0]",
                                                      "sweep.seeds=1", "sweep.workers=1", "study.max_size_kb=150"])
    result = run_cli(overrides, env={**os.environ, "PYTHONWARNINGS": "default"})  # DeprecationWarnings shown too
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert not [w for w in WARNINGS if w in output], output[-3000:]
    by_width = {t.params["model.width"]: t for t in trials(db)}
    small, large = by_width[0.125], by_width[0.4]
    assert small.state == TrialState.COMPLETE and small.constraints["size_kb"] < 0
    assert large.state == TrialState.PRUNED and "curves" not in large.user_attrs
    assert large.user_attrs["pruned_reason"].startswith("over budget: size 233.")
    assert large.constraints["size_kb"] == pytest.approx(large.user_attrs["size_bytes"] / 1e3 - 150)


def test_dashboard_serves_the_study(swept):
    db, _ = swept
    port = _free_port()
    dashboard = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent)) or shutil.which("optuna-dashboard")
    if dashboard is None:
        pytest.skip("optuna-dashboard is not installed")
    proc = subprocess.Popen([dashboard, f"sqlite:///{db}", "--port", str(port), "--artifact-dir", str(db.with_suffix("") / "artifacts"), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        studies = _get_json(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
        study = next(s for s in studies if s["study_name"] == "width-cifar10-quick")
        detail = _get_json(f"http://127.0.0.1:{port}/api/studies/{study['study_id']}")
        assert detail["objective_names"] == list(OBJECTIVES)
        assert len(detail["trials"]) == 4
        assert {t["state"] for t in detail["trials"]} == {"Complete"}
        assert all(len(t["artifacts"]) == 2 for t in detail["trials"])
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
