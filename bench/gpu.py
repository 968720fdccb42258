"""GPU sweeps at full speed: what CUDA-graph steps and fused trials buy on this GPU, and what the paper's space takes.

One run (under 8 minutes on an H100 or H200) prints the device, the torch version and, for the paper's models
(Shallow SqueezeNext-06-0.4x, -06-1.0x and SqueezeNext-23-2x), batch 128, `conf/train/sgd.yaml`, bf16 autocast,
the layout the trainer picks (`train.memory_format=auto`), on generated CIFAR-sized data already on the GPU
(pixels do not change the speed):
  1. s/epoch of one trial by `dse.train.train`, eagerly (`train.cuda_graph=false`) and replaying the captured
     step (`train.cuda_graph=true`, the default): its second 50,000-image epoch (training pass alone);
  2. the loop a user would write (bench/trainer.py's: fp32 NCHW, torchvision DataLoader with 8 workers and PIL
     transforms), in images/s of its second epoch, and ours (graph) / user;
  3. aggregate training images/s of 1, 2, 4, 8 and 16 fused trials (`dse.autotune.pick_group_size`'s probe: copies
     of the model stepped as `train_group` steps them, graphs included), and the size `auto` picks (the largest
     that adds >= 10 %);
  4. the estimated wall time of the `paper` space (every row of Tables 1-6, 3 seeds, 200 epochs): its trials
     grouped by `dse.fused.group_key` into groups of the size `auto` picks for them (at most as many as share
     the key), each group size timed by `train_group` itself for two epochs of generated data (the second
     counts: training pass, and validation scaled to the real 5,000 images), scaled to the real epoch (the
     trial's own data split), times the trial's epochs, plus a test pass. Groups run one after another (no
     two architectures share the GPU in this estimate).
Then the issue's targets beside the figures. `--device cpu --tiny` runs every part on a few batches on the CPU,
to check the script (its figures mean nothing). `bench/gpu.sh` runs it on a GPU machine without network.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]  # this checkout's dse, and bench/trainer.py

from dse.autotune import best_group_size, pick_group_size  # noqa: E402
from dse.config import SpaceConfig, TrainConfig, to_object  # noqa: E402
from dse.data import Splits  # noqa: E402
from dse.fused import group_key  # noqa: E402
from dse.models import build_model, create_model, paper_name  # noqa: E402
from dse.sweep import compose, grid_params, merge_overrides, trial_overrides, typed  # noqa: E402
from dse.train import Failed, Member, train, train_group  # noqa: E402

try:
    from trainer import user_loop  # bench/trainer.py's textbook loop
except ImportError as e:  # torchvision or pillow is missing on this machine
    user_loop, NO_USER_LOOP = None, f"{type(e).__name__}: {e}"

MODELS = ["Shallow SqueezeNext-06-0.4x", "Shallow SqueezeNext-06-1.0x", "SqueezeNext-23-2x"]
SIZES = (1, 2, 4, 8, 16)
EPOCH = 50_000  # a CIFAR-10 epoch, as the paper's s/epoch counts it
# Facts of the datasets the paper space trains on: (official training images, test images, classes).
DATASETS = {"cifar10": (50_000, 10_000, 10), "cifar100": (50_000, 10_000, 100)}


@dataclass
class Scale:
    """How big each measurement is: the full run on a GPU, or `--tiny` on the CPU."""

    epoch_images: int = EPOCH  # part 1's epochs
    user_batches: int = 100  # part 2's epochs, in batches
    sizes: tuple[int, ...] = SIZES
    probe_steps: int = 20  # part 3 and the auto size of part 4
    group_batches: int = 40  # part 4's generated epochs, in batches
    group_val: int = 2048  # part 4's generated validation images
    classes: int | None = None  # part 4: only the first N groups of trials (tiny)


TINY = Scale(epoch_images=512, user_batches=4, sizes=(1, 2), probe_steps=2, group_batches=3, group_val=64, classes=2)


def generated(n_train: int, n_val: int, n_test: int, num_classes: int, device: torch.device) -> Splits:
    """CIFAR-shaped uint8 images and labels drawn at random, already on the device."""
    g = torch.Generator().manual_seed(0)

    def images(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g).to(device)

    def labels(n: int) -> torch.Tensor:
        return torch.randint(0, num_classes, (n,), generator=g).to(device)

    return Splits(
        name="generated",
        train_x=images(n_train),
        train_y=labels(n_train),
        val_x=images(n_val),
        val_y=labels(n_val),
        test_x=images(n_test),
        test_y=labels(n_test),
        classes=[str(c) for c in range(num_classes)],
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        split={"dataset": "generated", "train": n_train, "val": n_val, "test": n_test},
    )


def base_config(device: torch.device, batch: int) -> TrainConfig:
    """conf/train/sgd.yaml (the paper's recipe) on this device."""
    recipe = to_object(TrainConfig, compose(["train=sgd"]).train)
    return replace(recipe, device=device.type, batch_size=batch, progress=False, checkpoint=None)


def one_trial(name: str, splits: Splits, cfg: TrainConfig) -> tuple[float, str, bool]:
    """(seconds of the second epoch scaled to 50,000 images, layout, whether it replayed a graph)."""
    torch.manual_seed(0)
    result = train(create_model(name, num_classes=10), splits, replace(cfg, epochs=2))
    last = result.epochs[-1]
    return EPOCH / last.images_per_s, result.memory_format, result.cuda_graph


def part1_and_2(scale: Scale, device: torch.device, batch: int) -> dict:
    print(
        f"\n1-2. one trial: s per {EPOCH:,}-image epoch (second epoch, training pass), and the user loop "
        f"(8 DataLoader workers, fp32 NCHW)"
    )
    print(f"{'model':<30}{'eager':>8}{'graph':>8}{'layout':>15}{'user img/s':>12}{'user s/ep':>10}{'graph/user':>11}")
    if user_loop is None:
        print(f"  (no user loop here: {NO_USER_LOOP})")
    splits = generated(scale.epoch_images, batch, batch, 10, device)
    cfg = base_config(device, batch)
    figures = {}
    for name in MODELS:
        eager, layout, _ = one_trial(name, splits, replace(cfg, cuda_graph=False))
        graph, _, graphed = one_trial(name, splits, cfg)
        user = math.nan
        if user_loop is not None:
            user = user_loop(name, splits.to("cpu"), scale.user_batches, device, workers=8, batch=batch)
        figures[name] = (eager, graph, user)
        note = "" if graphed else " (eager: no graph)"
        print(
            f"{name:<30}{eager:>8.2f}{graph:>8.2f}{layout:>15}{user:>12.0f}{EPOCH / user:>10.2f}"
            f"{EPOCH / graph / user:>11.2f}{note}",
            flush=True,
        )
    return figures


def part3(scale: Scale, device: torch.device, batch: int) -> dict:
    print(
        f"\n3. fused trials: aggregate training images/s per group size (`pick_group_size`, {scale.probe_steps} "
        "timed steps), x = over one trial"
    )
    print(f"{'model':<30}" + "".join(f"{size:>14}" for size in scale.sizes) + f"{'auto':>6}")
    splits = generated(batch, batch, batch, 10, device)
    cfg = base_config(device, batch)
    figures = {}
    for name in MODELS:
        torch.manual_seed(0)
        model = create_model(name, num_classes=10)
        _, rates = pick_group_size(model, splits, cfg, sizes=scale.sizes, min_gain=-math.inf, steps=scale.probe_steps)
        auto = best_group_size(rates)
        figures[name] = rates
        cells = "".join(
            f"{f'{rates[s]:.0f} ({rates[s] / rates[1]:.1f}x)':>14}" if s in rates else f"{'OOM':>14}"
            for s in scale.sizes
        )
        print(f"{name:<30}{cells}{auto:>6}", flush=True)
    return figures


def paper_trials() -> list:
    """Every trial of the `paper` space as the sweep composes it (TrialSetups)."""
    space = to_object(SpaceConfig, compose(["+space=paper"]).space)
    trials = []
    for params in grid_params(space, space.seeds):
        static, varying = trial_overrides(params, space)
        trials.append(typed(compose(merge_overrides(space.overrides, static, ["+space=paper"], varying))))
    return trials


def part4(scale: Scale, device: torch.device) -> float:
    trials = paper_trials()
    groups: dict[tuple, list] = defaultdict(list)
    for setup in trials:
        with torch.device("meta"):  # shapes are all group_key needs
            model = build_model(setup.model, num_classes=DATASETS[setup.data.name][2], in_channels=3)
        cfg = replace(setup.train, device=device.type, progress=False, checkpoint=None)
        data = (setup.data.name, setup.data.val_size, setup.data.subset)
        groups[(group_key(model, cfg), data)].append((setup, cfg))
    keys = list(groups)[: scale.classes]
    print(
        f"\n4. the paper space: {len(trials)} trials in {len(groups)} groups of fusable trials"
        f"{f' (tiny: the first {len(keys)})' if scale.classes else ''}: per group, its trials, the size auto "
        "picks, s per real epoch (training + validation) at that size, and its hours"
    )
    total = 0.0
    for key in keys:
        hours, line = estimate(groups[key], scale, device)
        total += hours
        print(line, flush=True)
    print(f"  estimated paper space on this device: {total:.2f} h (groups one after another)")
    return total


def estimate(trials: list, scale: Scale, device: torch.device) -> tuple[float, str]:
    """(hours, printed line) of one group of fusable trials: split into groups of the auto size, each timed."""
    setup, cfg = trials[0]
    train_images, test_images, num_classes = DATASETS[setup.data.name]
    train_images = min(train_images - setup.data.val_size, setup.data.subset or train_images)
    probe = generated(cfg.batch_size, cfg.batch_size, cfg.batch_size, num_classes, device)
    torch.manual_seed(0)
    model = build_model(setup.model, num_classes=num_classes, in_channels=3)
    sizes = sorted({s for s in scale.sizes if s < len(trials)} | {min(len(trials), max(scale.sizes))})
    auto, _ = pick_group_size(model, probe, cfg, sizes=sizes, steps=scale.probe_steps)
    chunks = [auto] * (len(trials) // auto) + ([len(trials) % auto] if len(trials) % auto else [])
    timed = {k: group_seconds(trials[:k], num_classes, train_images, test_images, scale, device) for k in set(chunks)}
    hours = sum(timed[k][0] for k in chunks) / 3600
    name = paper_name(setup.model) + ("" if setup.data.name == "cifar10" else f" ({setup.data.name})")
    optimizers = "/".join(sorted({c.optimizer for _, c in trials}))
    line = f"  {name:<44}{len(trials):>3} trials  auto {auto:<3}{timed[auto][1]:>7.2f} s/epoch{hours:>7.2f} h"
    return hours, f"{line}  {optimizers}"


def group_seconds(
    trials: list, num_classes: int, train_images: int, test_images: int, scale: Scale, device: torch.device
) -> tuple[float, float]:
    """(wall seconds of these trials trained as one group for all their epochs, seconds per real epoch) from two
    epochs of `train_group` on generated data: the second epoch's training pass and validation, scaled."""
    batch = trials[0][1].batch_size
    splits = generated(scale.group_batches * batch, scale.group_val, batch, num_classes, device)
    members = []
    for setup, cfg in trials:
        torch.manual_seed(cfg.seed)
        members.append(Member(build_model(setup.model, num_classes=num_classes, in_channels=3), replace(cfg, epochs=2)))
    outcomes = dict(train_group(members, splits))
    for outcome in outcomes.values():
        if isinstance(outcome, Failed):
            raise outcome.error
    last = outcomes[0].result.epochs[-1]
    val_images = trials[0][0].data.val_size
    eval_per_image = last.eval_seconds / scale.group_val
    per_epoch = last.seconds * (train_images // batch) / scale.group_batches + eval_per_image * val_images
    epochs = max(cfg.epochs for _, cfg in trials)
    return epochs * per_epoch + eval_per_image * test_images, per_epoch


def targets(one: dict, fused: dict, paper_hours: float | None) -> None:
    """The issue's acceptance figures beside what this run measured."""
    print("\ntargets (issue 11):")
    small = MODELS[0]

    def line(what: str, value: float, ok: bool) -> None:
        print(f"  {what:<58}{value:>9.2f}  {'met' if ok else 'NOT met'}")

    if one:
        eager, graph, user = one[small]
        line(f"{small} s/epoch, one trial (<= 1.0)", graph, graph <= 1.0)
        ratios = [EPOCH / g / u for _, g, u in one.values()]
        if all(math.isfinite(r) for r in ratios):
            mean = math.exp(sum(map(math.log, ratios)) / len(ratios))
            line("our trainer / 8-worker DataLoader loop, geometric mean (>= 3)", mean, mean >= 3)
    if fused and 8 in fused.get(small, {}):
        gain = fused[small][8] / fused[small][1]
        line(f"8 fused {small} / one trial (>= 4)", gain, gain >= 4)
    if paper_hours is not None:
        line("paper space, hours on one GPU (<= 3)", paper_hours, paper_hours <= 3)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a few batches of each part (to check the script)")
    parser.add_argument("--parts", nargs="+", type=int, default=[1, 2, 3, 4], choices=[1, 2, 3, 4])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    scale, batch = (TINY, 32) if args.tiny else (Scale(), 128)
    started = time.perf_counter()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"{gpu}, torch {torch.__version__} (CUDA {torch.version.cuda}), {os.cpu_count()} CPU cores"
        f"{', TINY: figures mean nothing' if args.tiny else ''}"
    )
    one = part1_and_2(scale, device, batch) if {1, 2} & set(args.parts) else {}
    fused = part3(scale, device, batch) if 3 in args.parts else {}
    paper_hours = part4(scale, device) if 4 in args.parts else None
    targets(one, fused, paper_hours)
    print(f"\nbench/gpu.py took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
