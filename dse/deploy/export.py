"""Export a trial's checkpoint as a deployment bundle: fp32 ONNX checked against PyTorch, static int8,
both measured under ONNX Runtime (test accuracy, batch-1 latency), the PyTorch weights, meta.json, the
runtime files, SHA256SUMS and a .tar.gz; the metrics are recorded on the study as `deploy:<trial>`."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import platform
import re
import shutil
import socket
import string
import tarfile
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
import onnx
import onnxruntime as ort
import optuna
import safetensors
import sqlalchemy
import torch
import torch.nn as nn
from onnxruntime.quantization import CalibrationDataReader
from optuna.trial import TrialState
from safetensors.torch import load_file, save_file

import dse
from dse.checkpoint import load_model_state
from dse.data import DataConfig, Splits, batches, load_data
from dse.deploy.bundle import predict as runtime
from dse.deploy.front import DeployError
from dse.measure import median_iqr, time_calls
from dse.models import ModelConfig, build_model, config_from_name, paper_name, resolve_config
from dse.storage import open_storage
from dse.study import study_workdir

__all__ = [
    "ExportSettings",
    "export_trial",
    "export_front",
    "load_bundle_model",
    "measure_shape",
    "verify_bundle",
    "write_index",
]

FORMAT = "dse.deploy/1"
TEMPLATES = Path(__file__).resolve().parent / "bundle"
RUNTIME_FILES = ("predict.py", "rtmaps_classifier.py", "bench_latency.py")
OPSET = 17
INPUT, OUTPUT = "image", "logits"
# The first ONNX Runtime release implementing an ONNX opset / IR version, from the version table of
# https://onnxruntime.ai/docs/reference/compatibility.html. The bundle files themselves parse with Python 3.8.
ORT_FOR_OPSET = {17: "1.12", 18: "1.14", 19: "1.15", 20: "1.17", 21: "1.18"}
ORT_FOR_IR = {8: "1.10", 9: "1.15", 10: "1.18"}
PYTHON_MIN = "3.8"
# Not quantized: the quantizer can only give a BatchNorm's scale one int8 range for all channels, and ORT
# has no int8 BatchNorm kernel, so it would run in fp32 between extra Quantize/Dequantize pairs anyway.
INT8_SKIP = ("BatchNormalization",)


@dataclass
class ExportSettings:
    """How an export measures: latency threads/runs, calibration and check sizes, the fp32 tolerance."""

    threads: int = 1  # ONNX Runtime intra-op threads for the latency runs
    warmup: int = 20
    runs: int = 200
    calibration_images: int = 256  # training images the int8 ranges are calibrated on
    check_images: int = 256  # test images on which ONNX Runtime's fp32 logits must match PyTorch's
    atol: float = 1e-4  # the largest allowed |ONNX Runtime - PyTorch| logit difference
    samples: int = 8  # test images shipped in samples/ for `predict.py --selftest`
    seed: int = 0  # draws the calibration images

    def __post_init__(self) -> None:
        for name in ("threads", "runs", "calibration_images", "check_images", "samples", "atol"):
            if not getattr(self, name) > 0:
                raise DeployError(f"{name}={getattr(self, name)!r} must be > 0")
        if self.warmup < 0:
            raise DeployError(f"warmup={self.warmup!r} must be >= 0")


# ---------------------------------------------------------------------------------------------- the trial


def find_trial(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    """A COMPLETE trial with a checkpoint artifact, or a DeployError that says what is wrong."""
    trials = study.get_trials(deepcopy=False)
    trial = next((t for t in trials if t.number == number), None)
    where = f"study {study.study_name!r}"
    if trial is None:
        have = f"0..{len(trials) - 1}" if trials else "none"
        raise DeployError(f"{where} has no trial {number}; its trials are {have}")
    if trial.state != TrialState.COMPLETE:
        raise DeployError(f"trial {number} of {where} is {trial.state.name}, not COMPLETE: only a finished "
                          "training can be exported (python -m dse.deploy list shows the front)")
    if not trial.user_attrs.get("artifact_checkpoint"):
        raise DeployError(f"trial {number} of {where} has no checkpoint (no artifact_checkpoint attribute); "
                          "it was not trained by dse.sweep, or its upload failed: rerun the trial")
    return trial


def _config(trial: optuna.trial.FrozenTrial) -> dict:
    config = trial.user_attrs.get("provenance", {}).get("config")
    if not isinstance(config, dict) or "model" not in config or "data" not in config:
        raise DeployError(f"trial {trial.number} has no provenance.config with model and data; it cannot be rebuilt")
    return config


def load_trial_model(study: optuna.Study, trial: optuna.trial.FrozenTrial, *, storage: str, workdir: str | None,
                     num_classes: int, in_channels: int) -> tuple[nn.Module, ModelConfig]:
    """The trial's model with its checkpoint's weights, in eval mode, and its resolved config."""
    store_dir = study_workdir(study.study_name, storage, workdir) / "artifacts"
    if not store_dir.is_dir():
        raise DeployError(f"no artifact store at {store_dir}: pass the study's --workdir (where its sweep wrote artifacts/)")
    store = optuna.artifacts.FileSystemArtifactStore(str(store_dir))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoint.pt"
        try:
            optuna.artifacts.download_artifact(artifact_store=store, file_path=str(path),
                                               artifact_id=trial.user_attrs["artifact_checkpoint"])
        except Exception as e:  # the store raises several types for a missing or unreadable artifact
            raise DeployError(f"checkpoint artifact of trial {trial.number} is not readable in {store_dir} "
                              f"({type(e).__name__}: {e})") from None
        weights = load_model_state(path)
    cfg = ModelConfig(**_config(trial)["model"])
    model = build_model(cfg, num_classes=num_classes, in_channels=in_channels)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise DeployError(f"the checkpoint of trial {trial.number} does not fit its config {paper_name(cfg)}: "
                          f"{str(e).splitlines()[0]}") from None
    return model.eval(), resolve_config(cfg)


def load_trial_data(trial: optuna.trial.FrozenTrial, data_root: str | None = None) -> Splits:
    """The trial's dataset and split (`data_root` overrides where it lives); refused when the files
    split differently from the trial's (another dataset copy)."""
    data = dict(_config(trial)["data"], download=False)
    if data_root is not None:
        data["root"] = str(data_root)
    splits = load_data(DataConfig(**data))
    theirs = trial.user_attrs.get("split", {}).get("indices_sha256")
    if theirs and theirs != splits.split["indices_sha256"]:
        raise DeployError(f"the data in {data['root']} splits differently from trial {trial.number}'s "
                          f"(indices sha256 {splits.split['indices_sha256']}, trial {theirs}); pass --data-root")
    return splits


# ---------------------------------------------------------------------------------------------- ONNX


def export_onnx(model: nn.Module, path: Path, input_shape: tuple[int, ...]) -> None:
    """fp32 ONNX, opset OPSET, batch axis dynamic, with the TorchScript exporter: it needs no onnxscript
    and writes opset 17 / IR 8 files that older ONNX Runtime builds for ARM still load."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        torch.onnx.export(
            model.eval(), (torch.zeros(1, *input_shape),), str(path), dynamo=False, opset_version=OPSET,
            input_names=[INPUT], output_names=[OUTPUT], dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
        )  # fmt: skip


def compact_names(path: Path) -> None:
    """Rewrite an ONNX file with short tensor names and no node names, doc strings or inferred shapes:
    a QDQ graph otherwise spends more bytes on names than on int8 weights. Input and output keep theirs;
    the named PyTorch weights are in weights.safetensors."""
    model = onnx.load(str(path))
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return  # subgraphs (If, Loop) refer to outer names: leave such a model as it is
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        return name if not name or name in keep else names.setdefault(name, format(len(names), "x"))

    for tensor in graph.initializer:
        tensor.name = short(tensor.name)
    for node in graph.node:
        node.input[:] = [short(x) for x in node.input]
        node.output[:] = [short(x) for x in node.output]
        node.name = node.doc_string = ""
    del graph.value_info[:]
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _normalized(x: torch.Tensor, stats: tuple, size: int) -> Iterator[np.ndarray]:
    """uint8 images in float32 batches of `size`, normalised with stats = (mean, std) by the bundle's code."""
    mean, std = stats
    for i in range(0, len(x), size):
        yield runtime.normalize(x[i : i + size].numpy(), mean, std)


def ort_logits(sess, x: torch.Tensor, mean, std, *, batch_size: int = 256) -> np.ndarray:
    """ONNX Runtime logits of uint8 images, normalised by the bundle's own code."""
    return np.concatenate([runtime.run(sess, b) for b in _normalized(x, (mean, std), batch_size)])


@torch.no_grad()
def torch_logits(model: nn.Module, x: torch.Tensor, mean, std, *, batch_size: int = 256) -> np.ndarray:
    """PyTorch logits of uint8 images, normalised by the training pipeline (dse.data)."""
    y = torch.zeros(len(x), dtype=torch.int64)
    return torch.cat([model(xb) for xb, _ in batches(x, y, batch_size, mean=mean, std=std)]).numpy()


class _Calibration(CalibrationDataReader):
    def __init__(self, batches_: list[np.ndarray]) -> None:
        self._batches = iter(batches_)

    def get_next(self) -> dict | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT: batch}


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """ONNX Runtime's quantizer warns through the root logger about choices made on purpose here."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def quantize_int8(fp32: Path, out: Path, calibration: list[np.ndarray]) -> None:
    """Static int8 quantization with ONNX Runtime: QDQ format, per-channel int8 weights, uint8 activations,
    MinMax ranges over the calibration batches (normalised float32 N x C x H x W)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp, _quiet_root_logger():
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared))  # shape inference and graph clean-up, as ORT advises
        ops = sorted({n.op_type for n in onnx.load(str(prepared)).graph.node} - set(INT8_SKIP))
        quantize_static(
            str(prepared), str(out), _Calibration(calibration), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=ops,
            calibrate_method=CalibrationMethod.MinMax,
        )  # fmt: skip


def calibration_batches(x: torch.Tensor, mean, std, *, n: int, seed: int, batch_size: int = 32) -> list[np.ndarray]:
    """`n` images drawn with `seed` from uint8 training images, normalised, in batches."""
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return list(_normalized(x[idx], (mean, std), batch_size))


def weight_bytes(path: Path) -> int:
    """Bytes of an ONNX file's initializers (the weights, without the graph's names and structure)."""
    return sum(onnx.numpy_helper.to_array(t).nbytes for t in onnx.load(str(path)).graph.initializer)


def onnx_versions(path: Path) -> tuple[int, int]:
    """(default-domain opset, IR version) of an ONNX file."""
    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), model.ir_version


def min_onnxruntime(paths: list[Path]) -> str:
    """The oldest ONNX Runtime that implements every file's opset and IR version."""
    needs = []
    for path in paths:
        opset, ir = onnx_versions(path)
        if opset not in ORT_FOR_OPSET or ir not in ORT_FOR_IR:
            raise DeployError(f"{path.name}: opset {opset} / IR {ir} is not in ORT_FOR_OPSET / ORT_FOR_IR; extend them")
        needs += [ORT_FOR_OPSET[opset], ORT_FOR_IR[ir]]
    return max(needs, key=lambda v: tuple(int(p) for p in v.split(".")))


def measure_latency(path: Path, x: np.ndarray, settings: ExportSettings) -> tuple[float, float]:
    """Batch-1 (median, IQR) ms of one ONNX Runtime run: `dse.measure`'s method, as the bundle's bench_latency.py
    times it on the board."""
    sess = runtime.cpu_session(str(path), settings.threads)
    feed = {sess.get_inputs()[0].name: x}
    return median_iqr(time_calls(lambda: sess.run(None, feed), warmup=settings.warmup, runs=settings.runs))


def latency_how(settings: ExportSettings) -> str:
    return (f"batch 1, {settings.threads} intra-op thread(s), median of {settings.runs} runs after {settings.warmup} "
            f"warm-up, ONNX Runtime {ort.__version__} CPUExecutionProvider, {runtime.cpu_name()}")


# ---------------------------------------------------------------------------------------------- the bundle


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def study_bundles(name: str) -> Path:
    """bundles/<study>/, the study's name as it is where it is a plain folder name (else its slug)."""
    plain = re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) and ".." not in name
    return Path("bundles") / (name if plain else _slug(name))


def bundle_name(trial: optuna.trial.FrozenTrial) -> str:
    return f"trial{trial.number}-{_slug(trial.user_attrs.get('paper_name', 'model'))}"


def _check_out(out: Path, force: bool) -> None:
    """Refuse to overwrite a bundle without `force`, and anything that is not a bundle even with it."""
    for path in (out, _tar_path(out)):
        if not path.exists() or path.is_dir() and not any(path.iterdir()):
            continue
        if not force:
            raise DeployError(f"{path} already exists; pass --force to replace it, or another --out")
        if path == out and not (out / runtime.SUMS).is_file():
            raise DeployError(f"{out} holds files but no bundle ({runtime.SUMS} missing); --force replaces bundles "
                              "only: pick another --out")


def _tar_path(folder: Path) -> Path:
    return folder.with_name(folder.name + ".tar.gz")


def write_samples(folder: Path, splits: Splits, n: int) -> list[dict]:
    """The first test image of each class (up to `n` images) as PNG files in samples/."""
    from PIL import Image

    (folder / "samples").mkdir()
    chosen: dict[int, int] = {}
    for i, label in enumerate(splits.test_y.tolist()):
        if len(chosen) == n:
            break
        chosen.setdefault(label, i)
    samples = []
    for label, i in sorted(chosen.items(), key=lambda kv: kv[1]):
        hwc = np.ascontiguousarray(splits.test_x[i].permute(1, 2, 0).numpy())
        name = f"samples/{i:05d}-{_slug(splits.classes[label])}.png"
        Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc).save(folder / name)
        samples.append({"file": name, "label": label, "test_index": i})
    return samples


def _sample_classes(folder: Path, meta: dict) -> None:
    """Each sample's class under both models, read back through predict.py's own file path."""
    for precision, model_file in runtime.MODELS.items():
        sess = runtime.cpu_session(str(folder / model_file))
        for sample in meta["samples"]:
            x = runtime.to_model_input(runtime.load_image(str(folder / sample["file"])), meta)
            sample[f"{precision}_class"] = int(runtime.run(sess, x).argmax())


def _storage_label(storage: str) -> str:
    try:
        return sqlalchemy.engine.make_url(storage).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return storage


def _readme(meta: dict, name: str) -> str:
    m, shape = meta["metrics"], meta["input"]["shape"]
    values = {
        "paper_name": meta["paper_name"], "trial": meta["trial"], "study": meta["study"],
        "dse_version": meta["export"]["dse"], "exported_at": meta["export"]["exported_at"],
        "in_channels": shape[1], "height": shape[2], "width": shape[3], "num_classes": len(meta["classes"]),
        "dataset": meta["config"]["data"]["name"], "python_min": meta["requires"]["python"].lstrip(">="),
        "onnxruntime_min": meta["requires"]["onnxruntime"].lstrip(">="), "test_images": m["test_images"],
        "fp32_acc": f"{100 * m['fp32_acc']:.2f}", "int8_acc": f"{100 * m['int8_acc']:.2f}",
        "agreement": f"{100 * m['int8_agreement']:.2f}", "fp32_bytes": f"{m['onnx_fp32_bytes']:,}",
        "int8_bytes": f"{m['onnx_int8_bytes']:,}", "latency_fp32_ms": f"{m['latency_fp32_ms']:.3f}",
        "latency_int8_ms": f"{m['latency_int8_ms']:.3f}", "latency_how": m["latency_how"],
        "opset": meta["onnx"]["opset"], "input_name": meta["input"]["name"],
        "calibration_images": meta["int8"]["calibration_images"], "num_samples": len(meta["samples"]),
        "bundle_name": name, "class_names": ", ".join(meta["classes"]),
    }  # fmt: skip
    return string.Template((TEMPLATES / "README.md").read_text()).substitute(values)


def _finish(folder: Path, meta: dict) -> None:
    """README.md, then meta.json with the sha256 of every other file, then SHA256SUMS over all of them."""
    (folder / "README.md").write_text(_readme(meta, folder.name))
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    for name in files:
        (folder / name).chmod(0o644)  # safetensors writes 0600; the board's RTMaps user must read every file
    meta["files"] = {name: runtime.sha256(str(folder / name)) for name in files}
    (folder / runtime.META).write_text(json.dumps(meta, indent=1) + "\n")
    sums = dict(meta["files"], **{runtime.META: runtime.sha256(str(folder / runtime.META))})
    (folder / runtime.SUMS).write_text("".join(f"{sums[n]}  {n}\n" for n in sorted(sums)))


def _tar(folder: Path) -> Path:
    """folder.tar.gz beside the folder, entries sorted and owned by nobody in particular."""
    tar = _tar_path(folder)

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    tmp = tar.with_name(f".{tar.name}.tmp")
    with tarfile.open(tmp, "w:gz") as f:
        f.add(folder, arcname=folder.name, recursive=False, filter=clean)
        for path in sorted(folder.rglob("*")):
            f.add(path, arcname=f"{folder.name}/{path.relative_to(folder).as_posix()}", recursive=False, filter=clean)
    os.replace(tmp, tar)
    return tar


def _replace(new: Path, out: Path) -> None:
    """Move the finished bundle into place; an older bundle there goes only once the new one is complete."""
    if out.exists():
        old = new.with_name(new.name + ".old")
        os.replace(out, old)
        os.replace(new, out)
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
    else:
        os.replace(new, out)


def check_against_torch(model: nn.Module, fp32: Path, splits: Splits, settings: ExportSettings) -> float:
    """Max |ONNX Runtime - PyTorch| fp32 logit difference on the first test images; refused above atol."""
    check = splits.test_x[: settings.check_images]
    onnx_out = ort_logits(runtime.cpu_session(str(fp32)), check, splits.mean, splits.std)
    diff = float(np.abs(onnx_out - torch_logits(model, check, splits.mean, splits.std)).max())
    if not diff < settings.atol:
        raise DeployError(f"ONNX Runtime's fp32 logits differ from PyTorch's by {diff:.2e} on {len(check)} test "
                          f"images, more than atol={settings.atol:g}; the export is wrong, or pass a larger --atol")
    return diff


def measure_models(fp32: Path, int8: Path, splits: Splits, settings: ExportSettings) -> dict:
    """Test accuracy, int8-vs-fp32 top-1 agreement, file and weight bytes, batch-1 latency of both models."""
    y = splits.test_y.numpy()
    pred = {p: ort_logits(runtime.cpu_session(str(path)), splits.test_x, splits.mean, splits.std).argmax(1)
            for p, path in (("fp32", fp32), ("int8", int8))}
    metrics = {"fp32_acc": float((pred["fp32"] == y).mean()), "int8_acc": float((pred["int8"] == y).mean()),
               "int8_agreement": float((pred["int8"] == pred["fp32"]).mean()), "test_images": len(y)}
    one = runtime.normalize(splits.test_x[:1].numpy(), splits.mean, splits.std)
    for precision, path in (("fp32", fp32), ("int8", int8)):
        median, iqr = measure_latency(path, one, settings)
        metrics.update({f"onnx_{precision}_bytes": path.stat().st_size, f"onnx_{precision}_weight_bytes": weight_bytes(path),
                        f"latency_{precision}_ms": median, f"latency_{precision}_iqr_ms": iqr})
    metrics.update(latency_threads=settings.threads, latency_runs=settings.runs, latency_warmup=settings.warmup,
                   latency_how=latency_how(settings))
    return metrics


def write_torch_files(folder: Path, model: nn.Module, cfg: ModelConfig, splits: Splits) -> None:
    """weights.safetensors and config.json: what `load_bundle_model` rebuilds the PyTorch model from."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "weights.safetensors"), metadata={"format": FORMAT, "paper_name": paper_name(cfg)})
    config = {"format": FORMAT, "model": asdict(cfg), "num_classes": splits.num_classes,
              "in_channels": splits.in_channels, "input_shape": list(splits.test_x.shape[1:]), "dse": dse.__version__}
    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")


def describe(cfg: ModelConfig, splits: Splits, fp32: Path, int8: Path, settings: ExportSettings) -> dict:
    """meta.json's description of the model: input and its preprocessing, output, classes, ONNX, int8, runtime."""
    shape = list(splits.test_x.shape[1:])
    opset, ir = onnx_versions(fp32)
    ort_min = min_onnxruntime([fp32, int8])
    return {
        "paper_name": paper_name(cfg), "model": asdict(cfg),
        "input": {
            "name": INPUT, "shape": [1, *shape], "dtype": "float32", "layout": "NCHW", "batch_axis": "dynamic",
            "channels": {3: "RGB", 1: "grey"}.get(shape[0], f"{shape[0]} channels"),
            "mean": list(splits.mean), "std": list(splits.std),
            "preprocess": "uint8 image -> model channels -> centred crop to the model's aspect ratio -> area "
                          "resize -> (x/255 - mean)/std (predict.to_model_input)",
        },
        "output": {"name": OUTPUT, "shape": ["batch", splits.num_classes], "meaning": "logits; softmax gives probabilities"},
        "classes": list(splits.classes),
        "onnx": {"opset": opset, "ir_version": ir, "exporter": f"torch.onnx (TorchScript) {torch.__version__}"},
        "int8": {"format": "QDQ", "weights": "int8 per channel", "activations": "uint8 per tensor",
                 "calibration": "MinMax", "calibration_images": settings.calibration_images,
                 "calibration_seed": settings.seed, "not_quantized": list(INT8_SKIP)},
        "requires": {"python": f">={PYTHON_MIN}", "onnxruntime": f">={ort_min}",
                     "packages": ["numpy", f"onnxruntime>={ort_min}", "pillow (image files only)"]},
    }  # fmt: skip


def build_bundle(folder: Path, model: nn.Module, cfg: ModelConfig, splits: Splits, settings: ExportSettings,
                 *, header: dict) -> dict:
    """Write every bundle file into the empty `folder` and return its meta.json content."""
    fp32, int8 = folder / runtime.MODELS["fp32"], folder / runtime.MODELS["int8"]
    export_onnx(model, fp32, tuple(splits.test_x.shape[1:]))
    compact_names(fp32)
    diff = check_against_torch(model, fp32, splits, settings)
    calibration = calibration_batches(splits.train_x, splits.mean, splits.std, n=settings.calibration_images,
                                      seed=settings.seed)
    quantize_int8(fp32, int8, calibration)
    compact_names(int8)
    metrics = measure_models(fp32, int8, splits, settings)
    metrics.update(onnx_max_abs_diff=diff, onnx_check_images=min(settings.check_images, len(splits.test_x)))
    write_torch_files(folder, model, cfg, splits)
    for name in RUNTIME_FILES:
        shutil.copyfile(TEMPLATES / name, folder / name)
    meta = {"format": FORMAT, **header, **describe(cfg, splits, fp32, int8, settings), "metrics": metrics,
            "samples": write_samples(folder, splits, settings.samples)}
    _sample_classes(folder, meta)
    _finish(folder, meta)
    return meta


def _header(study: optuna.Study, trial: optuna.trial.FrozenTrial, storage: str, splits: Splits) -> dict:
    """Where the bundle comes from: study, trial, its objectives, config, split and provenance, the export."""
    trained = trial.user_attrs.get("provenance", {})
    return {
        "study": study.study_name, "storage": _storage_label(storage), "trial": trial.number,
        "objectives": dict(zip(study.metric_names or [], trial.values)),
        "torch_test_acc": trial.user_attrs.get("test_acc"), "config": _config(trial), "split": dict(splits.split),
        "provenance": {k: trained.get(k) for k in ("git_commit", "versions", "host")},
        "export": {
            "dse": dse.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": ort.__version__, "numpy": np.__version__, "safetensors": safetensors.__version__,
            "python": platform.python_version(), "host": socket.gethostname(), "cpu": runtime.cpu_name(),
            "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    }  # fmt: skip


def export_trial(
    study: optuna.Study,
    number: int,
    out: str | os.PathLike | None = None,
    *,
    storage: str,
    workdir: str | None = None,
    data_root: str | None = None,
    settings: ExportSettings | None = None,
    force: bool = False,
) -> dict:
    """Export trial `number` as a bundle folder `out` (default bundles/<study>/<trial name>) and
    out.tar.gz, record its metrics on the study as `deploy:<number>`, and return that record."""
    settings = settings or ExportSettings()
    trial = find_trial(study, number)
    out = Path(out) if out is not None else study_bundles(study.study_name) / bundle_name(trial)
    _check_out(out, force)
    splits = load_trial_data(trial, data_root)
    model, cfg = load_trial_model(study, trial, storage=storage, workdir=workdir,
                                  num_classes=splits.num_classes, in_channels=splits.in_channels)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        folder = Path(tmp) / out.name
        folder.mkdir()
        meta = build_bundle(folder, model, cfg, splits, settings, header=_header(study, trial, storage, splits))
        _replace(folder, out)
    _tar(out)
    m = meta["metrics"]
    record = {
        "trial": number, "paper_name": meta["paper_name"], "fp32_acc": m["fp32_acc"], "int8_acc": m["int8_acc"],
        "onnx_fp32_bytes": m["onnx_fp32_bytes"], "onnx_int8_bytes": m["onnx_int8_bytes"],
        "latency_fp32_ms": m["latency_fp32_ms"], "latency_int8_ms": m["latency_int8_ms"],
        "latency_how": m["latency_how"], "bundle": str(out.resolve()),
    }  # fmt: skip
    record_on_study(study.study_name, storage, number, record)
    return record


def record_on_study(name: str, storage: str, number: int, record: dict) -> None:
    """Set the study attribute `deploy:<number>` (what the report's Table 7 reads), through the sweep's
    storage settings, so a sweep still writing to the same SQLite file makes it wait, not fail."""
    optuna.load_study(study_name=name, storage=open_storage(storage)).set_user_attr(f"deploy:{number}", record)


def export_front(study: optuna.Study, numbers: list[int], out: str | os.PathLike | None = None, **kwargs) -> list[dict]:
    """Export every trial of `numbers` (the filtered Pareto front) into `out` (default bundles/<study>/),
    one bundle each, and write out/index.md; return the records."""
    out = Path(out) if out is not None else study_bundles(study.study_name)
    folders = {n: out / bundle_name(find_trial(study, n)) for n in numbers}
    for folder in folders.values():  # refuse before the first export, not halfway
        _check_out(folder, kwargs.get("force", False))
    records = [export_trial(study, n, folders[n], **kwargs) for n in numbers]
    write_index(out, records)
    return records


def write_index(out: Path, records: list[dict]) -> Path:
    """out/index.md: one row per bundle (fp32/int8 test accuracy, ONNX bytes, batch-1 latency, folder)."""
    import pandas as pd

    frame = pd.DataFrame([{
        "trial": r["trial"], "model": r["paper_name"], "fp32_acc_%": round(100 * r["fp32_acc"], 2),
        "int8_acc_%": round(100 * r["int8_acc"], 2), "fp32_bytes": r["onnx_fp32_bytes"], "int8_bytes": r["onnx_int8_bytes"],
        "fp32_ms": round(r["latency_fp32_ms"], 3), "int8_ms": round(r["latency_int8_ms"], 3),
        "bundle": os.path.relpath(r["bundle"], out.resolve()),
    } for r in records])  # fmt: skip
    how = records[0]["latency_how"] if records else ""
    path = out / "index.md"
    path.write_text(f"# Pareto-front bundles\n\nAccuracy on the test set; latency {how}.\n\n"
                    f"{frame.to_markdown(index=False)}\n")
    return path


# ---------------------------------------------------------------------------------------------- reading bundles


def verify_bundle(bundle: str | os.PathLike) -> dict:
    """Check every file of a bundle, its folder or the .tar.gz export wrote, against SHA256SUMS and meta.json;
    return the meta or raise DeployError. An archive is unpacked into a temporary folder first (`unpack_bundle`)."""
    if not Path(bundle).is_file():
        return _verify_folder(Path(bundle), str(bundle))
    with tempfile.TemporaryDirectory(prefix="dse-verify-") as tmp:
        return _verify_folder(unpack_bundle(Path(bundle), Path(tmp)), str(bundle))


def _verify_folder(folder: Path, shown: str) -> dict:
    """`runtime.verify` of `folder`, its errors naming `shown` (the archive, not the temporary folder)."""
    try:
        return runtime.verify(str(folder))
    except runtime.BundleError as e:
        raise DeployError(str(e).replace(str(folder), shown)) from None
    except (OSError, ValueError, KeyError) as e:
        raise DeployError(f"{shown} is not a readable bundle ({type(e).__name__}: {e})") from None


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    """Refuse a member that could write outside the folder it is unpacked into, or is not a file or a folder."""
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts:
        raise DeployError(f"{archive}: member {member.name!r} is an absolute path or climbs out with '..'; a bundle "
                          "archive holds relative paths only")
    if not (member.isfile() or member.isdir()):
        kind = "a link" if member.issym() or member.islnk() else "not a file or a folder"
        raise DeployError(f"{archive}: member {member.name!r} is {kind}; a bundle archive holds files and folders only")


def unpack_bundle(archive: Path, into: Path) -> Path:
    """Unpack a bundle archive (.tar.gz) into the folder `into`, refusing absolute paths, '..', links and special
    files; return the bundle's folder (the archive's one top folder, else `into`)."""
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(archive, member)
            tar.extractall(into, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DeployError(f"{archive} is neither a bundle folder nor a readable bundle archive (.tar.gz): {e}") from None
    tops = {PurePosixPath(m.name).parts[0] for m in members if PurePosixPath(m.name).parts}
    top = into / tops.pop() if len(tops) == 1 else into
    return top if top.is_dir() else into


def load_bundle_model(folder: str | os.PathLike) -> nn.Module:
    """The PyTorch model of a bundle, rebuilt with dse from config.json and weights.safetensors (checked)."""
    verify_bundle(folder)
    config = json.loads((Path(folder) / "config.json").read_text())
    model = build_model(ModelConfig(**config["model"]), num_classes=config["num_classes"], in_channels=config["in_channels"])
    model.load_state_dict(load_file(str(Path(folder) / "weights.safetensors")))
    return model.eval()


# ---------------------------------------------------------------------------------------------- a shape alone


def measure_shape(name: str, *, num_classes: int = 10, in_channels: int = 3, size: int = 32,
                  settings: ExportSettings | None = None) -> dict:
    """ONNX file sizes and batch-1 ONNX Runtime latency, fp32 and int8, of a freshly initialised model
    (seed 0) of a registry or paper name: no training, so no accuracy. BatchNorm weights and statistics
    are drawn at random, as training leaves them: at their initial 1s and 0s the exporter would store
    equal tensors once and the file would look smaller than a trained model's. The int8 ranges are
    calibrated on `calibration_images` uniform random images (uint8, normalised with mean 0.5, std 0.25):
    they change the scales, not the file size or the work done."""
    settings = settings or ExportSettings()
    cfg = config_from_name(name)
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=num_classes, in_channels=in_channels).eval()
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            for tensor, (low, high) in ((bn.weight, (0.5, 1.5)), (bn.bias, (-0.1, 0.1)),
                                        (bn.running_mean, (-0.1, 0.1)), (bn.running_var, (0.5, 1.5))):
                if tensor is not None:
                    tensor.uniform_(low, high)
    shape = (in_channels, size, size)
    stats = ((0.5,) * in_channels, (0.25,) * in_channels)
    images = torch.randint(0, 256, (settings.calibration_images, *shape), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(settings.seed))
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
        export_onnx(model, fp32, shape)
        compact_names(fp32)
        quantize_int8(fp32, int8, list(_normalized(images, stats, 32)))
        compact_names(int8)
        one = runtime.normalize(images[:1].numpy(), *stats)
        row = {"model": paper_name(cfg), "params": sum(p.numel() for p in model.parameters())}
        for precision, path in (("fp32", fp32), ("int8", int8)):
            median, iqr = measure_latency(path, one, settings)
            row.update({f"{precision}_bytes": path.stat().st_size, f"{precision}_weight_bytes": weight_bytes(path),
                        f"{precision}_ms": median, f"{precision}_iqr_ms": iqr})
    row["latency_how"] = latency_how(settings)
    return row
