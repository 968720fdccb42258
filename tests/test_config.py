"""The schemas of conf/: every shipped config file validates, and bad values are refused naming them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from trainers import composed_train, train_config

from dse.config import (
    OBJECTIVES,
    DataConfig,
    SpaceConfig,
    StudyConfig,
    SweepConfig,
    TrainConfig,
    check_study_name,
    register_schemas,
    to_object,
)
from dse.models import ModelConfig

CONF = Path(__file__).resolve().parents[1] / "conf"
SCHEMAS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "study": StudyConfig, "space": SpaceConfig}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", list(SCHEMAS))
def test_every_config_file_of_a_group_is_an_instance_of_its_schema(group):
    register_schemas()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        for option in _options(group):
            space = option if group == "space" else "width"  # the study's default name reads the space's
            cfg = compose("sweep", overrides=[f"+space={space}"] + ([f"{group}={option}"] if group != "space" else []))
            assert isinstance(to_object(SCHEMAS[group], cfg[group]), SCHEMAS[group]), option


def test_to_object_refuses_an_unknown_key_naming_it():
    with pytest.raises(ValueError, match="widht"):
        to_object(ModelConfig, {"widht": 0.5})


def test_study_objectives_are_named_metrics_each_once():
    assert StudyConfig().objectives == list(OBJECTIVES)
    with pytest.raises(ValueError, match="metric .flops. is unknown; allowed: val_acc, test_acc, size_mb"):
        StudyConfig(objectives=["val_acc", "flops"])
    with pytest.raises(ValueError, match="distinct"):
        StudyConfig(objectives=["val_acc", "val_acc"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pruner": "asha"}, "pruner='asha' is unknown; allowed: none, pareto, median"),
        ({"pruner": "median"}, "single-objective studies only"),
        ({"pruner": "pareto", "objectives": ["size_mb"]}, "needs an accuracy among the objectives"),
        ({"max_size_kb": 0}, "max_size_kb=0 must be > 0 or null"),
        ({"heartbeat_interval": 60, "grace_period": 60}, "grace_period=60 larger than it"),
        ({"max_retry": -1}, "max_retry=-1"),
        ({"name": "../etc"}, "must be letters, digits"),
    ],
)
def test_a_bad_study_setting_is_refused_naming_it(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        StudyConfig(**kwargs)


@pytest.mark.parametrize("name", ["width-cifar10-quick", "Breite_ü.2", "_x"])
def test_study_names_are_file_names(name):
    assert check_study_name(name) == name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"workers": -1}, "workers=-1"),
        ({"seeds": 0}, "seeds=0 must be >= 1"),
        ({"trials_per_gpu": "many"}, "trials_per_gpu='many' is not allowed; allowed: auto or a whole number >= 1"),
    ],
)
def test_a_bad_sweep_setting_is_refused_naming_it(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SweepConfig(**kwargs)


def test_trials_per_gpu_is_a_group_size_or_auto():
    assert SweepConfig(trials_per_gpu="4").group_size == 4
    assert SweepConfig().group_size is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sampler": "random", "grid": {"a": [1]}}, "sampler='random' is unknown"),
        ({"grid": {}}, "needs `grid` or `points`"),
        ({"grid": {"model.width": []}}, "must be a non-empty list"),
        ({"grid": {"model.width": [0.5]}, "seeds": [1, 1]}, "each once"),
        ({"sampler": "tpe", "search": {"model.width": {"low": 0.1, "high": 1.0}}}, "n_trials >= 1"),
        ({"sampler": "tpe", "n_trials": 2, "search": {"x": {"low": 1, "high": 0}}}, "low < high"),
        ({"sampler": "tpe", "n_trials": 2, "search": {"x": {"low": 0, "high": 1, "log": True}}}, "log=true needs low"),
        ({"sampler": "tpe", "n_trials": 2, "search": {"x": {"choices": []}}}, "non-empty list"),
    ],
)
def test_a_bad_space_is_refused_naming_it(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpaceConfig(**kwargs)


def test_an_unknown_dataset_lists_the_known_ones():
    with pytest.raises(ValueError, match="data name='mnist' is unknown; allowed: cifar10, cifar100, fashion_mnist"):
        DataConfig(name="mnist")


@pytest.mark.parametrize(
    "knob, value, message",
    [
        ("warmup", 1.0, r"warmup=1.0 must be in \[0, 1\)"),
        ("warmup", -0.1, r"warmup=-0.1 must be in \[0, 1\)"),
        ("ema", 1.0, r"ema=1.0 must be in \[0, 1\)"),
        ("ema", -0.5, r"ema=-0.5 must be in \[0, 1\)"),
        ("label_smoothing", 1.0, r"label_smoothing=1.0 must be in \[0, 1\)"),
        ("crop", 0.5, r"crop=0.5 must be in \[0, 0.5\)"),
        ("crop", -0.1, r"crop=-0.1 must be in \[0, 0.5\)"),
        ("lr_batch_size", 0, r"lr_batch_size=0 must be > 0 or null"),
        ("tta", "yes", r"tta='yes' must be true or false"),
        ("augment", 1, r"augment=1 must be true or false"),
    ],
)
def test_every_recipe_knob_refuses_bad_values_naming_them(knob, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{knob: value})


def test_recipe_knobs_are_checked_by_the_schema_from_the_command_line():
    with pytest.raises(Exception, match="tta"):
        composed_train("run", "train=fast", "train.tta=maybe")
    with pytest.raises(Exception, match="warmup"):
        composed_train("run", "train=fast", "train.warmup=fast")


def test_short_budget_picks_the_fast_recipe_unless_a_train_config_is_named():
    fast = train_config("fast")
    assert fast.ema > 0 and fast.tta and fast.schedule in ("linear", "cosine") and fast.label_smoothing > 0
    for primary in ("run", "sweep"):
        short = composed_train(primary, "budget=short")
        assert short == replace(fast, epochs=30)
        assert composed_train(primary, "budget=short", "train=adam").optimizer == "adam"
    assert composed_train("sweep", "budget=paper") == replace(train_config("sgd"), epochs=200)
