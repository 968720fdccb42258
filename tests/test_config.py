"""The schemas of conf/: every shipped config file validates, and bad values are refused naming them."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

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


@pytest.fixture(scope="module")
def composed():
    register_schemas()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        yield lambda overrides: compose("sweep", overrides=overrides)


@pytest.mark.parametrize("group", list(SCHEMAS))
def test_every_config_file_of_a_group_is_an_instance_of_its_schema(composed, group):
    for option in _options(group):
        space = option if group == "space" else "width"  # the study's default name reads the space's
        cfg = composed([f"+space={space}"] + ([f"{group}={option}"] if group != "space" else []))
        assert isinstance(to_object(SCHEMAS[group], cfg[group]), SCHEMAS[group]), option


def test_to_object_refuses_an_unknown_key_naming_it():
    with pytest.raises(ValueError, match="widht"):
        to_object(ModelConfig, {"widht": 0.5})


def test_study_objectives_are_named_metrics_each_once():
    assert StudyConfig().objectives == list(OBJECTIVES)
    with pytest.raises(ValueError, match="must be distinct names from val_acc, size_mb, latency_ms"):
        StudyConfig(objectives=["val_acc", "flops"])
    with pytest.raises(ValueError, match="distinct"):
        StudyConfig(objectives=["val_acc", "val_acc"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pruner": "asha"}, "pruner='asha' is unknown; allowed: none, pareto, median"),
        ({"pruner": "median"}, "single-objective studies only"),
        ({"pruner": "pareto", "objectives": ["size_mb"]}, "needs val_acc"),
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
