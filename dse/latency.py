"""Latency per architecture: a study measures each distinct inference graph once, with training on this machine
paused, in PyTorch eager and (with `ort`) in ONNX Runtime as fp32 and int8 files, and stores the figures as a study
attribute `latency:<architecture>` that every trial of it reads (`with_latency`)."""

from __future__ import annotations

import copy
import datetime
import getpass
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import optuna
import pandas as pd
import torch
import torch.nn as nn

from dse.identity import architecture
from dse.measure import measure_calls, measure_latencies
from dse.models import ModelConfig, build_model
from dse.onnx import INPUT, as_trained, export_pair, random_calibration, session

try:
    import fcntl
except ImportError:  # not POSIX: measurements do not pause training (their load is still recorded)
    fcntl = None

__all__ = [
    "ATTR",
    "LATENCY",
    "MEASURED_ALONE",
    "ORT",
    "architecture",
    "build",
    "figures",
    "with_latency",
    "ensure",
    "ort_latencies",
    "trial_attrs",
    "pause_training",
    "training_turns",
]

ATTR = "latency:"
# How long a measurement waits for training workers to reach an epoch boundary before it measures anyway
# (and says so): an epoch of a large model on a slow CPU can take minutes.
PAUSE_WAIT_S = 600.0
# How each trial's latency was measured, from its architecture's figure (older studies: the trial's own).
LATENCY = ("latency_ms", "latency_iqr_ms", "latency_under_load", "latency_how")
MEASURED_ALONE = (
    "measured by the trial itself"  # latency_how of a trial whose study stores no figure of its architecture
)
# The ONNX Runtime figures (a figure's "onnx" and "int8" records) as trial attributes; None where a study has none.
ORT = (
    "latency_onnx_ms",
    "latency_onnx_iqr_ms",
    "latency_onnx_clock",
    "latency_int8_ms",
    "latency_int8_iqr_ms",
    "latency_int8_clock",
)


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
            row.update(
                latency_ms=figure["ms"],
                latency_iqr_ms=figure["iqr_ms"],
                latency_under_load=figure["under_load"],
                latency_how=figure["how"],
            )
            row.update({k: v for k, v in trial_attrs(figure).items() if k in ORT})
        else:
            row.update(latency_under_load=None, latency_how=MEASURED_ALONE if _measured(row["latency_ms"]) else None)
        rows.append(row)
    return pd.DataFrame(rows, columns=list(dict.fromkeys([*trials.columns, *LATENCY, *ORT])))


def trial_attrs(figure: Mapping) -> dict:
    """An architecture's figure as a trial's attributes: the PyTorch latency, and where measured the ONNX Runtime
    latencies (`latency_onnx_ms`, `latency_int8_ms`, their IQR and clock) and the files' sizes (`onnx_kb`,
    `int8_kb`: a trained trial records its own files' instead)."""
    out = {
        "latency_ms": figure["ms"],
        "latency_iqr_ms": figure["iqr_ms"],
        "latency_threads": figure["threads"],
        "latency_under_load": figure["under_load"],
    }
    for name in ("onnx", "int8"):
        if name in figure:
            ort = figure[name]
            out.update(
                {
                    f"latency_{name}_ms": ort["ms"],
                    f"latency_{name}_iqr_ms": ort["iqr_ms"],
                    f"latency_{name}_clock": ort["clock"],
                    f"{name}_kb": figure[f"{name}_kb"],
                }
            )
    return out


def _measured(ms) -> bool:
    """A latency a trial stored: a non-zero number (not None or NaN) at the report's 6-digit rounding."""
    return ms is not None and bool(pd.notna(ms)) and round(float(ms), 6) != 0


def ensure(
    study: optuna.Study,
    models: Mapping[str, Callable[[], tuple[nn.Module, Sequence[int]]]],
    how: str,
    *,
    remeasure: bool = False,
    ort: bool = False,
    **settings,
) -> dict[str, dict]:
    """The figures of these architectures (key -> a function giving a model and its input shape): those the study
    holds, the others (all with `remeasure`; with `ort`, those without ONNX Runtime figures too) measured now with
    training on this machine paused, then stored on the study. `how` says who measured; `settings` go to
    `measure_latencies` (and, but for `threads`, to `ort_latencies`)."""

    def missing(have: dict) -> list[str]:
        return [k for k in models if remeasure or k not in have or (ort and "onnx" not in have[k])]

    if missing(figures(study.user_attrs)):
        with pause_training() as paused:
            have = figures(study.user_attrs)  # another worker may have measured them while we waited
            built = {k: models[k]() for k in missing(have)}
            measured = measure_latencies(built, **settings) if built else {}
            on_ort = ort_latencies(built, **{k: v for k, v in settings.items() if k != "threads"}) if ort else {}
        for key, latency in measured.items():
            record = {
                **have.get(key, {}),
                **latency.to_dict(),
                **on_ort.get(key, {}),
                "how": how if paused else f"{how}; training did not pause within {PAUSE_WAIT_S:g} s",
                "paused_training": paused,
                "host": socket.gethostname(),
                "measured_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            }
            study.set_user_attr(ATTR + key, record)
    have = figures(study.user_attrs)
    return {k: have[k] for k in models}


def ort_latencies(models: Mapping[str, tuple[nn.Module, Sequence[int]]], **settings) -> dict[str, dict]:
    """ONNX Runtime figures of architectures in one sitting (`measure_calls`, interleaved): each model, its
    BatchNorm drawn as training leaves it, exported to fp32 and int8 as a trial is (`dse.onnx.export_pair`, int8
    calibrated on random images), each file run at batch 1 with one intra-op thread. By key: {"onnx": Latency,
    "int8": Latency (as dicts), "onnx_kb", "int8_kb"} (file sizes in 10^3 bytes)."""
    out: dict[str, dict] = {}
    calls = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (key, (model, shape)) in enumerate(models.items()):
            shape = tuple(shape)
            folder = Path(tmp) / str(i)
            folder.mkdir()
            fresh = as_trained(copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).eval())
            files = dict(zip(("onnx", "int8"), export_pair(fresh, folder, shape, random_calibration(shape, 32, 0))))
            x = random_calibration(shape, 1, 1)[0]
            for name, path in files.items():
                sess = session(path, threads=1)
                calls[key, name] = lambda sess=sess, feed={INPUT: x}: sess.run(None, feed)
                out.setdefault(key, {})[f"{name}_kb"] = path.stat().st_size / 1e3
        for (key, name), latency in measure_calls(calls, threads=1, **settings).items():
            out[key][name] = latency.to_dict()
    return out


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
