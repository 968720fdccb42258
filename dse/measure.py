"""Measure any nn.Module the way the paper and a deployment engineer need: params, sizes, MACs, latency.

Latency has one method, `time_calls` then `median_iqr`: `measure_latency` applies it to a model, the rounds of
`measure_calls` (PyTorch models: `measure_latencies`; ONNX Runtime sessions: `dse.latency`) keep the fastest of each
round on the wall clock and on the thread's CPU time, and `dse.deploy.onnx` times ONNX Runtime sessions with it. (A bundle's own `bench_latency.py` ships without dse, so it carries its copy.)"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "ModelProfile",
    "Latency",
    "profile",
    "state_dict_bytes",
    "int8_bytes",
    "count_macs",
    "time_calls",
    "median_iqr",
    "measure_latency",
    "measure_latencies",
    "measure_calls",
]

# A sitting is "under load" when other processes kept more than this share of the machine's cores busy.
UNDER_LOAD = 0.25
# A wall-clock figure is kept while it exceeds the thread's CPU time by at most this share (the clocks agree).
AGREE = 0.15


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


def time_calls(
    call: Callable[[], Any], *, warmup: int, runs: int, clock: Callable[[], float] = time.perf_counter
) -> list[float]:
    """Milliseconds of `runs` timed calls of `call` on `clock` (seconds; the wall clock by default), after `warmup`
    untimed ones."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"{runs=} must be >= 1 and {warmup=} >= 0")
    times = []
    for i in range(warmup + runs):
        start = clock()
        call()
        if i >= warmup:
            times.append((clock() - start) * 1e3)
    return times


def median_iqr(times: Sequence[float]) -> tuple[float, float]:
    """(median, interquartile range) of timings; one timing has no spread."""
    if len(times) < 2:
        return times[0], 0.0
    q1, _, q3 = statistics.quantiles(times, n=4)
    return statistics.median(times), q3 - q1


def measure_latency(
    model: nn.Module, input_shape: Sequence[int], *, threads: int = 1, warmup: int = 10, repeats: int = 50
) -> tuple[float, float]:
    """Batch-1 CPU inference latency in ms: (median, interquartile range) over `repeats` timed runs after
    `warmup` untimed ones, with `threads` intra-op threads. Eval mode, no autograd, NCHW fp32."""
    if repeats < 1 or warmup < 0 or threads < 1:
        raise ValueError(f"{repeats=} must be >= 1, {warmup=} >= 0, {threads=} >= 1")
    x = torch.randn(1, *input_shape)
    with _eval(model), torch.inference_mode(), _threads(threads):
        return median_iqr(time_calls(lambda: model(x), warmup=warmup, runs=repeats))


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
    median, iqr = (
        measure_latency(model, input_shape, threads=threads, warmup=warmup, repeats=repeats)
        if latency
        else (None, None)
    )
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


@dataclass(frozen=True)
class Latency:
    """Batch-1 CPU latency of one model from one sitting of `measure_calls`. Each round times a few runs in a row
    and keeps the fastest (a run the scheduler did not interrupt); `ms` is the median of those round figures over
    the last `window` rounds, `iqr_ms` their interquartile range (the drift between rounds).

    Each run is timed twice: on the wall clock and on the CPU time of the thread that runs it (PyTorch with one
    thread and ONNX Runtime with one intra-op thread compute on the calling thread). `ms` is the wall figure when
    the two agree (`clock` "wall"); when the wall figure exceeds the CPU figure by more than AGREE, other processes
    took the core meanwhile, and `ms` is the CPU figure (`clock` "thread cpu time")."""

    ms: float
    iqr_ms: float
    window: int  # rounds the figure comes from
    rounds: int  # rounds run in all: more than the window while the spread was wide
    runs: int  # timed runs per round
    threads: int
    other_cores: float | None  # cores other processes kept busy on average (None: not measurable here)
    cpus: int  # the cores this process may run on
    under_load: bool  # other_cores > UNDER_LOAD x cpus
    wall_ms: float | None = None  # the two clocks' figures (None: a figure of an older dse, wall only)
    cpu_ms: float | None = None
    clock: str = "wall"  # which of them `ms` is: "wall" | "thread cpu time"

    @property
    def spread(self) -> float:
        """IQR / median over the rounds: 0.05 means the middle half of the rounds lie within 5 % of the median."""
        return self.iqr_ms / self.ms if self.ms else float("inf")

    def to_dict(self) -> dict:
        return {**asdict(self), "spread": self.spread}


def _cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def _busy_seconds(cores: list[int]) -> float | None:
    """CPU seconds every process has spent busy on these cores (Linux /proc/stat); None elsewhere."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    busy = 0
    for line in lines:
        name, *ticks = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
            values = [int(t) for t in ticks[:8]]  # user nice system idle iowait irq softirq steal
            busy += sum(values) - values[3] - values[4]
    return busy / os.sysconf("SC_CLK_TCK")


@contextmanager
def _machine_load(out: dict) -> Iterator[None]:
    """Fill out["other_cores"]: the cores other processes kept busy on average while the block ran."""
    cores = _cores()
    wall, mine, busy = time.perf_counter(), time.process_time(), _busy_seconds(cores)
    yield
    after = _busy_seconds(cores)
    elapsed = time.perf_counter() - wall
    others = None
    if busy is not None and after is not None and elapsed > 0:
        others = max(0.0, (after - busy) - (time.process_time() - mine)) / elapsed
    out.update(other_cores=others, cpus=len(cores))


def measure_latencies(
    models: Mapping[str, tuple[nn.Module, Sequence[int]]], *, threads: int = 1, **settings
) -> dict[str, Latency]:
    """Batch-1 CPU latency of several PyTorch models in one sitting (`measure_calls`): eval mode, no autograd,
    NCHW fp32, `threads` threads. `models` maps a name to (model, input shape without the batch)."""
    if threads < 1:
        raise ValueError(f"{threads=} must be >= 1")
    inputs = {name: torch.randn(1, *shape) for name, (_, shape) in models.items()}
    with ExitStack() as stack:
        for model, _ in models.values():
            stack.enter_context(_eval(model))
        stack.enter_context(torch.inference_mode())
        stack.enter_context(_threads(threads))
        calls = {name: (lambda m=model, x=inputs[name]: m(x)) for name, (model, _) in models.items()}
        return measure_calls(calls, threads=threads, **settings)


def measure_calls(
    calls: Mapping[str, Callable[[], Any]],
    *,
    threads: int = 1,
    warmup: int = 5,
    runs: int = 5,
    window: int = 7,
    max_rounds: int = 40,
    max_spread: float = 0.05,
    clock: Callable[[], float] = time.perf_counter,
    cpu_clock: Callable[[], float] = time.thread_time,
) -> dict[str, Latency]:
    """Latency of several calls (one batch-1 inference each) in one sitting, so that they compare with each other.
    Rounds interleave them: each round times `runs` runs of each call in turn (after one untimed run) and keeps the
    fastest. A call's figure is the median of its last `window` round figures; while their spread (IQR / median)
    exceeds `max_spread` the call gets more rounds, up to `max_rounds`, so that drift or a burst of load elsewhere
    passes. `clock` (the wall clock) and `cpu_clock` (this thread's CPU time) time the runs, in seconds; `threads`
    is recorded (set it yourself)."""
    if runs < 1 or window < 1 or max_rounds < window or warmup < 0 or threads < 1 or max_spread <= 0:
        raise ValueError(
            f"{runs=} and {window=} must be >= 1, {max_rounds=} >= window, {warmup=} >= 0, "
            f"{threads=} >= 1, {max_spread=} > 0"
        )
    best: dict[str, list[float]] = {name: [] for name in calls}  # the fastest wall-clock run of each round
    cpu: dict[str, list[float]] = {name: [] for name in calls}  # and the fastest on the thread's CPU time
    load: dict = {}
    with _machine_load(load):
        for call in calls.values():
            for _ in range(warmup):
                call()
        wide = list(calls)
        while wide:
            for name in wide:
                wall, used = _fastest(calls[name], runs, clock, cpu_clock)
                best[name].append(wall)
                cpu[name].append(used)
            wide = [
                n
                for n in wide
                if len(best[n]) < max_rounds and (len(best[n]) < window or _spread(best[n][-window:]) > max_spread)
            ]
    under = load["other_cores"] is not None and load["other_cores"] > UNDER_LOAD * load["cpus"]
    out = {}
    for name in calls:
        wall, wall_iqr = median_iqr(best[name][-window:])
        used, used_iqr = median_iqr(cpu[name][-window:])
        agree = wall <= used * (1 + AGREE)
        out[name] = Latency(
            wall if agree else used,
            wall_iqr if agree else used_iqr,
            min(window, len(best[name])),
            len(best[name]),
            runs,
            threads,
            load["other_cores"],
            load["cpus"],
            under,
            wall,
            used,
            "wall" if agree else "thread cpu time",
        )
    return out


def _spread(values: list[float]) -> float:
    median, iqr = median_iqr(values)
    return iqr / median


def _fastest(
    call: Callable[[], Any], runs: int, clock: Callable[[], float], cpu_clock: Callable[[], float]
) -> tuple[float, float]:
    """The fastest of `runs` timed calls in ms, on the wall clock and on the thread's CPU time, after an untimed
    one (the previous model left the cache)."""
    call()
    walls, cpus = [], []
    for _ in range(runs):
        wall, used = clock(), cpu_clock()
        call()
        cpus.append((cpu_clock() - used) * 1e3)
        walls.append((clock() - wall) * 1e3)
    return min(walls), min(cpus)
