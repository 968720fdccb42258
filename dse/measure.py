"""Measure any nn.Module the way the paper and a deployment engineer need: params, sizes, MACs, latency."""

from __future__ import annotations

import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["ModelProfile", "profile", "state_dict_bytes", "int8_bytes", "count_macs", "measure_latency"]


@dataclass(frozen=True)
class ModelProfile:
    """What `profile` measured. Sizes: `size_mb` is the fp32 `state_dict` file in 10^6 bytes, as the
    paper's "model size"; `int8_mb` is an estimate (see `int8_bytes`). Latency is batch-1 CPU inference."""

    params: int
    size_bytes: int
    size_mb: float
    int8_bytes: int
    int8_mb: float
    macs: int
    flops: int
    input_shape: tuple[int, ...]
    latency_ms: float | None
    latency_iqr_ms: float | None
    latency_runs: int
    threads: int

    def to_dict(self) -> dict:
        return asdict(self)


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of the file `torch.save(model.state_dict(), "model.pt")` writes: weights, BN statistics and
    the zip framing (whose record names come from the file name, hence a real file of a fixed name)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.pt"
        torch.save(model.state_dict(), path)
        return path.stat().st_size


def int8_bytes(model: nn.Module) -> int:
    """Estimated bytes of the model with int8 weights: each conv/linear weight at 1 byte plus one fp32
    scale per output channel; everything else (biases, BatchNorm, buffers) stays at fp32. BatchNorm
    folding at export may make the real file smaller; framing overhead is not counted."""
    total = 0
    for module in model.modules():
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for name, tensor in own:
            if name == "weight" and isinstance(module, (nn.Conv2d, nn.Linear)):
                total += tensor.numel() + 4 * tensor.shape[0]
            else:
                total += tensor.numel() * tensor.element_size()
    return total


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> tuple[int, int]:
    """(MACs, FLOPs) of one forward pass on one image, counted by `torch.utils.flop_counter`."""
    counter = FlopCounterMode(display=False)
    with _eval(model), torch.no_grad(), counter:
        model(torch.zeros(1, *input_shape))
    flops = counter.get_total_flops()
    return flops // 2, flops


@contextmanager
def _eval(model: nn.Module) -> Iterator[nn.Module]:
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure_latency(
    model: nn.Module, input_shape: Sequence[int], *, threads: int = 1, warmup: int = 10, repeats: int = 50
) -> tuple[float, float]:
    """Batch-1 CPU inference latency in ms: (median, interquartile range) over `repeats` timed runs after
    `warmup` untimed ones, with `threads` intra-op threads. Eval mode, no autograd, NCHW fp32."""
    if repeats < 1 or warmup < 0 or threads < 1:
        raise ValueError(f"{repeats=} must be >= 1, {warmup=} >= 0, {threads=} >= 1")
    x = torch.randn(1, *input_shape)
    times = []
    with _eval(model), torch.inference_mode(), _threads(threads):
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    if len(times) < 2:
        return times[0], 0.0
    q1, _, q3 = statistics.quantiles(times, n=4)
    return statistics.median(times), q3 - q1


def profile(
    model: nn.Module,
    input_shape: Sequence[int] = (3, 32, 32),
    *,
    threads: int = 1,
    warmup: int = 10,
    repeats: int = 50,
    latency: bool = True,
) -> ModelProfile:
    """Params, fp32 `state_dict` size (bytes and MB = 10^6 bytes), int8 size estimate, MACs/FLOPs per image
    and batch-1 CPU latency (median and IQR, `threads` threads; skipped with `latency=False`)."""
    input_shape = tuple(input_shape)
    size = state_dict_bytes(model)
    int8 = int8_bytes(model)
    macs, flops = count_macs(model, input_shape)
    median, iqr = measure_latency(model, input_shape, threads=threads, warmup=warmup, repeats=repeats) if latency else (None, None)
    return ModelProfile(
        params=sum(p.numel() for p in model.parameters()),
        size_bytes=size,
        size_mb=size / 1e6,
        int8_bytes=int8,
        int8_mb=int8 / 1e6,
        macs=macs,
        flops=flops,
        input_shape=input_shape,
        latency_ms=median,
        latency_iqr_ms=iqr,
        latency_runs=repeats if latency else 0,
        threads=threads,
    )
