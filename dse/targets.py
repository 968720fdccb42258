"""Latency measured on a target machine (a board): a kit's latency.json checked, stored on the study per
architecture and target (`latency@<target>:<architecture>`, with provenance), and read back."""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Mapping
from pathlib import Path

import optuna
import pandas as pd

from dse.kit import KIT_FORMAT, PRECISIONS, kit_id
from dse.metrics import TARGET_MACHINES, split_metric
from dse.predict import FEATURES, Fitted, fit, spec_features

__all__ = [
    "FEATURES_ATTR",
    "METRICS",
    "RESULTS_FORMAT",
    "TEMPLATE_ATTR",
    "TARGETS",
    "ResultsError",
    "attr",
    "check_target",
    "read_results",
    "store",
    "measured",
    "study_features",
    "predict_target",
    "figure_on_target",
    "unmeasured_targets",
    "with_targets",
]

RESULTS_FORMAT = "dse-latency-results/2"  # what the shipped latency_runner.py writes
# Results of kits written by an older dse import too: /1 figures are plain wall-clock medians.
READABLE = {"dse-latency-results/1": "dse-latency-kit/1", RESULTS_FORMAT: KIT_FORMAT}
TEMPLATE_ATTR = "architecture_template"  # a sweep's architecture a kit draws on, before the study has trials
FEATURES_ATTR = "features:"  # an architecture's graph features (dse.predict), computed once per study
METRICS = tuple(f"latency_{word}_ms" for word in PRECISIONS.values())  # what a target's figure holds
TARGETS = TARGET_MACHINES  # the machines a kit's figures may come from (dse.metrics: they name metrics too)


class ResultsError(ValueError):
    """A latency.json that cannot be imported: malformed, or made for another study's architectures."""


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise ResultsError(f"{target=} is unknown; allowed: {', '.join(TARGETS)}")
    return target


def attr(target: str, key: str) -> str:
    """The study attribute that holds an architecture's figures on a target."""
    return f"latency@{target}:{key}"


def _positive(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ResultsError(f"{what}: latency {value!r} ms is not a positive finite number")
    return float(value)


def read_results(path: Path, study: str, definition_sha256: str | None) -> dict:
    """The figures of a latency.json made by a kit of this study (name and definition), checked: "figures"
    ({architecture: {"latency_onnx_ms", ...}}), "missing" (graphs without a figure, or not every round), "machine",
    "kit", "file". Raises ResultsError naming what is wrong."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ResultsError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise ResultsError(f"{path} is not valid JSON ({e}); a truncated copy? copy it from the board again") from None
    if not isinstance(data, dict) or data.get("format") not in READABLE:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ResultsError(f"{path}: format {found!r} is not a kit's results; allowed: {', '.join(READABLE)}")
    kit = data.get("kit") or {}
    if kit.get("format") != READABLE[data["format"]]:
        raise ResultsError(
            f"{path}: kit format {kit.get('format')!r} is unknown to results {data['format']!r}; allowed: "
            f"{READABLE[data['format']]}"
        )
    if kit.get("study") != study:
        raise ResultsError(
            f"{path} was made by a kit of study {kit.get('study')!r}, not of {study!r}: its architectures are another "
            "study's"
        )
    if kit.get("definition_sha256") != definition_sha256:
        raise ResultsError(
            f"{path} was made by a kit of another definition of study {study!r} (definition "
            f"{str(kit.get('definition_sha256'))[:12]}, the study's {str(definition_sha256)[:12]}): a study of the "
            "same name elsewhere"
        )
    graphs = data.get("graphs")
    if not isinstance(graphs, dict):
        raise ResultsError(f"{path}: 'graphs' is missing or not an object")
    figures: dict[str, dict] = {}
    missing = []
    settings = data.get("settings")
    rounds = settings.get("rounds") if isinstance(settings, dict) else None
    for gid, g in graphs.items():
        if (
            not isinstance(g, dict)
            or g.get("precision") not in PRECISIONS
            or not isinstance(g.get("architecture"), str)
        ):
            raise ResultsError(f"{path}: graph {gid!r} lacks an architecture or a precision ({', '.join(PRECISIONS)})")
        if "ms" not in g:
            missing.append(gid)
            continue
        word = PRECISIONS[g["precision"]]
        times = [t for r in g.get("rounds", []) for t in r.get("times_ms", [])]
        for t in [g["ms"], *times]:
            _positive(t, f"{path}: graph {gid!r}")
        iqr = g.get("iqr_ms")
        if isinstance(iqr, bool) or not isinstance(iqr, (int, float)) or not math.isfinite(iqr) or iqr < 0:
            raise ResultsError(f"{path}: graph {gid!r}: IQR {iqr!r} ms is not a finite number >= 0")
        if rounds and len(g.get("rounds", [])) < rounds:
            missing.append(f"{gid} (rounds {len(g.get('rounds', []))} of {rounds})")
        figures.setdefault(g["architecture"], {}).update(
            {
                f"latency_{word}_ms": float(g["ms"]),
                f"latency_{word}_iqr_ms": float(g["iqr_ms"]),
                f"latency_{word}_clock": g.get("clock", "wall"),
                f"{word}_runs": g.get("runs"),
            }
        )
    if kit_id(study, list({g["architecture"] for g in graphs.values()})) != kit.get("kit"):
        raise ResultsError(
            f"{path}: its graphs are not those of kit {kit.get('kit')!r} (edited, or merged from two kits)"
        )
    return {"figures": figures, "missing": missing, "machine": data.get("machine", {}), "kit": kit, "file": str(path)}


def store(study: optuna.Study, target: str, results: Mapping) -> int:
    """Store each architecture's figures on the study for `target` (replacing that target's earlier figures of it,
    predicted or measured, but keeping measured metrics a partial run lacks; no other target's), with where they came
    from. Returns how many were stored."""
    check_target(target)
    provenance = {
        "measured": True,
        "file": results["file"],
        "kit": results["kit"].get("kit"),
        "machine": results["machine"],
        "imported_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    for key, figure in results["figures"].items():
        old = study.user_attrs.get(attr(target, key)) or {}
        # a partial run's figure keeps the metrics an earlier measurement has and it lacks (never a prediction)
        kept = (
            {k: v for k, v in old.items() if k.startswith(("latency_", "onnx_", "int8_"))}
            if old.get("measured")
            else {}
        )
        study.set_user_attr(attr(target, key), {**kept, **figure, **provenance})
    return len(results["figures"])


def measured(study_attrs: Mapping, target: str, *, predicted: bool = True) -> dict[str, dict]:
    """The figures a study holds for a target (with `predicted=False`, those measured only), by architecture key."""
    prefix = attr(target, "")
    return {
        k.removeprefix(prefix): v
        for k, v in study_attrs.items()
        if k.startswith(prefix) and isinstance(v, dict) and (predicted or v.get("measured"))
    }


def study_features(study: optuna.Study, specs: Mapping[str, dict]) -> pd.DataFrame:
    """The graph features (`dse.predict.spec_features`) of these architectures, one row each: stored on the study
    as `features:<architecture>` the first time (an ONNX export each), read back after (computed again where an
    older dse stored fewer features)."""
    rows = {}
    for key, spec in specs.items():
        rows[key] = study.user_attrs.get(FEATURES_ATTR + key)
        if rows[key] is None or not set(FEATURES) <= set(rows[key]):
            rows[key] = spec_features(spec)
            study.set_user_attr(FEATURES_ATTR + key, rows[key])
    return pd.DataFrame(rows).T


def predict_target(study: optuna.Study, target: str, specs: Mapping[str, dict]) -> list[Fitted]:
    """Fit a predictor per metric on the target's measured architectures and store its figure of each of `specs`
    the target has not measured (`predicted`: True, with the fit's held-out error); measured figures stay. Returns
    the fits (none for a metric with fewer than 3 measured architectures). Fits with nothing to predict too: their
    held-out error is worth printing, and the measured architectures' graph features are then stored for the sweep."""
    check_target(target)
    have = measured(study.user_attrs, target, predicted=False)
    todo = {k: s for k, s in specs.items() if k not in have}
    known = {k: json.loads(k) for k in have}
    features = study_features(study, {**known, **todo})
    fits, figures = [], {k: {} for k in todo}
    for metric in METRICS:
        measured_ms = pd.Series({k: v[metric] for k, v in have.items() if metric in v}, dtype=float)
        if len(measured_ms) < 3:
            continue
        fitted = fit(features, measured_ms, metric)
        fits.append(fitted)
        for key, ms in (fitted.predict(features.loc[list(todo)]) if todo else {}).items():
            figures[key][metric] = float(ms)
            figures[key][f"{metric}_how"] = fitted.summary()
    for key, figure in figures.items():
        if figure:
            study.set_user_attr(attr(target, key), {**figure, "measured": False, "predicted": True})
    return fits


def figure_on_target(study: optuna.Study, name: str, key: str, spec: Mapping) -> tuple[float, bool]:
    """(ms, predicted) of `latency_int8_ms@bluebox`-style metric `name` for an architecture: the target's measured
    figure, else its stored prediction, else one predicted now (and stored)."""
    metric, target = split_metric(name)
    figure = measured(study.user_attrs, target).get(key, {})
    if metric not in figure:
        predict_target(study, target, {key: dict(spec)})
        figure = measured(study.user_attrs, target).get(key, {})
    if metric not in figure:
        raise ResultsError(
            f"{name}: study {study.study_name!r} has too few architectures measured on {target} to predict"
        )
    return float(figure[metric]), not figure.get("measured", False)


def unmeasured_targets(study: optuna.Study, names: list[str], least: int = 3) -> list[str]:
    """Of these metric names, those `x@target` whose target has fewer than `least` architectures measured on the
    study (a predictor needs 3)."""
    out = []
    for name in names:
        metric, target = split_metric(name)
        if target and sum(metric in f for f in measured(study.user_attrs, target, predicted=False).values()) < least:
            out.append(name)
    return out


def with_targets(trials: pd.DataFrame, attrs: Mapping[str, Mapping], names: list[str]) -> pd.DataFrame:
    """The trials (a `study` and a `latency_key` column) with a column per `latency_int8_ms@bluebox`-style name and
    its `<name>_predicted`, as their study (`attrs`: study name -> its user attributes) holds the figure now: a kit
    imported after a trial replaced its prediction with a measurement. A trial whose study holds none keeps what it
    recorded (predicted unless it says otherwise)."""
    out = trials.copy()
    for name in [n for n in dict.fromkeys(names) if split_metric(n)[1]]:
        metric, target = split_metric(name)
        stored = {study: measured(a, target) for study, a in attrs.items()}
        values, predicted = [], []
        for row in trials.to_dict("records"):
            key = row.get("latency_key")
            figure = stored.get(row["study"], {}).get(key, {}) if isinstance(key, str) else {}
            if metric in figure:
                values.append(float(figure[metric]))
                predicted.append(not figure.get("measured", False))
            else:
                mine = row.get(name)
                values.append(float(mine) if mine is not None and pd.notna(mine) else float("nan"))
                predicted.append(bool(row.get(f"{name}_predicted", True)) if pd.notna(mine) else None)
        out[name], out[f"{name}_predicted"] = values, predicted
    return out
