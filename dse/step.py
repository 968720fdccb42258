"""The training step of a group of trials, eager (Step) or replayed from a CUDA graph (GraphStep), chosen once per run
by its StepMode; the device and precision it runs in."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch import Tensor

from dse.config import TrainConfig
from dse.fused import (
    dropout_key,
    group_forward,
    seed_dropouts,
    unfuse,
    unseed,
    vmaps_on,
)
from dse.optim import NOT_CAPTURABLE, average_into, ema_decay, make_optimizer

__all__ = [
    "WARMUP_STEPS",
    "GraphStep",
    "Learner",
    "Step",
    "StepMode",
    "mixed_precision",
    "native_bf16",
    "resolve_device",
    "step_mode",
    "sync",
    "time_steps",
]

log = logging.getLogger(__name__)

WARMUP_STEPS = 3  # eager steps on a side stream before a CUDA graph is captured (cuDNN and cuBLAS set-up)


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"train device={name!r} is not a device; allowed: auto, cpu, cuda, cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train device={name!r} but CUDA is not available here; use device=auto or cpu")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively (any CUDA GPU we train on; a CPU with AMX or AVX512-BF16).
    Elsewhere bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        return True
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch.cpu's only probes are private
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def mixed_precision(cfg: TrainConfig, device: torch.device, *, cache: bool = True) -> torch.autocast:
    """The autocast context the trainer runs forward passes in: bf16 when `cfg.amp` and the device has bf16 units.
    `cache=False` for code captured in a CUDA graph (autocast's weight cache must not outlive the capture)."""
    enabled = cfg.amp and native_bf16(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=cache)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (what a wall-clock timing of CUDA work needs)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Learner:
    """A member's training state on the device: its model (dropouts seeded), optimizer and weight average."""

    model: nn.Module
    cfg: TrainConfig
    optimizer: torch.optim.Optimizer
    average: nn.Module | None  # the weight average (cfg.ema), evaluated and saved instead of the model
    dropouts: list = field(default_factory=list)  # (parent, attribute, nn.Dropout) swapped for SeededDropouts
    released: bool = False

    def release(self, *, averaged: bool) -> None:
        """Give the model back as it was handed over, with the weights it ends with: its own tensors and dropout
        modules; with `averaged`, its weight average's weights (what was evaluated and saved). Once."""
        if self.released:
            return
        unseed(self.dropouts)
        unfuse(self.model)
        if self.average is not None:
            unfuse(self.average)
            if averaged:
                self.model.load_state_dict(self.average.state_dict())
        self.released = True


@dataclass(frozen=True, eq=False)
class StepMode:
    """How a run steps, decided once where it starts: its device and autocast, eager or CUDA-graph steps, and
    whether groups run vmapped or member by member."""

    device: torch.device
    autocast: torch.autocast
    bf16: bool
    graphed: bool  # steps are captured in a CUDA graph after warm-up (GraphStep), their optimizers built for it
    vmapped: bool
    compile: bool
    counter: Tensor  # the steps done in this epoch, on the device: the dropout masks and per-step tables read it

    @property
    def precision(self) -> str:
        return "bf16 autocast" if self.bf16 else "fp32"

    def learner(self, model: nn.Module, cfg: TrainConfig) -> Learner:
        """`model` (on the device, in its layout) ready to train: its optimizer, its average, its dropouts seeded."""
        optimizer = make_optimizer(model, cfg, graph=self.graphed)
        average = copy.deepcopy(model) if cfg.ema else None
        return Learner(model, cfg, optimizer, average, seed_dropouts(model, self.counter))

    def step(self, learners: list[Learner], steps: int) -> Step:
        """The training step of these learners as one group, for epochs of `steps` steps."""
        return (GraphStep if self.graphed else Step)(self, learners, steps)


def step_mode(
    cfgs: Sequence[TrainConfig], device: torch.device, *, vmapped: bool | None = None, quiet: bool = False
) -> StepMode:
    """The mode of a run of members with these configs (they share `group_key`) on `device`: CUDA graphs where
    `cuda_graph` asks and every optimizer can be captured (else the log says why not, unless `quiet`); vmapped
    groups where `vmapped` says, by default on `VMAP_DEVICES`."""
    cfg = cfgs[0]
    graphed = device.type == "cuda" and cfg.cuda_graph
    if graphed:
        problems = ["train.compile=true runs compiled steps"] if cfg.compile else []
        problems += sorted({NOT_CAPTURABLE[c.optimizer] for c in cfgs if c.optimizer in NOT_CAPTURABLE})
        if problems and not quiet:
            log.warning("dse.train: no CUDA graph: %s; training eagerly", "; ".join(problems))
        graphed = not problems
    return StepMode(
        device,
        mixed_precision(cfg, device, cache=not graphed),
        bf16=cfg.amp and native_bf16(device),
        graphed=graphed,
        vmapped=vmaps_on(device) if vmapped is None else vmapped,
        compile=cfg.compile,
        counter=torch.zeros(1, dtype=torch.int64, device=device),
    )


def _losses(logits: Tensor, y: Tensor, smoothing: Tensor) -> Tensor:
    """Each member's mean cross-entropy over its batch with its own label smoothing (M×1): torch's formula."""
    logp = logits.log_softmax(-1)
    nll = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return ((1 - smoothing) * nll - smoothing * logp.mean(-1)).mean(-1)


class Step:
    """One training step of every learner of a group, run eagerly: one forward pass for all (fused), each one's
    loss with its label smoothing, backward, each one's optimizer step and weight average. Per epoch:
    `begin_epoch`, a call per batch, `totals`; `evaluator` for scoring."""

    def __init__(self, mode: StepMode, learners: list[Learner], steps: int):
        m, device = len(learners), mode.device
        self.mode, self.learners, self.steps = mode, learners, steps
        forward, tensors = group_forward([learner.model for learner in learners], vmapped=mode.vmapped)
        self.forward = torch.compile(forward) if mode.compile else forward
        self.evaluated = self.forward  # the members' weight averages, or their models
        self.grads = [t.grad for t in tensors.values() if t.requires_grad]  # each parameter's is a view of these
        self.smoothing = torch.tensor([[learner.cfg.label_smoothing] for learner in learners], device=device)
        self.loss_sum = torch.zeros(m, device=device)
        self.correct = torch.zeros(m, dtype=torch.int64, device=device)
        self.averages: list[tuple[Tensor, Tensor]] = []  # (average, model) tensor pairs
        if learners[0].cfg.ema:
            averaged, averages = group_forward(
                [learner.average for learner in learners], vmapped=mode.vmapped, grads=False
            )
            self.evaluated = torch.compile(averaged) if mode.compile else averaged
            self.averages = [(average, tensors[name].detach()) for name, average in averages.items()]
            self.ema = torch.zeros(m, device=device)  # this step's weight of the model in each average (1 - decay)
            self.ema_table = torch.zeros(m, steps, device=device)  # M×steps: this epoch's weights
            self.ema_views = [
                self.ema.view(()) if m == 1 else self.ema.view(-1, *[1] * (a.dim() - 1)) for a, _ in self.averages
            ]
        self.lrs: list[list[float]] = []  # this epoch's learning rates per learner and step
        self.taken = 0  # steps taken this epoch

    @property
    def graphed(self) -> bool:
        """Whether the steps replay a captured CUDA graph."""
        return False

    def begin_epoch(self, epochs: list[int], lrs: list[list[float]]) -> None:
        """Start a training pass: each learner's 0-based epoch (its dropout masks and average's decay) and its
        learning rate per step; the models in train mode, the averages in eval mode."""
        for counter in (self.mode.counter, self.loss_sum, self.correct):
            counter.zero_()
        self.lrs, self.taken = lrs, 0
        for learner, epoch in zip(self.learners, epochs):
            key = dropout_key(learner.cfg.seed, epoch)
            for parent, attr, _ in learner.dropouts:
                getattr(parent, attr).key.fill_(key)
            learner.model.train()
            if learner.average is not None:
                learner.average.eval()
        if self.averages:
            weights = [
                [1 - ema_decay(learner.cfg, epoch * self.steps + i) for i in range(self.steps)]
                for learner, epoch in zip(self.learners, epochs)
            ]
            self.ema_table.copy_(torch.tensor(weights, dtype=self.ema_table.dtype))

    def __call__(self, x: Tensor, y: Tensor) -> None:
        """One step on each learner's batch: x M×B×C×H×W, y M×B."""
        for learner, lrs in zip(self.learners, self.lrs):
            for param_group in learner.optimizer.param_groups:
                param_group["lr"] = lrs[self.taken]
        self._compute(x, y)
        self.taken += 1

    def totals(self) -> tuple[list[float], list[float]]:
        """The pass's summed training loss and correct predictions per learner (the epoch's one host sync)."""
        losses, hits = torch.stack([self.loss_sum.double(), self.correct.double()]).tolist()
        return losses, hits

    def evaluator(self) -> Callable[[Tensor], Tensor]:
        """Every learner's weight average (or model) in eval mode as one call: N images -> M×N×K logits."""
        for learner in self.learners:
            learner.model.eval()
            if learner.average is not None:
                learner.average.eval()
        return lambda x: self.evaluated(x, True)

    def _compute(self, x: Tensor, y: Tensor) -> None:
        """The step's device work only, so that it can be captured in a CUDA graph and replayed."""
        torch._foreach_zero_(self.grads)  # one kernel for every gradient; torch has no public foreach zero
        with self.mode.autocast:
            logits = self.forward(x, False)
        losses = _losses(logits.float(), y, self.smoothing)
        losses.sum().backward()
        for learner in self.learners:
            learner.optimizer.step()
        if self.averages:
            self.ema.copy_(self.ema_table.index_select(1, self.mode.counter).squeeze(1))
            with torch.no_grad():
                average_into(self.averages, self.ema_views)
        self.loss_sum += losses.detach() * y.shape[1]
        self.correct += (logits.argmax(-1) == y).sum(-1)
        self.mode.counter.add_(1)


class GraphStep(Step):
    """The same step, its learning rates read from a device table: warmed up on a side stream, captured in a CUDA
    graph, then replayed. Where the capture fails, the log says why and it steps as Step does from then on."""

    def __init__(self, mode: StepMode, learners: list[Learner], steps: int):
        super().__init__(mode, learners, steps)
        m, device = len(learners), mode.device
        self.lr = torch.zeros(m, device=device)  # the learning rates the optimizers read
        self.lr_table = torch.zeros(m, steps, device=device)  # M×steps: this epoch's
        for learner, lr in zip(learners, self.lr.unbind()):
            for param_group in learner.optimizer.param_groups:
                param_group["lr"] = lr
        self.side = torch.cuda.Stream(device)  # the warm-up stream
        self.static: tuple[Tensor, Tensor] | None = None  # the graph's input buffers
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warm = 0
        self.eager = False  # the capture failed

    @property
    def graphed(self) -> bool:
        return self.graph is not None

    def begin_epoch(self, epochs: list[int], lrs: list[list[float]]) -> None:
        super().begin_epoch(epochs, lrs)
        self.lr_table.copy_(torch.tensor(lrs, dtype=self.lr_table.dtype))

    def __call__(self, x: Tensor, y: Tensor) -> None:
        if self.eager:
            super().__call__(x, y)
            return
        if self.static is None:
            self.static = (torch.empty_like(x), torch.empty_like(y))
        static_x, static_y = self.static
        static_x.copy_(x)
        static_y.copy_(y)
        self.taken += 1
        if self.graph is not None:
            self.graph.replay()
            return
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            self._compute(static_x, static_y)
        torch.cuda.current_stream().wait_stream(self.side)
        self.warm += 1
        if self.warm == WARMUP_STEPS:
            self.graph = self._capture()
            self.eager = self.graph is None

    def _compute(self, x: Tensor, y: Tensor) -> None:
        if not self.eager:
            self.lr.copy_(self.lr_table.index_select(1, self.mode.counter).squeeze(1))
        super()._compute(x, y)

    def _capture(self) -> torch.cuda.CUDAGraph | None:
        """The step recorded in a CUDA graph (recording runs nothing); None, with the reason logged, where it fails."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._compute(*self.static)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as e:
            log.warning(
                "dse.train: the training step cannot be captured in a CUDA graph (%s); training eagerly",
                str(e).strip().splitlines()[0],
            )
            return None
        return graph


def time_steps(mode: StepMode, learners: list[Learner], x: Tensor, y: Tensor, steps: int) -> float:
    """Seconds `steps` training steps of the learners as one group take on the batch (x, y) at their configs' lr,
    timed after WARMUP_STEPS + 1 untimed ones (warm-up and, graphed, the capture and a first replay)."""
    untimed = WARMUP_STEPS + 1
    step = mode.step(learners, untimed + steps)
    step.begin_epoch([0] * len(learners), [[learner.cfg.lr] * (untimed + steps) for learner in learners])
    for _ in range(untimed):
        step(x, y)
    sync(mode.device)
    start = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    sync(mode.device)
    return time.perf_counter() - start
