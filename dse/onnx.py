"""ONNX files of a model, the one code path the sweep and `dse.deploy` share: export, compact names, static int8,
calibration images, ONNX Runtime sessions and logits."""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from dse.data import normalize

__all__ = [
    "CALIBRATION_IMAGES",
    "CALIBRATION_SEED",
    "FILES",
    "INPUT",
    "INT8_SKIP",
    "OPSET",
    "OUTPUT",
    "calibration_batches",
    "compact_names",
    "export_onnx",
    "export_pair",
    "as_trained",
    "random_calibration",
    "normalized_batches",
    "ort_logits",
    "quantize_int8",
    "session",
]

OPSET = 17
INPUT, OUTPUT = "image", "logits"
FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}  # the names they ship under (a bundle's predict.MODELS)
# Not quantized: the quantizer can only give a BatchNorm's scale one int8 range for all channels, and ORT
# has no int8 BatchNorm kernel, so it would run in fp32 between extra Quantize/Dequantize pairs anyway.
INT8_SKIP = ("BatchNormalization",)
CALIBRATION_IMAGES, CALIBRATION_SEED = 256, 0  # training images the int8 ranges are calibrated on, drawn with the seed


def export_onnx(model: nn.Module, path: Path, input_shape: tuple[int, ...]) -> None:
    """fp32 ONNX, opset OPSET, batch axis dynamic, with the TorchScript exporter: it needs no onnxscript
    and writes opset 17 / IR 8 files that older ONNX Runtime builds for ARM still load."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        torch.onnx.export(
            model.eval(),
            (torch.zeros(1, *input_shape),),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
        )


def compact_names(path: Path) -> None:
    """Rewrite an ONNX file with short tensor names and no node names, doc strings or inferred shapes:
    a QDQ graph otherwise spends more bytes on names than on int8 weights. Input and output keep theirs;
    the named PyTorch weights are in weights.safetensors."""
    import onnx  # here, not above: 0.7 s that every sweep and report process would pay for a first export

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


def normalized_batches(x: torch.Tensor, stats: tuple, size: int) -> Iterator[np.ndarray]:
    """uint8 images in float32 batches of `size`, normalised with stats = (mean, std) as training normalises
    (`dse.data.normalize`)."""
    mean, std = (torch.tensor(s, dtype=torch.float32).view(1, -1, 1, 1) for s in stats)
    for i in range(0, len(x), size):
        yield normalize(x[i : i + size].float(), mean, std).numpy()


def session(path: str | Path, threads: int = 1):
    """An ONNX Runtime CPU session with `threads` intra-op threads, one inter-op thread, every graph optimisation:
    the options of a bundle's `predict.cpu_session`, so that the sweep and the board run the same graph."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_logits(sess, x: torch.Tensor, mean, std, *, batch_size: int = 256) -> np.ndarray:
    """ONNX Runtime logits of uint8 images, normalised as training normalises."""
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: b})[0] for b in normalized_batches(x, (mean, std), batch_size)])


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
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Calibration(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT: batch}

    with tempfile.TemporaryDirectory() as tmp, _quiet_root_logger():
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared))  # shape inference and graph clean-up, as ORT advises
        ops = sorted({n.op_type for n in onnx.load(str(prepared)).graph.node} - set(INT8_SKIP))
        quantize_static(
            str(prepared),
            str(out),
            Calibration(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=ops,
            calibrate_method=CalibrationMethod.MinMax,
        )


def calibration_batches(
    x: torch.Tensor, mean, std, *, n: int = CALIBRATION_IMAGES, seed: int = CALIBRATION_SEED, batch_size: int = 32
) -> list[np.ndarray]:
    """`n` images drawn with `seed` from uint8 training images, normalised, in batches."""
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return list(normalized_batches(x[idx], (mean, std), batch_size))


def export_pair(
    model: nn.Module, folder: Path, input_shape: tuple[int, ...], calibration: list[np.ndarray]
) -> tuple[Path, Path]:
    """The fp32 and the int8 file of a model (on the CPU, fp32) in `folder` under their FILES names: export, compact
    names, quantize the fp32 file on the calibration batches, compact names. Return their paths."""
    fp32, int8 = folder / FILES["fp32"], folder / FILES["int8"]
    export_onnx(model, fp32, input_shape)
    compact_names(fp32)
    quantize_int8(fp32, int8, calibration)
    compact_names(int8)
    return fp32, int8


@torch.no_grad()
def as_trained(model: nn.Module) -> nn.Module:
    """Draw a fresh model's BatchNorm weights and statistics at random, as training leaves them (in place): at
    their initial 1s and 0s the exporter stores equal tensors once and the file looks smaller than a trained one."""
    for bn in (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        for tensor, (low, high) in (
            (bn.weight, (0.5, 1.5)),
            (bn.bias, (-0.1, 0.1)),
            (bn.running_mean, (-0.1, 0.1)),
            (bn.running_var, (0.5, 1.5)),
        ):
            if tensor is not None:
                tensor.uniform_(low, high)
    return model


def random_calibration(shape: tuple[int, ...], n: int, seed: int) -> list[np.ndarray]:
    """Calibration batches of `n` uniform random uint8 images normalised with mean 0.5, std 0.25: for an
    architecture alone (they change the int8 scales, not the file size or the work done)."""
    images = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return list(normalized_batches(images, ((0.5,) * shape[0], (0.25,) * shape[0]), 32))
