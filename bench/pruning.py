"""Benchmark: the same `open` search with and without the pareto pruner, on real Fashion-MNIST.

What it measures, on this machine's CPU: two sweeps of the `open` space (NSGA-II, same sampler seed, same
number of trials; trials within NSGA-II's first generation, so both runs propose the same configs, which
the script checks) on a Fashion-MNIST subset, one with `study.pruner=none`, one with `study.pruner=pareto`.
It prints, for each: total training epochs run, wall time (first trial's start to last trial's end, read
from the study DB: process start-up and data loading excluded alike), trials complete/pruned, and the
Pareto hypervolume of (validation accuracy, fp32 size in MB, batch-1 CPU latency in ms) over the complete
trials, with a fixed reference point (accuracy 0, --ref-size MB, --ref-latency ms) and Optuna's WFG
hypervolume code. Latency is measured anew in each run, and its run-to-run noise moves the hypervolume
too, so the hypervolume is printed twice: with each run's own latencies, and with the unpruned run's
size and latency for the same config (the pruner cannot change a model's latency). Target of issue 7:
>= 95% of the unpruned hypervolume with <= 50% of the epochs.

`--quick` runs the same comparison smaller, with the same 9 epochs and rungs (epochs 1 and 3): 12 trials
on 800 images in batches of 64, widths 0.125-0.5, one torch thread (several threads spin-wait on busy
cores), to fit in 15 minutes on 2 cores that others share; the default run is for a GPU or a quiet machine.
Last, it prints its own wall time and CPU time (the sweeps' processes included): with one thread, CPU time
is about what the wall time would be on an idle machine. Every file a run writes (study DBs, checkpoints,
Hydra's run folders) goes to a temporary folder, or to --keep DIR.

Needs Fashion-MNIST's IDX files (Debian: apt-get install dataset-fashion-mnist, or data.root=...).
    python bench/pruning.py [--quick] [--trials 24 --epochs 9 --subset 3000] [--pruning eta=3] [--keep DIR [--reuse]]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
from optuna._hypervolume import compute_hypervolume  # Optuna's WFG algorithm (no public API for it)
from optuna.trial import TrialState

REPO = Path(__file__).resolve().parents[1]
QUICK = {"trials": 12, "subset": 800, "val_size": 500, "batch_size": 64, "max_width": 0.5, "threads": 1}


def run(pruner: str, args: argparse.Namespace, folder: Path) -> optuna.Study:
    """The study of one sweep; with --reuse, a finished study of the same name in the folder is read instead."""
    knobs = args.pruning if pruner == "pareto" else []
    # --quick's studies get names of their own, so that --keep DIR --reuse never mixes them with the default run's
    name = "-".join(["bench-pruning", *(["quick"] if args.quick else []), pruner, *(k.replace("=", "") for k in knobs)])
    storage = f"sqlite:///{folder / name}.db"
    if args.reuse and (folder / f"{name}.db").exists():
        study = optuna.load_study(study_name=name, storage=storage)
        if len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == args.trials:
            print(f"reusing {storage}")
            return study
    overrides = [
        "+space=open",
        "data=fashion_mnist",
        f"data.subset={args.subset}",
        f"data.val_size={args.val_size}",
        f"train.epochs={args.epochs}",
        f"train.batch_size={args.batch_size}",
        f"space.n_trials={args.trials}",
        "sweep.seeds=1",
        f"sweep.workers={args.workers}",
        f"sweep.threads={args.threads}",
        "sweep.progress=false",
        f"study.name={name}",
        f"study.storage={storage}",
        f"study.pruner={pruner}",
        f"study.sampler_seed={args.seed}",
        f"space.search={{model.width:{{low:{args.min_width},high:{args.max_width},log:true}}}}",
        *(f"study.pruning.{k}" for k in knobs),
        *args.overrides,
    ]
    subprocess.run([sys.executable, "-m", "dse.sweep", *overrides], cwd=REPO, check=True)
    return optuna.load_study(study_name=name, storage=storage)


def config(trial: optuna.trial.FrozenTrial) -> str:
    return json.dumps(trial.params, sort_keys=True)


def hypervolume(study: optuna.Study, ref: np.ndarray, costs: dict[str, tuple[float, float]] | None = None) -> float:
    """HV of the complete trials; `costs` maps a config to the (size, latency) to use instead of the trial's own."""
    points = []
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        size, latency = (costs or {}).get(config(t), (t.user_attrs["size_mb"], t.user_attrs["latency_ms"]))
        points.append([1 - t.user_attrs["curves"][-1]["val_acc"], size, latency])
    points = np.array([p for p in points if np.all(np.array(p) < ref)])
    return float(compute_hypervolume(points, ref)) if len(points) else 0.0


def summarize(study: optuna.Study, ref: np.ndarray, costs: dict[str, tuple[float, float]]) -> dict:
    trials = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    span = max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)
    return {
        "wall_s": span.total_seconds(),
        "epochs": sum(len(t.user_attrs.get("curves", [])) for t in trials),
        "complete": sum(t.state == TrialState.COMPLETE for t in trials),
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "hypervolume": hypervolume(study, ref),
        "hv_shared": hypervolume(study, ref, costs),
        "configs": [config(t) for t in sorted(trials, key=lambda t: t.number)],
    }


def ratio(a: float, b: float) -> str:
    return f"{a / b:.1%}" if b else "n/a"


def parse_args() -> argparse.Namespace:
    """The command line; --quick changes the defaults, and options given beside it still win."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"a run for 2 busy cores: {QUICK}")
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=9)
    parser.add_argument("--subset", type=int, default=3000, help="training images")
    parser.add_argument("--val-size", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="more than 1 makes the trial order, hence the configs each run gets, timing-dependent",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: cores / workers)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-width", type=float, default=0.125)
    parser.add_argument("--max-width", type=float, default=1.0)
    parser.add_argument("--ref-size", type=float, default=5.0, help="reference point: MB")
    parser.add_argument("--ref-latency", type=float, default=20.0, help="reference point: ms")
    parser.add_argument("--keep", type=Path, default=None, help="keep the study DBs in this folder")
    parser.add_argument("--reuse", action="store_true", help="read a finished study found in --keep, do not re-run it")
    parser.add_argument(
        "--pruning",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="settings of the pareto pruner (study.pruning.KEY), e.g. eta=3",
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for both sweeps")
    if parser.parse_known_args()[0].quick:
        parser.set_defaults(**QUICK)
    args = parser.parse_args()
    if args.reuse and not args.keep:
        parser.error("--reuse needs --keep DIR")
    return args


def main() -> None:
    started = time.perf_counter()
    args = parse_args()
    ref = np.array([1.0, args.ref_size, args.ref_latency])
    folder = args.keep or Path(tempfile.mkdtemp(prefix="dse-bench-pruning-"))
    folder.mkdir(parents=True, exist_ok=True)
    studies = {p: run(p, args, folder) for p in ("none", "pareto")}
    costs = {
        config(t): (t.user_attrs["size_mb"], t.user_attrs["latency_ms"])
        for t in studies["none"].get_trials(states=(TrialState.COMPLETE,))
    }
    results = {p: summarize(study, ref, costs) for p, study in studies.items()}
    off, on = results["none"], results["pareto"]
    print(
        f"\n{args.trials} trials of `open` on Fashion-MNIST ({args.subset} train / {args.val_size} val images, "
        f"{args.epochs} epochs of batch {args.batch_size}, widths {args.min_width}-{args.max_width}, "
        f"{args.workers} workers x {args.threads or 'auto'} threads, "
        f"pruner settings: {' '.join(args.pruning) or 'defaults'}); "
        f"HV reference (acc 0, {args.ref_size} MB, {args.ref_latency} ms)"
    )
    print(f"same configs proposed in both runs: {'yes' if off['configs'] == on['configs'] else 'NO'}")
    print(f"{'pruner':8} {'epochs':>7} {'wall s':>8} {'complete':>9} {'pruned':>7} {'HV own':>9} {'HV shared':>10}")
    for name, r in results.items():
        print(
            f"{name:8} {r['epochs']:7d} {r['wall_s']:8.1f} {r['complete']:9d} {r['pruned']:7d} "
            f"{r['hypervolume']:9.4f} {r['hv_shared']:10.4f}"
        )
    print(
        f"pareto/none: epochs {ratio(on['epochs'], off['epochs'])}, wall time {ratio(on['wall_s'], off['wall_s'])}, "
        f"hypervolume {ratio(on['hypervolume'], off['hypervolume'])} with each run's own latencies, "
        f"{ratio(on['hv_shared'], off['hv_shared'])} with shared ones  (target: <= 50% epochs, >= 95% hypervolume)"
    )
    cpu = sum(os.times()[:4])  # this process and the sweeps it ran
    print(f"study DBs: {folder}; whole benchmark: {time.perf_counter() - started:.0f} s wall, {cpu:.0f} s CPU")


if __name__ == "__main__":
    main()
