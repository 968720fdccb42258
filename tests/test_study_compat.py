"""Old studies stay usable: a study DB with its run folders, checkpoints and artifact store as dse 41f3f2d left them
after a Ctrl-C (tests/fixtures/old-study-41f3f2d, written by make_old_study.py there: trial 0 COMPLETE, trial 1
stopped in epoch 2 with its epoch-1 checkpoint, trial 2 its queued retry) is listed, reported and deployed as it
is, and running the same sweep command again resumes trial 1's retry from epoch 1 without retraining trial 0.

Only the command lines are used (`python -m dse.sweep|dse.report|dse.deploy`, run from a copy of the fixture, the
working directory the old sweep ran in, with this checkout's code); the DB and checkpoints are read with Optuna
and torch directly. The dataset is not in the fixture: it is written again with the same writer and seed."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from conftest import write_cifar
from optuna.trial import TrialState

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "old-study-41f3f2d"
META = json.loads((FIXTURE / "fixture.json").read_text())
STUDY, STORAGE = META["study"], META["storage"]  # STORAGE: relative to the study's folder
OLD_STATES = [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
STUDY_ARGS = ["--study", STUDY, "--storage", STORAGE]


def copy_old_study(folder: Path) -> Path:
    """The fixture copied into `folder`, its dataset written again as the old sweep read it."""
    shutil.copytree(FIXTURE, folder)
    data = META["data"]
    written = write_cifar(
        folder / data["root"], data["name"], n_train=data["n_train"], n_test=data["n_test"], seed=data["seed"]
    )
    arrays = {k: hashlib.sha256(getattr(written, k).tobytes()).hexdigest() for k in data["sha256"]}
    assert arrays == data["sha256"], (
        "conftest.write_cifar no longer writes the fixture's images: regenerate the fixture"
    )
    return folder


def run(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m ARGS` in the study's folder with this checkout's dse, one thread; asserted to exit 0."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", *args], cwd=folder, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, (
        f"python -m {' '.join(args)[:300]} exited {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    )
    return result


def trials(folder: Path) -> list[optuna.trial.FrozenTrial]:
    url = f"sqlite:///{folder / STORAGE.removeprefix('sqlite:///')}"
    return optuna.load_study(study_name=STUDY, storage=url).get_trials()


def checkpoints(folder: Path) -> dict[str, dict]:
    """The study's checkpoints in its run folders, by folder name."""
    paths = sorted((folder / META["workdir"] / "runs").glob("*/checkpoint.pt"))
    return {p.parent.name: torch.load(p, map_location="cpu", weights_only=True) for p in paths}


def report(folder: Path) -> dict[int, str]:
    """`python -m dse.report` of the study: trial number -> state, from its every-trial CSV table."""
    out = run(folder, "dse.report", *STUDY_ARGS, "--out", "reports", "--format", "markdown", "csv").stdout
    assert STUDY in out
    table = folder / "reports" / STUDY / "trials.csv"
    assert (folder / "reports" / STUDY / "index.md").is_file()
    return {int(r["trial"]): r["state"] for r in csv.DictReader(io.StringIO(table.read_text()))}


def front(folder: Path) -> tuple[str, list[int]]:
    """`python -m dse.deploy list` of the study: its heading line and the trial numbers of the Pareto front."""
    heading, _, table = run(folder, "dse.deploy", "list", *STUDY_ARGS, "--format", "csv").stdout.partition("\n")
    return heading, [int(r["trial"]) for r in csv.DictReader(io.StringIO(table))]


def listed(folder: Path) -> dict[str, str]:
    """`python -m dse.sweep --list NAME`: the study's row of trial counts by state."""
    lines = run(folder, "dse.sweep", "--list", *STUDY_ARGS[1:]).stdout.strip().splitlines()
    cells = lambda line: [c.strip() for c in line.strip("|").split("|")]
    return dict(zip(cells(lines[0]), cells(lines[-1])))


def test_fixture_is_what_an_interrupted_41f3f2d_sweep_leaves(tmp_path):
    folder = copy_old_study(tmp_path / "study")
    done, stopped, retry = trials(folder)
    assert [t.state for t in (done, stopped, retry)] == OLD_STATES
    assert stopped.user_attrs["fail_reason"] == "interrupted"
    assert retry.system_attrs["dse:retry_of"] == stopped.number
    assert [r["epoch"] for r in stopped.user_attrs["curves"]] == [1]
    epochs = {name: state["epoch"] for name, state in checkpoints(folder).items()}
    assert sorted(epochs.values()) == [1, 2] and epochs == META["checkpoint_epochs"]
    assert all(state["run"]["split"] == done.user_attrs["split"] for state in checkpoints(folder).values())
    assert done.user_attrs["provenance"]["git_commit"] == META["dse_commit"]


@pytest.mark.slow
def test_old_study_is_listed_reported_and_deployed_before_any_new_run(tmp_path):
    folder = copy_old_study(tmp_path / "study")
    counts = listed(folder)
    assert (counts["trials"], counts["complete"], counts["fail"], counts["waiting"]) == ("3", "1", "1", "1")
    assert report(folder) == {0: "COMPLETE", 1: "FAIL"}  # the queued retry has not started: not a row
    heading, numbers = front(folder)
    assert numbers == [0] and "of 1 COMPLETE trial(s)" in heading
    # The old checkpoint artifact of the complete trial exports (its weights load into today's model).
    run(
        folder,
        "dse.deploy",
        "export",
        *STUDY_ARGS,
        "--trial",
        "0",
        "--out",
        "bundles/t0",
        "--runs",
        "5",
        "--warmup",
        "1",
        "--calibration-images",
        "16",
        "--check-images",
        "16",
    )
    meta = json.loads((folder / "bundles" / "t0" / "meta.json").read_text())
    assert meta["trial"] == 0 and meta["study"] == STUDY
    assert [t.state for t in trials(folder)] == OLD_STATES  # reading the study ran none of its trials


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> tuple[Path, list[optuna.trial.FrozenTrial], dict[str, dict]]:
    """The old study after the same sweep command ran again: its folder, and its trials and checkpoints before."""
    folder = copy_old_study(tmp_path_factory.mktemp("resumed") / "study")
    before, saved = trials(folder), checkpoints(folder)
    run(folder, "dse.sweep", *META["overrides"])
    return folder, before, saved


@pytest.mark.slow
def test_same_sweep_command_resumes_the_interrupted_trial_from_epoch_1(resumed):
    folder, before, saved = resumed
    after = trials(folder)
    assert [t.state for t in after] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]  # no new trial
    done, stopped, retry = after
    assert retry.params == before[1].params and retry.system_attrs["dse:retry_of"] == 1
    assert retry.user_attrs["resumed_from"] == 1
    curves = retry.user_attrs["curves"]
    assert [r["epoch"] for r in curves] == [1, 2]
    assert curves[0] == before[1].user_attrs["curves"][0]  # epoch 1 is the old run's, from its checkpoint
    (old,) = [state for state in saved.values() if state["epoch"] == 1]
    assert retry.user_attrs["split"] == old["run"]["split"] == done.user_attrs["split"]  # the same data split
    assert retry.values is not None and len(retry.values) == len(done.values)
    # The complete trial was kept as it was, not trained again.
    assert (done.values, done.datetime_complete, done.user_attrs) == (
        before[0].values,
        before[0].datetime_complete,
        before[0].user_attrs,
    )
    assert (stopped.state, stopped.user_attrs) == (before[1].state, before[1].user_attrs)


@pytest.mark.slow
def test_resumed_study_is_listed_and_reported(resumed):
    folder, _, _ = resumed
    counts = listed(folder)
    assert (counts["trials"], counts["complete"], counts["fail"], counts["waiting"]) == ("3", "2", "1", "0")
    assert report(folder) == {0: "COMPLETE", 1: "FAIL", 2: "COMPLETE"}
    heading, numbers = front(folder)
    assert "of 2 COMPLETE trial(s)" in heading and numbers and set(numbers) <= {0, 2}
