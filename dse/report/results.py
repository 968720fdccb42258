"""The user's own results: every trial and every configuration of the studies with the swept knobs as columns and
the Pareto front marked, the labels that name what a study swept, and the front itself (also `dse.deploy list`'s)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import pandas as pd

from dse.front import front_mask
from dse.metrics import DEPLOYED, METRICS
from dse.report.frame import StudyData, clean, on_target, val_acc

__all__ = [
    "KNOBS",
    "knobs",
    "varying",
    "label",
    "trials_table",
    "configs_table",
    "shown_trials",
    "shown_configs",
]

# The knobs a study may sweep, as the tables name them.
KNOBS = ("family", "R", "W", "p", "activation", "optimizer", "lr", "dataset")
NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "fashion_mnist": "Fashion-MNIST"}


def _number(value) -> str:
    return format(value, ".4g") if isinstance(value, (int, float)) else str(value)


def knobs(row: dict | pd.Series) -> dict:
    """The KNOBS of a trial record (its user attributes), None where it has none (e.g. a queued trial)."""
    blocks, activation = clean(row.get("blocks")), clean(row.get("activation"))
    if activation is not None and clean(row.get("inplace")) is False:
        activation = f"{activation} (not in place)"
    return {
        "family": clean(row.get("family")),
        "R": ",".join(map(str, blocks)) if blocks else None,
        "W": clean(row.get("width")),
        "p": clean(row.get("dropout")),
        "activation": activation,
        "optimizer": clean(row.get("optimizer")),
        "lr": clean(row.get("lr")),
        "dataset": clean(row.get("dataset")),
    }


def varying(rows: Iterable[dict]) -> list[str]:
    """The KNOBS that take more than one value among the rows, in KNOBS order (None, a knob a family lacks,
    is no value)."""
    values = [knobs(r) for r in rows]
    return [k for k in KNOBS if len({v[k] for v in values} - {None}) > 1]


def label(row: dict | pd.Series, swept: Sequence[str]) -> str:
    """What distinguishes a row among its study's: 'W=0.9', 'p=0.1 relu'; the model's name first when the family
    or the stage counts vary, e.g. 'SqueezeNet-v1.1' or 'Shallow SqueezeNext-14-1.5x p=0.2'."""
    values = knobs(row)
    parts = []
    if {"family", "R"} & set(swept):
        parts.append(str(row.get("paper_name") or row.get("model")))
        swept = [k for k in swept if k not in ("family", "R", "W")]
    for key in swept:
        value = values[key]
        if value is None:
            continue
        if key in ("activation", "optimizer"):
            parts.append(str(value))
        elif key == "dataset":
            parts.append(NAMES.get(value, str(value)))
        else:
            parts.append(f"{key}={_number(value)}")
    return " ".join(parts) or str(row.get("paper_name") or row.get("model"))


def _sort_key(row: dict, fields: Sequence[str]) -> list:
    return [
        (v is None or (isinstance(v, float) and math.isnan(v)), v if clean(v) is not None else 0)
        for v in (clean(row.get(f)) for f in fields)
    ]


# ---------------------------------------------------------------- the tables (CSV frames)


def trials_table(data: StudyData) -> pd.DataFrame:
    """Every trial that started (complete, pruned, failed, running): the knobs, its seed and epochs, accuracies
    in %, the model's measurements, its architecture's latency with its spread, s/epoch, state, and `front`:
    on its study's Pareto front (COMPLETE trials, the study's objectives). Smallest models first."""
    rows = []
    for row in data.trials.to_dict("records"):
        if row["state"] == "WAITING" or not isinstance(row.get("paper_name"), str):
            continue
        curves = row["curves"] if isinstance(row["curves"], list) else []
        state = row["state"] + (f" at epoch {len(curves)}" if row["state"] == "PRUNED" else "")
        rows.append(
            {
                "study": row["study"],
                "trial": int(row["number"]),
                "state": state,
                "model": row["paper_name"],
                **knobs(row),
                "seed": clean(row["seed"]),
                "epochs": clean(row["epochs_planned"]),
                "epochs_run": len(curves),
                "val_acc": 100 * val_acc(row),
                "test_acc": 100 * row["test_acc"] if clean(row["test_acc"]) is not None else math.nan,
                "params": clean(row["params"]),
                "mmacs": row["macs"] / 1e6 if clean(row["macs"]) is not None else math.nan,
                "size_mb": clean(row["size_mb"]),
                "int8_mb": clean(row["int8_mb"]),
                "latency_ms": clean(row["latency_ms"]),
                "latency_iqr_ms": clean(row["latency_iqr_ms"]),
                "latency_under_load": row["latency_under_load"],
                "latency_how": row["latency_how"],
                "s_per_epoch": clean(row["s_per_epoch"]),
                **_deployed(row),
                **{c: row[c] for c in on_target(data.trials)},
                "front": False,
                "note": row["pruned_reason"] if isinstance(row["pruned_reason"], str) else "",
            }
        )
    columns = [
        "study",
        "trial",
        "state",
        "model",
        *KNOBS,
        "seed",
        "epochs",
        "epochs_run",
        "val_acc",
        "test_acc",
        "params",
        "mmacs",
        "size_mb",
        "size_kb",
        "int8_mb",
        "latency_ms",
        "latency_iqr_ms",
        "latency_under_load",
        "latency_how",
        "s_per_epoch",
        *DEPLOYED,
        *on_target(data.trials),
        "front",
        "note",
    ]
    frame = pd.DataFrame(rows, columns=columns)
    for study, objectives in data.objectives.items():
        done = frame[(frame["study"] == study) & (frame["state"] == "COMPLETE")]
        frame.loc[done.index, "front"] = front_mask(done, objectives)
    order = ["study", "dataset", "params", *KNOBS, "seed", "trial"]
    records = sorted(frame.to_dict("records"), key=lambda r: _sort_key(r, order))
    return pd.DataFrame(records, columns=columns).astype({"front": bool})


def _deployed(row: dict) -> dict:
    """The deployed figures of a trial record (accuracies in %), NaN where it has none; and its size in KB."""
    out = {}
    for m in DEPLOYED:
        value = clean(row.get(m))
        out[m] = math.nan if value is None else 100 * value if METRICS[m].unit == "fraction" else value
    size = clean(row.get("size_mb"))
    return {**out, "size_kb": math.nan if size is None else 1e3 * size}


def configs_table(groups: pd.DataFrame, objectives: Sequence[str]) -> pd.DataFrame:
    """One row per configuration (`aggregate`'s groups: the knobs and the budget): n seeds, mean and sample std
    of validation and test accuracy (%) and s/epoch, the measurements, and `front`: on the Pareto front of the
    configurations of its dataset in `objectives` (validation accuracy by its mean)."""
    rows = []
    for g in groups.to_dict("records"):
        rows.append(
            {
                "model": g["model"],
                **knobs({**g, "blocks": g["blocks"], "paper_name": g["model"]}),
                "epochs": g["epochs"],
                "train_images": g["train_images"],
                "n": g["n"],
                "seeds": " ".join(map(str, g["seeds"])),
                "trials": " ".join(f"{s}#{n}" for s, n in g["trials"]),
                "val_mean": g["val_mean"],
                "val_std": g["val_std"],
                "test_mean": g["acc_mean"],
                "test_std": g["acc_std"],
                "params": g["params"],
                "mmacs": g["macs"] / 1e6,
                "size_mb": g["size_mb"],
                "size_kb": 1e3 * g["size_mb"],
                "int8_mb": g["int8_mb"],
                "latency_ms": g["latency_ms"],
                "latency_iqr_ms": g["latency_iqr_ms"],
                "latency_under_load": g["latency_under_load"],
                "s_per_epoch_mean": g["s_per_epoch_mean"],
                "s_per_epoch_std": g["s_per_epoch_std"],
                **{m: g[m] for m in DEPLOYED},
                **{c: g[c] for c in on_target(groups)},
                "front": False,
            }
        )
    columns = [
        "model",
        *KNOBS,
        "epochs",
        "train_images",
        "n",
        "seeds",
        "trials",
        "val_mean",
        "val_std",
        "test_mean",
        "test_std",
        "params",
        "mmacs",
        "size_mb",
        "size_kb",
        "int8_mb",
        "latency_ms",
        "latency_iqr_ms",
        "latency_under_load",
        "s_per_epoch_mean",
        "s_per_epoch_std",
        *DEPLOYED,
        *on_target(groups),
        "front",
    ]
    frame = pd.DataFrame(rows, columns=columns)
    for dataset in set(frame["dataset"]):
        rows_of = frame[frame["dataset"] == dataset]
        frame.loc[rows_of.index, "front"] = front_mask(
            rows_of, objectives, {"val_acc": "val_mean", "test_acc": "test_mean"}
        )
    order = ["dataset", "params", *KNOBS, "epochs"]
    records = sorted(frame.to_dict("records"), key=lambda r: _sort_key(r, order))
    return pd.DataFrame(records, columns=columns).astype({"front": bool})


# ---------------------------------------------------------------- printing


def _fmt(value, spec: str) -> str:
    if clean(value) is None:
        return "—"
    if spec in ("d", ",") and isinstance(value, float) and value.is_integer():
        value = int(value)  # an int column pandas made float: a queued trial (no attributes yet) has NaN there
    return format(value, spec)


def _pm(mean, std, digits: int = 2) -> str:
    """'82.47 ± 0.31' ('82.47' for one run)."""
    return _fmt(mean, f".{digits}f") + ("" if clean(std) is None else f" ± {std:.{digits}f}")


def _latency(row: dict) -> str:
    return _fmt(row["latency_ms"], ".3f") + (" †" if row["latency_under_load"] is True else "")


def _knob_cells(row: dict) -> dict:
    return {
        k: NAMES.get(row[k], row[k])
        if k == "dataset"
        else _fmt(row[k], ".4g")
        if k in ("W", "p", "lr")
        else _fmt(row[k], "s")
        for k in KNOBS
    }


def _shown(rows: list[dict], always: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
    """The printed table without the columns that hold one value in every row (they go into the returned
    notes), except `always`."""
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame, []
    same = [c for c in frame.columns if c not in always and frame[c].nunique() == 1 and len(frame) > 1]
    notes = [f"{c} {frame[c].iloc[0]}" for c in same]
    return frame.drop(columns=same), notes


def shown_trials(table: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """`trials_table` as printed (accuracies %, latency ms with † when measured under load, ★ on the front), and
    'column value' for the columns that are the same in every row."""
    rows = [
        {
            "study": r["study"],
            "trial": str(r["trial"]),
            "model": r["model"],
            **_knob_cells(r),
            "seed": _fmt(r["seed"], "d"),
            "epochs": f"{r['epochs_run']}/{_fmt(r['epochs'], 'd')}",
            "state": r["state"].lower(),
            "val %": _fmt(r["val_acc"], ".2f"),
            "test %": _fmt(r["test_acc"], ".2f"),
            "params": _fmt(r["params"], ","),
            "MMACs": _fmt(r["mmacs"], ".2f"),
            "MB": _fmt(r["size_mb"], ".3f"),
            "int8 MB": _fmt(r["int8_mb"], ".3f"),
            "latency ms": _latency(r),
            "IQR ms": _fmt(r["latency_iqr_ms"], ".3f"),
            "s/epoch": _fmt(r["s_per_epoch"], ".2f"),
            **_deployed_cells(r),
            "front": "★" if r["front"] else "",
        }
        for r in table.to_dict("records")
    ]
    return _shown(rows, always=("trial", "val %", "test %", "params", "MB", "latency ms", "front"))


# The deployed figures as the tables print them: ONNX Runtime on the fp32 and int8 files that ship.
DEPLOYED_CELLS = {
    "ONNX val %": ("val_acc_onnx", ".2f"),
    "int8 val %": ("val_acc_int8", ".2f"),
    "ONNX test %": ("test_acc_onnx", ".2f"),
    "int8 test %": ("test_acc_int8", ".2f"),
    "ONNX KB": ("onnx_kb", ".1f"),
    "int8 KB": ("int8_kb", ".1f"),
    "ORT ms": ("latency_onnx_ms", ".3f"),
    "ORT int8 ms": ("latency_int8_ms", ".3f"),
}


def _deployed_cells(r: dict) -> dict:
    return {name: _fmt(r[column], spec) for name, (column, spec) in DEPLOYED_CELLS.items()}


def shown_configs(table: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """`configs_table` as printed: accuracies and s/epoch as mean ± std over the n seeds."""
    rows = [
        {
            "model": r["model"],
            **_knob_cells(r),
            "epochs": _fmt(r["epochs"], "d"),
            "n": str(r["n"]),
            "val %": _pm(r["val_mean"], r["val_std"]),
            "test %": _pm(r["test_mean"], r["test_std"]),
            "params": _fmt(r["params"], ","),
            "MMACs": _fmt(r["mmacs"], ".2f"),
            "MB": _fmt(r["size_mb"], ".3f"),
            "int8 MB": _fmt(r["int8_mb"], ".3f"),
            "latency ms": _latency(r),
            "IQR ms": _fmt(r["latency_iqr_ms"], ".3f"),
            "s/epoch": _pm(r["s_per_epoch_mean"], r["s_per_epoch_std"]),
            **_deployed_cells(r),
            "front": "★" if r["front"] else "",
            "trials": r["trials"],
        }
        for r in table.to_dict("records")
    ]
    return _shown(rows, always=("model", "n", "val %", "test %", "params", "MB", "latency ms", "front"))
