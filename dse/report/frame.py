"""The report's input: every trial of one or more studies as one frame, and repeats (seeds) aggregated."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optuna
import pandas as pd
import sqlalchemy

from dse.latency import LATENCY, MEASURED_ALONE, with_latency
from dse.metrics import DEPLOYED, METRICS
from dse.models import parse_name
from dse.study import OBJECTIVES, StudyError, default_storage, load_study, trials_frame
from dse.targets import with_targets

__all__ = [
    "CONFIG",
    "BUDGET",
    "LATENCY",
    "MEASURED_ALONE",
    "StudyData",
    "on_target",
    "load_studies",
    "completed",
    "aggregate",
    "clean",
    "val_acc",
]

# Two trials are repeats of one experiment when these agree (they differ in the seed only).
CONFIG = ("family", "blocks", "width", "dropout", "activation", "inplace", "dataset", "optimizer")
BUDGET = ("epochs", "lr", "train_images")
# The user attributes the report reads; a study written before one existed still loads.
ATTRS = (
    "paper_name",
    "family",
    "blocks",
    "width",
    "dropout",
    "activation",
    "inplace",
    "dataset",
    "optimizer",
    "lr",
    "epochs_planned",
    "seed",
    "params",
    "macs",
    "size_mb",
    "int8_mb",
    "latency_ms",
    "test_acc",
    "s_per_epoch",
    "curves",
    "split",
    "device",
    "provenance",
    "pruned_reason",
    "latency_key",
    "latency_iqr_ms",
    *DEPLOYED,
)


@dataclass
class StudyData:
    """Every trial of the studies (`trials`: one row each, with a `study` column; latency columns LATENCY from
    its architecture's figure), each study's storage URL, user attributes (its space, the paper tables it
    reproduces, its command line, deploy records, latency figures) and objectives (metric names)."""

    trials: pd.DataFrame
    storages: dict[str, str]
    attrs: dict[str, dict]
    objectives: dict[str, list[str]]

    @property
    def name(self) -> str:
        """The report's name: the study, or the studies joined by '+'."""
        return "+".join(self.storages)


def load_studies(names: Sequence[str], storages: Sequence[str] = ()) -> StudyData:
    """Read studies through `dse.study`. `storages`: none (each at `studies/<name>.db`), one for all, or one
    per study. Raises StudyError (unknown study, unreachable or unreadable storage) or ValueError."""
    if not names:
        raise ValueError("no study given; name at least one with --study NAME")
    if len(set(names)) != len(names):
        raise ValueError(f"studies={list(names)} name a study twice")
    if len(storages) not in (0, 1, len(names)):
        raise ValueError(f"{len(storages)} storages for {len(names)} studies: give none, one for all, or one per study")
    urls = {
        name: storages[i] if len(storages) == len(names) else storages[0] if storages else default_storage(name)
        for i, name in enumerate(names)
    }
    frames, attrs, objectives = [], {}, {}
    for name, url in urls.items():
        study = _load(name, url)
        frame = trials_frame(study)
        frame.insert(0, "study", name)
        frames.append(frame)
        attrs[name] = dict(study.user_attrs)
        objectives[name] = list(study.metric_names or OBJECTIVES)
    trials = pd.concat(frames, ignore_index=True)
    for column in ("number", "state", "val_acc", *ATTRS):
        if column not in trials:
            trials[column] = None
    names = [m for ms in objectives.values() for m in ms]
    return StudyData(with_targets(with_latency(trials, attrs), attrs, names), urls, attrs, objectives)


def _load(name: str, url: str) -> optuna.Study:
    try:
        return load_study(name, url)
    except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as e:
        cause = e.__cause__ or e.__context__ or e
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise StudyError(f"storage {url!r} is not a readable Optuna study DB: {reason}") from None


def clean(value: Any) -> Any:
    """A value as a hashable, comparable Python value: NaN -> None, lists -> tuples, floats rounded."""
    if hasattr(value, "item") and not isinstance(value, (list, tuple, dict)):
        value = value.item()
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 6)
    if isinstance(value, (list, tuple)):
        return tuple(clean(v) for v in value)
    return value


@functools.cache
def _model(name: str) -> tuple:
    cfg = parse_name(name)  # a trial's paper name round-trips to its canonical family, stage counts and width
    return cfg.name, clean(cfg.blocks), clean(cfg.width)


def config_key(row: dict) -> tuple:
    """The CONFIG values of a trial record, canonical (registry aliases such as squeezenext_23_2x folded in)."""
    family, blocks, width = clean(row["family"]), clean(row["blocks"]), clean(row["width"])
    if isinstance(row.get("paper_name"), str):
        try:
            family, blocks, width = _model(row["paper_name"])
        except ValueError:
            pass
    return (family, blocks, width, *(clean(row[k]) for k in CONFIG[3:]))


def val_acc(row: dict) -> float:
    """The final validation accuracy: the objective when the study optimises it, else the last epoch's."""
    if clean(row["val_acc"]) is not None:
        return row["val_acc"]
    curves = row["curves"] if isinstance(row["curves"], list) else []
    return curves[-1]["val_acc"] if curves else math.nan


def completed(trials: pd.DataFrame) -> pd.DataFrame:
    """The COMPLETE trials with what the tables and plots read: `config` (a CONFIG tuple), `budget` (a BUDGET
    tuple) and the accuracies in % (`test_pct`, `val_pct`; the study stores fractions)."""
    records = []
    for row in trials[trials["state"] == "COMPLETE"].to_dict("records"):
        split = row["split"] if isinstance(row["split"], dict) else {}
        config = config_key(row)
        records.append(
            {
                **row,
                **dict(zip(CONFIG, config)),
                "config": config,
                "epochs": clean(row["epochs_planned"]),
                "train_images": split.get("train"),
                "budget": (clean(row["epochs_planned"]), clean(row["lr"]), split.get("train")),
                "test_pct": 100 * row["test_acc"] if row["test_acc"] is not None else math.nan,
                "val_pct": 100 * val_acc(row),
            }
        )
    columns = [*trials.columns, *CONFIG, "config", "epochs", "train_images", "budget", "test_pct", "val_pct"]
    return pd.DataFrame(records, columns=list(dict.fromkeys(columns)))


def aggregate(done: pd.DataFrame) -> pd.DataFrame:
    """One row per experiment (CONFIG + BUDGET): n trials, their seeds, mean and sample std (ddof=1; NaN for
    n=1) of test accuracy, validation accuracy and seconds per epoch, and the model's measurements."""
    rows = []
    keyed = done.assign(_key=[json.dumps([c, b]) for c, b in zip(done["config"], done["budget"])])
    for _, g in keyed.groupby("_key", sort=True):
        first = g.iloc[0]
        stats = {}
        for column, name in (("test_pct", "acc"), ("val_pct", "val"), ("s_per_epoch", "s_per_epoch")):
            values = g[column].astype(float)
            stats |= {f"{name}_mean": values.mean(), f"{name}_std": values.std(ddof=1)}
        rows.append(
            {
                "config": first["config"],
                **dict(zip(CONFIG, first["config"])),
                "budget": first["budget"],
                **dict(zip(BUDGET, first["budget"])),
                "model": first["paper_name"],
                "n": len(g),
                "seeds": sorted(int(s) for s in g["seed"]),
                "studies": sorted(set(g["study"])),
                "trials": sorted(zip(g["study"], g["number"].astype(int))),
                **stats,
                "size_mb": g["size_mb"].astype(float).mean(),
                "int8_mb": g["int8_mb"].astype(float).mean(),
                "params": int(first["params"]),
                "macs": int(first["macs"]),
                "latency_ms": g["latency_ms"].astype(float).mean(),
                "latency_iqr_ms": g["latency_iqr_ms"].astype(float).mean(),
                "latency_under_load": bool(g["latency_under_load"].eq(True).any()),
                "device": ", ".join(sorted(set(map(str, g["device"])))),
                **{m: _mean(g[m]) * (100 if METRICS[m].unit == "fraction" else 1) for m in DEPLOYED},  # accuracies in %
                **{c: bool(g[c].eq(True).any()) if c.endswith("_predicted") else _mean(g[c]) for c in on_target(done)},
            }
        )
    columns = [
        "config",
        *CONFIG,
        "budget",
        *BUDGET,
        "model",
        "n",
        "seeds",
        "studies",
        "trials",
        "acc_mean",
        "acc_std",
        "val_mean",
        "val_std",
        "s_per_epoch_mean",
        "s_per_epoch_std",
        "size_mb",
        "int8_mb",
        "params",
        "macs",
        "latency_ms",
        "latency_iqr_ms",
        "latency_under_load",
        "device",
        *DEPLOYED,
        *on_target(done),
    ]
    return pd.DataFrame(rows, columns=columns)


def on_target(frame: pd.DataFrame) -> list[str]:
    """The frame's `latency_int8_ms@bluebox`-style columns and their `_predicted` marks (dse.targets)."""
    return [c for c in frame.columns if "@" in c]


def _mean(values: pd.Series) -> float:
    """The mean of the figures recorded (a trial of an older dse records no deployed figure: NaN)."""
    return float(pd.to_numeric(values, errors="coerce").mean())
