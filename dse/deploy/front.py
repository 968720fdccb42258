"""The deployment filters on a study's Pareto front (`dse.front.front_frame`) and the pick of one model."""

from __future__ import annotations

import math

import pandas as pd

from dse.front import front_frame

__all__ = ["PICKS", "DeployError", "front_frame", "filter_front", "pick"]

# How each pick orders the front: (column, ascending) keys, the first decides, the others break ties.
PICKS = {
    "smallest": [("size_kb", True), ("val_acc", False), ("latency_ms", True)],
    "fastest": [("latency_ms", True), ("val_acc", False), ("size_kb", True)],
    "most-accurate": [("val_acc", False), ("size_kb", True), ("latency_ms", True)],
}


class DeployError(RuntimeError):
    """A study, trial, bundle or option cannot be deployed as asked; the message says why and what to do."""


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
