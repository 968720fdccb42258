"""Study DB URLs, checked before anything opens or writes them: malformed URLs, unreachable servers, SQLite files
that are missing (naming the studies their folder holds), empty, corrupt, foreign or read-only."""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy

__all__ = [
    "StudyError",
    "check_storage",
    "did_you_mean",
    "first_line",
    "server_kwargs",
    "sqlite_path",
    "studies_in_folder",
]


class StudyError(RuntimeError):
    """A study or its storage cannot be used as asked (unreachable, unknown, defined otherwise)."""


def sqlite_path(url: str) -> Path | None:
    """The DB file of a `sqlite:///` URL; None for any other URL."""
    if not url.startswith("sqlite:///"):
        return None
    return Path(url.removeprefix("sqlite:///"))


def check_storage(url: str, *, must_exist: bool = False, writable: bool = False) -> None:
    """Fail early, writing nothing, when a storage URL is malformed, its database unreachable, or (SQLite)
    its file empty, corrupt, not an Optuna DB or, with `writable`, read-only."""
    path = sqlite_path(url)
    if url.startswith("sqlite") and path is None:
        raise StudyError(f"storage {url!r}: write SQLite URLs as sqlite:///path/to/file.db")
    if path is not None:
        _check_sqlite(url, path, must_exist=must_exist, writable=writable)
        return
    try:
        engine = sqlalchemy.create_engine(url, **server_kwargs(url))
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError, ImportError) as e:
        hint = " (for PostgreSQL: pip install -e '.[postgres]')" if "psycopg" in str(e) else ""
        raise StudyError(
            f"storage {url!r} is not a usable SQLAlchemy URL: {e}{hint}; e.g. sqlite:///studies/x.db or postgresql://user@host/db"
        ) from None
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as e:
        raise StudyError(f"cannot reach storage {url!r}: {first_line(e)}") from None
    finally:
        engine.dispose()


def studies_in_folder(folder: Path) -> list[str]:
    """The studies whose SQLite DBs lie in `folder`, named by their files as `dse.study.default_storage` names them."""
    return sorted(p.stem for p in folder.glob("*.db") if p.is_file()) if folder.is_dir() else []


def did_you_mean(name: str, names: list[str]) -> str:
    """'did you mean NAME?' for the closest of `names` (difflib), or ''."""
    close = difflib.get_close_matches(name, names, n=1)
    return f"did you mean {close[0]}?" if close else ""


def _no_db(url: str, path: Path, folder: Path) -> str:
    """Why a study DB is missing, naming the studies its folder does hold and the closest one."""
    found = studies_in_folder(folder)
    if not folder.is_dir():
        there = f"there is no folder {folder}/"
    elif not found:
        there = f"no study DB in {folder}/"
    else:
        hint = did_you_mean(path.stem, found)
        there = f"studies in {folder}/: {', '.join(found)}" + (f"; {hint}" if hint else "")
    return f"no study DB at {path} (storage {url!r}); {there}; run a sweep first or pass the right storage"


def _check_sqlite(url: str, path: Path, *, must_exist: bool, writable: bool) -> None:
    folder = path.parent if path.parent != Path("") else Path(".")
    if must_exist and not path.is_file():
        raise StudyError(_no_db(url, path, folder))
    if path.exists() and not path.is_file() or folder.exists() and not folder.is_dir():
        raise StudyError(f"storage {url!r}: {path} is not a file in a folder")
    if writable:
        # SQLite writes its journal beside the DB: the folder must be writable too.
        for what, p in (("file", path), ("folder", folder)):
            if p.exists() and not os.access(p, os.W_OK):
                raise StudyError(f"storage {url!r}: the DB {what} {p} is read-only; a sweep must write to it")
    with _settled(path):  # not while a concurrent sweep is creating it
        _check_sqlite_file(url, path)


@contextlib.contextmanager
def _settled(path: Path) -> Iterator[None]:
    """Wait, without writing anything, while a dse process holds the DB's lock (it may be creating the file)."""
    lock = path.with_name(path.name + ".lock")
    if not lock.exists():
        yield
        return
    with open(lock) as f:
        fcntl.flock(f, fcntl.LOCK_SH)
        yield


def _check_sqlite_file(url: str, path: Path) -> None:
    if not path.exists():
        return
    if path.stat().st_size == 0:
        raise StudyError(f"storage {url!r}: {path} is empty (0 bytes), not a study DB; delete it to start a new study")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as connection:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.Error as e:
        raise StudyError(
            f"storage {url!r}: {path} is not a readable SQLite DB ({e}); it is corrupt or another file"
        ) from None
    if tables and "studies" not in tables:
        raise StudyError(
            f"storage {url!r}: {path} is a SQLite DB without Optuna's tables; point study.storage elsewhere"
        )


def first_line(e: BaseException) -> str:
    cause = getattr(e, "orig", None) or e.__cause__ or e
    return (str(cause).strip().splitlines() or [type(cause).__name__])[0]


def server_kwargs(url: str) -> dict:
    """Engine options for a database server: drop dead pooled connections; give up connecting after 10 s."""
    connect = {"connect_timeout": 10} if url.startswith("postgresql") else {}
    return {"pool_pre_ping": True, "connect_args": connect}
