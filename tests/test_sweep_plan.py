"""Planning, without data or processes: every grid trial's params, a trial's overrides (later keys win, a point's
extras yield to the command line, the swept knobs always win), the plan's mode and total decided once, refusals
of a command line that sets a swept key, and the study's definition."""

from __future__ import annotations

import json

import pytest

from dse.config import SpaceConfig, StudyConfig
from dse.sweep import GRID, SAMPLED, compose, draft_plan, grid_params, merge_overrides, trial_overrides, typed
from dse.sweep.plan import definition


def _draft(tmp_path, *extra: str):
    args = ["budget=quick", f"study.storage=sqlite:///{tmp_path / 'x.db'}", *extra]
    return draft_plan(compose(args), args)


def test_grid_params_cover_every_point_and_seed():
    space = SpaceConfig(name="s", grid={"model.width": [0.2, 0.4], "model.activation": ["elu", "relu"]}, seeds=[0, 1])
    params = grid_params(space, [0, 1])
    assert len(params) == 8 and len({json.dumps(p, sort_keys=True) for p in params}) == 8
    assert {"model.width": 0.4, "model.activation": "relu", "seed": 1} in params


def test_grid_params_of_points_are_labelled_and_a_point_twice_is_refused():
    point = {"model": "Shallow SqueezeNext-06-0.2x", "overrides": ["model.dropout=0.1"]}
    space = SpaceConfig(name="s", points=["SqueezeNet-v1.1", point], seeds=[0])
    assert grid_params(space, [0, 3]) == [
        {"point": "SqueezeNet-v1.1", "seed": 0},
        {"point": "SqueezeNet-v1.1", "seed": 3},
        {"point": "Shallow SqueezeNext-06-0.2x [model.dropout=0.1]", "seed": 0},
        {"point": "Shallow SqueezeNext-06-0.2x [model.dropout=0.1]", "seed": 3},
    ]
    with pytest.raises(ValueError, match="lists a point twice"):
        grid_params(SpaceConfig(name="s", points=["SqueezeNet-v1.1", "SqueezeNet-v1.1"]), [0])


def test_later_override_of_a_key_wins():
    merged = merge_overrides(["data=cifar100", "model.width=0.2"], ["+data=fashion_mnist"])
    assert merged == ["model.width=0.2", "+data=fashion_mnist"]


def test_trial_overrides_split_a_point_s_extras_from_the_swept_knobs():
    point = {"model": "Shallow SqueezeNext-06-0.2x", "overrides": ["model.dropout=0.1"]}
    space = SpaceConfig(name="s", points=[point], grid={}, seeds=[0])
    static, varying = trial_overrides({"point": "Shallow SqueezeNext-06-0.2x [model.dropout=0.1]", "seed": 2}, space)
    assert static == ["model.dropout=0.1"]
    assert varying[0] == "model=shallow_squeezenext" and "model.width=0.2" in varying and varying[-1] == "train.seed=2"
    blocks = SpaceConfig(name="b", grid={"model.blocks": [[1, 2, 8, 1]]})
    assert trial_overrides(grid_params(blocks, [0])[0], blocks) == ([], ["model.blocks=[1,2,8,1]", "train.seed=0"])


def test_a_grid_plan_decides_its_mode_and_total_once(tmp_path):
    widths = ("+space=width", "space.grid={model.width:[0.2,0.3,0.4]}", "space.seeds=[0,1]")
    plan = _draft(tmp_path, *widths, "sweep.seeds=2")
    assert (plan.mode, plan.total, plan.seeds) == (GRID, 6, [0, 1]) and len(plan.grid) == 6
    assert plan.choices("model.width") == [0.2, 0.3, 0.4]
    assert plan.costs() == {json.dumps(p, sort_keys=True): 1.0 for p in plan.grid}  # no costs measured yet
    fewer = _draft(tmp_path, *widths, "sweep.seeds=1")
    assert (fewer.total, fewer.seeds) == (3, [0])
    assert not (tmp_path / "x.db").exists()


def test_a_sampled_plan_has_no_grid_and_its_n_trials(tmp_path):
    plan = _draft(tmp_path, "+space=open", "space.n_trials=7")
    assert (plan.mode, plan.total, plan.grid) == (SAMPLED, 7, [])
    assert plan.costs() == {}


def test_a_trial_s_overrides_merge_space_command_line_study_and_knobs(tmp_path):
    plan = _draft(tmp_path, "+space=width", "space.grid={model.width:[0.2]}", "train.epochs=3")
    overrides = plan.overrides(plan.grid[0])
    assert overrides.index("train.epochs=3") < overrides.index("model.width=0.2")  # command line < the trial's knobs
    assert overrides[-1] == "train.seed=0" and "study.name='width-cifar10-quick'" in overrides
    setup = typed(compose(overrides))
    assert (setup.model.width, setup.train.epochs, setup.train.seed) == (0.2, 3, 0)


def test_a_command_line_override_of_a_swept_key_is_refused_naming_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"train.seed=5: space 'width' sets train.seed for every trial.*space.seeds"):
        _draft(tmp_path, "+space=width", "train.seed=5")
    with pytest.raises(ValueError, match="no search space given; add"):
        _draft(tmp_path)


def test_the_definition_names_what_makes_trials_comparable():
    search = {"model.width": {"low": 0.1, "high": 1.0}}
    space = SpaceConfig(name="o", sampler="tpe", n_trials=4, search=search, seeds=[0])
    setups = {"base": typed(compose(["+space=open", "budget=quick"]))}
    plain = definition(space, [0], StudyConfig(), setups)
    assert plain["seeds"] == [0] and plain["pruning"] is None and plain["space"]["sampler"] == "tpe"
    assert "width" not in plain["configs"]["base"]["model"]  # a searched knob is not part of the definition
    assert "n_trials" not in json.dumps(plain["space"])  # a sampled study may grow
    pareto = definition(space, [0], StudyConfig(pruner="pareto"), setups)
    assert pareto["pruning"] is not None and pareto["configs"] == plain["configs"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["+space=activation", "space.grid={model.widht:[0.2]}"],
            "space 'activation': grid key model.widht: model has no key 'widht'; did you mean width?",
        ),
        (
            ["+space=open", "space.search={trian.lr:{low:0.1,high:1}}"],
            "space 'open': search key trian.lr: no key or config group 'trian'; did you mean train?",
        ),
    ],
)
def test_a_grid_or_search_over_an_unknown_key_is_refused_naming_the_closest(tmp_path, extra, message):
    with pytest.raises(ValueError) as e:
        _draft(tmp_path, *extra)
    assert str(e.value).startswith(message)
    assert not (tmp_path / "x.db").exists()


def test_a_grid_over_any_key_from_the_command_line_plans_every_combination(tmp_path):
    grid = "space.grid={model.activation:[elu,relu],model.width:[0.2,0.4,0.8,1.5]}"
    plan = _draft(tmp_path, "+space=activation", grid)
    assert plan.total == 8 and plan.choices("model.width") == [0.2, 0.4, 0.8, 1.5]
    assert set(plan.grid[0]) == {"model.activation", "model.width", "seed"}
    setup = typed(compose(plan.overrides(plan.grid[-1])))
    assert (setup.model.activation, setup.model.width, setup.model.blocks) == ("relu", 1.5, [1, 1, 1, 1])


def test_the_plan_carries_the_config_folders_its_workers_compose_with(tmp_path, monkeypatch):
    (tmp_path / "mine" / "space").mkdir(parents=True)
    space = "defaults: [schema, _self_]\nname: own\ngrid: {model.width: [0.3]}\n"
    (tmp_path / "mine" / "space" / "own.yaml").write_text(space)
    monkeypatch.setenv("DSE_CONFIG_PATH", str(tmp_path / "mine"))
    plan = _draft(tmp_path, "+space=own")
    assert plan.study_name == "own-cifar10-quick"
    monkeypatch.delenv("DSE_CONFIG_PATH")  # a worker started elsewhere: the plan alone says where the space is
    assert typed(compose(plan.overrides(plan.grid[0]))).model.width == 0.3
    with pytest.raises(ValueError, match=r"no search space given; add \+space=NAME \(one of: .*own.*\) or \+space="):
        _draft(tmp_path, f"hydra.searchpath=[file://{tmp_path / 'mine'}]")
