"""Optuna storage and studies: open a study DB (SQLite or any SQLAlchemy URL), create or check a study,
and read its trials into a pandas frame."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import warnings

import optuna
import pandas as pd
import sqlalchemy
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

__all__ = [
    "OBJECTIVES",
    "StudyError",
    "default_storage",
    "study_workdir",
    "check_storage",
    "open_storage",
    "create_or_check_study",
    "load_study",
    "trials_frame",
]

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats and their retry

# The sweep's objectives, in order: metric name -> direction. Accuracies are fractions in [0, 1].
OBJECTIVES = {"val_acc": "maximize", "size_mb": "minimize", "latency_ms": "minimize"}
STUDIES = Path("studies")


class StudyError(RuntimeError):
    """A study or its storage cannot be used as asked (unreachable, unknown, other objectives)."""


def default_storage(name: str, root: Path = STUDIES) -> str:
    """SQLite at `studies/<name>.db`."""
    return f"sqlite:///{root / f'{name}.db'}"


def study_workdir(name: str, storage: str, workdir: str | None = None) -> Path:
    """Checkpoints and artifacts of a study: `workdir`, else beside a SQLite DB, else `studies/<name>/`."""
    if workdir:
        return Path(workdir)
    path = _sqlite_path(storage)
    return path.with_suffix("") if path is not None else STUDIES / name


def _sqlite_path(url: str) -> Path | None:
    if not url.startswith("sqlite:///"):
        return None
    return Path(url.removeprefix("sqlite:///"))


def check_storage(url: str, *, must_exist: bool = False) -> None:
    """Fail early, writing nothing, when a storage URL is malformed or its database unreachable."""
    path = _sqlite_path(url)
    if url.startswith("sqlite") and path is None:
        raise StudyError(f"storage {url!r}: write SQLite URLs as sqlite:///path/to/file.db")
    if path is not None:
        if must_exist and not path.is_file():
            raise StudyError(f"no study DB at {path} (storage {url!r}); run a sweep first or pass the right storage")
        folder = path.parent if path.parent != Path("") else Path(".")
        if path.exists() and not path.is_file() or folder.exists() and not folder.is_dir():
            raise StudyError(f"storage {url!r}: {path} is not a file in a folder")
        return
    try:
        engine = sqlalchemy.create_engine(url)
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError, ImportError) as e:
        hint = " (for PostgreSQL: pip install -e '.[postgres]')" if "psycopg" in str(e) else ""
        raise StudyError(
            f"storage {url!r} is not a usable SQLAlchemy URL: {e}{hint}; e.g. sqlite:///studies/x.db or postgresql://user@host/db"
        ) from None
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as e:
        reason = str(e.orig if hasattr(e, "orig") else e).strip().splitlines()[0]
        raise StudyError(f"cannot reach storage {url!r}: {reason}") from None
    finally:
        engine.dispose()


def open_storage(
    url: str,
    *,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    max_retry: int | None = None,
) -> RDBStorage:
    """An RDBStorage. SQLite gets a WAL journal and a long busy timeout so parallel workers wait for the
    write lock instead of dying on "database is locked"; heartbeats fail and re-enqueue stale trials."""
    check_storage(url)
    path = _sqlite_path(url)
    engine_kwargs: dict = {"pool_pre_ping": True}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(path, timeout=60) as connection:  # WAL is a property of the file: set once
            if connection.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                connection.execute("PRAGMA journal_mode=WAL")
        engine_kwargs = {"connect_args": {"timeout": 300}}
    retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry, inherit_intermediate_values=True) if heartbeat_interval else None
    storage = RDBStorage(
        url,
        engine_kwargs=engine_kwargs,
        heartbeat_interval=heartbeat_interval,
        grace_period=grace_period,
        heartbeat_stale_trial_callback=retry,
    )
    if path is not None:
        _serialize_sqlite(storage.engine)
    return storage


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


def _existing(storage: RDBStorage, name: str) -> optuna.study.StudySummary | None:
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        if summary.study_name == name:
            return summary
    return None


def create_or_check_study(
    name: str,
    storage: RDBStorage,
    *,
    objectives: list[str] | None = None,
    sampler: optuna.samplers.BaseSampler | None = None,
    user_attrs: dict | None = None,
) -> optuna.Study:
    """Load the study `name`, or create it with these objectives (default: all of OBJECTIVES) as metric
    names. A study of that name with other objectives is refused before anything is written."""
    objectives = list(objectives or OBJECTIVES)
    directions = [OBJECTIVES[m] for m in objectives]
    summary = _existing(storage, name)
    if summary is not None:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        ours = dict(zip(objectives, directions))
        theirs = dict(zip(study.metric_names or [f"objective {i}" for i in range(len(summary.directions))],
                          [d.name.lower() for d in summary.directions]))
        if theirs != ours:
            raise StudyError(
                f"study {name!r} exists in {storage.url} with objectives {theirs}; this sweep optimises {ours}. "
                "Pick another study.name or storage"
            )
        return study
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, directions=directions)
    study.set_metric_names(objectives)
    for key, value in (user_attrs or {}).items():
        study.set_user_attr(key, value)
    return study


def load_study(name: str, storage: str) -> optuna.Study:
    """An existing study, read-only use. Unknown names list the studies the storage holds."""
    check_storage(storage, must_exist=True)
    try:
        rdb = RDBStorage(storage, skip_table_creation=True)
        found = _existing(rdb, name)
    except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as e:
        raise StudyError(f"storage {storage!r} is not a readable Optuna study DB: {type(e).__name__}") from None
    if found is None:
        names = sorted(s.study_name for s in optuna.get_all_study_summaries(rdb, include_best_trial=False))
        raise StudyError(f"no study {name!r} in {storage}; studies there: {', '.join(names) or 'none'}")
    return optuna.load_study(study_name=name, storage=rdb)


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, objective values by metric name, params (`param.` prefix) and
    user attributes (their own names)."""
    names = study.metric_names or list(OBJECTIVES)
    rows = []
    for t in study.get_trials(deepcopy=False):
        row = {"number": t.number, "state": t.state.name, "start": t.datetime_start, "complete": t.datetime_complete}
        row.update(dict(zip(names, t.values or [None] * len(names))))
        row.update({f"param.{k}": v for k, v in t.params.items()})
        row.update(t.user_attrs)
        rows.append(row)
    return pd.DataFrame(rows)
