"""Multi-objective early stopping: at rung epochs, prune a trial whose validation accuracy is dominated by
trials that are no larger and no slower (size and latency are known before the first epoch)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["PruningConfig", "History", "Decision", "rungs", "decide", "histories"]


@dataclass
class PruningConfig:
    """Knobs of the `pareto` pruner (`study.pruning` in config)."""

    first_rung: int = 1  # rung epochs: first_rung * base**k (1, 3, 9, 27, ... by default)
    base: int = 3
    margin: float = 0.0  # a dominator's accuracy must exceed ours by more than this (fraction)
    min_trials: int = 2  # comparison trials that must have reached the rung before any decision
    eta: int | None = None  # ASHA rule: also prune outside the top 1/eta of similar-size trials
    band: float = 0.25  # "similar size" for the ASHA rule: within a factor (1 + band) in size and latency

    def __post_init__(self) -> None:
        if self.first_rung < 1 or self.base < 2:
            raise ValueError(f"pruning first_rung={self.first_rung} must be >= 1 and base={self.base} >= 2")
        if self.margin < 0 or self.min_trials < 1 or self.band < 0:
            raise ValueError(
                f"pruning margin={self.margin} and band={self.band} must be >= 0, min_trials={self.min_trials} >= 1"
            )
        if self.eta is not None and self.eta < 2:
            raise ValueError(f"pruning eta={self.eta} must be >= 2 or null (off)")


@dataclass(frozen=True)
class History:
    """What a trial has shown so far: its fixed costs and its validation accuracy per finished epoch."""

    number: int
    size: float
    latency: float
    accuracy: dict[int, float] = field(default_factory=dict)  # epoch -> validation accuracy


@dataclass(frozen=True)
class Decision:
    epoch: int
    accuracy: float
    dominated_by: int  # the best trial that made the decision
    their_accuracy: float
    rule: str  # "dominated" | "asha"

    def reason(self) -> str:
        return (
            f"{self.rule} at epoch {self.epoch}: val_acc {self.accuracy:.4f} vs {self.their_accuracy:.4f} of "
            f"trial {self.dominated_by}, which is no larger and no slower"
            + (" (within the size band)" if self.rule == "asha" else "")
        )


def rungs(cfg: PruningConfig, last_epoch: int) -> list[int]:
    """The rung epochs up to `last_epoch` (the last epoch itself is never a rung: the trial is done)."""
    out, epoch = [], cfg.first_rung
    while epoch < last_epoch:
        out.append(epoch)
        epoch *= cfg.base
    return out


def decide(me: History, epoch: int, others: list[History], cfg: PruningConfig) -> Decision | None:
    """Prune `me` at `epoch`? Only trials that reached this epoch count; a trial that no other one
    dominates (strictly better accuracy beyond the margin, at no more size and no more latency) is kept."""
    if epoch not in me.accuracy:
        raise ValueError(f"trial {me.number} has no accuracy at {epoch=}")
    mine = me.accuracy[epoch]
    peers = [o for o in others if o.number != me.number and epoch in o.accuracy]
    if len(peers) < cfg.min_trials:
        return None
    dominators = [
        o for o in peers if o.size <= me.size and o.latency <= me.latency and o.accuracy[epoch] > mine + cfg.margin
    ]
    if dominators:
        best = max(dominators, key=lambda o: o.accuracy[epoch])
        return Decision(epoch, mine, best.number, best.accuracy[epoch], "dominated")
    if cfg.eta is None:
        return None
    grow = 1 + cfg.band
    similar = [o for o in peers if o.size <= me.size * grow and o.latency <= me.latency * grow]
    better = sorted((o for o in similar if o.accuracy[epoch] > mine + cfg.margin), key=lambda o: -o.accuracy[epoch])
    keep = math.ceil((len(similar) + 1) / cfg.eta)
    if len(better) >= keep:
        return Decision(epoch, mine, better[0].number, better[0].accuracy[epoch], "asha")
    return None


def histories(trials, *, size_key: str = "size_mb", latency_key: str = "latency_ms") -> list[History]:
    """Histories of Optuna trials (FrozenTrial) from their user attributes: size, latency, `curves`."""
    out = []
    for t in trials:
        attrs = t.user_attrs
        if size_key in attrs and latency_key in attrs and attrs.get("curves"):
            curve = {int(r["epoch"]): float(r["val_acc"]) for r in attrs["curves"]}
            out.append(History(t.number, float(attrs[size_key]), float(attrs[latency_key]), curve))
    return out
