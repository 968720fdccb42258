"""The benchmark scripts' plumbing on tiny settings (their figures are for a quiet machine, never a test)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_bench(tmp_path: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    """A bench script from the checkout, its temporary files under `tmp_path`, writing no bytecode."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, f"bench/{script}", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def checkout_status() -> str:
    """Every path git sees changed, untracked or ignored in the checkout."""
    return subprocess.run(
        ["git", "status", "--porcelain", "--ignored"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout


@pytest.mark.slow
def test_quick_pruning_bench_compares_both_runs_and_writes_nothing_into_the_checkout(tmp_path, fake_data):
    data = fake_data("fashion_mnist", n_train=300, n_test=50)
    before = checkout_status()
    quick = ["--quick", "--trials", "3", "--epochs", "2", "--subset", "200", "--val-size", "50"]
    result = run_bench(tmp_path, "pruning.py", *quick, f"data.root={data.root}")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "2 epochs of batch 64" in out and "1 workers x 1 threads" in out  # --quick's defaults, options win
    assert "same configs proposed in both runs: yes" in out
    assert re.search(r"^none +6 ", out, re.M), out  # 3 trials x 2 epochs, none pruned
    assert re.search(r"^pareto +\d+ ", out, re.M), out
    assert checkout_status() == before
    [folder] = tmp_path.glob("dse-bench-pruning-*")
    names = ["bench-pruning-quick-none", "bench-pruning-quick-pareto"]
    assert sorted(p.stem for p in folder.glob("*.db")) == names


def test_trainer_bench_imports_what_it_measures_and_describes_itself():
    result = subprocess.run(
        [sys.executable, "bench/trainer.py", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Trainer throughput" in result.stdout and "--skip-fused" in result.stdout


@pytest.mark.slow
def test_quick_latency_predictor_bench_prints_its_tables_and_writes_nothing_into_the_checkout(tmp_path):
    before = checkout_status()
    tiny = ["--calibration", "4", "--held-out", "3", "--runs", "2", "--rounds", "1"]
    result = run_bench(tmp_path, "latency_predictor.py", *tiny)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "kit: 4 calibration + 3 held-out architectures of the open space, 14 graphs" in out
    assert "latency_onnx_ms: held-out (4 architectures, 4-fold)" in out
    rows = ("dse.predict", "MACs", "params", "dse.predict, on the second run", "the kit's second run, at the first's")
    for row in rows:
        assert re.search(rf"^\| latency_int8_ms +\| {re.escape(row)} ", out, re.M), out
    assert checkout_status() == before
