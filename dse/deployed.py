"""A trained model as it ships: its fp32 and int8 ONNX files (`dse.onnx`, the code path `dse.deploy export` uses),
their sizes and sha256, and both evaluated in ONNX Runtime on the validation and the test split."""

from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from dse.data import Splits
from dse.onnx import CALIBRATION_IMAGES, CALIBRATION_SEED, calibration_batches, export_pair, ort_logits, session

__all__ = ["EVAL_BATCH", "Deployed", "evaluate_deployed", "sha256"]

EVAL_BATCH = 1024  # images per ONNX Runtime call: large batches amortise its per-call cost


@dataclass(frozen=True)
class Deployed:
    """What `evaluate_deployed` made: the two files and the trial attributes that describe them."""

    fp32: Path
    int8: Path
    attrs: dict  # val_acc_onnx, val_acc_int8, test_acc_onnx, test_acc_int8, onnx_kb, int8_kb, sha256s, seconds


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _accuracy(sess, x: torch.Tensor, y: torch.Tensor, splits: Splits) -> float:
    if not len(x):
        return float("nan")
    logits = ort_logits(sess, x, splits.mean, splits.std, batch_size=EVAL_BATCH)
    return float((logits.argmax(1) == y.numpy()).mean())


def evaluate_deployed(model: nn.Module, splits: Splits, folder: Path, *, threads: int = 1) -> Deployed:
    """Export `model` (a copy, on the CPU in fp32 and NCHW) into `folder` as `dse.deploy export` does (int8
    calibrated on CALIBRATION_IMAGES training images drawn with CALIBRATION_SEED), and evaluate both files in
    ONNX Runtime (`threads` intra-op threads, one session per file) on the validation and the test split."""
    started = time.perf_counter()
    cpu = copy.deepcopy(model).to("cpu", torch.float32, memory_format=torch.contiguous_format).eval()
    folder.mkdir(parents=True, exist_ok=True)
    calibration = calibration_batches(splits.train_x.cpu(), splits.mean, splits.std)
    fp32, int8 = export_pair(cpu, folder, tuple(splits.train_x.shape[1:]), calibration)
    exported = time.perf_counter()
    attrs: dict = {}
    for name, path in (("onnx", fp32), ("int8", int8)):
        sess = session(path, threads)
        for split, x, y in (("val", splits.val_x, splits.val_y), ("test", splits.test_x, splits.test_y)):
            attrs[f"{split}_acc_{name}"] = _accuracy(sess, x.cpu(), y.cpu(), splits)
        attrs[f"{name}_kb"] = path.stat().st_size / 1e3
        attrs[f"{name}_sha256"] = sha256(path)
    attrs["deployed_calibration"] = {"images": CALIBRATION_IMAGES, "seed": CALIBRATION_SEED}
    attrs["deployed_seconds"] = {"export": exported - started, "evaluate": time.perf_counter() - exported}
    return Deployed(fp32, int8, attrs)
