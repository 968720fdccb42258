"""`deploy latency-kit` and `deploy import-latency` on a study: kit -> run on this machine -> import, for a grid
(`width`) and a sampled (`open`) space; a partial run; the front's kit replacing figures; and refusals of a file
of another study, a truncated or malformed file, a negative or NaN latency, an unknown target, with the study
untouched."""

from __future__ import annotations

import json
import math
import shutil

import optuna
import pandas as pd
import pytest
from latency_kits import make_study, run_kit
from sweeps import run_tiny_plan

from dse.deploy.__main__ import main
from dse.report.__main__ import main as report_main
from dse.targets import attr, measured

WIDTH = {"grid": {"model.width": [0.125, 0.25, 0.5, 0.8]}}  # the width space, four of its widths


def kit(tmp_path, storage, name, *args) -> dict:
    out = tmp_path / f"kit-{name}-{len(list(tmp_path.glob('kit-*')))}"
    assert main(["latency-kit", "--study", name, "--storage", storage, "--out", str(out), *args]) == 0
    return json.loads((out / "kit.json").read_text()) | {"folder": out}


def import_latency(path, storage: str, name: str, target: str) -> int:
    """`python -m dse.deploy import-latency PATH --study NAME --storage STORAGE --target TARGET`'s exit code."""
    return main(["import-latency", str(path), "--study", name, "--storage", storage, "--target", target])


def figures(storage, name, target="host") -> dict:
    return measured(optuna.load_study(study_name=name, storage=storage).user_attrs, target)


@pytest.fixture(scope="module")
def width(tmp_path_factory):
    """A `width` study's kit, run on this machine."""
    tmp = tmp_path_factory.mktemp("width")
    storage = f"sqlite:///{tmp / 'w.db'}"
    make_study(storage, "w", "width", widths=(0.125, 0.25, 0.5), grid=WIDTH["grid"])
    made = kit(tmp, storage, "w")
    run_kit(made["folder"])
    return storage, made


def test_a_grid_kit_holds_the_study_s_and_the_grid_s_architectures_and_imports_them_all(width, capsys):
    storage, made = width
    sets = {}
    for g in made["graphs"]:
        sets.setdefault(g["set"], set()).add(g["architecture"])
    assert len(sets["study"]) == 3 and len(sets["grid"]) == 1  # the grid's fourth width is not yet a trial
    path = made["folder"] / "latency.json"
    assert import_latency(path, storage, "w", "host") == 0
    assert "stored the latency of 4 architecture(s)" in capsys.readouterr().out
    stored = figures(storage, "w")
    assert set(stored) == sets["study"] | sets["grid"]
    for figure in stored.values():
        assert figure["latency_onnx_ms"] > 0 and figure["latency_int8_ms"] > 0 and figure["measured"]
        assert figure["kit"] == made["kit"] and figure["machine"]["onnxruntime"]
    assert figures(storage, "w", "bluebox") == {}


def test_an_open_kit_adds_a_calibration_draw_and_its_figures_come_back(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    make_study(storage, "o", "open")
    made = kit(tmp_path, storage, "o", "--calibration", "3")
    assert sum(g["set"] == "calibration" for g in made["graphs"]) == 6
    run_kit(made["folder"])
    path = made["folder"] / "latency.json"
    capsys.readouterr()
    assert import_latency(path, storage, "o", "bluebox") == 0
    assert len(figures(storage, "o", "bluebox")) == 5 and figures(storage, "o", "host") == {}
    # every architecture measured, none to predict: the fit's held-out error is printed all the same
    assert "fitted the bluebox predictor of the architectures no kit timed; latency_int8_ms: held-out (5" in (
        capsys.readouterr().out
    )


def test_a_partial_run_imports_what_it_timed_and_says_what_is_missing(width, tmp_path, capsys):
    storage, made = width
    data = json.loads((made["folder"] / "latency.json").read_text())
    gone = made["graphs"][-1]["id"]
    data["graphs"][gone] = {k: v for k, v in data["graphs"][gone].items() if k in ("architecture", "precision")}
    data["complete"] = False
    path = tmp_path / "partial.json"
    path.write_text(json.dumps(data))
    assert import_latency(made["folder"] / "latency.json", storage, "w", "host") == 0  # the whole run first
    capsys.readouterr()
    assert import_latency(path, storage, "w", "host") == 0
    out = capsys.readouterr().out
    assert "stored the latency of 4 architecture(s)" in out and f"missing: 1 graph(s) not (fully) timed: {gone}" in out
    last = figures(storage, "w")[made["graphs"][-1]["architecture"]]
    timed = json.loads((made["folder"] / "latency.json").read_text())["graphs"][gone]
    assert last["latency_int8_ms"] == timed["ms"]  # measured by the earlier, whole run: kept


def test_the_front_s_kit_replaces_that_target_s_figures_of_the_front_only(width, tmp_path, capsys):
    storage, whole = width
    assert import_latency(whole["folder"] / "latency.json", storage, "w", "host") == 0  # the grid's kit first
    before = figures(storage, "w")
    made = kit(tmp_path, storage, "w", "--front")
    front = {g["architecture"] for g in made["graphs"]}
    assert {g["set"] for g in made["graphs"]} == {"front"} and len(front) == 3
    run_kit(made["folder"])
    assert import_latency(made["folder"] / "latency.json", storage, "w", "host") == 0
    after = figures(storage, "w")
    assert set(after) == set(before)
    assert all(after[k]["kit"] == made["kit"] for k in front)
    assert all(after[k] == before[k] for k in set(before) - front)


def test_the_study_s_unmeasured_architectures_are_predicted_until_a_kit_measures_them(width, tmp_path, capsys):
    storage, made = width
    data = json.loads((made["folder"] / "latency.json").read_text())
    study_graphs = [g for g in made["graphs"] if g["set"] == "study"]
    left_out = study_graphs[0]["architecture"]
    for g in study_graphs[:2]:  # both graphs of one of the study's architectures: not timed
        data["graphs"][g["id"]] = {"architecture": g["architecture"], "precision": g["precision"], "rounds": []}
    path = tmp_path / "partial.json"
    path.write_text(json.dumps(data))
    assert import_latency(path, storage, "w", "bluebox") == 0
    out = capsys.readouterr().out
    assert "stored the latency of 3 architecture(s)" in out
    assert "fitted the bluebox predictor of the architectures no kit timed; latency_onnx_ms: held-out (3" in out
    guess = figures(storage, "w", "bluebox")[left_out]
    assert guess["predicted"] and not guess["measured"] and "held-out" in guess["latency_int8_ms_how"]
    assert math.isfinite(guess["latency_onnx_ms"]) and math.isfinite(guess["latency_int8_ms"])
    assert import_latency(made["folder"] / "latency.json", storage, "w", "bluebox") == 0
    now = figures(storage, "w", "bluebox")[left_out]
    assert now["measured"] and "predicted" not in now
    timed = json.loads((made["folder"] / "latency.json").read_text())["graphs"]
    assert now["latency_onnx_ms"] == timed[study_graphs[0]["id"]]["ms"]


def test_a_kit_of_another_space_draws_on_the_study_s_architecture_and_an_unknown_space_is_refused(
    width, tmp_path, capsys
):
    storage, _ = width
    made = kit(tmp_path, storage, "w", "--space", "open", "--calibration", "2")
    drawn = {g["architecture"] for g in made["graphs"] if g["set"] == "calibration"}
    assert len(drawn) == 2 and all(json.loads(k)["input_shape"] == [1, 16, 16] for k in drawn)
    capsys.readouterr()
    assert (
        main(["latency-kit", "--study", "w", "--storage", storage, "--space", "nope", "--out", str(tmp_path / "x")])
        == 2
    )
    assert "space 'nope' is unknown; allowed: activation, baselines" in capsys.readouterr().err


def _bad(storage, name, tmp_path, data, capsys, target="host") -> str:
    before = optuna.load_study(study_name=name, storage=storage).user_attrs
    path = tmp_path / "bad.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    assert import_latency(path, storage, name, target) == 2
    assert optuna.load_study(study_name=name, storage=storage).user_attrs == before
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dse.deploy: error: ")
    return err


def test_a_kit_result_of_another_study_is_refused(width, tmp_path, capsys):
    storage, made = width
    make_study(storage, "other", "width", grid=WIDTH["grid"])
    text = (made["folder"] / "latency.json").read_text()
    assert "made by a kit of study 'w', not of 'other'" in _bad(storage, "other", tmp_path, text, capsys)
    # the same name in another storage: another definition
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    make_study(elsewhere, "w", "width", grid={"model.width": [0.3]})
    assert "another definition of study 'w'" in _bad(elsewhere, "w", tmp_path, text, capsys)


def test_a_truncated_or_malformed_file_is_refused(width, tmp_path, capsys):
    storage, made = width
    text = (made["folder"] / "latency.json").read_text()
    assert "is not valid JSON" in _bad(storage, "w", tmp_path, text[: len(text) // 2], capsys)
    assert "format None is not a kit's results" in _bad(storage, "w", tmp_path, {"graphs": {}}, capsys)
    data = json.loads(text)
    data["graphs"]["extra-fp32"] = data["graphs"][made["graphs"][0]["id"]] | {"architecture": '{"model": {}}'}
    assert "are not those of kit" in _bad(storage, "w", tmp_path, data, capsys)


def test_a_kit_result_written_by_the_previous_runner_still_imports(width, tmp_path, capsys):
    """dse-latency-results/1 (plain wall-clock medians, no reference graph) from a kit of dse-latency-kit/1."""
    shared, made = width
    storage = f"sqlite:///{shutil.copy(shared.removeprefix('sqlite:///'), tmp_path / 'copy.db')}"
    data = json.loads((made["folder"] / "latency.json").read_text())
    data.pop("reference")
    old = data | {"format": "dse-latency-results/1", "kit": data["kit"] | {"format": "dse-latency-kit/1"}}
    for g in old["graphs"].values():
        g["ms"] = g["wall_ms"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    assert import_latency(path, storage, "w", "bluebox") == 0
    stored = figures(storage, "w", "bluebox")
    assert {k: f["latency_onnx_ms"] for k, f in stored.items()} == {
        g["architecture"]: g["ms"] for g in old["graphs"].values() if g["precision"] == "fp32"
    }
    capsys.readouterr()
    mixed = data | {"kit": data["kit"] | {"format": "dse-latency-kit/1"}}
    err = _bad(storage, "w", tmp_path, mixed, capsys)
    assert "kit format 'dse-latency-kit/1' is unknown to results 'dse-latency-results/2'" in err


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf, 0.0, "fast"])
def test_a_latency_that_is_not_a_positive_finite_number_is_refused(width, tmp_path, capsys, value):
    storage, made = width
    data = json.loads((made["folder"] / "latency.json").read_text())
    gid = made["graphs"][1]["id"]
    data["graphs"][gid]["ms"] = value
    err = _bad(storage, "w", tmp_path, json.dumps(data), capsys)  # json.dumps writes NaN and Infinity as they come
    assert f"graph '{gid}': latency {value!r} ms is not a positive finite number" in err


def test_an_unknown_target_is_refused(width, capsys):
    storage, made = width
    before = figures(storage, "w")
    path = made["folder"] / "latency.json"
    assert import_latency(path, storage, "w", "board") == 2
    assert "target='board' is unknown; allowed: host, bluebox" in capsys.readouterr().err
    assert figures(storage, "w") == before and attr("host", "k") == "latency@host:k"


@pytest.mark.slow
def test_a_sampled_sweep_runs_on_predicted_latency_and_the_front_s_kit_replaces_it(tmp_path, capsys):
    args = ["+space=open", "space.n_trials=3", "study.objectives=[val_acc_onnx,onnx_kb,latency_onnx_ms@host]"]
    with pytest.raises(ValueError, match="latency_onnx_ms@host: study 'sampled' has fewer than 3 architectures"):
        run_tiny_plan(tmp_path, *args, name="sampled")
    storage = f"sqlite:///{tmp_path / 'sampled.db'}"
    made = kit(tmp_path, storage, "sampled", "--calibration", "5")
    assert {g["set"] for g in made["graphs"]} == {"calibration"}  # no trial yet: drawn on the sweep's architecture
    run_kit(made["folder"])
    assert import_latency(made["folder"] / "latency.json", storage, "sampled", "host") == 0
    assert run_tiny_plan(tmp_path, *args, name="sampled").ok
    study = optuna.load_study(study_name="sampled", storage=storage)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 3 and study.metric_names == ["val_acc_onnx", "onnx_kb", "latency_onnx_ms@host"]
    for t in done:
        assert (
            t.values[2] == t.user_attrs["latency_onnx_ms@host"] > 0 and t.user_attrs["latency_onnx_ms@host_predicted"]
        )
    capsys.readouterr()
    assert main(["list", "--study", "sampled", "--storage", storage]) == 0
    listed = capsys.readouterr()
    assert "latency_onnx_ms@host_predicted" in listed.out and "latency_onnx_ms@host of trial(s)" in listed.err
    assert reported(tmp_path, storage)["latency_onnx_ms@host_predicted"].eq(True).all()
    front = kit(tmp_path, storage, "sampled", "--front")
    run_kit(front["folder"])
    assert import_latency(front["folder"] / "latency.json", storage, "sampled", "host") == 0
    capsys.readouterr()
    assert main(["list", "--study", "sampled", "--storage", storage]) == 0
    listed = capsys.readouterr()
    assert "is predicted" not in listed.err
    stored = figures(storage, "sampled")
    assert all(stored[g["architecture"]]["measured"] for g in front["graphs"])
    trials = reported(tmp_path, storage).set_index("trial")
    for t in done:
        measured_now = stored[t.user_attrs["latency_key"]]
        row = trials.loc[t.number]
        assert row["latency_onnx_ms@host_predicted"] == (not measured_now["measured"])
        assert row["latency_onnx_ms@host"] == pytest.approx(measured_now["latency_onnx_ms"])


def reported(tmp_path, storage) -> pd.DataFrame:
    """The trials table `python -m dse.report` writes for the sampled study (CSV)."""
    report_main(["--study", "sampled", "--storage", storage, "--out", str(tmp_path / "reports"), "--format", "csv"])
    return pd.read_csv(tmp_path / "reports" / "sampled" / "trials.csv")
