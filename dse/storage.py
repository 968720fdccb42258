"""The study DB as a sweep uses it (its URL checked by dse.dburl): opening (SQLite serialised, server calls retried), the lock,
heartbeats and trial ownership, claiming and telling trials; the only module that touches Optuna/SQLAlchemy internals.

Why each internal is touched (Optuna 5 offers no public way to do these):
- `trial._trial_id` (`trial_id`): the storage's calls (heartbeats, state changes, reads) take the trial's id, and
  neither `Trial` nor `FrozenTrial` exposes it publicly.
- RDBStorage's methods, including the private ones its cache calls (`_DB_METHODS`), are rebound on the instance
  to retry while a database server is unreachable: Optuna has no retry hook, and its own retry covers only
  heartbeats. `before_trial_reads` rebinds `_get_trials`, the read of a study's trials that Optuna's cache makes.
- SQLAlchemy engine events (`serialize_sqlite`) make each SQLite transaction take the write lock at BEGIN: Optuna's
  SELECT ... FOR UPDATE is a no-op on SQLite, so two workers could claim one queued trial.
- Claiming a queued (WAITING) trial changes its state here (`claim`), as Optuna's private
  `Study._pop_waiting_trial_id` does, instead of through `study.ask()`: `ask()` creates a new trial when the
  queue empties between our read and its pop, which a grid space must never get (every trial comes from the
  queue) and a sampled space must not get beyond its `n_trials`; and our duplicate check needs the claimed
  trial from the same read. New sampled trials do come from the public `study.ask()`.
- `tell` reads the trial back through `Trial.storage` to tell a takeover (another worker finished it) from a
  refused value: `study.tell` raises the same errors for both.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import sqlite3
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import optuna
import sqlalchemy
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from dse.dburl import StudyError, check_storage, did_you_mean, first_line, server_kwargs, sqlite_path, studies_in_folder

__all__ = [
    "StudyError",
    "TrialLost",
    "sqlite_path",
    "studies_in_folder",
    "did_you_mean",
    "check_storage",
    "open_storage",
    "open_readonly",
    "storage_lock",
    "transient",
    "retrying",
    "before_trial_reads",
    "Heartbeat",
    "check_ours",
    "trial_id",
    "live_trial",
    "read_trial",
    "change_state",
    "claim",
    "tell",
    "report_value",
]

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")

_LOCK_KEY = int.from_bytes(hashlib.sha256(b"dse.study").digest()[:8], "big", signed=True)  # pg_advisory_lock's key


class TrialLost(RuntimeError):
    """This worker no longer owns its trial: another worker failed it as stale, and a retry takes over."""


# ---------------------------------------------------------------- the lock, retries, opening


@contextlib.contextmanager
def storage_lock(url: str) -> Iterator[None]:
    """One dse process at a time in a storage's critical sections (creating its tables, creating or checking
    a study, queueing trials): a lock file beside a SQLite DB, pg_advisory_lock on PostgreSQL. Other
    databases get no lock (Optuna's own transactions only)."""
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return
    if not url.startswith("postgresql"):
        yield
        return
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, **server_kwargs(url))
    try:
        with engine.connect() as connection:  # a session lock: released with the connection
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": _LOCK_KEY})
            connection.commit()
            try:
                yield
            finally:
                with contextlib.suppress(sqlalchemy.exc.SQLAlchemyError):
                    connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": _LOCK_KEY})
    finally:
        engine.dispose()


def transient(e: BaseException) -> bool:
    """A storage error that may pass (server down or restarting, connection lost), not a bad request."""
    while e is not None:
        if isinstance(e, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
            return True
        if isinstance(e, sqlalchemy.exc.DBAPIError) and e.connection_invalidated:
            return True
        e = e.__cause__
    return False


# Every RDBStorage method that talks to the database, including the private ones Optuna's cache calls.
_DB_METHODS = (
    "create_new_study",
    "delete_study",
    "set_study_user_attr",
    "set_study_system_attr",
    "get_study_id_from_name",
    "get_study_name_from_id",
    "get_study_directions",
    "get_study_user_attrs",
    "get_study_system_attrs",
    "get_all_studies",
    "create_new_trial",
    "_create_new_trial",
    "set_trial_param",
    "_set_trial_param",
    "get_trial_param",
    "set_trial_state_values",
    "set_trial_intermediate_value",
    "set_trial_user_attr",
    "set_trial_system_attr",
    "get_trial_id_from_study_id_trial_number",
    "get_trial",
    "get_all_trials",
    "_get_trials",
    "get_best_trial",
    "_get_best_trial_id",
    "_get_stale_trial_ids",
)
_retrying = threading.local()


def retrying(fn: Callable, seconds: float, url: str) -> Callable:
    """`fn`, retried with exponential backoff (0.5 s to 8 s) while it fails with a transient storage error,
    for up to `seconds` in all. Only the outermost call of a thread retries (methods call each other)."""

    def call(*args, **kwargs):
        if getattr(_retrying, "active", False):
            return fn(*args, **kwargs)
        _retrying.active = True
        start, delay, warned = time.monotonic(), 0.5, False
        try:
            while True:
                try:
                    result = fn(*args, **kwargs)
                    if warned:
                        print(
                            f"storage {url!r} is back after {time.monotonic() - start:.1f} s",
                            file=sys.stderr,
                            flush=True,
                        )
                    return result
                except Exception as e:
                    waited = time.monotonic() - start
                    if not transient(e) or waited + delay > seconds:
                        raise
                    if not warned:
                        print(
                            f"storage {url!r} unreachable ({first_line(e)}); retrying for up to {seconds:g} s",
                            file=sys.stderr,
                            flush=True,
                        )
                        warned = True
                    time.sleep(delay)
                    delay = min(2 * delay, 8.0)
        finally:
            _retrying.active = False

    return call


def open_storage(
    url: str,
    *,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None,
    retry_seconds: float = 0,
) -> RDBStorage:
    """An RDBStorage, its tables created under `storage_lock` (concurrent creators wait, then find them).

    SQLite gets a WAL journal and a long busy timeout so parallel workers wait for the write lock instead of
    dying on "database is locked". A server database's calls are retried for up to `retry_seconds` while it
    is unreachable. With a heartbeat interval, `optuna.storages.fail_stale_trials` fails trials whose
    heartbeat lapsed for `grace_period` seconds and calls `on_stale` for each."""
    check_storage(url)  # outside the lock: it waits for the lock's holder (SQLite)
    path = sqlite_path(url)
    engine_kwargs = server_kwargs(url)
    with storage_lock(url):
        if path is not None:
            with contextlib.closing(sqlite3.connect(path, timeout=60)) as connection:  # WAL is a property of the file
                if connection.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    connection.execute("PRAGMA journal_mode=WAL")
            engine_kwargs = {"connect_args": {"timeout": 300}}
        storage = RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=on_stale,
        )
    if path is not None:
        _serialize_sqlite(storage.engine)
    elif retry_seconds > 0:
        for name in _DB_METHODS:
            setattr(storage, name, retrying(getattr(storage, name), retry_seconds, url))
    return storage


def before_trial_reads(storage: RDBStorage, hook: Callable[[], None], *, after: bool = False) -> RDBStorage:
    """The storage calling `hook` before (or, with `after`, after) each read of a study's trials: a test's seam for a
    slow or busy database, or for workers whose reads interleave."""
    read = storage._get_trials

    def hooked(*args, **kwargs):
        if not after:
            hook()
        trials = read(*args, **kwargs)
        if after:
            hook()
        return trials

    storage._get_trials = hooked
    return storage


def open_readonly(url: str) -> RDBStorage:
    """An existing study DB for reading (its tables are not created)."""
    return RDBStorage(url, skip_table_creation=True)


def _serialize_sqlite(engine: sqlalchemy.engine.Engine) -> None:
    """Make every SQLite transaction take the write lock at BEGIN. Python's sqlite3 driver otherwise
    starts the transaction only at the first write, so two workers can both read a queued trial as
    WAITING and both claim it (Optuna's SELECT ... FOR UPDATE is a no-op on SQLite)."""

    @sqlalchemy.event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # the driver emits no BEGIN of its own

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners are dropped


# ---------------------------------------------------------------- heartbeats: who owns a running trial


@dataclass
class Heartbeat:
    """One thread that beats for every trial this worker runs (a set, for workers that run several at once).
    A beat that fails (the storage is unreachable) is tried again every second until one lands: the thread
    survives outages. `silent_for` says how long a trial's beats have not reached the storage."""

    storage: RDBStorage  # without storage retries: a beat never blocks the next
    interval: float
    last: dict[int, float] = field(default_factory=dict)  # trial id -> monotonic time of its last beat that landed
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        self._thread = threading.Thread(target=self._run, name="dse-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()

    def add(self, trial_id: int, *, patience: float = 0) -> None:
        """Beat for this trial from now on; its first beat is tried for up to `patience` seconds."""
        with self._lock:
            self.last[trial_id] = time.monotonic()
        deadline = time.monotonic() + patience
        while not self._beat(trial_id) and time.monotonic() < deadline:
            time.sleep(1)

    def remove(self, trial_id: int) -> None:
        with self._lock:
            self.last.pop(trial_id, None)

    def silent_for(self, trial_id: int) -> float:
        with self._lock:
            return time.monotonic() - self.last.get(trial_id, time.monotonic())

    def _run(self) -> None:
        pause = self.interval
        while not self._stop.wait(pause):
            with self._lock:
                ids = list(self.last)
            landed = [self._beat(trial_id) for trial_id in ids]
            pause = self.interval if all(landed) else min(self.interval, 1.0)  # beat again as soon as it is back

    def _beat(self, trial_id: int) -> bool:
        try:
            self.storage.record_heartbeat(trial_id)
        except Exception:  # noqa: BLE001 - any storage failure: the next beat tries again
            return False
        with self._lock:
            if trial_id in self.last:
                self.last[trial_id] = time.monotonic()
        return True


def check_ours(storage: RDBStorage, trial_id: int, beat: Heartbeat, grace: float) -> None:
    """Raise TrialLost once this worker no longer owns the trial: another worker failed it as stale (and
    its retry takes over), or, while the storage cannot say, none of our beats landed for `grace` seconds
    (others may take it over as soon as the storage is back)."""
    try:
        state = storage.get_trial(trial_id).state
    except Exception as e:
        if not transient(e):
            raise
        if beat.silent_for(trial_id) > grace:
            raise TrialLost(
                f"no heartbeat reached the storage for {beat.silent_for(trial_id):.0f} s (study.grace_period={grace:g})"
            ) from None
        return
    if state != TrialState.RUNNING:
        raise TrialLost(f"the trial is {state.name}: another worker found its heartbeat stale and queued a retry")


# ---------------------------------------------------------------- trials: ids, claiming, telling


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The storage's id of a trial (what the storage's calls take; not its number within the study)."""
    return trial._trial_id


def live_trial(study: optuna.Study, trial: FrozenTrial) -> optuna.Trial:
    """A running trial of `study` to suggest, set attributes on and tell, from its frozen record."""
    return optuna.Trial(study, trial_id(trial))


def read_trial(trial: optuna.Trial) -> FrozenTrial:
    """The trial as the storage holds it now."""
    return trial.storage.get_trial(trial_id(trial))


def change_state(storage: RDBStorage, trial: FrozenTrial, state: TrialState) -> bool:
    """Move a queued or running trial to `state`, one process winning (the state changes under the storage's
    row lock, BEGIN IMMEDIATE on SQLite); False when another process changed it first."""
    try:
        return storage.set_trial_state_values(trial_id(trial), state=state)
    except UpdateFinishedTrialError:  # another process finished it
        return False


def claim(study: optuna.Study, storage: RDBStorage, trial: FrozenTrial) -> optuna.Trial | None:
    """Take a queued (WAITING) trial for this worker, marked RUNNING; None when another worker took it first."""
    return live_trial(study, trial) if change_state(storage, trial, TrialState.RUNNING) else None


def tell(
    study: optuna.Study,
    trial: optuna.Trial,
    *,
    values: list[float] | None = None,
    state: TrialState | None = None,
    reason: str | None = None,
) -> FrozenTrial | None:
    """End a trial (with its fail `reason`, if any); None when another worker finished it first (it failed the
    trial as stale)."""
    try:
        if reason is not None:
            trial.set_user_attr("fail_reason", reason)
        return study.tell(trial, values, state=state)
    except (UpdateFinishedTrialError, ValueError):
        if read_trial(trial).state == TrialState.RUNNING:
            raise  # a real error (e.g. a value Optuna refuses), not a takeover
        return None


def report_value(trial: optuna.Trial, step: int, value: float) -> None:
    """An intermediate value (the dashboard's curves; Optuna's own pruners read it). `Trial.report` refuses
    multi-objective studies, so those write through the storage."""
    if len(trial.study.directions) == 1:
        trial.report(value, step)
    else:
        trial.storage.set_trial_intermediate_value(trial_id(trial), step, value)
