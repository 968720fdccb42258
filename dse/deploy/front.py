"""The study's Pareto front as a table, the deployment filters on it, and the pick of one model."""

from __future__ import annotations

import math

import optuna
import pandas as pd

from dse.report.frame import with_latency
from dse.report.results import front_mask
from dse.study import OBJECTIVES, trials_frame

__all__ = ["PICKS", "DeployError", "front_frame", "filter_front", "pick"]

# How each pick orders the front: (column, ascending) keys, the first decides, the others break ties.
PICKS = {
    "smallest": [("size_kb", True), ("val_acc", False), ("latency_ms", True)],
    "fastest": [("latency_ms", True), ("val_acc", False), ("size_kb", True)],
    "most-accurate": [("val_acc", False), ("size_kb", True), ("latency_ms", True)],
}


class DeployError(RuntimeError):
    """A study, trial, bundle or option cannot be deployed as asked; the message says why and what to do."""


def front_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per Pareto-optimal COMPLETE trial in the study's objectives, smallest first: validation and test
    accuracy (fractions), fp32 state_dict size and int8 estimate in KB (10^3 bytes), the PyTorch batch-1 CPU
    latency of its architecture with its spread and whether it was measured under load, params, MACs, and the
    bundle exported from it, if any. Latency is read from the study's per-architecture figures (the latest
    `measure --front` included), so the front is computed here rather than from the trials' stored values."""
    names = study.metric_names or list(OBJECTIVES)
    deployed = {k.removeprefix("deploy:"): v for k, v in study.user_attrs.items() if k.startswith("deploy:")}
    trials = trials_frame(study).assign(study=study.study_name)
    for column in ("state", "val_acc", "latency_key", "latency_ms", "latency_iqr_ms", "curves"):
        if column not in trials:
            trials[column] = None
    done = with_latency(trials, {study.study_name: study.user_attrs})
    rows = []
    for r in done[done["state"] == "COMPLETE"].to_dict("records"):
        curves = r["curves"] if isinstance(r["curves"], list) else []
        accuracy = r["val_acc"] if pd.notna(r["val_acc"]) else curves[-1]["val_acc"] if curves else math.nan
        rows.append({
            "trial": int(r["number"]), "model": _text(r.get("paper_name")), "val_acc": accuracy,
            "test_acc": _num(r.get("test_acc")), "size_kb": _num(r.get("size_mb")) * 1e3,
            "int8_kb": _num(r.get("int8_mb")) * 1e3, "latency_ms": _num(r["latency_ms"]),
            "latency_iqr_ms": _num(r["latency_iqr_ms"]), "under_load": r["latency_under_load"] is True,
            "params": r.get("params"), "mmacs": _num(r.get("macs")) / 1e6,
            "bundle": deployed.get(str(int(r["number"])), {}).get("bundle", ""),
        })  # fmt: skip
    columns = ["trial", "model", "val_acc", "test_acc", "size_kb", "int8_kb", "latency_ms", "latency_iqr_ms",
               "under_load", "params", "mmacs", "bundle"]
    frame = pd.DataFrame(rows, columns=columns)
    on_front = front_mask(frame.assign(size_mb=frame["size_kb"] / 1e3), names)
    return frame[on_front].sort_values(["size_kb", "trial"], ignore_index=True)


def _num(value) -> float:
    return float(value) if value is not None and pd.notna(value) else math.nan


def _text(value) -> str:
    return value if isinstance(value, str) else ""


def _check_limit(name: str, value: float | None, upper: float = math.inf) -> None:
    if value is not None and not 0 < value <= upper:
        hint = " (a fraction: 0.9 is 90 %)" if upper == 1 else ""
        raise DeployError(f"{name}={value!r} must be in (0, {upper:g}]{hint}")


def filter_front(
    frame: pd.DataFrame,
    *,
    max_size_kb: float | None = None,
    max_latency_ms: float | None = None,
    min_accuracy: float | None = None,
) -> pd.DataFrame:
    """The front's rows within the limits (size in KB, latency in ms, validation accuracy as a fraction).
    Refuses bad limits and limits no row meets, naming the front's range."""
    _check_limit("max_size_kb", max_size_kb)
    _check_limit("max_latency_ms", max_latency_ms)
    _check_limit("min_accuracy", min_accuracy, 1.0)
    keep = pd.Series(True, index=frame.index)
    if max_size_kb is not None:
        keep &= frame["size_kb"] <= max_size_kb
    if max_latency_ms is not None:
        keep &= frame["latency_ms"] <= max_latency_ms
    if min_accuracy is not None:
        keep &= frame["val_acc"] >= min_accuracy
    if frame.empty:
        raise DeployError("the study has no COMPLETE trial, so no Pareto front; run or finish its sweep first")
    if not keep.any():
        limits = {"max_size_kb": max_size_kb, "max_latency_ms": max_latency_ms, "min_accuracy": min_accuracy}
        asked = ", ".join(f"{k}={v:g}" for k, v in limits.items() if v is not None)
        raise DeployError(
            f"no model of the Pareto front meets {asked}; the front spans size {frame.size_kb.min():.1f}-"
            f"{frame.size_kb.max():.1f} KB, latency {frame.latency_ms.min():.3f}-{frame.latency_ms.max():.3f} ms, "
            f"val_acc {frame.val_acc.min():.4f}-{frame.val_acc.max():.4f}"
        )
    return frame[keep].reset_index(drop=True)


def pick(frame: pd.DataFrame, how: str) -> int:
    """The trial number the pick `how` chooses from a (filtered) front. Accuracy means validation
    accuracy: the test set stays out of the choice."""
    if how not in PICKS:
        raise DeployError(f"pick={how!r} is unknown; allowed: {', '.join(PICKS)}")
    if frame.empty:
        raise DeployError("nothing to pick from: the front is empty")
    columns, ascending = zip(*PICKS[how])
    return int(frame.sort_values(list(columns), ascending=list(ascending), kind="stable").iloc[0]["trial"])
