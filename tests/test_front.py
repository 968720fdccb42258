"""The Pareto front: non-dominated points with every coordinate minimised, the rows of a table on the front in a
study's objectives (accuracy up, size and latency down, a missing value the worst), and a study's front table."""

from __future__ import annotations

import math

import optuna
import pandas as pd

from dse.front import front_frame, front_mask, non_dominated


def test_non_dominated_keeps_ties_and_drops_dominated_points():
    assert non_dominated([(1, 5), (2, 2), (3, 3), (5, 1), (2, 2)]) == [0, 1, 3, 4]
    assert non_dominated([]) == []


def test_front_mask_maximises_accuracy_and_minimises_size_and_latency():
    frame = pd.DataFrame(
        {"val_acc": [0.9, 0.8, 0.95, 0.7], "size_mb": [1.0, 0.5, 2.0, 0.6], "latency_ms": [1.0, 1.0, 3.0, math.nan]},
        index=[10, 11, 12, 13],
    )
    mask = front_mask(frame, ["val_acc", "size_mb", "latency_ms"])
    assert list(mask.index) == [10, 11, 12, 13] and mask.tolist() == [True, True, True, False]
    assert front_mask(frame, ["val_acc"]).tolist() == [False, False, True, False]
    means = frame.rename(columns={"val_acc": "val_mean"})
    assert front_mask(means, ["val_acc", "size_mb"], {"val_acc": "val_mean"}).tolist() == [True, True, True, False]


def test_front_frame_lists_the_complete_trials_on_the_front_smallest_first():
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    study.set_metric_names(["val_acc", "size_mb", "latency_ms"])
    for acc, mb, attrs in ((0.9, 1.0, {}), (0.8, 0.5, {}), (0.7, 2.0, {}), (0.99, 0.1, {"failed": True})):
        trial = study.ask()
        for key, value in {"paper_name": f"m{mb}", "size_mb": mb, "latency_ms": 1.0, **attrs}.items():
            trial.set_user_attr(key, value)
        if attrs:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, [acc, mb, 1.0])
    front = front_frame(study)
    assert front["trial"].tolist() == [1, 0] and front["size_kb"].tolist() == [500.0, 1000.0]
    assert front["model"].tolist() == ["m0.5", "m1.0"] and front["val_acc"].tolist() == [0.8, 0.9]
