"""Studies: safe names, a study's definition that a differing run cannot write into (refused naming what differs,
nothing written), an older study adopting the definition."""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd
import pytest

from dse.storage import StudyError, open_storage
from dse.study import (
    check_study_name,
    create_or_check_study,
    definition_diff,
    fingerprint,
    load_study,
    why_no_front,
)

DEFINITION = {
    "seeds": [0],
    "objectives": ["val_acc"],
    "configs": {
        "model.width=0.2": {"train": {"epochs": 2, "lr": 0.01}},
        "model.width=0.4": {"train": {"epochs": 2, "lr": 0.01}},
    },
}


@pytest.mark.parametrize("name", ["width-cifar10-quick", "étude_2.v1", "_x"])
def test_safe_study_names_pass(name):
    assert check_study_name(name) == name


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", "a..b", ".hidden", "-x", "", "a b", "x\\y"])
def test_study_names_that_could_leave_their_folder_are_refused(name):
    with pytest.raises(ValueError, match="must be letters, digits"):
        check_study_name(name)
    with pytest.raises(ValueError):
        load_study(name, "sqlite:///nowhere.db")


def test_a_differing_definition_is_refused_before_anything_is_written(tmp_path):
    db = tmp_path / "d.db"
    storage = open_storage(f"sqlite:///{db}")
    study = create_or_check_study("d", storage, objectives=["val_acc"], definition=DEFINITION)
    assert study.user_attrs["definition_sha256"] == fingerprint(DEFINITION)
    assert create_or_check_study("d", storage, objectives=["val_acc"], definition=DEFINITION).study_name == "d"
    other = {
        **DEFINITION,
        "seeds": [0, 1],
        "configs": {k: {"train": {"epochs": 1, "lr": 0.01}} for k in DEFINITION["configs"]},
    }
    before = db.read_bytes() + Path(f"{db}-wal").read_bytes()
    with pytest.raises(StudyError) as e:
        create_or_check_study("d", storage, objectives=["val_acc"], definition=other)
    assert "seeds: [0] -> [0, 1]" in str(e.value) and "train.epochs: 2 -> 1 (in 2 configs)" in str(e.value)
    assert "pick another study.name" in str(e.value)
    assert db.read_bytes() + Path(f"{db}-wal").read_bytes() == before


def test_a_study_made_by_an_older_dse_adopts_the_definition(tmp_path, capsys):
    storage = open_storage(f"sqlite:///{tmp_path / 'old.db'}")
    optuna.create_study(study_name="old", storage=storage, directions=["maximize"]).set_metric_names(["val_acc"])
    study = create_or_check_study("old", storage, objectives=["val_acc"], definition=DEFINITION)
    assert "made by an older dse" in capsys.readouterr().err
    assert study.user_attrs["definition"] == DEFINITION


def test_definition_diff_names_each_setting_once():
    new = {**DEFINITION, "objectives": ["val_acc", "size_mb"]}
    new["configs"] = {**DEFINITION["configs"], "model.width=0.4": {"train": {"epochs": 2, "lr": 0.1}}}
    assert definition_diff(DEFINITION, new) == [
        "train.lr: 0.01 -> 0.1",
        "objectives: ['val_acc'] -> ['val_acc', 'size_mb']",
    ]


def _frame(*rows: dict) -> pd.DataFrame:
    return pd.DataFrame(list(rows))


def test_why_no_front_names_how_every_trial_ended_and_the_smallest_model_s_reason():
    over = [
        {"state": "PRUNED", "size_mb": kb / 1e3, "pruned_reason": f"over budget: size {kb} KB > 1 KB"}
        for kb in (233.4, 75.5, 120.0)
    ]
    assert why_no_front(_frame(*over)) == "all 3 trials pruned: over budget (size 75.5 KB > 1 KB)"
    median = {"state": "PRUNED", "size_mb": 0.5, "pruned_reason": "median pruner at epoch 1"}
    assert (
        why_no_front(_frame(*over, median))
        == "all 4 trials pruned: 3 over budget (size 75.5 KB > 1 KB), 1 median pruner at epoch 1"
    )
    assert (
        why_no_front(_frame(over[0], {"state": "FAIL"}, {"state": "WAITING"}))
        == "no trial complete (1 pruned, 1 fail, 1 waiting); pruned: over budget (size 233.4 KB > 1 KB)"
    )
    assert why_no_front(_frame()) == "no trial yet"
    assert why_no_front(_frame(over[0], {"state": "COMPLETE"})) == ""
