"""Datasets as uint8 tensors, the seeded train/validation/test split, and the on-device batch iterator."""

from __future__ import annotations

import gzip
import hashlib
import math
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dse.config import DATASET_NAMES, DataConfig

__all__ = [
    "DATASETS",
    "DataConfig",
    "DataError",
    "Splits",
    "batches",
    "crop_flip",
    "crop_padding",
    "epoch_draws",
    "load_data",
    "member_batches",
    "normalize",
]

# Where Debian's `dataset-fashion-mnist` package puts the original gzipped IDX files.
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# The IDX files carry no class names; these are the ones the dataset's README lists, in label order.
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


class DataError(RuntimeError):
    """A dataset is missing or unreadable; the message says what was looked for, where, and how to get it."""


@dataclass
class Splits:
    """Train/validation/test images (uint8, N×C×H×W) with int64 labels, and what the model needs to know."""

    name: str
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: list[str]
    mean: tuple[float, ...]  # per channel, in [0, 1] units, measured on the training split
    std: tuple[float, ...]
    split: dict = field(default_factory=dict)  # seed, sizes and a hash of the indices: enough to redo it

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    def to(self, device: str | torch.device) -> Splits:
        """The same splits with every tensor on `device` (itself when already there)."""
        device = torch.device(device)
        if self.device == device:
            return self
        moved = {k: getattr(self, k).to(device) for k in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")}
        return replace(self, **moved)


# ---------------------------------------------------------------------------------------------- readers


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise DataError(f"{path} is unreadable ({type(e).__name__}: {e}); delete it and download again") from e


def _cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    try:
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)  # rows are R, G, B planes of 32×32
        y = np.asarray(d[label_key], dtype=np.int64)
    except (KeyError, ValueError, TypeError) as e:
        raise DataError(f"{path} is not a CIFAR python batch ({type(e).__name__}: {e})") from e
    if len(x) != len(y):
        raise DataError(f"{path} holds {len(x)} images but {len(y)} labels")
    return x, y


def _cifar_missing(folder: Path, files: list[str], what: str, name: str) -> DataError:
    missing = [f for f in files if not (folder / f).is_file()]
    return DataError(
        f"{what} not found: looked for {', '.join(missing)} in {folder}. Get it with data.download=true "
        f"(torchvision downloads and checks it into data.root={str(folder.parent)!r}), or unpack "
        f"{name}-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html into that folder."
    )


def _read_cifar(cfg: DataConfig, *, folder: str, train: list[str], test: str, meta: str, label: str, names: str):
    root = Path(cfg.root)
    what = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}[cfg.name]
    files = [*train, test, meta]
    if cfg.download and not all((root / folder / f).is_file() for f in files):
        import torchvision  # only needed to download

        cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[cfg.name]
        try:
            cls(str(root), train=True, download=True)
        except (OSError, RuntimeError) as e:  # URLError is an OSError; a bad archive raises RuntimeError
            raise DataError(
                f"{what} download into {str(root)!r} failed ({type(e).__name__}: {e}); is there a network? "
                f"Offline, put the unpacked {folder}/ there, or use data=fashion_mnist, which reads the IDX files "
                "of Debian's dataset-fashion-mnist package (/usr/share/datasets/fashion-mnist) or a local copy "
                f"in {str(root)!r}/fashion_mnist"
            ) from None
    if not all((root / folder / f).is_file() for f in files):
        raise _cifar_missing(root / folder, files, what, cfg.name.replace("cifar", "cifar-"))
    parts = [_cifar_batch(root / folder / f, label.encode()) for f in train]
    train_x, train_y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    test_x, test_y = _cifar_batch(root / folder / test, label.encode())
    classes = [c.decode() for c in _unpickle(root / folder / meta)[names.encode()]]
    return train_x, train_y, test_x, test_y, classes


def read_cifar10(cfg: DataConfig):
    return _read_cifar(
        cfg,
        folder="cifar-10-batches-py",
        train=[f"data_batch_{i}" for i in range(1, 6)],
        test="test_batch",
        meta="batches.meta",
        label="labels",
        names="label_names",
    )


def read_cifar100(cfg: DataConfig):
    return _read_cifar(
        cfg,
        folder="cifar-100-python",
        train=["train"],
        test="test",
        meta="meta",
        label="fine_labels",
        names="fine_label_names",
    )


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped when its name ends in .gz) of unsigned bytes, as an array of its shape."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path} is unreadable ({type(e).__name__}: {e}); delete it and fetch it again") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (header {raw[:4].hex()!r})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).copy()  # writable, for torch
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: header says {dims} ({int(np.prod(dims))} bytes), found {data.size}")
    return data.reshape(dims)


FASHION_FILES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]


def _find_idx(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def read_fashion_mnist(cfg: DataConfig):
    root = Path(cfg.root)
    # Our own folder, torchvision's download layout, then the Debian package.
    folders = [root / "fashion_mnist", root / "FashionMNIST" / "raw", SYSTEM_FASHION_MNIST]
    if cfg.download and not any(all(_find_idx(d, n) for n in FASHION_FILES) for d in folders):
        import torchvision  # only needed to download

        torchvision.datasets.FashionMNIST(str(root), train=True, download=True)
    for folder in folders:
        paths = [_find_idx(folder, n) for n in FASHION_FILES]
        if all(paths):
            break
    else:
        raise DataError(
            f"Fashion-MNIST not found: looked for {', '.join(f + '[.gz]' for f in FASHION_FILES)} in "
            f"{', '.join(str(d) for d in folders)}. Get it with `apt-get install dataset-fashion-mnist` "
            f"(Debian/Ubuntu), with data.download=true (torchvision downloads into {root / 'FashionMNIST'}), or "
            "copy the four IDX files from https://github.com/zalandoresearch/fashion-mnist into "
            f"{root / 'fashion_mnist'}."
        )
    train_x, train_y, test_x, test_y = (read_idx(p) for p in paths)
    for images, labels, p in ((train_x, train_y, paths[0]), (test_x, test_y, paths[2])):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{p} and its labels disagree: images {images.shape}, labels {labels.shape}")
    return train_x[:, None], train_y.astype(np.int64), test_x[:, None], test_y.astype(np.int64), FASHION_MNIST_CLASSES


DATASETS: dict[str, Callable] = {
    "cifar10": read_cifar10,
    "cifar100": read_cifar100,
    "fashion_mnist": read_fashion_mnist,
}
assert tuple(DATASETS) == DATASET_NAMES, "dse.config.DATASET_NAMES lists the readers here"


# ---------------------------------------------------------------------------------------------- split


def _mean_std(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std of uint8 images, in [0, 1] units, from a histogram."""
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1), minlength=256).double()
        mean = (counts * values).sum() / counts.sum()
        var = (counts * (values - mean) ** 2).sum() / counts.sum()
        means.append(float(mean))
        stds.append(float(var.sqrt()))
    return tuple(means), tuple(stds)


def _check_labels(y: np.ndarray, num_classes: int, what: str) -> None:
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{what} labels span {y.min()}..{y.max()}, outside 0..{num_classes - 1}")


def load_data(cfg: DataConfig) -> Splits:
    """Read a dataset into uint8 tensors and split it: validation drawn from the official training set
    with `cfg.seed`, then an optional training subset; the official test set is kept whole."""
    train_x, train_y, test_x, test_y, classes = DATASETS[cfg.name](cfg)
    _check_labels(train_y, len(classes), f"{cfg.name} training")
    _check_labels(test_y, len(classes), f"{cfg.name} test")
    n = len(train_x)
    if cfg.val_size >= n:
        raise ValueError(f"data val_size={cfg.val_size} must be < the {n} training images of {cfg.name}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    val_idx = perm[: cfg.val_size].sort().values
    train_idx = perm[cfg.val_size :][: cfg.subset].sort().values
    digest = hashlib.sha256(train_idx.numpy().tobytes() + b"|" + val_idx.numpy().tobytes()).hexdigest()
    x, y = torch.from_numpy(np.ascontiguousarray(train_x)), torch.from_numpy(train_y)
    splits_x = x[train_idx]
    mean, std = _mean_std(splits_x)
    return Splits(
        name=cfg.name,
        train_x=splits_x,
        train_y=y[train_idx],
        val_x=x[val_idx],
        val_y=y[val_idx],
        test_x=torch.from_numpy(np.ascontiguousarray(test_x)),
        test_y=torch.from_numpy(test_y),
        classes=list(classes),
        mean=mean,
        std=std,
        split={
            "dataset": cfg.name,
            "seed": cfg.seed,
            "train": len(train_idx),
            "val": len(val_idx),
            "test": len(test_x),
            "indices_sha256": digest[:16],
        },
    )


# ---------------------------------------------------------------------------------------------- batches


def crop_flip(x: Tensor, dy: Tensor, dx: Tensor, flip: Tensor, *, pad: int = 4, channels_last: bool = False) -> Tensor:
    """Crop each image of a uint8 N×C×H×W batch from its zero-padded copy at offset (dy, dx) in
    [0, 2·pad], mirrored left-right where `flip`; one gather for the whole batch. With `channels_last`
    the result has channels-last strides (the gather writes it that way; no extra copy)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    i_h, i_w = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    rows = dy[:, None] + i_h  # n×h
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - i_w, i_w)  # n×w
    b, ch = torch.arange(n, device=x.device), torch.arange(c, device=x.device)
    if channels_last:
        return padded[b[:, None, None, None], ch, rows[:, :, None, None], cols[:, None, :, None]].permute(0, 3, 1, 2)
    return padded[b[:, None, None, None], ch[:, None, None], rows[:, None, :, None], cols[:, None, None, :]]


def crop_padding(crop: float, size: tuple[int, int]) -> int:
    """The zero padding, in pixels, of a random crop whose shift is `crop` × the image's shorter side,
    rounded half up: 0.125 pads 4 pixels on 28×28 and on 32×32, 0.07 pads 2 on both."""
    if not 0 <= crop < 0.5:
        raise ValueError(f"{crop=} must be in [0, 0.5)")
    return math.floor(crop * min(size) + 0.5)


def normalize(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 images to float32 (x/255 - mean)/std, keeping x's memory format; mean/std shaped 1×C×1×1."""
    return torch.addcmul(-mean / std, x, 1 / (255 * std))


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # Derived from (seed, epoch) alone, so a resumed run draws the same order as an uninterrupted one.
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))


def epoch_draws(n: int, *, seed: int, epoch: int, pad: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    """One training epoch's random choices for n images, drawn on the CPU from (seed, epoch) alone: the
    order, the crop offsets (2×n, in [0, 2·pad]) and the horizontal flips."""
    g = _epoch_generator(seed, epoch)
    order = torch.randperm(n, generator=g)
    shifts = torch.randint(0, 2 * pad + 1, (2, n), generator=g)
    flips = torch.rand(n, generator=g) < 0.5
    return order, shifts, flips


def batches(
    x: Tensor,
    y: Tensor,
    batch_size: int,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    train: bool = False,
    augment: bool = True,
    seed: int = 0,
    epoch: int = 0,
    pad: int = 4,
    channels_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Normalised float32 batches of (x, y) computed on x's device.

    With `train`: full batches in a shuffled order and, with `augment`, random crop (zero pad `pad`)
    and horizontal flip, all drawn from (seed, epoch) alone. Without: every image in order, untouched.
    """
    if train:
        kw = dict(mean=mean, std=std, augment=augment, pad=pad, channels_last=channels_last)
        for xb, yb in member_batches(x, y, batch_size, seeds=[seed], epochs=[epoch], **kw):
            yield xb[0], yb[0]
        return
    m, s = _stats(mean, std, x.device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for i in range(0, len(x), batch_size):
        yield normalize(x[i : i + batch_size].contiguous(memory_format=fmt), m, s), y[i : i + batch_size]


def member_batches(
    x: Tensor,
    y: Tensor,
    batch_size: int,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    seeds: Sequence[int],
    epochs: Sequence[int],
    augment: bool = True,
    pad: int = 4,
    channels_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Training batches of several trials at once, for a fused group: (M×B×C×H×W images, M×B labels) where
    trial m's part is the batch `batches(train=True, seed=seeds[m], epoch=epochs[m])` yields, all M gathered,
    cropped and flipped together on x's device."""
    draws = [epoch_draws(len(x), seed=seed, epoch=epoch, pad=pad) for seed, epoch in zip(seeds, epochs, strict=True)]
    order, shifts, flips = (torch.stack(d).to(x.device) for d in zip(*draws))  # M×n, M×2×n, M×n
    m, s = _stats(mean, std, x.device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    members = len(draws)
    for i in range(0, len(x) - batch_size + 1, batch_size):
        part = slice(i, i + batch_size)
        idx = order[:, part].reshape(-1)
        xb = x.index_select(0, idx)
        if augment:
            dy, dx, flip = shifts[:, 0, part].reshape(-1), shifts[:, 1, part].reshape(-1), flips[:, part].reshape(-1)
            xb = crop_flip(xb, dy, dx, flip, pad=pad, channels_last=channels_last)
        xb = normalize(xb.contiguous(memory_format=fmt), m, s)
        yield xb.unflatten(0, (members, batch_size)), y.index_select(0, idx).view(members, batch_size)


def _stats(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    return torch.tensor(mean, device=device).view(1, -1, 1, 1), torch.tensor(std, device=device).view(1, -1, 1, 1)
