"""Figure 9 (training and validation accuracy per epoch) and the Pareto plot (accuracy vs size, colour =
latency, every point labelled), drawn on matplotlib's Agg canvas (no display, no global backend switch). Bands and
error bars are drawn, and promised, only where several seeds ran."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib import colors
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator
from matplotlib.transforms import Bbox

from dse.config import TargetConfig
from dse.front import non_dominated
from dse.metrics import METRICS
from dse.paper import load_paper
from dse.report.results import label, varying
from dse.report.tables import DATASETS, PAPER_TABLES

__all__ = ["EMPTY", "PANELS", "as_target", "pick_figure9", "plot_figure9", "plot_pareto"]

# Figure 9's panels: (title, the paper's panel, registry families, the paper's baseline models first).
PANELS = (
    ("SqueezeNet", "a", ("squeezenet_v1_0", "squeezenet_v1_1"), ("SqueezeNet-v1.0", "SqueezeNet-v1.1")),
    ("SqueezeNext", "b", ("squeezenext",), ("SqueezeNext-23-1x", "SqueezeNext-23-2x")),
    ("Shallow SqueezeNext", "c", ("shallow_squeezenext",), ("Shallow SqueezeNext-14-1.5x",)),
)
DPI = 110
EMPTY = "no finished trials yet: run (or finish) the sweep, then regenerate"  # what a figure of no trial says
PLAIN = FuncFormatter(lambda v, _: f"{v:g}")  # 0.2, not 2x10^-1


def _named(group: dict, swept: Sequence[str]) -> str:
    """The model's name and the swept knobs that the name does not give (it gives the family, depth and width)."""
    rest = [k for k in swept if k not in ("family", "R", "W")]
    return f"{group['model']} {label(group, rest)}" if rest else str(group["model"])


def _rank(group: dict, preferred: Sequence[str], defaults: dict) -> tuple:
    return (
        group["dataset"] != "cifar10",
        preferred.index(group["model"]) if group["model"] in preferred else len(preferred),
        any(group[k] != v for k, v in defaults.items()),  # the paper's knobs before a variant of the model
        -(group["budget"][0] or 0),
        -group["val_mean"],
        json.dumps([group["config"], group["budget"]]),
    )


def pick_figure9(groups: pd.DataFrame) -> list[tuple[str, dict, int]]:
    """(panel title, experiment, experiments of its family) for each family the studies ran: CIFAR-10 first, then
    the paper's baseline model (else the most accurate on validation), at the paper's knobs, with the longest
    training. The title names the paper's panel it stands for: 'Shallow SqueezeNext (paper: Figure 9 (c))'."""
    records = groups.to_dict("records")
    defaults = {"dropout": 0.3, "activation": "elu", "inplace": True, "optimizer": "sgd"}
    out = []
    for name, letter, families, preferred in PANELS:
        mine = [g for g in records if g["family"] in families]
        if mine:
            out.append(
                (
                    f"{name} (paper: Figure 9 ({letter}))",
                    min(mine, key=lambda g: _rank(g, preferred, defaults)),
                    len(mine),
                )
            )
    return out


def _band(ns: Sequence[int]) -> str:
    """What Figure 9's lines and bands are, given each panel's number of seeds."""
    if max(ns) == 1:
        return "one seed per model: each line is one run"
    return "line: mean over seeds; band: min to max" + ("" if min(ns) > 1 else " (where n > 1)")


def _curves(done: pd.DataFrame, group: dict) -> pd.DataFrame:
    """Per-epoch records of the experiment's trials, accuracies in %."""
    mask = [c == group["config"] and b == group["budget"] for c, b in zip(done["config"], done["budget"])]
    rows = [r for curves in done.loc[mask, "curves"] if isinstance(curves, list) for r in curves]
    frame = pd.DataFrame(rows, columns=["epoch", "train_acc", "val_acc"])
    return frame.assign(train_acc=100 * frame["train_acc"], val_acc=100 * frame["val_acc"])


def _nothing(path: Path, title: str, why: str) -> None:
    fig = Figure(figsize=(7, 2.5), layout="constrained")
    ax = fig.subplots()
    ax.set_axis_off()
    ax.text(0.5, 0.5, "\n".join(textwrap.wrap(why, 80)), ha="center", va="center")
    fig.suptitle(title)
    fig.savefig(path, dpi=DPI)


def plot_figure9(done: pd.DataFrame, groups: pd.DataFrame, path: Path, *, empty: str = EMPTY) -> list[str]:
    """Write Figure 9 to `path`: one panel per model family the studies ran (mean over seeds, band = min to
    max where several seeds ran), or the line `empty` where they have none; return what each panel shows."""
    title = "Figure 9: training and validation accuracy per epoch"
    picked = [(t, g, k) for t, g, k in pick_figure9(groups) if not _curves(done, g).empty]
    if not picked:
        _nothing(path, title, empty)
        return []
    title += f"\n({_band([g['n'] for _, g, _ in picked])})"
    swept = varying(groups.to_dict("records"))
    fig = Figure(figsize=(2 + 5 * len(picked), 4.8), layout="constrained")
    axes = fig.subplots(1, len(picked), sharey=True, squeeze=False)[0]
    shown = []
    for ax, (panel, group, of) in zip(axes, picked):
        what = f"{_named(group, swept)}, {DATASETS.get(group['dataset'], group['dataset'])}, n={group['n']}"
        ax.set_title(f"{panel}\n{what}", fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        by_epoch = _curves(done, group).groupby("epoch")
        for column, name, style, colour in (
            ("train_acc", "training", "--", "C0"),
            ("val_acc", "validation", "-", "C1"),
        ):
            stats = by_epoch[column].agg(["mean", "min", "max"])
            ax.plot(stats.index, stats["mean"], style, color=colour, marker="o", markersize=3, label=name)
            if group["n"] > 1:
                ax.fill_between(stats.index, stats["min"], stats["max"], color=colour, alpha=0.2, linewidth=0)
        ax.legend(loc="lower right")
        shown.append(
            f"{panel}: {what}, {group['epochs']} epochs"
            + (f" (1 of {of} configurations of the family; all are in the Pareto plot)" if of > 1 else "")
        )
    axes[0].set_ylabel("accuracy (%)")
    fig.suptitle(title)
    fig.savefig(path, dpi=DPI)
    return shown


def _paper_points(dataset: str) -> pd.DataFrame:
    paper = load_paper()
    rows = [r for t in PAPER_TABLES if paper["dataset"][t] == dataset for r in paper["tables"][t]["rows"]]
    return pd.DataFrame(rows, columns=["model", "acc", "size_mb"]).drop_duplicates()


def _latency_norm(latency: pd.Series) -> colors.Normalize:
    """Colour scale of the latencies: logarithmic when they span more than a decade."""
    low, high = (latency.min(), latency.max()) if latency.notna().any() else (0.0, 1.0)
    if low > 0 and high > 10 * low:
        return colors.LogNorm(low, high)
    return colors.Normalize(low, high) if high > low else colors.Normalize(0.9 * low, 1.1 * low + 1e-9)  # one latency


def _declutter(fig: Figure, notes: list) -> None:
    """Place each annotation beside its point where it covers no marker and no earlier label: right or left of
    the point, above or below, then further up or down."""
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw_without_rendering()
    to_points = 72 / fig.dpi
    taken = [
        Bbox.from_bounds(x - 9, y - 9, 18, 18)  # every marker drawn, in display pixels
        for ax in {n.axes for n in notes}
        for c in ax.collections
        if isinstance(c, PathCollection)
        for x, y in ax.transData.transform(c.get_offsets())
    ]
    for note in notes:
        box = note.get_window_extent(renderer)
        w, h = box.width * to_points, box.height * to_points
        places = [
            (6, 4),
            (6, -4 - h),
            (-6 - w, 4),
            (-6 - w, -4 - h),
            *((6, 4 + k * h) for k in (1, -2, 2, -3, 3, -4, 4)),
        ]
        for place in places:
            note.xyann = place
            box = note.get_window_extent(renderer)
            if not any(box.padded(2).overlaps(other) for other in taken):
                break
        taken.append(note.get_window_extent(renderer))


def _by_size(ax, ours: pd.DataFrame, swept: list[str], norm: colors.Normalize) -> tuple[list, list[int]]:
    """Accuracy against size (log x): the (accuracy, size) front stepped, points non-dominated in all three
    objectives ringed, every point labelled (the front's in black, placed first). Returns the annotations and the
    front's rows."""
    size, acc, latency = ours["size_mb"].astype(float), ours["val_mean"].astype(float), ours["latency_ms"].astype(float)
    ax.set_xscale("log")
    ax.margins(x=0.08, y=0.1)  # room for the labels of the outermost points
    ax.set_xlabel("model size (MB, fp32 state_dict, log scale)")
    ax.xaxis.set_major_formatter(PLAIN)
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))  # 0.2, 0.5
    _error_bars(ax, size, acc, ours)
    ax.scatter(size, acc, c=latency, cmap="viridis", norm=norm, s=55, zorder=4)
    ringed = sorted(non_dominated(list(zip(-acc, size, latency.fillna(float("inf"))))))
    ax.scatter(size[ringed], acc[ringed], s=170, facecolors="none", edgecolors="black", linewidths=1.1, zorder=5)
    front = sorted(non_dominated(list(zip(-acc, size))), key=lambda i: (size[i], -acc[i]))
    ax.step(size[front], acc[front], where="post", color="C3", linewidth=1.5, zorder=3)
    notes = [
        ax.annotate(
            label(ours.loc[i], swept),
            (size[i], acc[i]),
            xytext=(6, 4),
            textcoords="offset points",
            fontsize=8,
            color="black" if i in front else "0.35",
        )
        for i in [*front, *(i for i in range(len(ours)) if i not in front)]
    ]
    return notes, front


def _error_bars(ax, x, acc: pd.Series, ours: pd.DataFrame) -> None:
    """± one sample std of validation accuracy, for the configurations that ran with several seeds only."""
    several = (ours["n"] > 1).to_numpy()
    if several.any():
        x = pd.Series(list(x))
        ax.errorbar(
            x[several], acc[several], yerr=ours["val_std"].astype(float)[several], fmt="none", ecolor="0.6", zorder=3
        )


def _by_knob(ax, ours: pd.DataFrame, swept: list[str], norm: colors.Normalize) -> tuple[list, list[int]]:
    """Every model has one size: accuracy against the swept knob(s), one column per configuration in order."""
    order = sorted(
        range(len(ours)),
        key=lambda i: [
            (v is None, v if v is not None else 0)
            for v in (ours.loc[i, k] for k in ("dropout", "activation", "optimizer", "lr", "dataset"))
        ],
    )
    ours = ours.loc[order].reset_index(drop=True)
    x, acc = range(len(ours)), ours["val_mean"].astype(float)
    _error_bars(ax, x, acc, ours)
    ax.scatter(x, acc, c=ours["latency_ms"].astype(float), cmap="viridis", norm=norm, s=55, zorder=4)
    ax.set_xticks(
        list(x),
        [label(r, swept) for r in ours.to_dict("records")],
        rotation=30 if len(ours) > 6 else 0,
        ha="right" if len(ours) > 6 else "center",
        fontsize=8,
    )
    ax.set_xlim(-0.6, len(ours) - 0.4)
    ax.set_xlabel(
        f"every model is {ours['size_mb'].iloc[0]:.3f} MB: accuracy against {', '.join(swept) or 'the configuration'}"
    )
    best = [int(acc.idxmax())]
    ax.scatter([best[0]], [acc[best[0]]], s=170, facecolors="none", edgecolors="black", linewidths=1.1, zorder=5)
    return [], [order[best[0]]]


def as_target(groups: pd.DataFrame, target: TargetConfig) -> pd.DataFrame:
    """The configurations with the plot's columns (val_mean %, size_mb, latency_ms) holding a target's figures
    (`conf/target/`): the Pareto plot of what ships as fp32 or int8 ONNX. No spread over seeds is drawn for them."""
    size = groups[target.size].astype(float) / (1 if target.size == "size_mb" else 1e3)  # KB -> MB
    accuracy = groups["val_mean"] if target.accuracy == "val_acc" else groups[target.accuracy]
    return groups.assign(
        val_mean=accuracy,
        size_mb=size,
        latency_ms=groups[target.latency],
        val_std=groups["val_std"] if target.accuracy == "val_acc" else float("nan"),
    )


def plot_pareto(
    groups: pd.DataFrame, path: Path, target: TargetConfig | None = None, *, empty: str = EMPTY
) -> list[str]:
    """Write the Pareto plot to `path`: validation accuracy vs fp32 size, one panel per dataset, colour = batch-1
    latency, the (accuracy, size) front drawn, every point labelled, points non-dominated in all three objectives ringed,
    the paper's published points overlaid where it has them. A panel whose models all have one size plots
    accuracy against the swept knobs instead; the line `empty` where there is nothing to plot. With a `target` other
    than paper, its accuracy, size and latency are plotted instead (`as_target`), without the paper's points. Return
    the front's labels."""
    title = "Accuracy vs model size: our experiments"
    shipped = target is not None and target.objectives != TargetConfig().objectives
    if shipped:
        groups = as_target(groups, target)
        title = f"{target.name} target: {', '.join(target.objectives)}"
    if groups.empty:
        _nothing(path, title, empty)
        return []
    datasets = sorted(set(groups["dataset"]), key=lambda d: (d != "cifar10", d))
    fig = Figure(figsize=(2 + 7 * len(datasets), 6.2), layout="constrained")
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    norm = _latency_norm(groups["latency_ms"].astype(float))
    front_labels, notes, paper_drawn, stepped = [], [], False, False
    for ax, dataset in zip(axes, datasets):
        ours = groups[groups["dataset"] == dataset].reset_index(drop=True)
        swept = varying(ours.to_dict("records"))
        ax.grid(alpha=0.3, which="both")
        ax.set_title(f"{DATASETS.get(dataset, dataset)}: {len(ours)} configuration(s) of ours", fontsize=10)
        one_size = ours["size_mb"].astype(float).nunique() == 1 and len(ours) > 1
        drawn, front = (_by_knob if one_size else _by_size)(ax, ours, swept, norm)
        notes += drawn
        stepped |= not one_size
        front_labels += [f"{DATASETS.get(dataset, dataset)}: {_named(ours.loc[i], swept)}" for i in front]
        paper = _paper_points(dataset)
        if not one_size and not paper.empty and not shipped:
            ax.scatter(paper["size_mb"], paper["acc"], marker="x", color="0.55", s=30, zorder=2)
            paper_drawn = True
    several = groups["n"].max() > 1
    axes[0].set_ylabel("validation accuracy (%), " + ("mean over seeds (bar: ± std)" if several else "one seed"))
    legend = [
        Line2D([], [], marker="o", linestyle="none", color="0.7", label="ours (colour: latency)"),
        Line2D(
            [],
            [],
            marker="o",
            markersize=11,
            linestyle="none",
            markerfacecolor="none",
            markeredgecolor="black",
            label="ringed: non-dominated in (accuracy, size, latency)",
        ),
    ]
    if stepped:
        legend.insert(1, Line2D([], [], color="C3", label="non-dominated front (accuracy, size)"))
    if paper_drawn:
        legend.insert(
            0, Line2D([], [], marker="x", linestyle="none", color="0.55", label="paper (published test accuracy)")
        )
        title = "Accuracy vs model size: our experiments and the paper's published points"
    if not stepped and not shipped:
        title = "Accuracy vs the swept knobs (every model of a dataset has one size)"
    if shipped:
        axes[0].set_ylabel(f"{target.accuracy} (%): {METRICS[target.accuracy].what}")
        for ax in axes:
            ax.set_xlabel(f"{target.size} in MB: {METRICS[target.size].what} (log scale)")
    fig.legend(handles=legend, loc="outside lower center", ncols=2, fontsize=9)
    bar = fig.colorbar(
        ScalarMappable(norm=norm, cmap="viridis"),
        ax=list(axes),
        label=f"{target.latency} (ms)" if shipped else "batch-1 CPU latency (ms)",
    )
    bar.ax.yaxis.set_major_formatter(PLAIN)
    bar.ax.yaxis.set_minor_formatter(PLAIN)
    fig.suptitle(title)
    _declutter(fig, notes)
    fig.savefig(path, dpi=DPI)
    return front_labels
