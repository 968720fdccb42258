"""What a trial computes beyond its config: the layout `auto` trains in, vmapped groups and CUDA graphs, decided once
per architecture and device kind and stored on the study as `layout:<device kind>:<architecture>` (`ensure`)."""

from __future__ import annotations

import datetime
import platform
import socket
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import torch

import dse
from dse.autotune import auto_layout
from dse.config import TrainConfig
from dse.fused import vmaps_on
from dse.step import native_bf16

__all__ = ["ATTR", "Numerics", "attr_key", "device_kind", "ensure", "figures", "rule"]

ATTR = "layout:"


@dataclass(frozen=True)
class Numerics:
    """The choices, beyond a trial's config, that change its numbers (kernels that round differently): the layout
    `train.memory_format=auto` trains in, whether fused groups run vmapped (grouped kernels) or member by member,
    and on CUDA whether steps replay a captured graph (capturable optimizers). Choices that change no number (group
    size, threads) are not here: they may follow the clock."""

    memory_format: str
    vmapped: bool
    cuda_graph: bool

    @classmethod
    def from_figure(cls, figure: Mapping) -> Numerics:
        return cls(figure["memory_format"], bool(figure["vmapped"]), bool(figure["cuda_graph"]))


def _cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def device_kind(device: torch.device) -> str:
    """What picks a device's kernels, as a key: a GPU's name and compute capability, or a CPU's model and whether
    it computes in bf16 natively (`dse.step.native_bf16`: bf16 autocast on or off). Machines of one kind compute
    a trial's numbers identically; another kind within the noise of its arithmetic."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"cuda {props.name} sm_{props.major}{props.minor}"
    return f"{device.type} {_cpu_model()} {'bf16' if native_bf16(device) else 'no-bf16'}"


def attr_key(kind: str, architecture: str) -> str:
    """The study attribute of an architecture's choice on a device kind (`dse.identity.architecture`'s key)."""
    return f"{ATTR}{kind}:{architecture}"


def figures(study_attrs: Mapping) -> dict[str, dict]:
    """The choices a study holds (its user attributes), by attribute key."""
    return {k: v for k, v in study_attrs.items() if k.startswith(ATTR) and isinstance(v, dict)}


def rule(cfg: TrainConfig, device: torch.device) -> Numerics:
    """A deterministic function of the device (and, for CUDA graphs, the first run's `train.cuda_graph`): what a
    study decides where it has no choice yet. Why not a timing: `ensure` must give two brand-new studies of one
    command the same answer on one machine kind, and a clock under load does not; why store it at all: a study
    keeps the choice it started with when a later dse changes this rule, and its figure says how it was made."""
    return Numerics(auto_layout(device), vmaps_on(device), device.type == "cuda" and cfg.cuda_graph)


def ensure(
    study, kind: str, architecture: str, decide: Callable[[], Numerics], *, advice: Callable[[], str] | None = None
) -> tuple[str, Numerics]:
    """(attribute key, choice) of an architecture on a device kind: the one the study stores (reruns, retries,
    resumes and other workers reuse it), else `decide()`'s, stored now with how and when it was decided and, as
    advice only, what `advice()` (a layout timing) says is faster. Two workers deciding at once store the same
    choice (`decide` is a rule), so the later write loses nothing."""
    key = attr_key(kind, architecture)
    stored = study.user_attrs.get(key)
    if isinstance(stored, dict):
        return key, Numerics.from_figure(stored)
    choice = decide()
    try:
        faster = advice() if advice is not None else None
    except Exception as e:  # noqa: BLE001 - advice that fails costs nothing: it changes no choice
        faster = f"not timed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    study.set_user_attr(
        key,
        {
            **asdict(choice),
            "device_kind": kind,
            "architecture": architecture,
            "faster": faster,
            "how": "rule (dse.layouts.rule), at the study's first trial of the architecture on this device kind",
            "host": socket.gethostname(),
            "dse": dse.__version__,
            "decided_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        },
    )
    return key, choice
