"""What a sweep shows its user: where it stands (per epoch, with the time left), a line per finished trial naming
what was swept, the curves on the study's dashboard page, the front and the next commands at the end, and the
studies under studies/ (`--list`)."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import optuna
import pandas as pd
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from dse.front import front_frame
from dse.storage import open_readonly
from dse.study import FINISHED, STUDIES, StudyError, default_storage, load_study, trials_frame, why_no_front
from dse.sweep.plan import params_key
from dse.sweep.queue import INTERRUPTED

__all__ = [
    "CURVES_CHART",
    "describe",
    "params_of",
    "trial_line",
    "fraction_done",
    "duration",
    "watching",
    "save_curves_chart",
    "start_line",
    "summary",
    "list_studies",
]

CURVES_CHART = "validation-accuracy-per-epoch"  # its id among the study's optuna-dashboard charts
# How the sweep's params are named in its lines (the report's column names); others show as key=value.
SHORT = {"model.width": "W", "model.blocks": "R", "model.dropout": "p", "train.lr": "lr"}
# What `--list` suggests on a fresh clone: a sweep that runs offline, and the paper's dataset, which downloads.
FIRST_SWEEPS = (
    "  python -m dse.sweep +space=width budget=quick data=fashion_mnist   # offline: Fashion-MNIST from Debian's "
    "dataset-fashion-mnist package or data/fashion_mnist/\n"
    "  python -m dse.sweep +space=width budget=quick                      # CIFAR-10, downloaded into data/"
)
BARE = ("point", "model", "model.activation", "train", "data")  # values that name themselves: 'relu', 'adam'


def _value(value) -> str:
    return format(value, ".4g") if isinstance(value, float) else str(value)


def params_of(trial: FrozenTrial) -> dict:
    """A trial's params: suggested ones, or those it was queued with (a trial that has not suggested yet)."""
    return dict(trial.params or trial.system_attrs.get("fixed_params", {}))


def describe(params: dict) -> str:
    """What a trial's params sweep: 'W=0.9 seed 0', 'p=0.1 seed 1', 'relu adam seed 0'."""
    parts = [_value(v) if k in BARE else f"{SHORT.get(k, k)}={_value(v)}" for k, v in params.items() if k != "seed"]
    if "seed" in params:
        parts.append(f"seed {params['seed']}")
    return " ".join(parts)


def trial_line(trial: FrozenTrial, worker: int | None = None) -> str:
    """One line per finished trial: what it swept, its model, and its results or why it stopped."""
    a = trial.user_attrs
    if trial.state == TrialState.COMPLETE:
        loaded = " (measured under load)" if a.get("latency_under_load") else ""
        result = (
            f"val {100 * a['curves'][-1]['val_acc']:.2f}%  test {100 * a.get('test_acc', float('nan')):.2f}%  "
            f"{a['size_mb']:.3f} MB  {a['latency_ms']:.2f} ms{loaded}  {a.get('s_per_epoch', 0):.1f} s/epoch"
        )
    else:
        result = a.get("pruned_reason") or a.get("fail_reason") or trial.state.name
    what, model = describe(params_of(trial)), a.get("paper_name", "")
    named = what if not model or what.startswith(model) else f"{what} ({model})"
    return ("" if worker is None else f"[worker {worker}] ") + f"trial {trial.number} {named}: {result}"


# ---------------------------------------------------------------- progress


def _done_part(trial: FrozenTrial) -> float:
    """How much of its training a trial has done: 1 when finished (a pruned trial's other epochs never run)."""
    if trial.state in FINISHED:
        return 1.0
    if trial.state != TrialState.RUNNING:
        return 0.0
    planned = trial.user_attrs.get("epochs_planned") or 0
    return min(1.0, len(trial.user_attrs.get("curves") or []) / planned) if planned else 0.0


def fraction_done(trials: Sequence[FrozenTrial], costs: dict[str, float] | None, n_trials: int) -> float:
    """The share of the sweep's work done. Grid: each point weighs its training cost (`costs`: params key ->
    MACs x images x epochs); else every trial of `n_trials` weighs the same."""
    if costs:
        part: dict[str, float] = {}
        for t in trials:
            key = params_key(params_of(t))
            part[key] = max(part.get(key, 0.0), _done_part(t))
        total = sum(costs.values())
        return sum(cost * part.get(key, 0.0) for key, cost in costs.items()) / total if total else 0.0
    return min(1.0, sum(_done_part(t) for t in trials) / n_trials) if n_trials else 1.0


def duration(seconds: float) -> str:
    """'45 s', '3 min 10 s', '2 h 05 min'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _status(trials: Sequence[FrozenTrial], total: int, shown: int = 3) -> tuple[float, str]:
    """Trials done (running ones by their share of epochs) and the line that says so: '3/13 trials, epoch 2/3 of
    trial 4 (W=0.9)'."""
    finished = sum(t.state in FINISHED for t in trials)
    running = sorted((t for t in trials if t.state == TrialState.RUNNING), key=lambda t: t.number)
    what = []
    for t in running[:shown]:
        planned, epochs = t.user_attrs.get("epochs_planned"), len(t.user_attrs.get("curves") or [])
        swept = describe({k: v for k, v in params_of(t).items() if k != "seed"})
        at = f"epoch {epochs}/{planned} of trial {t.number}" if planned else f"trial {t.number} starting"
        what.append(at + (f" ({swept})" if swept else ""))
    more = f" +{len(running) - shown} running" if len(running) > shown else ""
    return finished + sum(_done_part(t) for t in running), ", ".join([f"{finished}/{total} trials", *what]) + more


class _Bar:
    """On a terminal: a bar rewritten in place, the trial lines above it."""

    def __init__(self, stream: TextIO, total: int):
        self.bar = tqdm(
            total=total, file=stream, bar_format="sweep |{bar:20}| {desc}", mininterval=0.5, dynamic_ncols=True
        )

    def show(self, done: float, text: str, final: bool = False) -> None:
        self.bar.set_description_str(text, refresh=False)
        self.bar.update(done - self.bar.n)  # prints the line (at most every mininterval)

    def line(self, text: str) -> None:
        tqdm.write(text)

    def close(self) -> None:
        self.bar.close()


class _Lines:
    """Into a log file or a pipe: plain lines, never a carriage return; the status when it changed, at most every
    `every` seconds (and at the end)."""

    def __init__(self, stream: TextIO, every: float = 30.0):
        self.stream, self.every, self.last, self.at = stream, every, "", -math.inf

    def show(self, done: float, text: str, final: bool = False) -> None:
        if text != self.last and (final or time.monotonic() - self.at >= self.every):
            print(f"sweep: {text}", file=self.stream, flush=True)
            self.last, self.at = text, time.monotonic()

    def line(self, text: str) -> None:
        print(text, flush=True)

    def close(self) -> None:
        pass


@contextmanager
def watching(
    study: optuna.Study,
    *,
    costs: dict[str, float] | None,
    n_trials: int,
    enabled: bool = True,
    every: float = 2.0,
    stream: TextIO | None = None,
) -> Iterator[None]:
    """Where the sweep stands while the block runs: trials done of the space's, the epoch each running trial is at,
    and the time left at the rate of this run (grid points weighed by their training cost); a `trial_line` per trial
    that ends. On a terminal (`stream`, default stderr) a bar rewritten in place with the lines above it; else plain
    lines (a log file gets no carriage returns). It reads the study every `every` seconds from a thread, so workers
    in other processes (or this one) show alike, and only this process writes the status (lines from several
    processes would tear the bar)."""
    if not enabled:
        yield
        return
    stream = sys.stderr if stream is None else stream
    total = len(costs) if costs else n_trials
    display = _Bar(stream, total) if stream.isatty() else _Lines(stream)
    started, stop = time.monotonic(), threading.Event()
    trials = study.get_trials(deepcopy=False)
    first, shown = fraction_done(trials, costs, n_trials), {t.number for t in trials if _ended(t)}

    def update(lines: bool = True, final: bool = False) -> None:
        trials = study.get_trials(deepcopy=False)
        ended = [t for t in trials if _ended(t) and t.number not in shown]
        for t in ended if lines else []:
            shown.add(t.number)
            if t.user_attrs.get("fail_reason") != INTERRUPTED:
                display.line(trial_line(t))
        if ended and lines:
            save_curves_chart(study, trials)
        done, text = _status(trials, total)
        work = fraction_done(trials, costs, n_trials)
        elapsed = time.monotonic() - started
        left = f"about {duration((1 - work) * elapsed / (work - first))} left" if first < work < 1 else ""
        display.show(done, " | ".join(p for p in (text, left) if p), final)

    def loop() -> None:
        pause = every
        while not stop.wait(pause):
            start = time.monotonic()
            try:
                update()
            except Exception:  # a busy or unreachable storage: the workers' own retries decide; the status waits
                pass
            pause = max(every, 10 * (time.monotonic() - start))  # a large study is read less often

    thread = threading.Thread(target=loop, name="dse-progress", daemon=True)
    thread.start()
    finished = False
    try:
        yield
        finished = True
    finally:
        stop.set()
        thread.join()
        try:
            update(lines=finished, final=True)  # no lines for the trials an interrupted sweep failed
        finally:
            display.close()


def _ended(trial: FrozenTrial) -> bool:
    return trial.state not in (TrialState.RUNNING, TrialState.WAITING)


def save_curves_chart(study: optuna.Study, trials: Sequence[FrozenTrial] | None = None) -> None:
    """A chart of every trial's validation accuracy per epoch (its intermediate values) on the study's
    optuna-dashboard page: the dashboard draws intermediate values itself for single-objective studies only."""
    import plotly.graph_objects as go
    from optuna_dashboard import save_plotly_graph_object

    trials = study.get_trials(deepcopy=False) if trials is None else trials
    lines = [
        go.Scatter(
            x=sorted(t.intermediate_values),
            y=[t.intermediate_values[e] for e in sorted(t.intermediate_values)],
            mode="lines+markers",
            name=f"#{t.number} {describe(params_of(t))} ({t.state.name.lower()})",
        )
        for t in trials
        if t.intermediate_values
    ]
    if lines:
        figure = go.Figure(
            lines,
            layout={
                "title": "Validation accuracy per epoch",
                "xaxis_title": "epoch",
                "yaxis_title": "validation accuracy",
            },
        )
        save_plotly_graph_object(study, figure, graph_object_id=CURVES_CHART)


# ---------------------------------------------------------------- start and end


def start_line(study: optuna.Study, storage: str, total: int, workers: int, threads: int) -> str:
    """Where a (re)started sweep stands: finished trials kept, interrupted ones queued again (they resume from
    their checkpoints), trials still to run."""
    trials = study.get_trials(deepcopy=False)
    finished = sum(t.state in FINISHED for t in trials)
    failed = {params_key(params_of(t)) for t in trials if t.state == TrialState.FAIL}
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    again = sum(params_key(params_of(t)) in failed for t in waiting)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    parts = [f"{finished} finished (kept)"]
    if again:
        parts.append(f"{again} interrupted or failed before, queued again (they resume from their last checkpoint)")
    parts.append(f"{len(waiting) - again} queued")
    if running:
        parts.append(f"{running} running elsewhere or stale (retried after the heartbeat's grace period)")
    return (
        f"study {study.study_name!r} in {storage}: {total} trials in the space: {', '.join(parts)}; "
        f"{workers} worker(s) x {threads} thread(s)"
    )


def _commands(name: str, storage: str, front: bool = True) -> list[str]:
    """The next commands: the report, deploy (only with a front: without one it has nothing to list) and the
    dashboard."""
    where = "" if storage == default_storage(name) else f" --storage {shlex.quote(storage)}"
    dashboard = (
        f"make dashboard STUDY={name}" if not where else f"make dashboard STUDY={name} STORAGE={shlex.quote(storage)}"
    )
    deploy = [
        f"  python -m dse.deploy list --study {name}{where}   # the Pareto front, with filters",
        f"  python -m dse.deploy export --study {name}{where} --pick most-accurate   # a bundle for the board",
    ]
    return [
        f"  python -m dse.report --study {name}{where}        # every trial, tables and figures into reports/{name}/",
        *(deploy if front else []),
        f"  {dashboard}   # optuna-dashboard: curves, params" + (", the front" if front else ""),
    ]


def summary(study: optuna.Study, storage: str, counts: str) -> str:
    """The end of a sweep: its `counts` line (the sweep's tally), the front as a short table (with what each
    trial swept) or why there is none (`why_no_front`), the next commands that work on what the study holds."""
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state for t in trials)
    finished = {params_key(params_of(t)) for t in trials if t.state in FINISHED}
    retried = sum(t.state == TrialState.FAIL and params_key(params_of(t)) in finished for t in trials)
    lines = [counts + (f" ({retried} earlier tries interrupted or failed, finished since)" if retried else "")]
    front = front_frame(study)
    if len(front):
        by_number = {t.number: t for t in trials}
        shown = pd.DataFrame(
            {
                "trial": front["trial"],
                "swept": [describe(params_of(by_number[int(n)])) for n in front["trial"]],
                "model": front["model"],
                "val %": [f"{100 * v:.2f}" for v in front["val_acc"]],
                "KB": [f"{kb:.1f}" for kb in front["size_kb"]],
                "latency ms": [
                    f"{ms:.3f}" + (" †" if u else "") for ms, u in zip(front["latency_ms"], front["under_load"])
                ],
            }
        )
        if front["val_acc_int8"].notna().any():  # as deployed: the ONNX files in ONNX Runtime (fp32 / int8)
            shown = shown.assign(
                **{
                    "ONNX val % fp32/int8": [
                        f"{100 * a:.2f}/{100 * b:.2f}" for a, b in zip(front["val_acc_onnx"], front["val_acc_int8"])
                    ],
                    "ONNX KB fp32/int8": [f"{a:.1f}/{b:.1f}" for a, b in zip(front["onnx_kb"], front["int8_kb"])],
                    "ORT ms fp32/int8": [
                        f"{a:.3f}/{b:.3f}" for a, b in zip(front["latency_onnx_ms"], front["latency_int8_ms"])
                    ],
                }
            )
        lines += [
            f"Pareto front ({', '.join(study.metric_names or [])}): {len(front)} of "
            f"{states[TrialState.COMPLETE]} complete trials",
            shown.to_markdown(index=False, disable_numparse=True),
        ]
        if front["under_load"].any():
            lines.append("† latency measured under load (other processes kept the cores busy)")
    else:
        lines.append(f"no Pareto front, nothing to deploy: {why_no_front(trials_frame(study))}")
    lines += ["next:", *_commands(study.study_name, storage, front=bool(len(front)))]
    return "\n".join(lines)


# ---------------------------------------------------------------- --list


def _counts(name: str, url: str) -> dict:
    trials = load_study(name, url).get_trials(deepcopy=False)
    states = Counter(t.state.name.lower() for t in trials)
    return {
        "study": name,
        "storage": url,
        "trials": len(trials),
        **{s: states[s] for s in ("complete", "pruned", "fail", "running", "waiting")},
    }


def _studies_in(url: str) -> list[str]:
    return sorted(s.study_name for s in optuna.get_all_study_summaries(open_readonly(url), include_best_trial=False))


def list_studies(argv: Sequence[str]) -> int:
    """`python -m dse.sweep --list [NAME] [--storage URL]`: the studies with their trial counts by state, from
    every studies/*.db or from URL; with NAME, that study only (exit code 2 and one line if there is none).
    Reads only: a missing DB is not created."""
    parser = argparse.ArgumentParser(prog="python -m dse.sweep --list", description=list_studies.__doc__)
    parser.add_argument("--list", action="store_true", required=True)
    parser.add_argument("name", nargs="?", help="one study (default: all)")
    parser.add_argument("--storage", help="storage URL (default: sqlite:///studies/<name>.db, or every studies/*.db)")
    args = parser.parse_args(argv)
    try:
        if args.name:
            rows = [_counts(args.name, args.storage or default_storage(args.name))]
        else:
            urls = (
                [args.storage]
                if args.storage
                else [default_storage(p.stem) for p in sorted(Path(STUDIES).glob("*.db"))]
            )
            rows = [_counts(name, url) for url in urls for name in _studies_in(url)]
    except (StudyError, optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError, ValueError) as e:
        hint = "; run a sweep first: python -m dse.sweep +space=NAME" if str(e).startswith("no study '") else ""
        print(f"dse.sweep: {' '.join(str(e).split())}{hint}", file=sys.stderr)
        return 2
    if not rows:
        print(f"no studies in {STUDIES}/ yet; run a sweep:\n{FIRST_SWEEPS}")
        return 0
    print(pd.DataFrame(rows).to_markdown(index=False))
    return 0
