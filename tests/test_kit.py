"""A latency kit: the architectures of a grid space and a calibration draw of a sampled one, a self-contained folder
(graphs, manifest, runner, README), and its runner: a fresh process per graph, rounds, median/IQR, the machine
recorded, resumed after an interruption, with neither torch nor dse."""

from __future__ import annotations

import json
import statistics

import onnx
import pytest
from latency_kits import run_kit

from dse.identity import architecture
from dse.kit import (
    KIT_FORMAT,
    MANIFEST,
    KitError,
    grid_architectures,
    kit_id,
    sample_architectures,
    write_kit,
)
from dse.models import ModelConfig
from dse.predict import graph_features

TEMPLATE = architecture(ModelConfig(name="shallow_squeezenext", blocks=[1, 1, 1, 1], width=0.125), (1, 16, 16), 4)[1]
OPEN = {
    "sampler": "nsga2",
    "search": {
        "model.blocks": {"choices": [[1, 1, 1, 1], [1, 2, 2, 1]]},
        "model.width": {"low": 0.125, "high": 0.5, "log": True},
        "model.dropout": {"low": 0.1, "high": 0.5},
        "model.activation": {"choices": ["elu", "relu"]},
        "train.lr": {"low": 0.001, "high": 0.1},
    },
}


def test_a_grid_space_gives_each_model_cell_once_on_the_template():
    archs = grid_architectures(TEMPLATE, {"grid": {"model.width": [0.125, 0.25, 0.5], "model.dropout": [0.1, 0.2]}})
    assert len(archs) == 3  # dropout is no part of the inference graph
    assert sorted(s["model"]["width"] for s in archs.values()) == [0.125, 0.25, 0.5]
    assert all(s["input_shape"] == [1, 16, 16] and s["model"]["blocks"] == [1, 1, 1, 1] for s in archs.values())


def test_a_space_file_s_model_overrides_hold_for_all_its_architectures():
    deeper = architecture(ModelConfig(name="shallow_squeezenext", blocks=[1, 2, 2, 1]), (1, 16, 16), 4)[1]
    space = {"overrides": ["model=shallow_squeezenext", "model.blocks=[1,1,1,1]"], "grid": {"model.width": [0.2]}}
    [spec] = grid_architectures(deeper, space).values()
    assert spec["model"]["blocks"] == [1, 1, 1, 1] and spec["model"]["width"] == 0.2


def test_a_sampled_space_draws_distinct_architectures_reproducibly_within_its_ranges():
    archs = sample_architectures(TEMPLATE, OPEN, 8, seed=3)
    assert len(archs) == 8 and archs == sample_architectures(TEMPLATE, OPEN, 8, seed=3)
    assert archs != sample_architectures(TEMPLATE, OPEN, 8, seed=4)
    for spec in archs.values():
        assert 0.125 <= spec["model"]["width"] <= 0.5 and spec["model"]["activation"] in ("elu", "relu")
    mine = next(iter(archs))
    assert mine not in sample_architectures(TEMPLATE, OPEN, 8, seed=3, exclude=frozenset({mine}))


def test_a_space_too_small_for_the_calibration_or_of_no_model_knob_is_refused():
    few = {"search": {"model.activation": {"choices": ["elu", "relu"]}}}
    with pytest.raises(KitError, match="calibration=3: the space holds only 2"):
        sample_architectures(TEMPLATE, few, 3)
    with pytest.raises(KitError, match="searches no model"):
        sample_architectures(TEMPLATE, {"search": {"train.lr": {"low": 0.1, "high": 0.2}}}, 3)
    with pytest.raises(KitError, match="'model.depth' is no model knob"):
        grid_architectures(TEMPLATE, {"grid": {"model.depth": [1, 2]}})


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    out = tmp_path_factory.mktemp("kit") / "kit"
    sets = {
        "study": dict([architecture(ModelConfig(**TEMPLATE["model"]), (1, 16, 16), 4)]),
        "calibration": sample_architectures(TEMPLATE, OPEN, 2),
    }
    manifest = write_kit(out, sets, study="s", definition_sha256="abc")
    return out, manifest


def test_the_kit_holds_both_precisions_of_every_architecture_and_everything_the_runner_needs(kit):
    out, manifest = kit
    assert manifest["format"] == KIT_FORMAT and json.loads((out / MANIFEST).read_text()) == manifest
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "graphs",
        "kit.json",
        "latency_runner.py",
        "predict.py",
    ]
    archs = {g["architecture"] for g in manifest["graphs"]}
    assert len(archs) == 3 and len(manifest["graphs"]) == 6 and manifest["kit"] == kit_id("s", list(archs))
    assert [g["set"] for g in manifest["graphs"]] == ["study"] * 2 + ["calibration"] * 4
    for g in manifest["graphs"]:
        model = onnx.load(out / g["file"])
        quantized = any(n.op_type == "QuantizeLinear" for n in model.graph.node)
        assert quantized == (g["precision"] == "int8")


def test_the_reference_every_run_is_paired_with_is_the_architecture_of_median_macs(kit):
    out, manifest = kit
    fp32 = {g["id"]: g for g in manifest["graphs"] if g["precision"] == "fp32"}
    macs = {i: graph_features(onnx.load(out / g["file"]))["macs"] for i, g in fp32.items()}
    assert len(set(macs.values())) == 3 and manifest["reference"]["fp32"] == sorted(macs, key=macs.get)[1]
    reference = fp32[manifest["reference"]["fp32"]]["architecture"]
    assert {g["architecture"] for g in manifest["graphs"] if g["id"] in manifest["reference"].values()} == {reference}


def test_an_existing_kit_folder_is_kept_unless_forced(kit):
    out, _ = kit
    with pytest.raises(KitError, match="exists; pass --force"):
        write_kit(out, {}, study="s", definition_sha256=None)


def test_the_runner_times_every_graph_in_rounds_without_torch_or_dse_and_resumes(kit, tmp_path):
    out, manifest = kit
    results = tmp_path / "latency.json"
    run_kit(out, "--out", str(results))
    data = json.loads(results.read_text())
    assert data["complete"] and data["kit"]["kit"] == manifest["kit"]
    assert {"cpu", "cores", "onnxruntime", "python"} <= set(data["machine"])
    assert set(data["graphs"]) == {g["id"] for g in manifest["graphs"]}
    for g in data["graphs"].values():
        assert len(g["rounds"]) == 2 and g["runs"] == 2 and g["ms"] > 0 and g["iqr_ms"] >= 0
        first = g["rounds"][0]
        assert len(first["times_ms"]) == len(first["cpu_times_ms"]) == len(first["reference_times_ms"]) == 1
        assert "load_before" in first and g["wall_ms"] > 0 and g["cpu_ms"] > 0
        # the figure: the median ratio to the reference's paired runs, at the reference's median over the whole run
        reference = data["reference"][g["precision"]]
        ratios = [t / r for x in g["rounds"] for t, r in zip(x["times_ms"], x["reference_times_ms"])]
        assert g["ratio"] == pytest.approx(statistics.median(ratios))
        assert g["ms"] == pytest.approx(g["ratio"] * reference["ms"])
    for precision, reference in data["reference"].items():
        paired = [
            t
            for g in data["graphs"].values()
            if g["precision"] == precision
            for x in g["rounds"]
            for t in x["reference_times_ms"]
        ]
        assert reference["graph"] == manifest["reference"][precision] and reference["ms"] == statistics.median(paired)
    # an interruption after the first round of the last graph: the rerun times that one round only
    last = manifest["graphs"][-1]["id"]
    data["graphs"][last]["rounds"].pop()
    data["complete"] = False
    results.write_text(json.dumps(data))
    again = run_kit(out, "--out", str(results))
    assert again.stdout.count(" ms ") == 1 and last in again.stdout
    resumed = json.loads(results.read_text())
    assert resumed["complete"] and len(resumed["graphs"][last]["rounds"]) == 2
    # the other graphs keep their timings; their figures follow the reference's median, which the new round moved
    assert all(resumed["graphs"][k]["rounds"] == v["rounds"] for k, v in data["graphs"].items() if k != last)
