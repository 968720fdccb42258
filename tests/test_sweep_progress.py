"""What a sweep shows its user, on real tiny sweeps (generated Fashion-MNIST, two worker processes): trial lines
that name the swept values, the front and the next commands at the end, one latency figure per architecture,
per-epoch intermediate values, a quiet Ctrl-C (exit code 130) and a restart that says what it kept, `--list`,
`make dashboard` on a missing study, and nothing written outside the ignored folders."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import write_fashion_mnist
from optuna.trial import TrialState

from dse.latency import figures
from dse.sweep.plan import workers_and_threads
from dse.sweep.progress import CURVES_CHART, describe, duration, fraction_done, list_studies, summary, watching

REPO = Path(__file__).resolve().parents[1]


def sweep_args(root: Path, db: Path, *extra: str) -> list[str]:
    """A dropout sweep: two values of p on one architecture, one seed, two workers."""
    return [
        "+space=dropout",
        "budget=quick",
        "data=fashion_mnist",
        f"data.root={root}",
        "data.subset=null",
        "data.val_size=40",
        "train.epochs=2",
        "train.batch_size=32",
        "space.grid={model.dropout:[0.1,0.3]}",
        "sweep.workers=2",
        "study.name=ux",
        f"study.storage=sqlite:///{db}",
        "study.heartbeat_interval=1",
        "study.grace_period=3",
        *extra,
    ]


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dse.sweep", *args], cwd=REPO, capture_output=True, text=True, timeout=600, **kwargs
    )


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("ux")
    write_fashion_mnist(tmp / "data", n_train=160, n_test=40)
    db = tmp / "ux.db"
    outputs = listing(REPO / "outputs")
    result = run(sweep_args(tmp / "data", db))
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="ux", storage=f"sqlite:///{db}")
    return {"tmp": tmp, "db": db, "result": result, "study": study, "outputs": outputs}


def test_trial_lines_name_the_swept_values(swept):
    out = swept["result"].stdout
    for p in ("0.1", "0.3"):
        assert f" p={p} seed 0 (Shallow SqueezeNext-06-0.2x): val " in out


def test_the_end_shows_the_front_and_the_next_commands(swept):
    out, db = swept["result"].stdout, swept["db"]
    assert "done in " in out and "2 complete, 0 pruned, 0 failed" in out
    assert "Pareto front (val_acc, size_mb, latency_ms):" in out and "| swept " in out
    for command in (
        f"python -m dse.report --study ux --storage sqlite:///{db}",
        "python -m dse.deploy list --study ux",
        f"make dashboard STUDY=ux STORAGE=sqlite:///{db}",
    ):
        assert command in out


def test_every_trial_of_one_architecture_carries_one_latency_figure(swept):
    study = swept["study"]
    ((key, figure),) = figures(study.user_attrs).items()
    assert figure["ms"] > 0 and figure["iqr_ms"] >= 0 and figure["how"].startswith("before training")
    trials = study.get_trials(states=[TrialState.COMPLETE])
    assert len(trials) == 2
    for t in trials:
        a = t.user_attrs
        assert a["latency_key"] == key and (a["latency_ms"], a["latency_iqr_ms"]) == (figure["ms"], figure["iqr_ms"])
        assert t.values[2] == figure["ms"] and a["latency_under_load"] == figure["under_load"]


def test_every_epoch_is_an_intermediate_value_and_on_the_dashboards_chart(swept):
    study = swept["study"]
    trials = study.get_trials(states=[TrialState.COMPLETE])
    for t in trials:
        assert t.intermediate_values == {r["epoch"]: r["val_acc"] for r in t.user_attrs["curves"]}
        assert sorted(t.intermediate_values) == [1, 2]
    prefix = f"dashboard:plot_data:{CURVES_CHART}:"  # optuna_dashboard.save_plotly_graph_object's storage
    attrs = study._storage.get_study_system_attrs(study._study_id)  # Optuna 5 has no public reader
    parts = {int(k.removeprefix(prefix)): v for k, v in attrs.items() if k.startswith(prefix)}
    chart = json.loads("".join(parts[i] for i in range(len(parts))))
    assert sorted((tuple(line["x"]), tuple(line["y"])) for line in chart["data"]) == sorted(
        ((1, 2), tuple(t.intermediate_values[e] for e in (1, 2))) for t in trials
    )
    assert {line["name"].split()[1] for line in chart["data"]} == {"p=0.1", "p=0.3"}


def test_nothing_lands_outside_the_ignored_folders(swept):
    assert listing(REPO / "outputs") == swept["outputs"]  # no empty Hydra run folders
    written = [
        "studies/x.db",
        "studies/x.db-wal",
        "studies/x/artifacts/a/b",
        "studies/x/runs/k/checkpoint.pt",
        "reports/x/index.md",
        "bundles/x/trial0-m/model.onnx",
        "outputs/2026-01-01/10-00-00/result.json",
        "data/fashion_mnist/train-images-idx3-ubyte.gz",
    ]
    check = subprocess.run(
        ["git", "check-ignore", "--no-index", *written, "studies/README.md"], cwd=REPO, capture_output=True, text=True
    )
    assert check.stdout.split() == written


def test_list_counts_trials_by_state_and_creates_nothing(swept, tmp_path, capsys):
    result = run(["--list", "--storage", f"sqlite:///{swept['db']}"])
    assert result.returncode == 0 and "| ux " in result.stdout and "complete" in result.stdout
    missing = tmp_path / "none.db"
    assert list_studies(["--list", "nope", "--storage", f"sqlite:///{missing}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no study DB at" in err and not missing.exists()
    assert list_studies(["--list", "nope", "--storage", f"sqlite:///{swept['db']}"]) == 2
    assert "no study 'nope'" in capsys.readouterr().err


def test_make_dashboard_on_a_missing_study_says_so_in_one_line_and_creates_nothing(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    db = tmp_path / "studies" / "nope.db"
    result = subprocess.run(
        ["make", "-s", "dashboard", f"PY={sys.executable}", "STUDY=nope", f"STORAGE=sqlite:///{db}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "no study DB at" in result.stderr
    assert "Traceback" not in result.stderr and not db.exists() and not db.parent.exists()


def _intermediate_values(db: Path) -> int:
    """Read-only: an empty DB file made here would be refused by the sweep (not a study DB)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as connection:
            return connection.execute("SELECT count(*) FROM trial_intermediate_values").fetchone()[0]
    except sqlite3.Error:  # not created yet
        return 0


@pytest.mark.slow
def test_ctrl_c_ends_with_one_line_and_the_rerun_resumes(tmp_path):
    write_fashion_mnist(tmp_path / "data", n_train=240, n_test=40)
    db = tmp_path / "c.db"
    args = sweep_args(tmp_path / "data", db, "train.epochs=3")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dse.sweep", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while _intermediate_values(db) < 1 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the main process and its workers
    out, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("sweep ", "sweep: "))]
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err + out and len(lines) == 1 and lines[0].startswith("dse.sweep: interrupted;")
    study = optuna.load_study(study_name="ux", storage=f"sqlite:///{db}")
    interrupted = [t for t in study.get_trials() if t.state == TrialState.FAIL]
    assert interrupted and not [t for t in study.get_trials() if t.state == TrialState.RUNNING]
    again = run(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(interrupted)} interrupted or failed before, queued again" in again.stdout
    assert f"2 complete, 0 pruned, 0 failed, 0 left ({len(interrupted)} earlier tries interrupted" in again.stdout
    done = optuna.load_study(study_name="ux", storage=f"sqlite:///{db}").get_trials(states=[TrialState.COMPLETE])
    assert len(done) == 2 and max(t.user_attrs["resumed_from"] for t in done) >= 1


def test_progress_weighs_points_by_cost_and_counts_running_epochs():
    def trial(params, state, epochs=0, planned=4):
        attrs = {"epochs_planned": planned, "curves": [{}] * epochs}
        return optuna.trial.FrozenTrial(0, state, None, None, None, {}, {}, attrs, {"fixed_params": params}, {}, 0)

    big, small = {"model.width": 2.0, "seed": 0}, {"model.width": 0.2, "seed": 0}
    costs = {json.dumps(big, sort_keys=True): 3.0, json.dumps(small, sort_keys=True): 1.0}
    assert fraction_done([], costs, 2) == 0
    assert fraction_done([trial(big, TrialState.RUNNING, epochs=2)], costs, 2) == pytest.approx(3 * 0.5 / 4)
    assert fraction_done([trial(big, TrialState.COMPLETE), trial(small, TrialState.PRUNED, epochs=1)], costs, 2) == 1
    assert fraction_done([trial(small, TrialState.RUNNING, epochs=1), trial(small, TrialState.FAIL)], None, 4) == 1 / 16
    assert (
        describe({"model.width": 0.9, "model.activation": "relu", "train": "adam", "train.lr": 0.00312, "seed": 1})
        == "W=0.9 relu adam lr=0.00312 seed 1"
    )
    assert [duration(s) for s in (45, 190, 7500)] == ["45 s", "3 min 10 s", "2 h 05 min"]


def _pruned_study(storage: str | None = None) -> optuna.Study:
    """A study whose two trials were both pruned over the size budget, the smaller one last."""
    study = optuna.create_study(study_name="tiny", storage=storage, directions=["maximize", "minimize", "minimize"])
    for kb in (233.4, 75.5):
        trial = study.ask()
        trial.set_user_attr("size_mb", kb / 1e3)
        trial.set_user_attr("pruned_reason", f"over budget: size {kb} KB > 1 KB")
        study.tell(trial, state=TrialState.PRUNED)
    return study


def _running_study() -> optuna.Study:
    """One trial finished, one at epoch 2 of 3, one queued."""
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    study.enqueue_trial({"model.width": 0.5, "seed": 0})
    study.tell(study.ask(), state=TrialState.PRUNED)
    running = study.ask()
    running.set_user_attr("epochs_planned", 3)
    running.set_user_attr("curves", [{}, {}])
    return study


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_progress_is_plain_lines_that_count_trials_and_epochs():
    stream = io.StringIO()
    with watching(_running_study(), costs=None, n_trials=13, stream=stream, every=0.05):
        time.sleep(0.3)
    text = stream.getvalue()
    assert "\r" not in text and "%" not in text
    assert text.splitlines()[0] == "sweep: 1/13 trials, epoch 2/3 of trial 1"
    assert len(set(text.splitlines())) == len(text.splitlines())  # a line when the status changes, not every read


def test_on_a_terminal_the_bar_counts_trials_not_a_percentage():
    stream = _Terminal()
    with watching(_running_study(), costs=None, n_trials=13, stream=stream, every=0.05):
        time.sleep(0.3)
    assert "\r" in stream.getvalue() and "1/13 trials, epoch 2/3 of trial 1" in stream.getvalue()
    assert "%" not in stream.getvalue()


def test_a_sweep_whose_trials_were_all_pruned_says_why_and_suggests_no_deploy():
    end = summary(_pruned_study(), "sqlite:///studies/tiny.db", "done in 3 s: 0 complete, 2 pruned, 0 failed")
    assert "no Pareto front, nothing to deploy: all 2 trials pruned: over budget (size 75.5 KB > 1 KB)" in end
    assert "python -m dse.report --study tiny" in end and "make dashboard STUDY=tiny" in end
    assert "dse.deploy" not in end


def test_worker_and_thread_defaults_read_the_cpus_this_process_may_use():
    assert workers_and_threads(0, 0, {0}) == (1, 1)
    assert workers_and_threads(0, 0, {0, 1, 2, 3}) == (4, 1)
    assert workers_and_threads(2, 0, {0, 1, 2, 3}) == (2, 2)
    assert workers_and_threads(0, 0, {0, 1, 2, 3}, gpus=1) == (1, 4)
    assert workers_and_threads(3, 5, {0}) == (3, 5)
    if shutil.which("taskset") is None:
        pytest.skip("taskset is not installed")
    code = (
        "from dse.sweep import compose, draft_plan; a = ['+space=width']; p = draft_plan(compose(a), a); "
        "print(p.workers, p.threads)"
    )
    result = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["1", "1"]


def test_list_on_a_fresh_clone_suggests_a_sweep_that_runs_offline(tmp_path, monkeypatch, capsys):
    (tmp_path / "studies").mkdir()
    monkeypatch.chdir(tmp_path)
    assert list_studies(["--list"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("no studies in studies/ yet; run a sweep:\n")
    assert "python -m dse.sweep +space=width budget=quick data=fashion_mnist   # offline" in out
    assert "python -m dse.sweep +space=width budget=quick     " in out  # CIFAR-10 as well, said to download


def test_make_tasks_that_read_a_study_say_how_to_pick_one(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")

    def make(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["make", "-s", "-f", str(REPO / "Makefile"), *args, "PY=echo"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )

    result = make("tables")
    assert result.returncode == 2
    assert (
        "pick a study: make tables STUDY=NAME [STORAGE=URL]; no study in studies/ yet: make sweep-quick "
        "DATA=fashion_mnist runs one offline" in result.stderr
    )
    (tmp_path / "studies").mkdir()
    for name in ("width-fashion_mnist-quick", "dropout-fashion_mnist-quick"):
        (tmp_path / "studies" / f"{name}.db").touch()
    result = make("deploy-list")
    assert "studies in studies/: dropout-fashion_mnist-quick, width-fashion_mnist-quick" in result.stderr
    (tmp_path / "studies" / "dropout-fashion_mnist-quick.db").unlink()
    result = make("deploy-list")  # the only study is the default
    assert result.stdout.split()[:5] == ["-m", "dse.deploy", "list", "--study", "width-fashion_mnist-quick"]
