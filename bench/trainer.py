"""Trainer throughput: how close `dse.train` gets to pure compute, and how far ahead of a textbook loop.

What it measures, in one run, on the machine it runs on (it prints the CPU/GPU, torch version and load):

For Shallow SqueezeNext-06-0.4x, -06-1.0x and SqueezeNext-23-1x on the CPU, batch 128, SGD with
Nesterov momentum and weight decay (`conf/train/sgd.yaml`), training images per second of
  (a) pure compute: forward + backward + optimizer step of the model on one batch already in memory,
      in both layouts (channels_last = NHWC, and NCHW) and the precision the trainer uses (bf16 autocast
      where the device has bf16 units, `dse.step.native_bf16`: CUDA, or a CPU with AMX/AVX512-BF16);
      b/a divides by the layout the trainer picked (`train.memory_format=auto`: NCHW on the CPU, channels_last on CUDA);
  (b) our trainer: `dse.train.train` on CIFAR-format files read by `dse.data` (generated pixels written
      as CIFAR python batches: content does not change the speed), with random crop and flip, timed by
      the trainer's own record of its second epoch (the training pass, evaluation excluded);
  (c) the loop a user would write: NCHW fp32 model, torchvision `DataLoader` (2 workers, shuffled) over
      PIL images with RandomCrop(32, 4), RandomHorizontalFlip, ToTensor and Normalize, torch's default
      threads; the second epoch, timed from its first batch (worker start-up excluded);
and the ratios b/a and b/c, with their geometric means over the three models.

Then trials fused in groups (`dse.train.train_group`, what `sweep.trials_per_gpu` uses): the aggregate training
images/s of groups of 1, 2 and 4 copies of Shallow SqueezeNext-06-0.4x and -1.0x (`dse.autotune.pick_group_size`,
one batch in memory, the trainer's layout and precision, one thread), run member by member (the CPU's way) and as
one vmapped model (grouped convolutions, CUDA's way); a group of one is the trial alone, so N/1 >= 1 means a
fused group is no slower than its trials one after the other.

Then a quick width sweep's trials (Shallow SqueezeNext-06 at 0.4x and 1.0x, two trials each, whole
`train` calls with evaluation) run by one worker with as many threads as cores, against as many
workers as cores with one thread each, in images per second of wall time, so the sweep can pick its
default (`sweep.workers`, `sweep.threads`).

On a GPU, when there is one: seconds per CIFAR-10-sized epoch (50,000 images) of our trainer for
Shallow SqueezeNext-06-0.4x, -14-1.5x and SqueezeNext-23-2x, and the same a/b/c figures there.

Every figure is a wall-clock rate: the best of `--repeats` interleaved runs (default 3), as timeit
does, because a shared machine only ever slows a run down; still, run it on a quiet machine (`uptime`;
the load average is printed before and after). `--batches` sets the timed batches per figure (default 20).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
from hydra import compose, initialize_config_dir
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # this checkout's dse, and the tests' CIFAR-format writer

from conftest import write_cifar  # noqa: E402

from dse.autotune import pick_group_size  # noqa: E402
from dse.config import TrainConfig, register_schemas, to_object  # noqa: E402
from dse.data import DataConfig, load_data  # noqa: E402
from dse.models import create_model  # noqa: E402
from dse.optim import make_optimizer  # noqa: E402
from dse.step import mixed_precision, native_bf16  # noqa: E402
from dse.train import train  # noqa: E402

CPU_MODELS = ["Shallow SqueezeNext-06-0.4x", "Shallow SqueezeNext-06-1.0x", "SqueezeNext-23-1x"]
GPU_MODELS = ["Shallow SqueezeNext-06-0.4x", "Shallow SqueezeNext-14-1.5x", "SqueezeNext-23-2x"]
SWEEP_WIDTHS = [0.4, 1.0]
BATCH = 128


def recipe(**overrides) -> TrainConfig:
    """conf/train/sgd.yaml with `overrides`."""
    register_schemas()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        node = compose("run", overrides=["train=sgd", *(f"train.{k}={v}" for k, v in overrides.items())]).train
    return to_object(TrainConfig, node)


class PILImages(Dataset):
    """What torchvision.datasets.CIFAR10 does per item: an H×W×C uint8 array to a PIL image, then the transform."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform):
        self.images, self.labels, self.transform = x.permute(0, 2, 3, 1).numpy(), y.tolist(), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def pure_compute(name: str, cfg: TrainConfig, steps: int, device: torch.device, channels_last: bool) -> float:
    """(a): images/s of forward+backward+step on one batch already on the device."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).to(device, memory_format=fmt).train()
    optimizer = make_optimizer(model, cfg)
    x = torch.randn(BATCH, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (BATCH,), device=device)
    autocast = mixed_precision(cfg, device)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:  # the plain forward, backward and optimizer step
        with autocast:
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * BATCH / (time.perf_counter() - start)


def our_trainer(name: str, splits, cfg: TrainConfig) -> tuple[float, float, str]:
    """(b): (images/s, seconds) of the trainer's second epoch, and the layout it picked."""
    torch.manual_seed(0)
    result = train(create_model(name, num_classes=10), splits, cfg)
    return result.epochs[-1].images_per_s, result.epochs[-1].seconds, result.memory_format


def user_loop(name: str, splits, steps: int, device: torch.device, *, workers: int = 2, batch: int = BATCH) -> float:
    """(c): images/s of a textbook loop: NCHW model, DataLoader with `workers` workers and PIL transforms."""
    tf = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(splits.mean, splits.std),
        ]
    )
    data = PILImages(splits.train_x[: steps * batch], splits.train_y[: steps * batch], tf)
    loader = DataLoader(data, batch_size=batch, shuffle=True, num_workers=workers, pin_memory=device.type == "cuda")
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    rate = math.nan
    for _ in range(2):  # the second epoch is timed
        images, start = 0, None
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if start is None:
                sync(device)
                start = time.perf_counter()
            else:
                images += len(y)
        sync(device)
        rate = images / (time.perf_counter() - start)
    return rate


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def compare(models: list[str], splits, steps: int, device: torch.device, repeats: int, epoch_note: str) -> None:
    cfg = recipe(epochs=2, progress=False, device=device.type)
    print(
        f"\n{'model':<30}{'a: NHWC':>9}{'a: NCHW':>9}{'b: ours':>9}{'layout':>8}{'c: user':>9}{'b/a':>7}{'b/c':>7}"
        f"{epoch_note:>12}"
    )
    ba, bc = [], []
    for name in models:
        a = {"channels_last": 0.0, "contiguous": 0.0}
        b = c = seconds = 0.0
        for _ in range(repeats):  # interleaved, best of each
            for layout in a:
                a[layout] = max(
                    a[layout], pure_compute(name, cfg, steps, device, channels_last=layout == "channels_last")
                )
            rate, secs, layout = our_trainer(name, splits, cfg)
            b, seconds = max((b, seconds), (rate, secs))
            c = max(c, user_loop(name, splits, steps, device))
        ba.append(b / a[layout])  # the trainer's own choice of layout (`train.memory_format=auto`)
        bc.append(b / c)
        extra = f"{seconds * 50_000 / len(splits.train_x):.2f}" if device.type == "cuda" else ""
        short = "NHWC" if layout == "channels_last" else "NCHW"
        row = (
            f"{name:<30}{a['channels_last']:>9.0f}{a['contiguous']:>9.0f}{b:>9.0f}{short:>8}{c:>9.0f}"
            f"{ba[-1]:>7.2f}{bc[-1]:>7.2f}{extra:>12}"
        )
        print(row, flush=True)
    print(
        f"{'geometric mean':<30}{'':>44}{geomean(ba):>7.2f}{geomean(bc):>7.2f}   (images/s; targets b/a >= 0.95, "
        f"b/c >= {'3' if device.type == 'cuda' else '1.3'})"
    )


def fused_groups(splits, steps: int, repeats: int, sizes: tuple[int, ...] = (1, 2, 4)) -> None:
    """Aggregate images/s of fused groups on the CPU, member by member and vmapped, interleaved, best of `repeats`."""
    cfg = recipe(progress=False, device="cpu", threads=1)
    print("\nFused groups on the CPU, 1 thread: aggregate training images/s by group size (ratio to size 1)")
    print(f"{'model':<30}{'run':<18}" + "".join(f"{n:>14}" for n in sizes))
    for width in SWEEP_WIDTHS:
        rates = {way: dict.fromkeys(sizes, 0.0) for way in ("member by member", "vmapped")}
        for _ in range(repeats):
            for way in rates:
                torch.manual_seed(0)
                model = create_model("shallow_squeezenext", num_classes=10, blocks=[1, 1, 1, 1], width=width)
                _, measured = pick_group_size(
                    model, splits, cfg, sizes=sizes, min_gain=-1.0, steps=steps, vmapped=way == "vmapped"
                )
                rates[way] = {n: max(rates[way][n], measured[n]) for n in sizes}
        for way, rate in rates.items():
            cells = "".join(f"{f'{rate[n]:.0f} ({rate[n] / rate[1]:.2f})':>14}" for n in sizes)
            print(f"{f'Shallow SqueezeNext-06-{width}x':<30}{way:<18}{cells}", flush=True)


def _trial(root: str, width: float, seed: int, threads: int, subset: int, barrier, queue) -> None:
    torch.set_num_threads(threads)
    splits = load_data(DataConfig(name="cifar10", root=root, val_size=256, subset=subset))
    cfg = recipe(epochs=2, progress=False, device="cpu", threads=threads, seed=seed)
    torch.manual_seed(seed)
    model = create_model("shallow_squeezenext", num_classes=10, blocks=[1, 1, 1, 1], width=width)
    if barrier is not None:
        barrier.wait()  # the workers start training together
    start = time.time()
    result = train(model, splits, cfg)
    queue.put((start, time.time(), sum(r.seconds * r.images_per_s for r in result.epochs)))


def sweep_layouts(root: str, subset: int, repeats: int) -> None:
    """One worker with all cores vs one worker per core with one thread, on the same trials."""
    cores = os.cpu_count() or 1
    ctx = mp.get_context("spawn")
    print(
        f"\nA quick width sweep: Shallow SqueezeNext-06, {cores} trials per width (2 epochs of {subset} images + "
        "evaluation each), images/s of wall time"
    )
    print(f"{'width':<8}{f'1 worker x {cores} threads':>24}{f'{cores} workers x 1 thread':>24}{'ratio':>8}")
    for width in SWEEP_WIDTHS:
        rates = [0.0, 0.0]
        for layout in [0, 1] * repeats:
            workers, threads = ((1, cores), (cores, 1))[layout]
            queue = ctx.Queue()
            barrier = ctx.Barrier(workers) if workers > 1 else None
            trials = [
                ctx.Process(target=_trial, args=(root, width, s, threads, subset, barrier, queue)) for s in range(cores)
            ]
            batches_of = [trials[i::workers] for i in range(workers)]
            results = []
            for round_ in zip(*batches_of):  # `workers` trials at a time
                for p in round_:
                    p.start()
                results += [queue.get() for _ in round_]
                for p in round_:
                    p.join()
            # Sequential trials: add their training times; parallel ones: span of the round.
            wall = sum(
                max(r[1] for r in results[i : i + workers]) - min(r[0] for r in results[i : i + workers])
                for i in range(0, len(results), workers)
            )
            rates[layout] = max(rates[layout], sum(r[2] for r in results) / wall)
        print(f"{width:<8}{rates[0]:>24.0f}{rates[1]:>24.0f}{rates[1] / rates[0]:>8.2f}", flush=True)


def describe_machine() -> None:
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPU cores ({cpu}), {torch.get_num_threads()} threads, "
        f"load average {' '.join(f'{v:.2f}' for v in load)}"
    )
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20, help="timed batches per measurement (CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per figure; the best counts")
    parser.add_argument("--models", nargs="+", default=CPU_MODELS, help="CPU models (paper names)")
    parser.add_argument("--skip-fused", action="store_true", help="skip the fused groups' images/s")
    parser.add_argument("--skip-sweep", action="store_true", help="skip the workers × threads comparison")
    args = parser.parse_args(argv)
    describe_machine()
    with tempfile.TemporaryDirectory() as tmp:
        n = args.batches * BATCH
        write_cifar(Path(tmp), "cifar10", n_train=n + 256, n_test=256)
        splits = load_data(DataConfig(name="cifar10", root=tmp, val_size=256))
        precision = "bf16 autocast" if native_bf16(torch.device("cpu")) else "fp32"
        print(
            f"\nCPU, batch {BATCH}, {args.batches} timed batches per figure, best of {args.repeats}, "
            f"training images/s; a and b in {precision}, c in fp32"
        )
        compare(args.models, splits, args.batches, torch.device("cpu"), args.repeats, "")
        if not args.skip_fused:
            fused_groups(splits, args.batches, args.repeats)
        if not args.skip_sweep:
            sweep_layouts(tmp, n, args.repeats)
        if torch.cuda.is_available():
            gpu_root = Path(tmp) / "gpu"
            write_cifar(gpu_root, "cifar10", n_train=50_000, n_test=10_000)
            gpu = load_data(DataConfig(name="cifar10", root=str(gpu_root), val_size=0))
            print(f"\n{torch.cuda.get_device_name()}, batch {BATCH}, CIFAR-10-sized epochs (50,000 images)")
            compare(GPU_MODELS, gpu, len(gpu.train_x) // BATCH, torch.device("cuda"), args.repeats, "s/epoch (b)")
    print(f"\nload average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
