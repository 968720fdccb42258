"""What a run, a trial and an architecture are: settings marked as changing no result never enter a key."""

from __future__ import annotations

from dataclasses import fields, replace

import pytest

from dse.config import DataConfig, TrainConfig, changes_result
from dse.identity import architecture, computed, run_identity, trial_identity, trial_key
from dse.models import ModelConfig

MODEL = ModelConfig(name="shallow_squeezenext", blocks=[1, 1, 1, 1], width=0.5)
DATA = DataConfig(name="fashion_mnist", root="/somewhere", subset=2000, val_size=500)
TRAIN = TrainConfig(
    optimizer="sgd",
    lr=0.05,
    optimizer_kwargs={"momentum": 0.9, "nesterov": True},
    epochs=3,
    batch_size=64,
    seed=2,
    threads=1,
)


def test_run_folder_keys_are_those_older_dse_wrote():
    # Computed by dse 41f3f2d (sweep.trial_identity, then sha256 of its sorted JSON): old studies resume in place.
    assert trial_key(trial_identity(MODEL, DATA, TRAIN)) == "34b7f029937db95a"
    assert trial_key(trial_identity(MODEL, DATA, TRAIN, seed=False)) == "459b79b159fd4d51"


@pytest.mark.parametrize(
    "change",
    [
        {"threads": 4},
        {"device": "cpu"},
        {"compile": True},
        {"cuda_graph": False},
        {"checkpoint": "/x.pt"},
        {"checkpoint_every": 5},
        {"eval_batch_size": 64},
        {"progress": False},
    ],
)
def test_settings_that_change_only_how_fast_or_where_leave_every_key_alone(change):
    other = replace(TRAIN, **change)
    assert trial_identity(MODEL, DATA, other) == trial_identity(MODEL, DATA, TRAIN)
    assert run_identity(other, {"seed": 0}, 10) == run_identity(TRAIN, {"seed": 0}, 10)


@pytest.mark.parametrize("change", [{"lr": 0.1}, {"epochs": 4}, {"memory_format": "contiguous"}, {"amp": False}])
def test_settings_that_change_the_numbers_change_the_trial_and_the_run(change):
    other = replace(TRAIN, **change)
    assert trial_key(trial_identity(MODEL, DATA, other)) != trial_key(trial_identity(MODEL, DATA, TRAIN))
    assert run_identity(other, {}, 10) != run_identity(TRAIN, {}, 10)


def test_where_the_data_live_is_not_part_of_a_trial():
    moved = replace(DATA, root="/elsewhere", download=True)
    assert trial_identity(MODEL, moved, TRAIN) == trial_identity(MODEL, DATA, TRAIN)
    assert trial_identity(MODEL, replace(DATA, val_size=100), TRAIN) != trial_identity(MODEL, DATA, TRAIN)


def test_the_seed_is_a_trial_s_but_not_its_cell_s():
    reseeded = replace(TRAIN, seed=7)
    assert trial_identity(MODEL, DATA, reseeded) != trial_identity(MODEL, DATA, TRAIN)
    assert trial_identity(MODEL, DATA, reseeded, seed=False) == trial_identity(MODEL, DATA, TRAIN, seed=False)
    assert run_identity(reseeded, {}, 10) != run_identity(TRAIN, {}, 10)


def test_a_trial_identity_holds_the_resolved_model_and_plain_json():
    identity = trial_identity(MODEL, DATA, TRAIN)
    assert identity["model"]["activation"] == "elu"  # the builder's default, filled in
    assert identity["train"]["milestones"] == [0.3, 0.6, 0.8]
    assert "root" not in identity["data"] and "threads" not in identity["train"]


def test_the_runtime_marks_are_exactly_these_settings():
    unmarked = {
        schema.__name__: sorted(f.name for f in fields(schema) if not changes_result(f))
        for schema in (TrainConfig, DataConfig)
    }
    assert unmarked == {
        "TrainConfig": sorted(
            [
                "threads",
                "device",
                "compile",
                "cuda_graph",
                "checkpoint",
                "checkpoint_every",
                "eval_batch_size",
                "progress",
            ]
        ),
        "DataConfig": ["download", "root"],
    }
    assert set(computed(DATA)) == {"name", "val_size", "subset", "seed"}


def test_an_architecture_is_its_inference_graph():
    key, spec = architecture(MODEL, (1, 28, 28), 10)
    assert architecture(replace(MODEL, dropout=0.5), (1, 28, 28), 10)[0] == key  # dropout: identity at inference
    assert architecture(replace(MODEL, activation="relu"), (1, 28, 28), 10)[0] != key
    assert architecture(MODEL, (3, 32, 32), 10)[0] != key
    assert spec["input_shape"] == [1, 28, 28] and spec["num_classes"] == 10 and "dropout" not in spec["model"]
