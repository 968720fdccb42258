"""Latency per architecture: a study measures each distinct inference graph once, with training on this machine
paused, and stores the figure as a study attribute `latency:<architecture>` that every trial of it reads
(`with_latency`)."""

from __future__ import annotations

import datetime
import getpass
import os
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import optuna
import pandas as pd
import torch.nn as nn

from dse.identity import architecture
from dse.measure import measure_latencies
from dse.models import ModelConfig, build_model

try:
    import fcntl
except ImportError:  # not POSIX: measurements do not pause training (their load is still recorded)
    fcntl = None

__all__ = ["ATTR", "LATENCY", "MEASURED_ALONE", "architecture", "build", "figures", "with_latency", "ensure", "pause_training", "training_turns"]

ATTR = "latency:"
# How long a measurement waits for training workers to reach an epoch boundary before it measures anyway
# (and says so): an epoch of a large model on a slow CPU can take minutes.
PAUSE_WAIT_S = 600.0
# How each trial's latency was measured, from its architecture's figure (older studies: the trial's own).
LATENCY = ("latency_ms", "latency_iqr_ms", "latency_under_load", "latency_how")
MEASURED_ALONE = "measured by the trial itself"  # latency_how of a trial whose study stores no figure of its architecture


def build(spec: Mapping) -> tuple[nn.Module, tuple[int, ...]]:
    """A freshly initialised model of an architecture spec and its input shape (weights do not change the time)."""
    shape = tuple(spec["input_shape"])
    model = build_model(ModelConfig(**spec["model"]), num_classes=spec["num_classes"], in_channels=shape[0])
    return model, shape


def figures(study_attrs: Mapping) -> dict[str, dict]:
    """The latency figures a study holds (its user attributes), by architecture key."""
    return {k.removeprefix(ATTR): v for k, v in study_attrs.items() if k.startswith(ATTR) and isinstance(v, dict)}


def with_latency(trials: pd.DataFrame, attrs: dict[str, dict]) -> pd.DataFrame:
    """The trials (a `study` and a `latency_key` column) with the LATENCY columns from their architecture's figure
    in their study (`attrs`: study name -> its user attributes); a trial of an older study (no figure) keeps the
    latency it measured itself."""
    tables = {name: figures(a) for name, a in attrs.items()}
    rows = []
    for row in trials.to_dict("records"):
        figure = tables[row["study"]].get(row["latency_key"]) if isinstance(row["latency_key"], str) else None
        if figure is not None:
            row.update(latency_ms=figure["ms"], latency_iqr_ms=figure["iqr_ms"],
                       latency_under_load=figure["under_load"], latency_how=figure["how"])
        else:
            row.update(latency_under_load=None, latency_how=MEASURED_ALONE if _measured(row["latency_ms"]) else None)
        rows.append(row)
    return pd.DataFrame(rows, columns=list(dict.fromkeys([*trials.columns, *LATENCY])))


def _measured(ms) -> bool:
    """A latency a trial stored: a non-zero number (not None or NaN) at the report's 6-digit rounding."""
    return ms is not None and bool(pd.notna(ms)) and round(float(ms), 6) != 0


def ensure(
    study: optuna.Study,
    models: Mapping[str, Callable[[], tuple[nn.Module, Sequence[int]]]],
    how: str,
    *,
    remeasure: bool = False,
    **settings,
) -> dict[str, dict]:
    """The figures of these architectures (key -> a function giving a model and its input shape): those the study
    holds, the others (all with `remeasure`) measured now in one sitting with training on this machine paused,
    then stored on the study. `how` says who measured; `settings` go to `measure_latencies`."""
    todo = [k for k in models if remeasure or k not in figures(study.user_attrs)]
    if todo:
        with pause_training() as paused:
            have = figures(study.user_attrs)  # another worker may have measured them while we waited
            todo = [k for k in todo if remeasure or k not in have]
            measured = measure_latencies({k: models[k]() for k in todo}, **settings) if todo else {}
        for key, latency in measured.items():
            record = {
                **latency.to_dict(), "how": how if paused else f"{how}; training did not pause within {PAUSE_WAIT_S:g} s",
                "paused_training": paused, "host": socket.gethostname(),
                "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }  # fmt: skip
            study.set_user_attr(ATTR + key, record)
    have = figures(study.user_attrs)
    return {k: have[k] for k in models}


# ---------------------------------------------------------------- pausing training on this machine
# Training workers hold a shared lock on `measure.lock` while they train and let go of it at every epoch
# boundary; a measurement takes it exclusively, so it runs while no worker of this machine trains. A second
# lock, `gate.lock`, stops workers from taking the shared lock again while a measurement waits (without it, a
# stream of workers holding it in turn could starve the measurement).


def _lock_file(name: str) -> Path:
    """One pair of lock files per user and machine, in the temp folder (or $DSE_LOCK_DIR: tests keep theirs apart
    from real sweeps on the same machine)."""
    return Path(os.environ.get("DSE_LOCK_DIR") or tempfile.gettempdir()) / f"dse-{getpass.getuser()}-{name}.lock"


def _open(name: str):
    return open(_lock_file(name), "a+")


def _pass_gate() -> None:
    """Wait while a measurement holds the gate."""
    with _open("gate") as gate:
        fcntl.flock(gate, fcntl.LOCK_SH)


@contextmanager
def pause_training(wait: float = PAUSE_WAIT_S) -> Iterator[bool]:
    """Hold every training worker of this machine at its next epoch boundary while the block runs; yields
    whether they all got there within `wait` seconds (else the block runs anyway)."""
    if fcntl is None:
        yield False
        return
    with _open("gate") as gate, _open("measure") as lock:
        fcntl.flock(gate, fcntl.LOCK_EX)
        deadline = time.monotonic() + wait
        paused = False
        while not paused and time.monotonic() < deadline:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                paused = True
            except BlockingIOError:
                time.sleep(0.05)
        yield paused
        # closing the files releases both locks


@contextmanager
def training_turns() -> Iterator[Callable[[], None]]:
    """Held by a worker while it trains; yields `boundary()`, to call after every epoch: there a waiting
    measurement runs first."""
    if fcntl is None:
        yield lambda: None
        return
    with _open("measure") as lock:

        def boundary() -> None:
            fcntl.flock(lock, fcntl.LOCK_UN)
            _pass_gate()
            fcntl.flock(lock, fcntl.LOCK_SH)

        _pass_gate()
        fcntl.flock(lock, fcntl.LOCK_SH)
        yield boundary
