"""The metrics a trial records, by name: what each is, its direction and unit, and whether the architecture alone
decides it (so a budget on it is checked before training). Objectives, budgets and targets name these."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "ARCHITECTURE",
    "TRAINED",
    "Metric",
    "METRICS",
    "PAPER",
    "DEPLOYED",
    "TARGET_MACHINES",
    "ON_MACHINE",
    "check_metric",
    "split_metric",
    "metric",
    "direction",
    "sign",
]

ARCHITECTURE, TRAINED = "architecture", "trained"  # when a metric is known: before training, or after it


@dataclass(frozen=True)
class Metric:
    """One recorded figure: its name (the trial attribute that holds it), direction, unit and when it is known."""

    name: str
    direction: str  # "maximize" | "minimize"
    unit: str
    known: str  # ARCHITECTURE (before training) | TRAINED
    what: str
    deployed: bool = False  # needs the per-trial ONNX evaluation (study.deployed)


METRICS = {
    m.name: m
    for m in (
        Metric(
            "val_acc",
            "maximize",
            "fraction",
            TRAINED,
            "PyTorch validation accuracy, evaluated as trained (bf16 autocast on CPUs with AMX and on CUDA)",
        ),
        Metric("test_acc", "maximize", "fraction", TRAINED, "PyTorch test accuracy, evaluated as trained"),
        Metric("size_mb", "minimize", "MB", ARCHITECTURE, "the fp32 state_dict file in 10^6 bytes (the paper's size)"),
        Metric("size_kb", "minimize", "KB", ARCHITECTURE, "the fp32 state_dict file in 10^3 bytes"),
        Metric("latency_ms", "minimize", "ms", ARCHITECTURE, "batch-1 PyTorch eager latency, one thread (the paper's)"),
        Metric(
            "val_acc_onnx",
            "maximize",
            "fraction",
            TRAINED,
            "validation accuracy of the fp32 ONNX file in ONNX Runtime",
            True,
        ),
        Metric(
            "val_acc_int8",
            "maximize",
            "fraction",
            TRAINED,
            "validation accuracy of the int8 ONNX file in ONNX Runtime",
            True,
        ),
        Metric(
            "test_acc_onnx",
            "maximize",
            "fraction",
            TRAINED,
            "test accuracy of the fp32 ONNX file in ONNX Runtime",
            True,
        ),
        Metric(
            "test_acc_int8",
            "maximize",
            "fraction",
            TRAINED,
            "test accuracy of the int8 ONNX file in ONNX Runtime",
            True,
        ),
        Metric("onnx_kb", "minimize", "KB", ARCHITECTURE, "the fp32 ONNX file that ships, in 10^3 bytes", True),
        Metric("int8_kb", "minimize", "KB", ARCHITECTURE, "the int8 (QDQ) ONNX file that ships, in 10^3 bytes", True),
        Metric(
            "latency_onnx_ms",
            "minimize",
            "ms",
            ARCHITECTURE,
            "batch-1 ONNX Runtime latency of the fp32 file, one intra-op thread",
            True,
        ),
        Metric(
            "latency_int8_ms",
            "minimize",
            "ms",
            ARCHITECTURE,
            "batch-1 ONNX Runtime latency of the int8 file, one intra-op thread",
            True,
        ),
    )
}
PAPER = ("val_acc", "size_mb", "latency_ms")  # the paper's objectives (conf/target/paper.yaml)
DEPLOYED = tuple(name for name, m in METRICS.items() if m.deployed)
# The machines a latency kit's figures come from (dse.targets stores them): `latency_int8_ms@bluebox` names that
# figure, measured where the kit timed the architecture and predicted (dse.predict) elsewhere.
TARGET_MACHINES = {
    "host": "the machine that runs the sweep (ONNX Runtime, as the kit's runner times it there)",
    "bluebox": "Bluebox 2.0: ARM Cortex-A cores, ONNX Runtime under RTMaps",
}
ON_MACHINE = ("latency_onnx_ms", "latency_int8_ms")  # the metrics a kit times: the ones that take @<target>


def split_metric(name: str) -> tuple[str, str | None]:
    """(metric, target machine) of `latency_int8_ms@bluebox`; (name, None) of a plain name."""
    base, _, target = str(name).partition("@")
    return base, target or None


def check_metric(name: str, what: str, allowed: Iterable[str] | None = None) -> str:
    """`name` if it is a metric (among `allowed`, default all); else a ValueError naming it, the valid ones and the
    closest. `what` names the setting, e.g. "study objectives"."""
    allowed = list(METRICS if allowed is None else allowed)
    base, target = split_metric(name)
    if target is not None:
        if base not in ON_MACHINE or base not in allowed:
            raise ValueError(f"{what}: metric {name!r}: only {', '.join(ON_MACHINE)} take @<target> here")
        if target not in TARGET_MACHINES:
            raise ValueError(f"{what}: metric {name!r}: {target=} is unknown; allowed: {', '.join(TARGET_MACHINES)}")
        return name
    if name in allowed:
        return name
    close = difflib.get_close_matches(str(name), allowed, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    known = "is not allowed here" if name in METRICS else "is unknown"
    raise ValueError(f"{what}: metric {name!r} {known}; allowed: {', '.join(allowed)}{hint}")


def metric(name: str) -> Metric:
    """The metric of a name; `latency_int8_ms@bluebox` is latency_int8_ms's, known from the architecture alone, on
    that target machine (no per-trial ONNX evaluation needs to run for it)."""
    base, target = split_metric(check_metric(name, "metric"))
    if target is None:
        return METRICS[base]
    m = METRICS[base]
    what = f"{m.what}, on {target} ({TARGET_MACHINES[target]}): measured by its latency kit, else predicted"
    return Metric(name, m.direction, m.unit, ARCHITECTURE, what)


def direction(name: str) -> str:
    """ "maximize" or "minimize"."""
    return metric(name).direction


def sign(name: str) -> int:
    """-1 for a maximised metric, 1 for a minimised one: multiplied in, every coordinate is minimised."""
    return -1 if direction(name) == "maximize" else 1
