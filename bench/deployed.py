"""Benchmark: what evaluating every trial as deployed adds to a sweep trial, as a share of its training time.

What it measures, on this machine's CPU (one torch thread, one ONNX Runtime intra-op thread, as a sweep worker on
a CPU runs), for Shallow SqueezeNext-06-0.4x on real Fashion-MNIST, for a `budget=quick` and a `budget=short` trial:
- training: the trainer's own seconds (`dse.train.train`, training passes plus per-epoch validation and the final
  test). The quick trial trains all its epochs; the short one (30 epochs on 55,000 images) trains `--short-epochs`
  epochs and the figure is scaled to its 30 (said on the line), since a whole short trial takes hours on a shared
  2-core machine.
- deployed, per trial: `dse.deployed.evaluate_deployed` on the trained model, the work `study.deployed=true` adds
  at the end of every trial: export fp32 ONNX, quantize to int8 (256 calibration images), evaluate both files in
  ONNX Runtime on the validation and the test split, in batches of 1,024, one session per file.
- ORT latency, per architecture: `dse.latency.ort_latencies`, the sitting `study.deployed=true` adds to the
  architecture's latency measurement (export, int8, interleaved timed rounds); a grid pays it once per
  architecture, not per trial: it is shown apart, and as the share it would be if every trial were its own.
Issue 21's goal: deployed < 5 % of the `budget=short` trial.

Needs Fashion-MNIST's IDX files (Debian: apt-get install dataset-fashion-mnist, or --data-root).
    python bench/deployed.py [--short-epochs 1] [--data-root DIR]

Found (2026-12-04, x86 CPU without AMX, 2 cores shared with three other processes' tests: wall times are 2-3x an
idle core's; both sides of each share slowed alike): budget=quick (2,000 train / 500 val / 10,000 test images,
3 epochs): training 101.8 s, deployed 68.2 s (export+int8 4.4 s, ORT evaluation of 21,000 images 63.6 s) = 67 %:
the quick budget tests on the whole test set, so evaluating it twice more costs about what it trains. budget=short
(55,000 / 5,000 / 10,000, 1 of 30 epochs trained, scaled): training 15,647 s, deployed 33.8 s (1.3 + 32.5 s) =
0.22 %, under the 5 % goal. ORT latency sitting per architecture: 3.1 s and 0.8 s.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from dse.data import load_data
from dse.deployed import evaluate_deployed
from dse.latency import ort_latencies
from dse.models import build_model
from dse.sweep.compose import compose, typed
from dse.train import train

MODEL = ["model=shallow_squeezenext", "model.blocks=[1,1,1,1]", "model.width=0.4"]  # Shallow SqueezeNext-06-0.4x


def trial(budget: str, epochs: int | None, data_root: str | None) -> dict:
    """Train one trial of `budget` (the first `epochs` epochs of it when given) and time the deployed work."""
    overrides = [
        f"budget={budget}",
        "data=fashion_mnist",
        *MODEL,
        "train.threads=1",
        "train.progress=false",
        "train.memory_format=contiguous",
        "train.device=cpu",
        "+space=width",
    ]  # a space names the study
    overrides += [f"data.root={data_root}"] if data_root else []
    setup = typed(compose(overrides))
    planned = setup.train.epochs
    if epochs is not None:
        setup.train.epochs = epochs
    splits = load_data(setup.data)
    torch.manual_seed(setup.train.seed)
    model = build_model(setup.model, num_classes=splits.num_classes, in_channels=splits.in_channels)
    started = time.perf_counter()
    result = train(model, splits, setup.train)
    trained = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        deployed = evaluate_deployed(model, splits, Path(tmp), threads=1)
        deployed_s = time.perf_counter() - started
    fresh = build_model(setup.model, num_classes=splits.num_classes, in_channels=splits.in_channels)
    started = time.perf_counter()
    ort_latencies({"06-0.4x": (fresh, tuple(splits.train_x.shape[1:]))})
    latency_s = time.perf_counter() - started
    scale = planned / setup.train.epochs
    return {
        "budget": budget,
        "epochs": f"{setup.train.epochs}/{planned}",
        "train_images": len(splits.train_x),
        "val_images": len(splits.val_x),
        "test_images": len(splits.test_x),
        "train_s": trained * scale,
        "scaled": scale != 1,
        "deployed_s": deployed_s,
        "export_s": deployed.attrs["deployed_seconds"]["export"],
        "evaluate_s": deployed.attrs["deployed_seconds"]["evaluate"],
        "latency_s": latency_s,
        "val_acc": result.epochs[-1].val_acc,
        "val_acc_onnx": deployed.attrs["val_acc_onnx"],
        "val_acc_int8": deployed.attrs["val_acc_int8"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short-epochs", type=int, default=1, help="epochs of the short trial trained (scaled to 30)")
    parser.add_argument("--data-root", help="where Fashion-MNIST is, if not where dse.data finds it")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for budget, epochs in (("quick", None), ("short", args.short_epochs)):
        r = trial(budget, epochs, args.data_root)
        print(
            f"budget={r['budget']}: {r['train_images']} train / {r['val_images']} val / {r['test_images']} test "
            f"images, epochs {r['epochs']}; training {r['train_s']:.1f} s"
            + (" (scaled from the epochs run)" if r["scaled"] else "")
            + f"; deployed per trial {r['deployed_s']:.2f} s (export+int8 {r['export_s']:.2f} s, ORT evaluation "
            f"{r['evaluate_s']:.2f} s) = {100 * r['deployed_s'] / r['train_s']:.2f} % of training; ORT latency per "
            f"architecture {r['latency_s']:.2f} s (= {100 * r['latency_s'] / r['train_s']:.2f} % were it per trial); "
            f"val_acc {r['val_acc']:.4f}, ONNX fp32 {r['val_acc_onnx']:.4f}, int8 {r['val_acc_int8']:.4f}",
            flush=True,
        )
    print(
        f"bench wall {time.perf_counter() - wall0:.0f} s, CPU {time.process_time() - cpu0:.0f} s "
        "(CPU below wall: other processes shared the cores)"
    )


if __name__ == "__main__":
    main()
