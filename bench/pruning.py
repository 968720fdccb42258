"""Benchmark: the same `open` search with and without the pareto pruner, on real Fashion-MNIST.

What it measures, on this machine's CPU: two sweeps of the `open` space (NSGA-II, same sampler seed, same
number of trials; trials within NSGA-II's first generation, so both runs propose the same configs, which
the script checks) on a Fashion-MNIST subset, one with `study.pruner=none`, one with `study.pruner=pareto`.
It prints, for each: total training epochs run, wall time, trials complete/pruned, and the Pareto
hypervolume of (validation accuracy, fp32 size in MB, batch-1 CPU latency in ms) over the complete
trials, with a fixed reference point (accuracy 0, --ref-size MB, --ref-latency ms) and Optuna's WFG
hypervolume code. Target of issue 7: >= 95% of the unpruned hypervolume with <= 50% of the epochs.

Needs Fashion-MNIST's IDX files (Debian: apt-get install dataset-fashion-mnist, or data.root=...).
    python bench/pruning.py --trials 24 --epochs 9 --subset 3000
"""

from __future__ import annotations

import argparse
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


def run(pruner: str, args: argparse.Namespace, folder: Path) -> tuple[float, optuna.Study]:
    name = f"bench-pruning-{pruner}"
    storage = f"sqlite:///{folder / name}.db"
    overrides = [
        "+space=open", "data=fashion_mnist", f"data.subset={args.subset}", f"data.val_size={args.val_size}",
        f"train.epochs={args.epochs}", f"space.n_trials={args.trials}", "sweep.seeds=1", f"sweep.workers={args.workers}",
        "sweep.progress=false", f"study.name={name}", f"study.storage={storage}", f"study.pruner={pruner}",
        f"study.sampler_seed={args.seed}", f"space.search={{model.width:{{low:{args.min_width},high:{args.max_width},log:true}}}}",
        *args.overrides,
    ]
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dse.sweep", *overrides], cwd=REPO, check=True)
    return time.perf_counter() - started, optuna.load_study(study_name=name, storage=storage)


def hypervolume(study: optuna.Study, ref: np.ndarray) -> float:
    points = [[1 - t.user_attrs["curves"][-1]["val_acc"], t.user_attrs["size_mb"], t.user_attrs["latency_ms"]]
              for t in study.get_trials(states=(TrialState.COMPLETE,))]
    points = np.array([p for p in points if np.all(np.array(p) < ref)])
    return float(compute_hypervolume(points, ref)) if len(points) else 0.0


def summarize(study: optuna.Study, seconds: float, ref: np.ndarray) -> dict:
    trials = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    return {
        "wall_s": seconds,
        "epochs": sum(len(t.user_attrs.get("curves", [])) for t in trials),
        "complete": sum(t.state == TrialState.COMPLETE for t in trials),
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "hypervolume": hypervolume(study, ref),
        "configs": [tuple(sorted(t.params.items())) for t in sorted(trials, key=lambda t: t.number)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=9)
    parser.add_argument("--subset", type=int, default=3000, help="training images")
    parser.add_argument("--val-size", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=1,
                        help="more than 1 makes the trial order, hence the configs each run gets, timing-dependent")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-width", type=float, default=0.125)
    parser.add_argument("--max-width", type=float, default=1.0)
    parser.add_argument("--ref-size", type=float, default=5.0, help="reference point: MB")
    parser.add_argument("--ref-latency", type=float, default=20.0, help="reference point: ms")
    parser.add_argument("--keep", type=Path, default=None, help="keep the study DBs in this folder")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for both sweeps")
    args = parser.parse_args()
    ref = np.array([1.0, args.ref_size, args.ref_latency])
    folder = args.keep or Path(tempfile.mkdtemp(prefix="dse-bench-pruning-"))
    folder.mkdir(parents=True, exist_ok=True)
    results = {p: summarize(*reversed(run(p, args, folder)), ref) for p in ("none", "pareto")}
    off, on = results["none"], results["pareto"]
    print(f"\n{args.trials} trials of `open` on Fashion-MNIST ({args.subset} train / {args.val_size} val images, "
          f"{args.epochs} epochs, widths {args.min_width}-{args.max_width}, {args.workers} workers); "
          f"HV reference (acc 0, {args.ref_size} MB, {args.ref_latency} ms)")
    print(f"same configs proposed in both runs: {'yes' if off['configs'] == on['configs'] else 'NO'}")
    print(f"{'pruner':8} {'epochs':>7} {'wall s':>8} {'complete':>9} {'pruned':>7} {'hypervolume':>12}")
    for name, r in results.items():
        print(f"{name:8} {r['epochs']:7d} {r['wall_s']:8.1f} {r['complete']:9d} {r['pruned']:7d} {r['hypervolume']:12.4f}")
    print(f"pareto/none: epochs {on['epochs'] / off['epochs']:.1%}, wall time {on['wall_s'] / off['wall_s']:.1%}, "
          f"hypervolume {on['hypervolume'] / off['hypervolume']:.1%}  (target: <= 50% epochs, >= 95% hypervolume)")
    print(f"study DBs: {folder}")


if __name__ == "__main__":
    main()
