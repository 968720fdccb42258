"""Every trial as it ships: a sweep exports each COMPLETE trial to ONNX (fp32, int8) through the code path of
`dse.deploy export`, evaluates both in ONNX Runtime, keeps the files as artifacts, and deploy ships those very files."""

from __future__ import annotations

import json

import optuna
import pytest
from optuna.trial import TrialState
from sweeps import run_tiny_sweep

from dse.deploy.__main__ import main
from dse.deployed import sha256
from dse.metrics import DEPLOYED

QUICK = ["--runs", "5", "--warmup", "1"]
RECORDED = ("val_acc_onnx", "val_acc_int8", "test_acc_onnx", "test_acc_int8", "onnx_kb", "int8_kb")


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("deployed")
    storage, name = run_tiny_sweep(
        root, "+space=width", "space.grid={model.width:[0.125,0.25]}", "space.seeds=[0]", name="shipped"
    )
    return {
        "root": root,
        "storage": storage,
        "name": name,
        "study": optuna.load_study(study_name=name, storage=storage),
    }


def test_every_complete_trial_carries_the_deployed_metrics_and_its_onnx_files(swept):
    done = swept["study"].get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 2
    store = optuna.artifacts.FileSystemArtifactStore(str(swept["root"] / "shipped" / "artifacts"))
    for t in done:
        attrs = t.user_attrs
        assert all(0 <= attrs[m] <= 1 for m in RECORDED if m.endswith(("_onnx", "_int8")))
        assert attrs["onnx_kb"] > 0 and attrs["int8_kb"] > 0
        for what in ("onnx", "int8"):
            path = swept["root"] / f"{what}-{t.number}.onnx"
            optuna.artifacts.download_artifact(
                artifact_store=store, file_path=str(path), artifact_id=attrs[f"artifact_{what}"]
            )
            assert sha256(path) == attrs[f"{what}_sha256"]
            assert path.stat().st_size / 1e3 == attrs[f"{what}_kb"]
    assert set(RECORDED) <= set(DEPLOYED)


def test_deploy_export_ships_the_sweep_s_files_byte_for_byte_with_the_same_accuracies(swept):
    study = swept["study"]
    trial = study.get_trials(states=(TrialState.COMPLETE,))[0]
    out = swept["root"] / "bundle"
    assert (
        main(
            [
                "export",
                "--study",
                swept["name"],
                "--storage",
                swept["storage"],
                "--trial",
                str(trial.number),
                "--out",
                str(out),
                *QUICK,
            ]
        )
        == 0
    )
    meta = json.loads((out / "meta.json").read_text())
    assert meta["files"]["model.onnx"] == trial.user_attrs["onnx_sha256"]
    assert meta["files"]["model.int8.onnx"] == trial.user_attrs["int8_sha256"]
    assert meta["metrics"]["onnx_from_sweep"] is True and meta["metrics"]["onnx_max_abs_diff"] < 1e-4
    assert meta["metrics"]["fp32_acc"] == trial.user_attrs["test_acc_onnx"]
    assert meta["metrics"]["int8_acc"] == trial.user_attrs["test_acc_int8"]


def test_the_knob_turns_it_off(tmp_path):
    storage, name = run_tiny_sweep(
        tmp_path,
        "+space=width",
        "space.grid={model.width:[0.125]}",
        "space.seeds=[0]",
        "study.deployed=false",
        name="off",
    )
    (trial,) = optuna.load_study(study_name=name, storage=storage).get_trials()
    assert trial.state == TrialState.COMPLETE
    assert not {*RECORDED, "artifact_onnx", "artifact_int8"} & set(trial.user_attrs)


def test_trials_carry_their_architecture_s_onnx_runtime_latencies(swept):
    for t in swept["study"].get_trials(states=(TrialState.COMPLETE,)):
        for name in ("onnx", "int8"):
            assert t.user_attrs[f"latency_{name}_ms"] > 0 and t.user_attrs[f"latency_{name}_iqr_ms"] >= 0
            assert t.user_attrs[f"latency_{name}_clock"] in ("wall", "thread cpu time")


def test_deploy_list_draws_the_front_of_any_target(swept, capsys):
    args = ["list", "--study", swept["name"], "--storage", swept["storage"], "--format", "csv"]
    assert main([*args, "--target", "int8"]) == 0
    out = capsys.readouterr().out
    assert "(val_acc_int8, int8_kb, latency_int8_ms)" in out and "val_acc_int8_%" in out and "latency_onnx_ms" in out
    assert main([*args, "--target", "int9"]) == 2
    assert "target 'int9' is unknown; allowed: int8, onnx, paper" in capsys.readouterr().err


@pytest.mark.parametrize("how", [["target=int8"], ["study.objectives=[val_acc_int8,int8_kb,latency_int8_ms]"]])
def test_a_sweep_on_the_int8_figures_optimises_and_fronts_them(tmp_path, how):
    from dse.front import front_frame

    storage, name = run_tiny_sweep(
        tmp_path, "+space=width", "space.grid={model.width:[0.125,0.25]}", "space.seeds=[0]", *how, name="int8"
    )
    study = optuna.load_study(study_name=name, storage=storage)
    assert study.metric_names == ["val_acc_int8", "int8_kb", "latency_int8_ms"]
    done = study.get_trials(states=(TrialState.COMPLETE,))
    for t in done:
        assert t.values == [t.user_attrs["val_acc_int8"], t.user_attrs["int8_kb"], t.user_attrs["latency_int8_ms"]]
    front = front_frame(study)
    ours = [(t.user_attrs["val_acc_int8"], t.user_attrs["int8_kb"], t.user_attrs["latency_int8_ms"]) for t in done]
    dominated = [any(o != p and o[0] >= p[0] and o[1] <= p[1] and o[2] <= p[2] for o in ours) for p in ours]
    assert sorted(front["trial"]) == sorted(t.number for t, d in zip(done, dominated) if not d)


def test_the_report_shows_the_deployed_figures_and_marks_any_target_s_front(swept, tmp_path):
    import pandas as pd

    from dse.front import front_frame
    from dse.report.__main__ import main as report

    report(
        [
            "--study",
            swept["name"],
            "--storage",
            swept["storage"],
            "--out",
            str(tmp_path),
            "--format",
            "csv",
            "--target",
            "int8",
        ]
    )
    trials = pd.read_csv(tmp_path / swept["name"] / "trials.csv")
    for t in swept["study"].get_trials(states=(TrialState.COMPLETE,)):
        row = trials[trials["trial"] == t.number].iloc[0]
        assert row["val_acc_int8"] == pytest.approx(100 * t.user_attrs["val_acc_int8"])
        assert row["int8_kb"] == pytest.approx(t.user_attrs["int8_kb"])
        assert row["latency_onnx_ms"] == pytest.approx(t.user_attrs["latency_onnx_ms"])
    int8 = set(front_frame(swept["study"], ["val_acc_int8", "int8_kb", "latency_int8_ms"])["trial"])
    assert set(trials.loc[trials["front"], "trial"]) == int8
    assert (tmp_path / swept["name"] / "pareto.png").stat().st_size > 0
