"""The Pareto front: which points no other dominates, which rows of a table are on the front, and a study's
front as a table (for the sweep's summary, the report and deploy)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import optuna
import pandas as pd

from dse.latency import with_latency
from dse.metrics import METRICS, sign, split_metric
from dse.study import OBJECTIVES, trials_frame
from dse.targets import with_targets

__all__ = ["DEPLOYED_COLUMNS", "DIRECTIONS", "non_dominated", "front_mask", "front_frame"]

DIRECTIONS = {name: sign(name) for name in METRICS}  # -1: maximised


def non_dominated(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points that no other point dominates, every coordinate minimised."""

    def dominates(q: Sequence[float], p: Sequence[float]) -> bool:
        return all(a <= b for a, b in zip(q, p)) and any(a < b for a, b in zip(q, p))

    return [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]


def front_mask(frame: pd.DataFrame, objectives: Sequence[str], columns: dict[str, str] | None = None) -> pd.Series:
    """True for the rows no other row dominates in `objectives` (val_acc up, size_mb and latency_ms down), read
    from `columns` (objective -> column; default the objective's name). A missing value counts as the worst."""
    columns = {m: (columns or {}).get(m, m) for m in objectives}
    points = [
        tuple(sign(m) * v if not math.isnan(v) else math.inf for m in objectives for v in [float(r[columns[m]])])
        for r in frame.to_dict("records")
    ]
    keep = set(non_dominated(points))
    return pd.Series([i in keep for i in range(len(frame))], index=frame.index, dtype=bool)


# The deployed figures a front row shows where its trial recorded them (NaN for a trial of an older dse).
DEPLOYED_COLUMNS = (
    "val_acc_onnx",
    "val_acc_int8",
    "test_acc_onnx",
    "test_acc_int8",
    "onnx_kb",
    "int8_kb",
    "latency_onnx_ms",
    "latency_onnx_iqr_ms",
    "latency_int8_ms",
    "latency_int8_iqr_ms",
)


def front_frame(study: optuna.Study, objectives: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per Pareto-optimal COMPLETE trial in `objectives` (default: the study's), smallest first: validation
    and test accuracy (fractions), fp32 state_dict size and int8 estimate in KB (10^3 bytes), the PyTorch batch-1
    CPU latency of its architecture with its spread and whether it was measured under load, params, MACs, the
    deployed figures (ONNX Runtime accuracies of the fp32 and int8 files, their sizes, the architecture's ORT
    latencies) and the bundle exported from it, if any. Latency is read from the study's per-architecture figures
    (the latest `measure --front` included), so the front is computed here rather than from the trials' values."""
    names = list(objectives or study.metric_names or list(OBJECTIVES))
    deployed = {k.removeprefix("deploy:"): v for k, v in study.user_attrs.items() if k.startswith("deploy:")}
    trials = trials_frame(study).assign(study=study.study_name)
    for column in ("state", "val_acc", "latency_key", "latency_ms", "latency_iqr_ms", "curves", *DEPLOYED_COLUMNS):
        if column not in trials:
            trials[column] = None
    on_target = [n for n in names if split_metric(n)[1]]
    attrs = {study.study_name: study.user_attrs}
    done = with_targets(with_latency(trials, attrs), attrs, on_target)
    rows = []
    for r in done[done["state"] == "COMPLETE"].to_dict("records"):
        curves = r["curves"] if isinstance(r["curves"], list) else []
        accuracy = r["val_acc"] if pd.notna(r["val_acc"]) else curves[-1]["val_acc"] if curves else math.nan
        rows.append(
            {
                "trial": int(r["number"]),
                "model": _text(r.get("paper_name")),
                "val_acc": accuracy,
                "test_acc": _num(r.get("test_acc")),
                "size_kb": _num(r.get("size_mb")) * 1e3,
                "int8_est_kb": _num(r.get("int8_mb")) * 1e3,
                "latency_ms": _num(r["latency_ms"]),
                "latency_iqr_ms": _num(r["latency_iqr_ms"]),
                "under_load": r["latency_under_load"] is True,
                **{c: _num(r.get(c)) for c in DEPLOYED_COLUMNS},
                "params": r.get("params"),
                "mmacs": _num(r.get("macs")) / 1e6,
                "bundle": deployed.get(str(int(r["number"])), {}).get("bundle", ""),
                **{c: r[c] for n in on_target for c in (n, f"{n}_predicted")},
            }
        )
    columns = [
        "trial",
        "model",
        "val_acc",
        "test_acc",
        "size_kb",
        "int8_est_kb",
        "latency_ms",
        "latency_iqr_ms",
        "under_load",
        *DEPLOYED_COLUMNS,
        "params",
        "mmacs",
        "bundle",
        *[c for n in on_target for c in (n, f"{n}_predicted")],
    ]
    frame = pd.DataFrame(rows, columns=columns)
    on_front = front_mask(frame.assign(size_mb=frame["size_kb"] / 1e3), names)
    return frame[on_front].sort_values(["size_kb", "trial"], ignore_index=True)


def _num(value) -> float:
    return float(value) if value is not None and pd.notna(value) else math.nan


def _text(value) -> str:
    return value if isinstance(value, str) else ""
