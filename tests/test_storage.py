"""Study storage: storage checks before anything is written, a lock around creation and queueing, storage
retries, heartbeats that survive outages and tell a worker it lost its trial, claiming and telling trials."""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
from types import SimpleNamespace

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from dse.storage import (
    Heartbeat,
    StudyError,
    TrialLost,
    check_ours,
    check_storage,
    claim,
    open_storage,
    read_trial,
    retrying,
    storage_lock,
    tell,
)


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

    assert retrying(flaky, 10, "postgresql://h/db")(21) == 42 and len(calls) == 3
    assert "unreachable" in capsys.readouterr().err

    def bad():
        calls.append(0)
        raise ValueError("a bad request")

    calls.clear()
    with pytest.raises(ValueError):
        retrying(bad, 10, "postgresql://h/db")()
    assert len(calls) == 1  # not an outage: no retry

    def down():
        raise _outage()

    start = time.monotonic()
    with pytest.raises(optuna.exceptions.StorageInternalError):
        retrying(down, 1, "postgresql://h/db")()
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


# ---------------------------------------------------------------- claiming and telling trials


def _queued(tmp_path, name: str = "q", directions: tuple[str, ...] = ("maximize",)):
    """A study with one queued trial, and its storage."""
    storage = open_storage(f"sqlite:///{tmp_path / f'{name}.db'}")
    study = optuna.create_study(study_name=name, storage=storage, directions=list(directions))
    study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING))
    return study, storage


def test_a_queued_trial_is_claimed_by_one_worker_only(tmp_path):
    study, storage = _queued(tmp_path)
    waiting = study.get_trials(states=(TrialState.WAITING,))[0]
    first = claim(study, storage, waiting)
    assert first is not None and first.number == waiting.number and read_trial(first).state == TrialState.RUNNING
    assert claim(study, storage, waiting) is None  # already running: the second claimer gets nothing
    study.tell(first, 1.0)
    assert claim(study, storage, waiting) is None  # finished meanwhile: no error either


def test_tell_says_none_when_another_worker_finished_the_trial(tmp_path):
    study, storage = _queued(tmp_path)
    trial = claim(study, storage, study.get_trials()[0])
    optuna.load_study(study_name="q", storage=storage).tell(trial.number, state=TrialState.FAIL)  # failed as stale
    assert tell(study, trial, values=[0.5], state=TrialState.COMPLETE) is None
    study, storage = _queued(tmp_path, "two", ("maximize", "minimize"))
    mine = claim(study, storage, study.get_trials()[0])
    with pytest.raises(ValueError):
        tell(study, mine, values=[0.5], state=TrialState.COMPLETE)  # a value Optuna refuses, not a takeover
    frozen = tell(study, mine, state=TrialState.FAIL, reason="a reason")
    assert frozen.state == TrialState.FAIL and frozen.user_attrs["fail_reason"] == "a reason"


def test_a_missing_db_says_whether_its_folder_exists_or_holds_no_study(tmp_path):
    with pytest.raises(StudyError, match=f"there is no folder {tmp_path}/none/; run a sweep first"):
        check_storage(f"sqlite:///{tmp_path}/none/x.db", must_exist=True)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").touch()
    with pytest.raises(StudyError, match=f"no study DB in {tmp_path}/empty/; run a sweep first"):
        check_storage(f"sqlite:///{tmp_path}/empty/x.db", must_exist=True)
    assert not (tmp_path / "none").exists() and not (tmp_path / "empty" / "x.db").exists()
