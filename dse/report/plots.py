"""Figure 9 (training and validation accuracy per epoch) and the Pareto plot (accuracy vs size, colour =
latency), drawn on matplotlib's Agg canvas (no display, no global backend switch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import pandas as pd
from matplotlib import colors
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator

from dse.paper import load_paper
from dse.report.frame import label
from dse.report.tables import DATASETS, PAPER_TABLES

__all__ = ["PANELS", "pick_figure9", "plot_figure9", "non_dominated", "plot_pareto"]

# Figure 9's panels: (title, registry families, the paper's baseline models first).
PANELS = (
    ("(a) SqueezeNet", ("squeezenet_v1_0", "squeezenet_v1_1"), ("SqueezeNet-v1.0", "SqueezeNet-v1.1")),
    ("(b) SqueezeNext", ("squeezenext",), ("SqueezeNext-23-1x", "SqueezeNext-23-2x")),
    ("(c) Shallow SqueezeNext", ("shallow_squeezenext",), ("Shallow SqueezeNext-14-1.5x",)),
)
DPI = 110


def _rank(group: dict, preferred: Sequence[str]) -> tuple:
    return (
        group["dataset"] != "cifar10",
        preferred.index(group["model"]) if group["model"] in preferred else len(preferred),
        label(group) != group["model"],  # the model at its defaults before a variant of it
        -(group["budget"][0] or 0),
        -group["val_mean"],
        json.dumps([group["config"], group["budget"]]),
    )


def pick_figure9(groups: pd.DataFrame) -> list[dict | None]:
    """The experiment each panel shows: CIFAR-10 first, then the paper's baseline model (else the most
    accurate on validation), at its default knobs, with the longest training."""
    records = groups.to_dict("records")
    return [
        min((g for g in records if g["family"] in families), key=lambda g: _rank(g, preferred), default=None)
        for _, families, preferred in PANELS
    ]


def _curves(done: pd.DataFrame, group: dict) -> pd.DataFrame:
    """Per-epoch records of the experiment's trials, accuracies in %."""
    mask = [c == group["config"] and b == group["budget"] for c, b in zip(done["config"], done["budget"])]
    rows = [r for curves in done.loc[mask, "curves"] if isinstance(curves, list) for r in curves]
    frame = pd.DataFrame(rows, columns=["epoch", "train_acc", "val_acc"])
    return frame.assign(train_acc=100 * frame["train_acc"], val_acc=100 * frame["val_acc"])


def plot_figure9(done: pd.DataFrame, groups: pd.DataFrame, path: Path) -> list[str]:
    """Write Figure 9 (one panel per family: mean over seeds, band = min to max) to `path`; return what each
    panel shows."""
    fig = Figure(figsize=(15, 4.6), layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)
    shown = []
    for ax, (title, _, _), group in zip(axes, PANELS, pick_figure9(groups)):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        curves = _curves(done, group) if group is not None else pd.DataFrame()
        if curves.empty:
            ax.set_title(title, fontsize=10)
            ax.text(0.5, 0.5, "not run in these studies", ha="center", va="center", transform=ax.transAxes, color="0.4")
            shown.append(f"{title}: not run")
            continue
        what = f"{label(group)}, {DATASETS.get(group['dataset'], group['dataset'])}, n={group['n']}"
        ax.set_title(f"{title}\n{what}", fontsize=10)
        by_epoch = curves.groupby("epoch")
        for column, name, style, colour in (("train_acc", "training", "--", "C0"), ("val_acc", "validation", "-", "C1")):
            stats = by_epoch[column].agg(["mean", "min", "max"])
            ax.plot(stats.index, stats["mean"], style, color=colour, marker="o", markersize=3, label=name)
            if group["n"] > 1:
                ax.fill_between(stats.index, stats["min"], stats["max"], color=colour, alpha=0.2, linewidth=0)
        ax.legend(loc="lower right")
        shown.append(f"{title}: {what}, {group['epochs']} epochs")
    axes[0].set_ylabel("accuracy (%)")
    fig.suptitle("Figure 9: training and validation accuracy per epoch (line: mean over seeds; band: min to max)")
    fig.savefig(path, dpi=DPI)
    return shown


def non_dominated(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points that no other point dominates, every coordinate minimised."""
    def dominates(q: Sequence[float], p: Sequence[float]) -> bool:
        return all(a <= b for a, b in zip(q, p)) and any(a < b for a, b in zip(q, p))

    return [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]


def _paper_points(dataset: str) -> pd.DataFrame:
    paper = load_paper()
    rows = [r for t in PAPER_TABLES if paper["dataset"][t] == dataset for r in paper["tables"][t]["rows"]]
    return pd.DataFrame(rows, columns=["model", "acc", "size_mb"]).drop_duplicates()


def _latency_norm(latency: pd.Series) -> colors.Normalize:
    """Colour scale of the latencies: logarithmic when they span more than a decade."""
    low, high = (latency.min(), latency.max()) if latency.notna().any() else (0.0, 1.0)
    if low > 0 and high > 10 * low:
        return colors.LogNorm(low, high)
    return colors.Normalize(low, high if high > low else low + 1.0)


def plot_pareto(groups: pd.DataFrame, path: Path) -> list[str]:
    """Write the Pareto plot to `path`: validation accuracy vs fp32 size (log x), one panel per dataset,
    colour = batch-1 latency, the (accuracy, size) front drawn and labelled, points non-dominated in all three
    objectives ringed, the paper's published points overlaid. Return the front's labels."""
    datasets = sorted(set(groups["dataset"]), key=lambda d: (d != "cifar10", d)) or ["cifar10"]
    fig = Figure(figsize=(2 + 7 * len(datasets), 6.2), layout="constrained")
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    norm = _latency_norm(groups["latency_ms"].astype(float))
    front_labels = []
    for ax, dataset in zip(axes, datasets):
        ours = groups[groups["dataset"] == dataset].reset_index(drop=True)
        paper = _paper_points(dataset)
        ax.scatter(paper["size_mb"], paper["acc"], marker="x", color="0.55", s=30, zorder=2)
        ax.set_xscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.set_xlabel("model size (MB, fp32 state_dict, log scale)")
        ax.set_title(f"{DATASETS.get(dataset, dataset)}: {len(ours)} experiment(s) of ours")
        if ours.empty:
            ax.text(0.5, 0.5, "no finished trials", ha="center", va="center", transform=ax.transAxes, color="0.4")
            continue
        size, acc = ours["size_mb"].astype(float), ours["val_mean"].astype(float)
        all_three = set(non_dominated(list(zip(-acc, size, ours["latency_ms"].astype(float)))))
        ax.errorbar(size, acc, yerr=ours["val_std"].astype(float).fillna(0), fmt="none", ecolor="0.6", zorder=3)
        ax.scatter(size, acc, c=ours["latency_ms"].astype(float), cmap="viridis", norm=norm, s=55, zorder=4)
        ringed = sorted(all_three)
        ax.scatter(size[ringed], acc[ringed], s=170, facecolors="none", edgecolors="black", linewidths=1.1, zorder=5)
        front = sorted(non_dominated(list(zip(-acc, size))), key=lambda i: (size[i], -acc[i]))
        ax.step(size[front], acc[front], where="post", color="C3", linewidth=1.5, zorder=3)
        for i in front:
            ax.annotate(label(ours.loc[i]), (size[i], acc[i]), xytext=(5, 5), textcoords="offset points", fontsize=8)
            front_labels.append(f"{DATASETS.get(dataset, dataset)}: {label(ours.loc[i])}")
    axes[0].set_ylabel("validation accuracy (%), mean over seeds (bar: ± std)")
    legend = [
        Line2D([], [], marker="x", linestyle="none", color="0.55", label="paper (published test accuracy)"),
        Line2D([], [], marker="o", linestyle="none", color="0.7", label="ours (colour: latency)"),
        Line2D([], [], color="C3", label="non-dominated front (accuracy, size)"),
        Line2D([], [], marker="o", markersize=11, linestyle="none", markerfacecolor="none", markeredgecolor="black",
               label="ringed: non-dominated in (accuracy, size, latency)"),
    ]
    fig.legend(handles=legend, loc="outside lower center", ncols=2, fontsize=9)
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap="viridis"), ax=list(axes), label="batch-1 CPU latency (ms)")
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # not 1.3x10^0
    bar.ax.yaxis.set_major_formatter(plain)
    bar.ax.yaxis.set_minor_formatter(plain)
    fig.suptitle("Accuracy vs model size: our experiments and the paper's published points")
    fig.savefig(path, dpi=DPI)
    return front_labels
