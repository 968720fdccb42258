"""Composing a trial's config: spaces from the user's own folders (`hydra.searchpath`, $DSE_CONFIG_PATH) or by path,
overrides made portable to other processes, `space.grid=`/`space.search=` replacing the space's own, and every
composition error as one line naming the override and the closest valid names."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import MissingConfigException

from dse.sweep.compose import CONFIG_PATH_ENV, compose, group_options, key_problem, portable

SPACE = """\
defaults:
  - schema
  - _self_
name: mine
seeds: [0]
overrides: [model=shallow_squeezenext, "model.blocks=[1,1,1,1]"]
grid:
  model.width: [0.2, 0.4]
"""


@pytest.fixture
def folder(tmp_path) -> Path:
    """A config folder of the user's, outside the checkout, with one space: space/mine.yaml."""
    (tmp_path / "myconf" / "space").mkdir(parents=True)
    (tmp_path / "myconf" / "space" / "mine.yaml").write_text(SPACE)
    return tmp_path / "myconf"


def test_a_grid_from_the_command_line_replaces_the_space_s_own():
    cfg = compose(["+space=activation", "space.grid={model.activation:[elu,relu],model.width:[0.2,0.4,0.8,1.5]}"])
    assert dict(cfg.space.grid) == {"model.activation": ["elu", "relu"], "model.width": [0.2, 0.4, 0.8, 1.5]}
    cfg = compose(["+space=activation", "space.grid={model.activation:[elu]}"])
    assert dict(cfg.space.grid) == {"model.activation": ["elu"]}  # no model.inplace left of the space's own


def test_a_search_from_the_command_line_replaces_the_space_s_own():
    cfg = compose(["+space=open", "space.search={model.width:{low:0.2,high:1.0}}"])
    assert dict(cfg.space.search) == {"model.width": {"low": 0.2, "high": 1.0}}


@pytest.mark.parametrize(
    "override, message",
    [
        ("space.grid={model.width:[]}", "space 'activation': grid model.width=[] must be a non-empty list"),
        ("space.grid={model.width:0.5}", "space 'activation': grid model.width=0.5 must be a non-empty list"),
        ("space.grid=[0.2,0.4]", "space 'activation': grid=[0.2, 0.4] must map keys to lists"),
        ("space.search={model.width:{low:1}}", "search model.width={'low': 1} needs choices: [...] or low, high"),
    ],
)
def test_a_bad_grid_or_search_is_one_line_naming_it(override, message):
    with pytest.raises(ValueError) as e:
        compose(["+space=activation", override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_space_of_the_user_s_folder_composes_through_the_search_path(folder, monkeypatch):
    cfg = compose(["+space=mine", f"hydra.searchpath=[file://{folder}]"])
    assert (cfg.space.name, dict(cfg.space.grid)) == ("mine", {"model.width": [0.2, 0.4]})
    monkeypatch.setenv(CONFIG_PATH_ENV, str(folder))
    assert compose(["+space=mine"]).space.name == "mine"


def test_a_space_file_composes_by_its_path(folder, monkeypatch):
    path = folder / "space" / "mine.yaml"
    assert compose([f"+space={path}"]).space.name == "mine"
    monkeypatch.chdir(folder)
    assert compose(["+space=./space/mine.yaml", "space.seeds=[3]"]).space.seeds == [3]
    with pytest.raises(ValueError, match=r"^\+space=nothere.yaml: no space file '.*/nothere.yaml'$"):
        compose(["+space=nothere.yaml"])


def test_portable_overrides_compose_alike_from_any_folder_and_environment(folder, tmp_path, monkeypatch):
    monkeypatch.chdir(folder.parent)
    monkeypatch.setenv(CONFIG_PATH_ENV, str(folder))
    given = portable(["+space=myconf/space/mine.yaml", "hydra.searchpath=[file://myconf]", "model.width=0.3"])
    assert given == [f"+space='{folder}/space/mine.yaml'", "model.width=0.3", f"hydra.searchpath=['file://{folder}']"]
    monkeypatch.delenv(CONFIG_PATH_ENV)
    monkeypatch.chdir(tmp_path.parent)  # a worker elsewhere, without the variable
    assert compose(given).space.name == "mine"
    assert compose([*given[1:], "+space=mine"]).space.name == "mine"  # the folder travels in the overrides
    with pytest.raises(ValueError, match="hydra.searchpath: config folder '.*/nope' does not exist"):
        portable(["hydra.searchpath=[file:///nope]"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+space=widht"], "+space=widht: Could not find 'space/widht'; did you mean width? (space: activation, "),
        (["data=cifar11"], "data=cifar11: Could not find 'data/cifar11'; did you mean cifar10? (data: cifar10, "),
        (["model.widht=0.5"], "model.widht=0.5: model has no key 'widht'; did you mean width?"),
        (["train.lrr=0.1"], "train.lrr=0.1: train has no key 'lrr'; did you mean lr?"),
        (["+model.widht=0.5"], "+model.widht=0.5: model has no key 'widht'; did you mean width?"),  # not added
        (["trian.lr=0.1"], "trian.lr=0.1: no key or config group 'trian'; did you mean train?"),
        (["study.pruning.bse=2"], "study.pruning.bse=2: study.pruning has no key 'bse'; did you mean base?"),
        (["train.lr=abc"], "train.lr=abc: Value 'abc' of type 'str' could not be converted to Float"),
        (["model.width=[1"], "model.width=[1: no viable alternative at input '[1'"),
    ],
)
def test_a_composition_error_is_one_line_naming_the_override_and_the_closest(overrides, message):
    with pytest.raises(ValueError) as e:
        compose(overrides)
    text = str(e.value)
    assert text.startswith(message) and "\n" not in text
    assert "schema" not in text and "use +" not in text  # the internal option; Hydra's wrong advice


def test_hydra_full_error_lets_hydra_s_own_error_through(monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(MissingConfigException):
        compose(["data=cifar11"])


def test_group_options_are_every_folder_s_without_schema(folder):
    assert group_options("space") == [
        "activation",
        "baselines",
        "dropout",
        "open",
        "optimizer",
        "paper",
        "resolution",
        "width",
    ]
    assert "mine" in group_options("space", [f"hydra.searchpath=[file://{folder}]"])


def test_a_key_is_a_schema_key_a_config_group_or_inside_a_free_dict():
    assert key_problem("model.width") is None and key_problem("train") is None and key_problem("budget") is None
    assert key_problem("train.optimizer_kwargs.momentum") is None
    assert key_problem("model.widht") == "model has no key 'widht'; did you mean width?"


def test_an_error_in_a_space_file_names_the_file_and_the_closest_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(SPACE.replace("grid:", "gird:"))
    with pytest.raises(ValueError) as e:
        compose([f"+space={path}"])
    assert str(e.value) == f"+space='{path}': space has no key 'gird'; did you mean grid?"
