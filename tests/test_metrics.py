"""The metric registry: objectives, budgets and targets by name; unknown names refused (with the valid ones and the
closest) before a study DB is touched."""

from __future__ import annotations

import re

import pytest

from dse.config import StudyConfig, TargetConfig, to_object
from dse.metrics import DEPLOYED, METRICS, PAPER, check_metric, metric, sign
from dse.sweep import compose, plan_sweep


def study(*overrides: str) -> StudyConfig:
    return to_object(StudyConfig, compose(["+space=width", *overrides]).study)


def test_every_metric_has_a_direction_and_the_paper_s_are_the_default_objectives():
    assert {m.direction for m in METRICS.values()} == {"maximize", "minimize"}
    assert study().objectives == list(PAPER) and study().target == TargetConfig()
    assert sign("val_acc_int8") == -1 and sign("int8_kb") == 1
    assert set(DEPLOYED) >= {
        "val_acc_onnx",
        "val_acc_int8",
        "test_acc_onnx",
        "test_acc_int8",
        "onnx_kb",
        "int8_kb",
        "latency_onnx_ms",
        "latency_int8_ms",
    }


@pytest.mark.parametrize(
    "target, objectives",
    [
        ("paper", ["val_acc", "size_mb", "latency_ms"]),
        ("onnx", ["val_acc_onnx", "onnx_kb", "latency_onnx_ms"]),
        ("int8", ["val_acc_int8", "int8_kb", "latency_int8_ms"]),
    ],
)
def test_a_target_sets_the_default_objectives_and_the_command_line_still_picks_any(target, objectives):
    assert study(f"target={target}").objectives == objectives
    assert study(f"target={target}").target.name == target
    assert study(f"target={target}", "study.objectives=[test_acc_int8,onnx_kb]").objectives == [
        "test_acc_int8",
        "onnx_kb",
    ]


def test_budgets_by_name_with_the_paper_s_shorthands():
    cfg = study("study.budgets={int8_kb:100,latency_onnx_ms:1.5}", "study.max_size_kb=300", "study.max_latency_ms=2")
    assert cfg.limits() == {"int8_kb": 100, "latency_onnx_ms": 1.5, "size_kb": 300, "latency_ms": 2}
    assert cfg.before_training() == cfg.limits()  # sizes and latencies: the architecture decides them


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["study.objectives=[val_acc_int9]"],
            "metric 'val_acc_int9' is unknown; allowed: val_acc, .*did you mean val_acc_int8",
        ),
        (["study.objectives=[val_acc,size_mb,latency_ms,int8_kb]"], "must be 1 to 3 distinct"),
        (["study.budgets={int8kb:100}"], "metric 'int8kb' is unknown; allowed: size_mb, .*did you mean int8_kb"),
        (["study.budgets={val_acc:0.9}"], "metric 'val_acc' is not allowed here; allowed: size_mb"),
        (["study.budgets={int8_kb:0}"], "int8_kb=0 must be a number > 0"),
        (["target=int8", "study.deployed=false"], "records no val_acc_int8, int8_kb, latency_int8_ms"),
    ],
)
def test_unknown_or_unusable_names_are_refused_naming_the_valid_ones(overrides, message):
    with pytest.raises(ValueError, match=message):
        study(*overrides)


def test_a_bad_metric_name_is_refused_before_the_study_db_is_touched(tmp_path):
    db = tmp_path / "s.db"
    args = ["+space=width", f"study.storage=sqlite:///{db}", "study.objectives=[val_acc, int8kb]"]
    with pytest.raises(ValueError, match="did you mean int8_kb"):
        plan_sweep(compose(args), args)
    assert not db.exists() and not (tmp_path / "s").exists()


def test_check_metric_limits_to_the_allowed_names():
    assert check_metric("onnx_kb", "x") == "onnx_kb"
    with pytest.raises(ValueError, match="allowed: size_mb$"):
        check_metric("latency_ms", "x", ["size_mb"])


def test_a_kit_s_latency_on_a_target_machine_is_a_metric_of_its_own():
    s = study(
        "study.objectives=[val_acc_onnx,onnx_kb,latency_onnx_ms@host]", "study.budgets={latency_int8_ms@bluebox: 5}"
    )
    assert s.objectives[-1] == "latency_onnx_ms@host" and s.before_training() == {"latency_int8_ms@bluebox": 5}
    assert sign("latency_int8_ms@bluebox") == 1 and metric("latency_int8_ms@bluebox").unit == "ms"
    assert not metric("latency_onnx_ms@host").deployed  # the kit measured it: no per-trial ONNX evaluation needed


@pytest.mark.parametrize(
    "objective, error",
    [
        ("latency_onnx_ms@board", "target='board' is unknown; allowed: host, bluebox"),
        ("size_kb@bluebox", "only latency_onnx_ms, latency_int8_ms take @<target>"),
        ("latency_onnx_ms@", "metric 'latency_onnx_ms@' is unknown"),
    ],
)
def test_an_unknown_target_in_the_objectives_is_refused(objective, error):
    with pytest.raises(ValueError, match=re.escape(f"study objectives: metric {objective!r}")) as e:
        study(f"study.objectives=[val_acc,{objective}]")
    assert error in str(e.value)
