"""Deploy's side of ONNX: export settings, versions, weight bytes, batch-1 latency under ONNX Runtime and a shape
alone; export, int8 and logits are `dse.onnx`'s (the code path the sweep evaluates every trial with)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn

from dse.data import batches
from dse.deploy.bundle import predict as runtime
from dse.deploy.front import DeployError
from dse.measure import median_iqr, time_calls
from dse.models import build_model, config_from_name, paper_name
from dse.onnx import (
    CALIBRATION_IMAGES,
    CALIBRATION_SEED,
    INPUT,
    INT8_SKIP,
    OPSET,
    OUTPUT,
    as_trained,
    calibration_batches,
    compact_names,
    export_onnx,
    export_pair,
    normalized_batches,
    ort_logits,
    quantize_int8,
    random_calibration,
)

__all__ = [
    "INPUT",
    "INT8_SKIP",
    "OPSET",
    "OUTPUT",
    "ExportSettings",
    "calibration_batches",
    "compact_names",
    "export_onnx",
    "file_figures",
    "export_pair",
    "latency_how",
    "measure_latency",
    "measure_shape",
    "min_onnxruntime",
    "normalized_batches",
    "onnx_versions",
    "ort_logits",
    "quantize_int8",
    "torch_logits",
    "weight_bytes",
]

# The first ONNX Runtime release implementing an ONNX opset / IR version, from the version table of
# https://onnxruntime.ai/docs/reference/compatibility.html. The bundle files themselves parse with Python 3.8.
ORT_FOR_OPSET = {17: "1.12", 18: "1.14", 19: "1.15", 20: "1.17", 21: "1.18"}
ORT_FOR_IR = {8: "1.10", 9: "1.15", 10: "1.18"}


@dataclass
class ExportSettings:
    """How an export measures: latency threads/runs, calibration and check sizes, the fp32 tolerance."""

    threads: int = 1  # ONNX Runtime intra-op threads for the latency runs
    warmup: int = 20
    runs: int = 200
    calibration_images: int = CALIBRATION_IMAGES  # training images the int8 ranges are calibrated on
    check_images: int = 256  # test images on which ONNX Runtime's fp32 logits must match PyTorch's
    atol: float = 1e-4  # the largest allowed |ONNX Runtime - PyTorch| logit difference
    samples: int = 8  # test images shipped in samples/ for `predict.py --selftest`
    seed: int = CALIBRATION_SEED  # draws the calibration images

    def __post_init__(self) -> None:
        for name in ("threads", "runs", "calibration_images", "check_images", "samples", "atol"):
            if not getattr(self, name) > 0:
                raise DeployError(f"{name}={getattr(self, name)!r} must be > 0")
        if self.warmup < 0:
            raise DeployError(f"warmup={self.warmup!r} must be >= 0")


@torch.no_grad()
def torch_logits(model: nn.Module, x: torch.Tensor, mean, std, *, batch_size: int = 256) -> np.ndarray:
    """PyTorch logits of uint8 images, normalised by the training pipeline (dse.data)."""
    y = torch.zeros(len(x), dtype=torch.int64)
    return torch.cat([model(xb) for xb, _ in batches(x, y, batch_size, mean=mean, std=std)]).numpy()


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


def file_figures(path: Path, one: np.ndarray, settings: ExportSettings) -> dict:
    """An ONNX file's bytes, weight bytes and batch-1 ONNX Runtime latency on the input `one`: ms and its IQR."""
    median, iqr = measure_latency(path, one, settings)
    return {"bytes": path.stat().st_size, "weight_bytes": weight_bytes(path), "ms": median, "iqr_ms": iqr}


def latency_how(settings: ExportSettings) -> str:
    return (
        f"batch 1, {settings.threads} intra-op thread(s), median of {settings.runs} runs after {settings.warmup} "
        f"warm-up, ONNX Runtime {ort.__version__} CPUExecutionProvider, {runtime.cpu_name()}"
    )


# ---------------------------------------------------------------------------------------------- a shape alone


def measure_shape(
    name: str, *, num_classes: int = 10, in_channels: int = 3, size: int = 32, settings: ExportSettings | None = None
) -> dict:
    """ONNX file sizes and batch-1 ONNX Runtime latency, fp32 and int8, of a freshly initialised model
    (seed 0) of a registry or paper name: no training, so no accuracy. BatchNorm weights and statistics
    are drawn at random, as training leaves them: at their initial 1s and 0s the exporter would store
    equal tensors once and the file would look smaller than a trained model's. The int8 ranges are
    calibrated on `calibration_images` uniform random images (uint8, normalised with mean 0.5, std 0.25):
    they change the scales, not the file size or the work done."""
    settings = settings or ExportSettings()
    cfg = config_from_name(name)
    torch.manual_seed(0)
    model = as_trained(build_model(cfg, num_classes=num_classes, in_channels=in_channels).eval())
    shape = (in_channels, size, size)
    stats = ((0.5,) * in_channels, (0.25,) * in_channels)
    images = torch.randint(
        0, 256, (1, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(settings.seed)
    )
    with tempfile.TemporaryDirectory() as tmp:
        calibration = random_calibration(shape, settings.calibration_images, settings.seed)
        fp32, int8 = export_pair(model, Path(tmp), shape, calibration)
        one = runtime.normalize(images[:1].numpy(), *stats)
        row = {"model": paper_name(cfg), "params": sum(p.numel() for p in model.parameters())}
        for precision, path in (("fp32", fp32), ("int8", int8)):
            row.update({f"{precision}_{key}": value for key, value in file_figures(path, one, settings).items()})
    row["latency_how"] = latency_how(settings)
    return row
