"""Studies: names and workdirs, a study's definition (fingerprint, diff), creating a study or checking a run
against it, loading one to read, and its trials as a pandas frame. The DB itself is `dse.storage`'s."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import sqlalchemy
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from dse.config import OBJECTIVES, check_study_name
from dse.metrics import direction
from dse.storage import StudyError, check_storage, did_you_mean, open_readonly, sqlite_path

__all__ = [
    "OBJECTIVES",
    "FINISHED",
    "ALIVE",
    "STUDIES",
    "StudyError",
    "check_study_name",
    "default_storage",
    "study_workdir",
    "check_workdir",
    "claim_workdir",
    "fingerprint",
    "definition_diff",
    "create_or_check_study",
    "load_study",
    "trials_frame",
    "why_no_front",
]

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # a trial that needs no retry
ALIVE = (TrialState.RUNNING, TrialState.WAITING)  # a trial that may still finish

STUDIES = Path("studies")
WORKDIR_MARKER = ".dse-workdir"  # a folder dse made for a study's checkpoints and artifacts


def default_storage(name: str, root: Path = STUDIES) -> str:
    """SQLite at `studies/<name>.db`."""
    return f"sqlite:///{root / f'{check_study_name(name)}.db'}"


def study_workdir(name: str, storage: str, workdir: str | None = None) -> Path:
    """Checkpoints and artifacts of a study: `workdir`, else beside a SQLite DB, else `studies/<name>/`."""
    if workdir:
        return Path(workdir)
    path = sqlite_path(storage)
    return path.with_suffix("") if path is not None else STUDIES / check_study_name(name)


def check_workdir(path: Path) -> None:
    """An explicit study.workdir must be new, empty, or a folder dse made (so `/etc` is never written into)."""
    if path.exists() and not path.is_dir():
        raise StudyError(f"study workdir={str(path)!r} is not a folder")
    if path.is_dir() and any(path.iterdir()) and not (path / WORKDIR_MARKER).exists():
        raise StudyError(
            f"study workdir={str(path)!r} is a non-empty folder that dse did not make (no {WORKDIR_MARKER} in it); "
            "give a new or empty folder"
        )


def claim_workdir(path: Path) -> None:
    """Make the study's workdir and mark it as dse's."""
    path.mkdir(parents=True, exist_ok=True)
    (path / WORKDIR_MARKER).touch()


# ---------------------------------------------------------------- studies and their definitions


def fingerprint(definition: dict) -> str:
    """sha256 of a definition's canonical JSON."""
    return hashlib.sha256(json.dumps(definition, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _flat(node: Any, path: tuple = ()) -> dict[tuple, Any]:
    if isinstance(node, dict) and node:
        return {k: v for key, value in node.items() for k, v in _flat(value, (*path, key)).items()}
    return {path: node}


def definition_diff(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for every setting that differs; the per-config settings (`configs.<label>.key`)
    are named once by their key, with how many configs differ."""
    a, b = _flat(old), _flat(new)
    changes: dict[str, list[str]] = {}
    for path in sorted(a.keys() | b.keys(), key=str):
        before, after = a.get(path, "unset"), b.get(path, "unset")
        if before != after:
            key = ".".join(map(str, path[2:] if path[0] == "configs" and len(path) > 2 else path))
            changes.setdefault(key, []).append(f"{key}: {before!r} -> {after!r}")
    return [lines[0] + (f" (in {len(lines)} configs)" if len(lines) > 1 else "") for lines in changes.values()]


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
    definition: dict | None = None,
    sampler: optuna.samplers.BaseSampler | None = None,
    user_attrs: dict | None = None,
) -> optuna.Study:
    """Load the study `name`, or create it with these objectives (default: all of OBJECTIVES) as metric
    names and its `definition` (what makes its trials comparable) with the definition's fingerprint.

    A study of that name with other objectives or another definition is refused, naming what differs,
    before anything is written. A study made by an older dse (no definition) adopts this one, with a
    warning. Hold `storage_lock` around this call and the queueing that follows: a concurrent sweep
    then either creates the study first or finds it."""
    objectives = list(objectives or OBJECTIVES)
    directions = [direction(m) for m in objectives]
    summary = _existing(storage, name)
    if summary is None:
        try:
            study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, directions=directions)
        except optuna.exceptions.DuplicatedStudyError:  # created meanwhile by a process that holds no dse lock
            return create_or_check_study(
                name, storage, objectives=objectives, definition=definition, sampler=sampler, user_attrs=user_attrs
            )
        study.set_metric_names(objectives)
        for key, value in (user_attrs or {}).items():
            study.set_user_attr(key, value)
        _store_definition(study, definition)
        return study
    study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    ours = dict(zip(objectives, directions))
    theirs = dict(
        zip(
            study.metric_names or [f"objective {i}" for i in range(len(summary.directions))],
            [d.name.lower() for d in summary.directions],
        )
    )
    if theirs != ours:
        raise StudyError(
            f"study {name!r} exists in {storage.url} with objectives {theirs}; this sweep optimises {ours}. "
            "Pick another study.name or storage"
        )
    if definition is not None:
        _check_definition(study, definition, storage.url)
    return study


def _store_definition(study: optuna.Study, definition: dict | None) -> None:
    if definition is not None:
        study.set_user_attr("definition", definition)
        study.set_user_attr("definition_sha256", fingerprint(definition))


def _check_definition(study: optuna.Study, definition: dict, url: str) -> None:
    stored = study.user_attrs.get("definition")
    if stored is None:
        print(
            f"warning: study {study.study_name!r} in {url} was made by an older dse and stores no definition; "
            "it adopts this run's (trials already in it are taken to match)",
            file=sys.stderr,
            flush=True,
        )
        _store_definition(study, definition)
        return
    if study.user_attrs.get("definition_sha256") == fingerprint(definition):
        return
    changes = definition_diff(stored, definition)
    shown = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
    raise StudyError(
        f"study {study.study_name!r} in {url} was defined otherwise (its value -> this run's): {shown}. Nothing was "
        "written. Its trials would not be comparable with this run's: pick another study.name (or storage), or "
        "run with the study's settings"
    )


def load_study(name: str, storage: str) -> optuna.Study:
    """An existing study, read-only use. Unknown names list the studies the storage holds."""
    check_study_name(name)
    check_storage(storage, must_exist=True)
    try:
        rdb = open_readonly(storage)
        found = _existing(rdb, name)
    except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as e:
        raise StudyError(f"storage {storage!r} is not a readable Optuna study DB: {type(e).__name__}") from None
    if found is None:
        names = sorted(s.study_name for s in optuna.get_all_study_summaries(rdb, include_best_trial=False))
        hint = did_you_mean(name, names)
        raise StudyError(
            f"no study {name!r} in {storage}; studies there: {', '.join(names) or 'none'}"
            + (f"; {hint}" if hint else "")
        )
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


def why_no_front(trials: pd.DataFrame) -> str:
    """Why trials (a `trials_frame`, of one study or several) hold no COMPLETE trial, in one line, or '' when they
    hold one: 'no trial yet', 'all 13 trials pruned: over budget (size 75.5 KB > 1 KB)' (each kind of reason once,
    with the smallest model's figures), or how many are pruned, failed and still to run."""
    states = trials["state"].value_counts() if len(trials) else pd.Series(dtype=int)
    if states.get("COMPLETE", 0):
        return ""
    if not len(trials):
        return "no trial yet"
    pruned = trials[trials["state"] == "PRUNED"]
    order = pruned.sort_values("size_mb", kind="stable") if "size_mb" in pruned else pruned
    reasons = order["pruned_reason"] if "pruned_reason" in order else pd.Series(dtype=object)
    kinds: dict[str, list[str]] = {}
    for reason in reasons:
        kind, _, detail = (reason if isinstance(reason, str) else "no reason recorded").partition(": ")
        kinds.setdefault(kind, []).append(detail)
    why = ", ".join(
        ("" if len(kinds) == 1 else f"{len(details)} ") + kind + (f" ({details[0]})" if details[0] else "")
        for kind, details in kinds.items()
    )
    if len(pruned) == len(trials):
        return f"all {len(trials)} trial{'s' if len(trials) > 1 else ''} pruned: {why}"
    parts = [f"{n} {state.lower()}" for state, n in states.items()]
    return f"no trial complete ({', '.join(parts)})" + (f"; pruned: {why}" if why else "")
