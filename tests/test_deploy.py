"""dse.deploy on a tiny real study: the Pareto front and its filters, bundles whose ONNX Runtime logits match
PyTorch, int8 agreement, predict.py without torch or dse (and in a fresh venv), the RTMaps component driven
through its lifecycle, and refusal of bad trials, studies and tampered bundles."""

from __future__ import annotations

import ast
import importlib.util
import io
import json
import shutil
import sqlite3
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import optuna
import pandas as pd
import pytest
import torch
from optuna.trial import TrialState
from sweeps import run_tiny_sweep

from dse.config import DataConfig
from dse.data import load_data
from dse.deploy import (
    DeployError,
    ExportSettings,
    filter_front,
    front_frame,
    load_bundle_model,
    measure_shape,
    pick,
    verify_bundle,
)
from dse.deploy.__main__ import main
from dse.deploy.bundle import predict as runtime
from dse.deploy.export import build_bundle, check_against_torch, study_bundles
from dse.deploy.onnx import export_onnx, ort_logits, torch_logits
from dse.deploy.trial import find_trial, load_trial_data, load_trial_model
from dse.latency import ATTR, figures
from dse.models import ModelConfig, create_model
from dse.study import load_study

QUICK = ["--runs", "5", "--warmup", "1", "--calibration-images", "64"]
# The study attribute the report reads (Table 7): exactly these keys.
CONTRACT = {
    "trial",
    "paper_name",
    "fp32_acc",
    "int8_acc",
    "onnx_fp32_bytes",
    "onnx_int8_bytes",
    "latency_fp32_ms",
    "latency_int8_ms",
    "latency_how",
    "bundle",
}
SHIPPED = ("predict.py", "rtmaps_classifier.py", "bench_latency.py")
# Blocks torch and dse, then runs a bundle script as `python script.py args...`.
NO_TORCH = (
    "import runpy, sys; sys.modules.update(torch=None, dse=None); sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """Two trained widths (both COMPLETE, with checkpoints), plus a FAIL trial and a dominated COMPLETE
    trial without a checkpoint, for the refusals."""
    root = tmp_path_factory.mktemp("deploy")
    storage, name = run_tiny_sweep(
        root, "+space=width", "space.grid={model.width:[0.125,0.25]}", "space.seeds=[0]", "sweep.seeds=1", name="tiny"
    )
    study = optuna.load_study(study_name=name, storage=storage)
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL))
    study.add_trial(optuna.trial.create_trial(values=[0.0, 9.0, 99.0], user_attrs={"paper_name": "no checkpoint"}))
    trials = study.get_trials()
    return {
        "root": root,
        "storage": storage,
        "name": name,
        "args": ["--study", name, "--storage", storage],
        "failed": trials[-2].number,
        "no_checkpoint": trials[-1].number,
    }


@pytest.fixture(scope="module")
def front(tiny) -> Path:
    """`export --front`: one bundle per Pareto-front model, with index.md."""
    out = tiny["root"] / "front"
    assert main(["export", *tiny["args"], "--front", "--out", str(out), *QUICK]) == 0
    return out


@pytest.fixture(scope="module")
def bundle(tiny, front) -> Path:
    """The smallest front model's bundle."""
    study = load_study(tiny["name"], tiny["storage"])
    return Path(study.user_attrs[f"deploy:{pick(front_frame(study), 'smallest')}"]["bundle"])


def _study(tiny) -> optuna.Study:
    return load_study(tiny["name"], tiny["storage"])


def _script(bundle: Path, name: str, *args: str, python: str = sys.executable, block: bool = True, **kw):
    """Run a bundle script from outside the repository; with `block`, torch and dse cannot be imported."""
    command = [python, "-c", NO_TORCH] if block else [python]
    return subprocess.run(
        [*command, str(bundle / name), *args], capture_output=True, text=True, timeout=300, cwd=bundle.parent, **kw
    )


def _predict_json(bundle: Path, files: list[Path], *extra: str, **kw) -> list[dict]:
    result = _script(bundle, "predict.py", "--json", "--top", "99", *extra, *map(str, files), **kw)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _probabilities(entry: dict) -> np.ndarray:
    return np.array([t["probability"] for t in sorted(entry["top"], key=lambda t: t["class"])])


def _samples(bundle: Path) -> list[Path]:
    return [bundle / s["file"] for s in json.loads((bundle / "meta.json").read_text())["samples"]]


# ---------------------------------------------------------------------------------------------- the front


def test_list_prints_the_pareto_front_only(tiny, capsys):
    assert main(["list", *tiny["args"], "--format", "csv"]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out.split("\n", 1)[1]))
    best = {t.number for t in _study(tiny).best_trials}
    assert set(table["trial"]) == best and tiny["failed"] not in best and tiny["no_checkpoint"] not in best
    assert {"val_acc_%", "test_acc_%", "size_kb", "latency_ms", "params", "model"} <= set(table.columns)


def test_filters_and_picks_choose_from_the_front(tiny):
    frame = front_frame(_study(tiny))
    assert pick(frame, "smallest") == frame.loc[frame.size_kb.idxmin(), "trial"]
    assert pick(frame, "fastest") == frame.loc[frame.latency_ms.idxmin(), "trial"]
    assert frame.loc[frame.trial == pick(frame, "most-accurate"), "val_acc"].item() == frame.val_acc.max()
    small = filter_front(frame, max_size_kb=frame.size_kb.min())
    assert list(small.trial) == [frame.loc[frame.size_kb.idxmin(), "trial"]]
    assert len(filter_front(frame, max_latency_ms=frame.latency_ms.max(), min_accuracy=frame.val_acc.min())) == len(
        frame
    )
    with pytest.raises(DeployError, match="no model of the Pareto front meets max_size_kb=1"):
        filter_front(frame, max_size_kb=1)
    with pytest.raises(DeployError, match=r"min_accuracy=80 must be in \(0, 1\]"):
        filter_front(frame, min_accuracy=80)


# ---------------------------------------------------------------------------------------------- the bundle


def test_front_export_writes_bundles_tars_index_and_study_records(tiny, front):
    study = _study(tiny)
    best = sorted(t.number for t in study.best_trials)
    records = {int(k.split(":")[1]): v for k, v in study.user_attrs.items() if k.startswith("deploy:")}
    assert sorted(records) == best
    index = (front / "index.md").read_text()
    for number, record in records.items():
        assert set(record) == CONTRACT and record["trial"] == number
        folder = Path(record["bundle"])
        assert folder.parent == front and folder.name in index
        meta = verify_bundle(folder)
        assert (
            meta["metrics"]["onnx_int8_bytes"]
            == (folder / "model.int8.onnx").stat().st_size
            == record["onnx_int8_bytes"]
        )
        with tarfile.open(folder.with_name(folder.name + ".tar.gz")) as tar:
            packed = {n.removeprefix(folder.name + "/") for n in tar.getnames() if tar.getmember(n).isfile()}
        assert packed == {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        assert set(meta["files"]) | {"meta.json", "SHA256SUMS"} == packed


def test_meta_describes_model_input_classes_and_runtime(tiny, bundle):
    meta = json.loads((bundle / "meta.json").read_text())
    trial = find_trial(_study(tiny), meta["trial"])
    splits = load_trial_data(trial)
    assert meta["paper_name"] == trial.user_attrs["paper_name"]
    assert meta["config"] == trial.user_attrs["provenance"]["config"]
    assert meta["input"]["shape"] == [1, 3, 32, 32] and meta["classes"] == splits.classes
    assert meta["input"]["mean"] == list(splits.mean) and meta["input"]["std"] == list(splits.std)
    assert meta["onnx"]["opset"] >= 17 and meta["requires"]["onnxruntime"].startswith(">=")
    assert all(meta["files"][name] == runtime.sha256(str(bundle / name)) for name in meta["files"])
    assert {"latency_how", "latency_fp32_ms", "latency_int8_ms", "int8_agreement"} <= set(meta["metrics"])
    assert (
        "1 intra-op thread" in meta["metrics"]["latency_how"] and "median of 5 runs" in meta["metrics"]["latency_how"]
    )


def test_onnx_runtime_fp32_logits_match_pytorch_on_test_images(tiny, bundle):
    meta = json.loads((bundle / "meta.json").read_text())
    study = _study(tiny)
    trial = find_trial(study, meta["trial"])
    splits = load_trial_data(trial)
    model, _ = load_trial_model(study, trial, storage=tiny["storage"], workdir=None, num_classes=10, in_channels=3)
    images = splits.test_x[:32]
    sess = runtime.cpu_session(str(bundle / "model.onnx"))
    onnx_logits = ort_logits(sess, images, splits.mean, splits.std)
    assert np.abs(onnx_logits - torch_logits(model, images, splits.mean, splits.std)).max() < 1e-4
    rebuilt = load_bundle_model(bundle)  # config.json + weights.safetensors, with dse
    assert np.abs(onnx_logits - torch_logits(rebuilt, images, splits.mean, splits.std)).max() < 1e-4
    assert meta["metrics"]["onnx_max_abs_diff"] < 1e-4
    fp32_acc = (ort_logits(sess, splits.test_x, splits.mean, splits.std).argmax(1) == splits.test_y.numpy()).mean()
    assert meta["metrics"]["fp32_acc"] == fp32_acc
    assert abs(fp32_acc - trial.user_attrs["test_acc"]) <= 1 / len(splits.test_y)  # PyTorch's own test score


def test_int8_model_is_quantized_and_its_agreement_reported(tiny, bundle):
    meta = json.loads((bundle / "meta.json").read_text())
    splits = load_trial_data(find_trial(_study(tiny), meta["trial"]))
    graph = onnx.load(str(bundle / "model.int8.onnx")).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.node}
    assert any(t.data_type == onnx.TensorProto.INT8 for t in graph.initializer)
    m = meta["metrics"]
    assert m["onnx_int8_weight_bytes"] < m["onnx_fp32_weight_bytes"]
    fp32 = ort_logits(runtime.cpu_session(str(bundle / "model.onnx")), splits.test_x, splits.mean, splits.std).argmax(1)
    int8 = ort_logits(
        runtime.cpu_session(str(bundle / "model.int8.onnx")), splits.test_x, splits.mean, splits.std
    ).argmax(1)
    assert m["int8_agreement"] == (fp32 == int8).mean() and m["int8_acc"] == (int8 == splits.test_y.numpy()).mean()


# ---------------------------------------------------------------------------------------------- the shipped files


def test_shipped_files_import_only_numpy_onnxruntime_pillow_and_parse_on_python_3_8(bundle):
    allowed = set(sys.stdlib_module_names) | {"numpy", "onnxruntime", "PIL", "rtmaps", "predict"}
    for name in SHIPPED:
        tree = ast.parse((bundle / name).read_text(), feature_version=(3, 8))
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert imported <= allowed, f"{name} imports {imported - allowed}"


def test_predict_runs_without_torch_or_dse(bundle):
    meta = json.loads((bundle / "meta.json").read_text())
    files = _samples(bundle)
    got = _predict_json(bundle, files)
    sess = runtime.cpu_session(str(bundle / "model.onnx"))
    for entry, sample in zip(got, meta["samples"]):
        probs = runtime.softmax(runtime.run(sess, runtime.to_model_input(runtime.load_image(entry["file"]), meta)))[0]
        assert entry["top"][0]["class"] == sample["fp32_class"] == int(probs.argmax())
        assert np.allclose(_probabilities(entry), probs, rtol=1e-6)
    selftest = _script(bundle, "predict.py", "--selftest")
    assert selftest.returncode == 0 and f"fp32: {len(files)}/{len(files)}" in selftest.stdout
    bench = _script(bundle, "bench_latency.py", "--runs", "3", "--warmup", "0")
    assert bench.returncode == 0 and "fp32" in bench.stdout and "int8" in bench.stdout, bench.stderr


# ---------------------------------------------------------------------------------------------- RTMaps


def fake_rtmaps() -> dict[str, ModuleType]:
    """A small stand-in for RTMaps' Python API: `rtmaps.types` (type tags, Ioelt, IplImage),
    `rtmaps.core` (report_*), `rtmaps.base_component.BaseComponent` (add_input/add_output/add_property,
    inputs[...].ioelt, outputs[...].write, properties[...].data, ENUM properties as their index).
    RTMaps itself is proprietary and cannot be installed here, so this is what drives the component."""
    types = ModuleType("rtmaps.types")
    for tag in ("ANY", "AUTO", "INTEGER64", "FLOAT64", "IPL_IMAGE", "ENUM", "MATRIX"):
        setattr(types, tag, tag)

    class Ioelt:
        def __init__(self, data=None, ts=0):
            self.data, self.ts = data, ts

    class IplImage:
        def __init__(self, image_data, channel_seq="RGB", color_model="COLR"):
            self.image_data, self.channel_seq, self.color_model = image_data, channel_seq, color_model

    types.Ioelt, types.IplImage = Ioelt, IplImage
    core = ModuleType("rtmaps.core")
    core.reports = []
    core.report_info = lambda message: core.reports.append(("info", message))
    core.report_warning = lambda message: core.reports.append(("warning", message))
    core.report_error = lambda message: core.reports.append(("error", message))

    class Port:
        def __init__(self, kind, size=1):
            self.kind, self.size, self.ioelt, self.written = kind, size, None, []

        def write(self, element):
            self.written.append(element)

    class Property:
        def __init__(self, data):
            self.data = data

    class BaseComponent:
        def __init__(self):
            self.inputs, self.outputs, self.properties = {}, {}, {}

        def add_input(self, name, kind):
            self.inputs.setdefault(name, Port(kind))

        def add_output(self, name, kind, buffer_size=1):
            self.outputs[name] = Port(kind, buffer_size)

        def add_property(self, name, value, kind=None):
            if kind == "ENUM":  # "count|default index|option|..." -> the selected index
                value = int(value.split("|")[1])
            self.properties.setdefault(name, Property(value))  # Dynamic runs again: the user's value stays

    base = ModuleType("rtmaps.base_component")
    base.BaseComponent = BaseComponent
    package = ModuleType("rtmaps")
    package.types, package.core, package.base_component = types, core, base
    return {"rtmaps": package, "rtmaps.types": types, "rtmaps.core": core, "rtmaps.base_component": base}


@pytest.fixture
def component(monkeypatch):
    """Load a bundle's rtmaps_classifier.py under the stand-in API; returns (module, rtmaps modules)."""
    modules = fake_rtmaps()
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "predict", raising=False)

    def load(bundle: Path) -> ModuleType:
        spec = importlib.util.spec_from_file_location("rtmaps_classifier", bundle / "rtmaps_classifier.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    yield load, modules
    sys.modules.pop("predict", None)


def _frame(image: np.ndarray, factor: int, rng: np.random.Generator) -> np.ndarray:
    """A larger, wider camera-like frame: the image scaled up, with noise bands left and right."""
    big = np.kron(image, np.ones((factor, factor, 1), dtype=np.uint8))
    band = rng.integers(0, 256, (big.shape[0], factor * 4, 3), dtype=np.uint8)
    return np.concatenate([band, big, band], axis=1)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_rtmaps_component_lifecycle_emits_what_predict_prints(bundle, component, tmp_path, precision):
    """RTMaps is proprietary and not installable here, so `fake_rtmaps()` stands in for its Python API and
    drives the component as RTMaps would: Dynamic (twice), Birth, Core per BGR camera-sized frame, Death.
    Every class, label and probability vector must equal what predict.py prints for the same frame."""
    from PIL import Image

    load, modules = component
    rtmaps = modules["rtmaps"]
    rng = np.random.default_rng(0)
    frames = [_frame(runtime.load_image(str(p)), 3, rng) for p in _samples(bundle)]
    files = []
    for i, frame in enumerate(frames):
        files.append(tmp_path / f"frame{i}.png")
        Image.fromarray(frame).save(files[-1])
    expected = _predict_json(bundle, files, *(["--int8"] if precision == "int8" else []))

    comp = load(bundle).rtmaps_python()
    comp.Dynamic()
    assert set(comp.inputs) == {"image"} and set(comp.outputs) == {"class_id", "label", "scores"}
    assert comp.outputs["scores"].size == 10
    comp.properties["precision"].data = ("fp32", "int8").index(precision)  # as set in RTMaps Studio
    comp.Dynamic()  # RTMaps calls it again when a wire changes: properties keep their values
    comp.Birth()
    assert comp.session is not None and rtmaps.core.reports[-1][0] == "info"
    for i, frame in enumerate(frames):
        bgr = rtmaps.types.IplImage(np.ascontiguousarray(frame[:, :, ::-1]), channel_seq="BGR")
        comp.inputs["image"].ioelt = rtmaps.types.Ioelt(bgr, ts=1000 * i)
        comp.Core()
    comp.Death()
    assert comp.session is None
    written = {name: port.written for name, port in comp.outputs.items()}
    assert [e.data for e in written["class_id"]] == [r["top"][0]["class"] for r in expected]
    assert [e.data for e in written["label"]] == [r["top"][0]["name"] for r in expected]
    for element, entry in zip(written["scores"], expected):
        assert np.allclose(element.data, _probabilities(entry), rtol=1e-6)
    assert all([e.ts for e in port] == [1000 * i for i in range(len(frames))] for port in written.values())


def test_tampered_bundle_is_refused_everywhere(bundle, component, tmp_path):
    copy = tmp_path / bundle.name
    shutil.copytree(bundle, copy)
    with open(copy / "model.onnx", "ab") as f:
        f.write(b"\0")
    result = subprocess.run([sys.executable, "-m", "dse.deploy", "verify", str(copy)], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "model.onnx was changed" in result.stderr
    predicted = _script(copy, "predict.py", str(copy / "samples" / Path(_samples(bundle)[0]).name))
    assert predicted.returncode == 2 and "model.onnx was changed after export" in predicted.stderr
    load, modules = component
    comp = load(copy).rtmaps_python()
    comp.Dynamic()
    with pytest.raises(Exception, match="model.onnx was changed"):
        comp.Birth()
    assert modules["rtmaps.core"].reports[-1][0] == "error" and comp.session is None
    shutil.copyfile(bundle / "model.onnx", copy / "model.onnx")
    meta = json.loads((copy / "meta.json").read_text())
    meta["input"]["mean"] = [0.0, 0.0, 0.0]
    (copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DeployError, match="meta.json was changed"):
        verify_bundle(copy)


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("case", ["failed", "no_checkpoint", "unknown", "unknown_study", "no_db", "trial_and_filter"])
def test_bad_exports_are_refused_with_one_line(tiny, tmp_path, capsys, case):
    args, message = {
        "failed": (["--trial", str(tiny["failed"])], f"trial {tiny['failed']} of study 'tiny' is FAIL, not COMPLETE"),
        "no_checkpoint": (["--trial", str(tiny["no_checkpoint"])], "has no checkpoint"),
        "unknown": (["--trial", "99"], "study 'tiny' has no trial 99; its trials are 0..3"),
        "unknown_study": (["--trial", "0", "--study", "nope"], "no study 'nope' in"),
        "no_db": (["--trial", "0", "--storage", f"sqlite:///{tmp_path}/none.db"], "no study DB at"),
        "trial_and_filter": (["--trial", "0", "--max-size-kb", "100"], "--max-size-kb only filter the front"),
    }[case]
    assert main(["export", *tiny["args"], *args, "--out", str(tmp_path / "b"), *QUICK]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("dse.deploy: error: ")
    assert not (tmp_path / "b").exists()


def test_pick_export_keeps_an_existing_bundle_unless_forced(tiny, tmp_path, capsys):
    out = tmp_path / "picked"
    study = _study(tiny)
    frame = front_frame(study)
    assert (
        main(
            [
                "export",
                *tiny["args"],
                "--pick",
                "most-accurate",
                "--min-accuracy",
                str(frame.val_acc.max()),
                "--out",
                str(out),
                *QUICK,
            ]
        )
        == 0
    )
    number = pick(filter_front(frame, min_accuracy=frame.val_acc.max()), "most-accurate")
    assert _study(tiny).user_attrs[f"deploy:{number}"]["bundle"] == str(out.resolve())
    first = (out / "meta.json").read_text()
    assert main(["export", *tiny["args"], "--trial", str(number), "--out", str(out), *QUICK]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err and (out / "meta.json").read_text() == first
    assert main(["export", *tiny["args"], "--trial", str(number), "--out", str(out), "--force", *QUICK]) == 0
    assert verify_bundle(out)["export"]["exported_at"] >= json.loads(first)["export"]["exported_at"]
    assert not list(tmp_path.glob(".picked*"))  # no temporary folder left behind
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["export", *tiny["args"], "--trial", str(number), "--out", str(other), "--force", *QUICK]) == 2
    assert "no bundle" in capsys.readouterr().err and (other / "keep.txt").read_text() == "mine"


def test_preprocessing_converts_channels_crops_and_resizes():
    meta = {"input": {"shape": [1, 1, 2, 2], "mean": [0.0], "std": [1 / 255]}}  # x/255 -> back to 0-255 units
    rgb = np.zeros((4, 6, 3), dtype=np.uint8)
    rgb[:, 1:5] = [100, 200, 50]  # the centred 4x4 square; the outer columns are cropped away
    x = runtime.to_model_input(rgb, meta)
    luma = 0.299 * 100 + 0.587 * 200 + 0.114 * 50
    assert x.shape == (1, 1, 2, 2) and np.allclose(x, round(luma), atol=1e-3)
    assert np.allclose(runtime.to_model_input(rgb[:, :, ::-1], meta, "BGR"), x)
    ramp = np.arange(16, dtype=np.uint8).reshape(4, 4, 1)
    assert np.allclose(runtime.resize_area(ramp, 2, 2)[:, :, 0], [[2.5, 4.5], [10.5, 12.5]])  # 2x2 block means
    with pytest.raises(runtime.BundleError, match="uint8"):
        runtime.to_model_input(rgb.astype(np.float32), meta)


def test_measure_reports_sizes_and_latencies_of_an_untrained_shape():
    row = measure_shape(
        "Shallow SqueezeNext-06-0.125x", settings=ExportSettings(runs=2, warmup=0, calibration_images=8)
    )
    assert row["model"] == "Shallow SqueezeNext-06-0.125x"
    assert row["int8_weight_bytes"] < row["fp32_weight_bytes"] < row["fp32_bytes"]
    assert row["fp32_ms"] > 0 and row["int8_ms"] > 0 and "median of 2 runs" in row["latency_how"]


# ---------------------------------------------------------------------------------------------- latency


def test_list_warns_of_latency_under_load_and_measure_front_remeasures(tiny, tmp_path, capsys):
    copy = tmp_path / "copy.db"  # the other tests keep the study's own figures
    with sqlite3.connect(tiny["storage"].removeprefix("sqlite:///")) as source, sqlite3.connect(copy) as target:
        source.backup(target)  # the WAL journal's pages too
    args = ["--study", tiny["name"], "--storage", f"sqlite:///{copy}"]
    study = load_study(tiny["name"], f"sqlite:///{copy}")
    before = figures(study.user_attrs)
    for key, figure in before.items():
        study.set_user_attr(ATTR + key, {**figure, "under_load": True})
    assert main(["list", *args]) == 0
    err = capsys.readouterr().err
    front = front_frame(study)
    assert front["under_load"].all() and "was measured under load" in err
    assert f"python -m dse.deploy measure --study {tiny['name']} --front" in err
    assert main(["measure", *args, "--front", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    keys = {t.user_attrs["latency_key"] for t in study.trials if t.number in set(front["trial"])}
    assert f"re-measured {len(keys)} architecture(s) of the front in one sitting" in out
    after = figures(load_study(tiny["name"], f"sqlite:///{copy}").user_attrs)
    assert set(after) == set(before)
    for key in after:
        assert after[key]["how"].startswith("python -m dse.deploy measure --front") and after[key]["ms"] > 0
    assert main(["measure"]) == 2 and "measure takes model NAMES, or --study S --front" in capsys.readouterr().err


def test_bundles_land_in_bundles_of_the_study_name(tiny, tmp_path, monkeypatch):
    assert study_bundles("width-fashion_mnist-quick") == Path("bundles/width-fashion_mnist-quick")
    assert study_bundles("a/../b c") == Path("bundles/a-b-c")
    monkeypatch.chdir(tmp_path)
    assert main(["export", *tiny["args"], "--pick", "smallest", *QUICK]) == 0
    (bundle,) = [p for p in (tmp_path / "bundles" / tiny["name"]).iterdir() if p.is_dir()]
    assert verify_bundle(bundle)["study"] == tiny["name"]


# ---------------------------------------------------------------------------------------------- fresh venv


@pytest.mark.slow
def test_predict_runs_in_a_fresh_venv_with_only_numpy_onnxruntime_pillow(bundle, tmp_path):
    """The issue's acceptance: a new venv that gets only numpy, onnxruntime and pillow from PyPI (the one
    test that needs the package index) runs predict.py, its self-test and the latency benchmark."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    pip = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "numpy", "onnxruntime", "pillow"],
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert pip.returncode == 0, pip.stderr[-3000:]
    check = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True)
    assert check.returncode != 0 and "No module named 'torch'" in check.stderr
    files = _samples(bundle)
    ours = _predict_json(bundle, files)
    theirs = _predict_json(bundle, files, python=python, block=False)
    assert [r["top"][0]["class"] for r in theirs] == [r["top"][0]["class"] for r in ours]
    for a, b in zip(theirs, ours):
        assert np.allclose(_probabilities(a), _probabilities(b), rtol=1e-5)
    assert _script(bundle, "predict.py", "--selftest", python=python, block=False).returncode == 0
    bench = _script(bundle, "bench_latency.py", "--runs", "3", python=python, block=False)
    assert bench.returncode == 0, bench.stderr


class _Drifting(torch.nn.Module):
    """A model whose PyTorch outputs move after every call, so the ONNX file traced from it disagrees with it."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1  # traced as a constant: the ONNX graph keeps the first call's offset
        return self.inner(x) + self.calls


def _parity_case(fake_data, tmp_path):
    splits = load_data(DataConfig(name="cifar10", root=str(fake_data("cifar10").root), val_size=50))
    torch.manual_seed(0)
    model = create_model("shallow_squeezenext", blocks=[1, 1, 1, 1], width=0.125, num_classes=10, in_channels=3)
    return splits, model.eval(), ExportSettings(runs=5, warmup=1, calibration_images=16, check_images=8)


def test_an_onnx_file_altered_after_writing_is_refused(fake_data, tmp_path):
    splits, model, settings = _parity_case(fake_data, tmp_path)
    path = tmp_path / "model.onnx"
    export_onnx(model, path, tuple(splits.test_x.shape[1:]))
    assert check_against_torch(model, path, splits, settings) < settings.atol
    graph = onnx.load(str(path))
    weight = graph.graph.initializer[0]
    values = onnx.numpy_helper.to_array(weight) * 1.5
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    onnx.save(graph, str(path))
    with pytest.raises(DeployError, match="ONNX Runtime's fp32 logits differ from PyTorch's by .* more than atol"):
        check_against_torch(model, path, splits, settings)


def test_a_bundle_whose_onnx_disagrees_with_its_model_is_not_written(fake_data, tmp_path):
    splits, model, settings = _parity_case(fake_data, tmp_path)
    folder = tmp_path / "bundle"
    folder.mkdir()
    cfg = ModelConfig(name="shallow_squeezenext", blocks=[1, 1, 1, 1], width=0.125)
    with pytest.raises(DeployError, match="differ from PyTorch's"):
        build_bundle(folder, _Drifting(model), cfg, splits, settings, header={})
    assert not (folder / "meta.json").exists()


# ---------------------------------------------------------------------------------------------- verify an archive


def test_verify_accepts_the_archive_export_wrote(bundle, tmp_path, capsys):
    archive = bundle.with_name(bundle.name + ".tar.gz")
    assert main(["verify", str(archive)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{archive}: ") and "files match SHA256SUMS and meta.json" in out
    assert verify_bundle(archive) == verify_bundle(bundle)
    tampered = tmp_path / archive.name
    with tarfile.open(archive) as src, tarfile.open(tampered, "w:gz") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else None
            if member.name.endswith("/model.onnx"):
                data += b"\0"
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    with pytest.raises(DeployError, match=r"model\.onnx was changed"):
        verify_bundle(tampered)


def _fake_bundle(folder: Path) -> Path:
    """A bundle folder with one file, meta.json and SHA256SUMS as export writes them (no model in it)."""
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"not really onnx")
    files = {"model.onnx": runtime.sha256(str(folder / "model.onnx"))}
    (folder / runtime.META).write_text(json.dumps({"files": files, "paper_name": "x", "trial": 0, "study": "s"}))
    sums = dict(files, **{runtime.META: runtime.sha256(str(folder / runtime.META))})
    (folder / runtime.SUMS).write_text("".join(f"{sums[n]}  {n}\n" for n in sorted(sums)))
    return folder


def _archive(path: Path, folder: Path, *extra: tarfile.TarInfo) -> Path:
    """folder as path (.tar.gz), then the `extra` members (empty files, links)."""
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
        for member in extra:
            tar.addfile(member, io.BytesIO(b"") if member.isfile() else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize(
    "member, message",
    [
        (_member("b/../../escaped"), r"member 'b/\.\./\.\./escaped' is an absolute path or climbs out with '\.\.'"),
        (_member("/tmp/dse-absolute"), r"member '/tmp/dse-absolute' is an absolute path"),
        (
            _member("b/passwd", tarfile.SYMTYPE, "/etc/passwd"),
            r"member 'b/passwd' is a link; a bundle archive holds files",
        ),
        (_member("b/hard", tarfile.LNKTYPE, "b/model.onnx"), r"member 'b/hard' is a link"),
        (_member("b/fifo", tarfile.FIFOTYPE), r"member 'b/fifo' is not a file or a folder"),
    ],
)
def test_verify_refuses_an_archive_that_could_write_outside_its_folder(tmp_path, capsys, member, message):
    archive = _archive(tmp_path / "b.tar.gz", _fake_bundle(tmp_path / "b"), member)
    with pytest.raises(DeployError, match=message):
        verify_bundle(archive)
    assert main(["verify", str(archive)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dse.deploy: error: ") and err.count("\n") == 1
    assert not (tmp_path.parent / "escaped").exists() and not Path("/tmp/dse-absolute").exists()


def test_verify_checks_a_hand_made_archive_and_names_it_in_errors(tmp_path):
    folder = _fake_bundle(tmp_path / "b")
    assert verify_bundle(_archive(tmp_path / "b.tar.gz", folder))["study"] == "s"
    (folder / "SHA256SUMS").unlink()
    with pytest.raises(DeployError) as refused:
        verify_bundle(_archive(tmp_path / "c.tar.gz", folder))
    assert str(refused.value) == f"{tmp_path / 'c.tar.gz'} is not a bundle: it has no SHA256SUMS"
    (tmp_path / "garbage.tar.gz").write_bytes(b"not an archive")
    with pytest.raises(DeployError, match=r"garbage\.tar\.gz is neither a bundle folder nor a readable bundle archive"):
        verify_bundle(tmp_path / "garbage.tar.gz")


def test_a_missing_study_db_names_the_studies_there_and_the_closest(tmp_path, monkeypatch, capsys):
    (tmp_path / "studies").mkdir()
    for name in ("width-fashion_mnist-quick", "baselines-cifar10-quick"):
        (tmp_path / "studies" / f"{name}.db").touch()
    monkeypatch.chdir(tmp_path)
    assert main(["list", "--study", "width-fashion_mnist-quik"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dse.deploy: error: no study DB at studies/width-fashion_mnist-quik.db")
    assert (
        "studies in studies/: baselines-cifar10-quick, width-fashion_mnist-quick; did you mean width-fashion_mnist-quick?"
        in err
    )


def test_a_study_whose_trials_were_all_pruned_says_why_in_list_and_export(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'tiny.db'}"
    study = optuna.create_study(study_name="tiny", storage=url, directions=["maximize", "minimize", "minimize"])
    for kb in (233.4, 75.5):
        trial = study.ask()
        trial.set_user_attr("size_mb", kb / 1e3)
        trial.set_user_attr("pruned_reason", f"over budget: size {kb} KB > 1 KB")
        study.tell(trial, state=TrialState.PRUNED)
    for command in (["list"], ["export", "--pick", "smallest"]):
        assert main([*command, "--study", "tiny", "--storage", url]) == 2
        assert capsys.readouterr().err == (
            "dse.deploy: error: study 'tiny' has no COMPLETE trial, so no Pareto front: "
            "all 2 trials pruned: over budget (size 75.5 KB > 1 KB)\n"
        )
