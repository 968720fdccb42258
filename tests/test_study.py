"""Study storage: safe names, storage checks before anything is written, a lock around creation and queueing,
storage retries, heartbeats that survive outages, and a study's definition that a differing run cannot write into."""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from dse.study import (
    Heartbeat,
    StudyError,
    TrialLost,
    check_ours,
    check_storage,
    check_study_name,
    create_or_check_study,
    definition_diff,
    fingerprint,
    load_study,
    open_storage,
    storage_lock,
)
from dse.study import _with_retries

DEFINITION = {"seeds": [0], "objectives": ["val_acc"], "configs": {"model.width=0.2": {"train": {"epochs": 2, "lr": 0.01}},
                                                                   "model.width=0.4": {"train": {"epochs": 2, "lr": 0.01}}}}


@pytest.mark.parametrize("name", ["width-cifar10-quick", "étude_2.v1", "_x"])
def test_safe_study_names_pass(name):
    assert check_study_name(name) == name


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", "a..b", ".hidden", "-x", "", "a b", "x\\y"])
def test_study_names_that_could_leave_their_folder_are_refused(name):
    with pytest.raises(ValueError, match="must be letters, digits"):
        check_study_name(name)
    with pytest.raises(ValueError):
        load_study(name, "sqlite:///nowhere.db")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty (0 bytes), not a study DB"),
        (b"garbage" * 200, "is not a readable SQLite DB"),
        (None, "a SQLite DB without Optuna's tables"),
    ],
)
def test_unusable_sqlite_files_are_refused_untouched(tmp_path, content, message):
    db = tmp_path / "x.db"
    if content is None:
        with sqlite3.connect(db) as connection:
            connection.execute("CREATE TABLE notes (text TEXT)")
    else:
        db.write_bytes(content)
    before = db.read_bytes()
    with pytest.raises(StudyError, match=re.escape(message)):
        check_storage(f"sqlite:///{db}")
    with pytest.raises(StudyError, match=re.escape(message)):
        open_storage(f"sqlite:///{db}")
    assert db.read_bytes() == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_db_folder_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    optuna.create_study(study_name="s", storage=f"sqlite:///{folder / 'x.db'}")
    folder.chmod(0o555)
    try:
        with pytest.raises(StudyError, match="is read-only"):
            check_storage(f"sqlite:///{folder / 'x.db'}", writable=True)
    finally:
        folder.chmod(0o755)


def test_a_differing_definition_is_refused_before_anything_is_written(tmp_path):
    db = tmp_path / "d.db"
    storage = open_storage(f"sqlite:///{db}")
    study = create_or_check_study("d", storage, objectives=["val_acc"], definition=DEFINITION)
    assert study.user_attrs["definition_sha256"] == fingerprint(DEFINITION)
    assert create_or_check_study("d", storage, objectives=["val_acc"], definition=DEFINITION).study_name == "d"
    other = {**DEFINITION, "seeds": [0, 1], "configs": {k: {"train": {"epochs": 1, "lr": 0.01}} for k in DEFINITION["configs"]}}
    before = db.read_bytes() + Path(f"{db}-wal").read_bytes()
    with pytest.raises(StudyError) as e:
        create_or_check_study("d", storage, objectives=["val_acc"], definition=other)
    assert "seeds: [0] -> [0, 1]" in str(e.value) and "train.epochs: 2 -> 1 (in 2 configs)" in str(e.value)
    assert "pick another study.name" in str(e.value)
    assert db.read_bytes() + Path(f"{db}-wal").read_bytes() == before


def test_a_study_made_by_an_older_dse_adopts_the_definition(tmp_path, capsys):
    storage = open_storage(f"sqlite:///{tmp_path / 'old.db'}")
    optuna.create_study(study_name="old", storage=storage, directions=["maximize"]).set_metric_names(["val_acc"])
    study = create_or_check_study("old", storage, objectives=["val_acc"], definition=DEFINITION)
    assert "made by an older dse" in capsys.readouterr().err
    assert study.user_attrs["definition"] == DEFINITION


def test_definition_diff_names_each_setting_once():
    new = {**DEFINITION, "objectives": ["val_acc", "size_mb"]}
    new["configs"] = {**DEFINITION["configs"], "model.width=0.4": {"train": {"epochs": 2, "lr": 0.1}}}
    assert definition_diff(DEFINITION, new) == [
        "train.lr: 0.01 -> 0.1", "objectives: ['val_acc'] -> ['val_acc', 'size_mb']",
    ]


def _lock_holds(url: str) -> None:
    """Two threads in storage_lock never overlap."""
    inside: list[tuple[float, float]] = []

    def hold() -> None:
        with storage_lock(url):
            start = time.monotonic()
            time.sleep(0.3)
            inside.append((start, time.monotonic()))

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    (a0, a1), (b0, b1) = sorted(inside)
    assert a1 <= b0, inside


def test_storage_lock_serialises_sqlite(tmp_path):
    _lock_holds(f"sqlite:///{tmp_path / 'lock.db'}")


def test_storage_lock_serialises_postgresql_and_tables_are_created_once(postgres):
    _lock_holds(postgres.url)
    results = []
    threads = [threading.Thread(target=lambda: results.append(open_storage(postgres.url))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 3  # concurrent creators: one creates the tables, the others find them


def _outage() -> Exception:
    error = optuna.exceptions.StorageInternalError("An exception is raised during the commit.")
    error.__cause__ = sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("connection refused"))
    return error


def test_storage_calls_are_retried_while_the_server_is_unreachable(capsys):
    calls = []

    def flaky(x):
        calls.append(x)
        if len(calls) < 3:
            raise _outage()
        return x * 2

    assert _with_retries(flaky, 10, "postgresql://h/db")(21) == 42 and len(calls) == 3
    assert "unreachable" in capsys.readouterr().err

    def bad():
        calls.append(0)
        raise ValueError("a bad request")

    calls.clear()
    with pytest.raises(ValueError):
        _with_retries(bad, 10, "postgresql://h/db")()
    assert len(calls) == 1  # not an outage: no retry

    def down():
        raise _outage()

    start = time.monotonic()
    with pytest.raises(optuna.exceptions.StorageInternalError):
        _with_retries(down, 1, "postgresql://h/db")()
    assert time.monotonic() - start <= 1.5  # bounded


class _FlakyStorage:
    """record_heartbeat fails while `down`; get_trial says the trial's state."""

    def __init__(self):
        self.down, self.beats, self.state = False, 0, TrialState.RUNNING

    def record_heartbeat(self, trial_id):
        if self.down:
            raise sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection"))
        self.beats += 1

    def get_trial(self, trial_id):
        if self.down:
            raise sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("connection refused"))
        return SimpleNamespace(state=self.state)


def test_heartbeat_survives_an_outage_and_a_lapsed_trial_stops():
    storage = _FlakyStorage()
    with Heartbeat(storage, interval=0.05) as beat:
        beat.add(7)
        storage.down = True
        time.sleep(0.3)
        assert beat.silent_for(7) >= 0.25
        check_ours(storage, 7, beat, grace=10)  # the storage cannot say, and the grace period has not passed
        with pytest.raises(TrialLost, match="no heartbeat reached the storage"):
            check_ours(storage, 7, beat, grace=0.2)
        storage.down = False
        time.sleep(0.3)
        assert beat.silent_for(7) < 0.2 and storage.beats >= 2  # the thread beats again
        storage.state = TrialState.FAIL  # another worker failed it as stale
        with pytest.raises(TrialLost, match="the trial is FAIL"):
            check_ours(storage, 7, beat, grace=10)
