"""Export a trial's checkpoint as a deployment bundle: fp32 ONNX checked against PyTorch, static int8,
both measured under ONNX Runtime (test accuracy, batch-1 latency), the PyTorch weights, meta.json, the
runtime files, SHA256SUMS and a .tar.gz; the metrics are recorded on the study as `deploy:<trial>`."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shutil
import socket
import string
import tarfile
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import optuna
import safetensors
import sqlalchemy
import torch
import torch.nn as nn
from safetensors.torch import save_file

import dse
from dse.data import Splits
from dse.deploy.bundle import predict as runtime
from dse.deploy.front import DeployError
from dse.deploy.onnx import (
    INPUT,
    INT8_SKIP,
    OUTPUT,
    ExportSettings,
    calibration_batches,
    export_pair,
    file_figures,
    latency_how,
    min_onnxruntime,
    onnx_versions,
    ort_logits,
    torch_logits,
)
from dse.deploy.trial import find_trial, load_trial_data, load_trial_model, shipped_files, trial_config
from dse.models import ModelConfig, paper_name
from dse.storage import open_storage

__all__ = [
    "build_bundle",
    "check_against_torch",
    "export_front",
    "export_trial",
    "study_bundles",
    "write_index",
]

FORMAT = "dse.deploy/1"
TEMPLATES = Path(__file__).resolve().parent / "bundle"
RUNTIME_FILES = ("predict.py", "rtmaps_classifier.py", "bench_latency.py")
PYTHON_MIN = "3.8"


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
            raise DeployError(
                f"{out} holds files but no bundle ({runtime.SUMS} missing); --force replaces bundles "
                "only: pick another --out"
            )


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
        "paper_name": meta["paper_name"],
        "trial": meta["trial"],
        "study": meta["study"],
        "dse_version": meta["export"]["dse"],
        "exported_at": meta["export"]["exported_at"],
        "in_channels": shape[1],
        "height": shape[2],
        "width": shape[3],
        "num_classes": len(meta["classes"]),
        "dataset": meta["config"]["data"]["name"],
        "python_min": meta["requires"]["python"].lstrip(">="),
        "onnxruntime_min": meta["requires"]["onnxruntime"].lstrip(">="),
        "test_images": m["test_images"],
        "fp32_acc": f"{100 * m['fp32_acc']:.2f}",
        "int8_acc": f"{100 * m['int8_acc']:.2f}",
        "agreement": f"{100 * m['int8_agreement']:.2f}",
        "fp32_bytes": f"{m['onnx_fp32_bytes']:,}",
        "int8_bytes": f"{m['onnx_int8_bytes']:,}",
        "latency_fp32_ms": f"{m['latency_fp32_ms']:.3f}",
        "latency_int8_ms": f"{m['latency_int8_ms']:.3f}",
        "latency_how": m["latency_how"],
        "opset": meta["onnx"]["opset"],
        "input_name": meta["input"]["name"],
        "calibration_images": meta["int8"]["calibration_images"],
        "num_samples": len(meta["samples"]),
        "bundle_name": name,
        "class_names": ", ".join(meta["classes"]),
    }
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
        raise DeployError(
            f"ONNX Runtime's fp32 logits differ from PyTorch's by {diff:.2e} on {len(check)} test "
            f"images, more than atol={settings.atol:g}; the export is wrong, or pass a larger --atol"
        )
    return diff


def measure_models(fp32: Path, int8: Path, splits: Splits, settings: ExportSettings) -> dict:
    """Test accuracy, int8-vs-fp32 top-1 agreement, file and weight bytes, batch-1 latency of both models."""
    y = splits.test_y.numpy()
    pred = {
        p: ort_logits(runtime.cpu_session(str(path)), splits.test_x, splits.mean, splits.std).argmax(1)
        for p, path in (("fp32", fp32), ("int8", int8))
    }
    metrics = {
        "fp32_acc": float((pred["fp32"] == y).mean()),
        "int8_acc": float((pred["int8"] == y).mean()),
        "int8_agreement": float((pred["int8"] == pred["fp32"]).mean()),
        "test_images": len(y),
    }
    one = runtime.normalize(splits.test_x[:1].numpy(), splits.mean, splits.std)
    for precision, path in (("fp32", fp32), ("int8", int8)):
        figures = file_figures(path, one, settings)
        metrics.update({f"onnx_{precision}_{key}": figures[key] for key in ("bytes", "weight_bytes")})
        metrics.update({f"latency_{precision}_{key}": figures[key] for key in ("ms", "iqr_ms")})
    metrics.update(
        latency_threads=settings.threads,
        latency_runs=settings.runs,
        latency_warmup=settings.warmup,
        latency_how=latency_how(settings),
    )
    return metrics


def write_torch_files(folder: Path, model: nn.Module, cfg: ModelConfig, splits: Splits) -> None:
    """weights.safetensors and config.json: what `load_bundle_model` rebuilds the PyTorch model from."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "weights.safetensors"), metadata={"format": FORMAT, "paper_name": paper_name(cfg)})
    config = {
        "format": FORMAT,
        "model": asdict(cfg),
        "num_classes": splits.num_classes,
        "in_channels": splits.in_channels,
        "input_shape": list(splits.test_x.shape[1:]),
        "dse": dse.__version__,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")


def describe(cfg: ModelConfig, splits: Splits, fp32: Path, int8: Path, settings: ExportSettings) -> dict:
    """meta.json's description of the model: input and its preprocessing, output, classes, ONNX, int8, runtime."""
    shape = list(splits.test_x.shape[1:])
    opset, ir = onnx_versions(fp32)
    ort_min = min_onnxruntime([fp32, int8])
    return {
        "paper_name": paper_name(cfg),
        "model": asdict(cfg),
        "input": {
            "name": INPUT,
            "shape": [1, *shape],
            "dtype": "float32",
            "layout": "NCHW",
            "batch_axis": "dynamic",
            "channels": {3: "RGB", 1: "grey"}.get(shape[0], f"{shape[0]} channels"),
            "mean": list(splits.mean),
            "std": list(splits.std),
            "preprocess": "uint8 image -> model channels -> centred crop to the model's aspect ratio -> area "
            "resize -> (x/255 - mean)/std (predict.to_model_input)",
        },
        "output": {
            "name": OUTPUT,
            "shape": ["batch", splits.num_classes],
            "meaning": "logits; softmax gives probabilities",
        },
        "classes": list(splits.classes),
        "onnx": {"opset": opset, "ir_version": ir, "exporter": f"torch.onnx (TorchScript) {torch.__version__}"},
        "int8": {
            "format": "QDQ",
            "weights": "int8 per channel",
            "activations": "uint8 per tensor",
            "calibration": "MinMax",
            "calibration_images": settings.calibration_images,
            "calibration_seed": settings.seed,
            "not_quantized": list(INT8_SKIP),
        },
        "requires": {
            "python": f">={PYTHON_MIN}",
            "onnxruntime": f">={ort_min}",
            "packages": ["numpy", f"onnxruntime>={ort_min}", "pillow (image files only)"],
        },
    }


def build_bundle(
    folder: Path,
    model: nn.Module,
    cfg: ModelConfig,
    splits: Splits,
    settings: ExportSettings,
    *,
    header: dict,
    shipped: dict[str, Path] | None = None,
) -> dict:
    """Write every bundle file into the empty `folder` and return its meta.json content. The ONNX files are
    `shipped` (precision -> the file the sweep exported and evaluated, copied as they are) or exported now."""
    if shipped:
        fp32, int8 = (Path(shutil.copyfile(shipped[p], folder / runtime.MODELS[p])) for p in ("fp32", "int8"))
    else:
        calibration = calibration_batches(
            splits.train_x, splits.mean, splits.std, n=settings.calibration_images, seed=settings.seed
        )
        fp32, int8 = export_pair(model, folder, tuple(splits.test_x.shape[1:]), calibration)
    diff = check_against_torch(model, fp32, splits, settings)
    metrics = measure_models(fp32, int8, splits, settings)
    metrics.update(
        onnx_max_abs_diff=diff,
        onnx_check_images=min(settings.check_images, len(splits.test_x)),
        onnx_from_sweep=bool(shipped),
    )  # the files the sweep evaluated, or exported now
    write_torch_files(folder, model, cfg, splits)
    for name in RUNTIME_FILES:
        shutil.copyfile(TEMPLATES / name, folder / name)
    meta = {
        "format": FORMAT,
        **header,
        **describe(cfg, splits, fp32, int8, settings),
        "metrics": metrics,
        "samples": write_samples(folder, splits, settings.samples),
    }
    _sample_classes(folder, meta)
    _finish(folder, meta)
    return meta


def _header(study: optuna.Study, trial: optuna.trial.FrozenTrial, storage: str, splits: Splits) -> dict:
    """Where the bundle comes from: study, trial, its objectives, config, split and provenance, the export."""
    trained = trial.user_attrs.get("provenance", {})
    return {
        "study": study.study_name,
        "storage": _storage_label(storage),
        "trial": trial.number,
        "objectives": dict(zip(study.metric_names or [], trial.values)),
        "torch_test_acc": trial.user_attrs.get("test_acc"),
        "config": trial_config(trial),
        "split": dict(splits.split),
        "provenance": {k: trained.get(k) for k in ("git_commit", "versions", "host")},
        "export": {
            "dse": dse.__version__,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
            "safetensors": safetensors.__version__,
            "python": platform.python_version(),
            "host": socket.gethostname(),
            "cpu": runtime.cpu_name(),
            "exported_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        },
    }


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
    model, cfg = load_trial_model(
        study, trial, storage=storage, workdir=workdir, num_classes=splits.num_classes, in_channels=splits.in_channels
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        shipped = shipped_files(study, trial, Path(tmp), storage=storage, workdir=workdir)
        if shipped:  # int8 was calibrated as the sweep did: say so in meta.json
            made = trial.user_attrs.get("deployed_calibration", {})
            settings = replace(
                settings,
                calibration_images=made.get("images", settings.calibration_images),
                seed=made.get("seed", settings.seed),
            )
        folder = Path(tmp) / out.name
        folder.mkdir()
        meta = build_bundle(
            folder, model, cfg, splits, settings, header=_header(study, trial, storage, splits), shipped=shipped
        )
        _replace(folder, out)
    _tar(out)
    m = meta["metrics"]
    record = {
        "trial": number,
        "paper_name": meta["paper_name"],
        "fp32_acc": m["fp32_acc"],
        "int8_acc": m["int8_acc"],
        "onnx_fp32_bytes": m["onnx_fp32_bytes"],
        "onnx_int8_bytes": m["onnx_int8_bytes"],
        "latency_fp32_ms": m["latency_fp32_ms"],
        "latency_int8_ms": m["latency_int8_ms"],
        "latency_how": m["latency_how"],
        "bundle": str(out.resolve()),
    }
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

    frame = pd.DataFrame(
        [
            {
                "trial": r["trial"],
                "model": r["paper_name"],
                "fp32_acc_%": round(100 * r["fp32_acc"], 2),
                "int8_acc_%": round(100 * r["int8_acc"], 2),
                "fp32_bytes": r["onnx_fp32_bytes"],
                "int8_bytes": r["onnx_int8_bytes"],
                "fp32_ms": round(r["latency_fp32_ms"], 3),
                "int8_ms": round(r["latency_int8_ms"], 3),
                "bundle": os.path.relpath(r["bundle"], out.resolve()),
            }
            for r in records
        ]
    )
    how = records[0]["latency_how"] if records else ""
    path = out / "index.md"
    path.write_text(
        f"# Pareto-front bundles\n\nAccuracy on the test set; latency {how}.\n\n{frame.to_markdown(index=False)}\n"
    )
    return path
