"""Test helper: run a small real sweep in this process and return its study (for report/deploy tests)."""

from __future__ import annotations

from pathlib import Path

from conftest import write_cifar

from dse.sweep import Outcome, Seams, compose, plan_sweep, run_sweep


def run_tiny_plan(
    tmp_path: Path, *overrides: str, name: str = "tiny", data_root: Path | None = None, seams: Seams = Seams()
) -> Outcome:
    """Train a few tiny models (generated CIFAR-10 data, 2 epochs) into `tmp_path/<name>.db`; return the outcome.

    `overrides` pick the space and its size, e.g. "+space=dropout", "space.grid={model.dropout:[0.1,0.2]}",
    "space.seeds=[0,1]", "sweep.seeds=2". Checkpoints and the artifact store are in `tmp_path/<name>/`; `seams`
    reach into the run (one worker, in this process).
    """
    if data_root is None:
        data_root = tmp_path / "data"
        if not data_root.exists():
            write_cifar(data_root, "cifar10", n_train=160, n_test=40)
    db = tmp_path / f"{name}.db"
    args = [
        "budget=quick",
        f"data.root={data_root}",
        "data.subset=null",
        "data.val_size=40",
        "train.epochs=2",
        "train.batch_size=32",
        f"study.storage=sqlite:///{db}",
        f"study.name={name}",
        "sweep.workers=1",
        "train.memory_format=contiguous",
        "sweep.progress=false",
        "sweep.trials_per_gpu=1",
        "sweep.threads=1",
        *overrides,
    ]
    return run_sweep(plan_sweep(compose(args), args), seams=seams)


def run_tiny_sweep(
    tmp_path: Path, *overrides: str, name: str = "tiny", data_root: Path | None = None
) -> tuple[str, str]:
    """`run_tiny_plan`, checked to end well; returns (storage URL, study name)."""
    outcome = run_tiny_plan(tmp_path, *overrides, name=name, data_root=data_root)
    assert outcome.ok, outcome.problems()
    return f"sqlite:///{tmp_path / f'{name}.db'}", name
