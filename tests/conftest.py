"""Shared fixtures: small datasets written in the original on-disk formats (CIFAR python batches,
Fashion-MNIST gzipped IDX files) into tmp_path, so no test needs the network or a real dataset; a
throwaway PostgreSQL cluster."""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest


@dataclass
class FakeDataset:
    """What a writer put on disk: images N×C×H×W uint8 and int64 labels, in file order."""

    name: str
    root: Path
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]


def make_images(n: int, num_classes: int, shape: tuple[int, int, int], rng: np.random.Generator):
    """Images a small model can learn: a fixed random pattern per class, blended with noise."""
    labels = rng.integers(0, num_classes, n)
    patterns = rng.integers(0, 256, (num_classes, *shape))
    noise = rng.integers(0, 256, (n, *shape))
    return ((patterns[labels] * 2 + noise) // 3).astype(np.uint8), labels.astype(np.int64)


def _cifar_rows(x: np.ndarray) -> np.ndarray:
    # The CIFAR format, written out longhand: 1024 red, then 1024 green, then 1024 blue values per row,
    # each plane in row-major order.
    hwc = x.transpose(0, 2, 3, 1)
    return np.concatenate([hwc[..., c].reshape(len(x), -1) for c in range(3)], axis=1)


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar(
    root: Path, name: str = "cifar10", *, n_train: int = 250, n_test: int = 50, seed: int = 0
) -> FakeDataset:
    """A CIFAR-10 (5 training batches) or CIFAR-100 (one training file) folder as torchvision unpacks it."""
    num_classes = {"cifar10": 10, "cifar100": 100}[name]
    rng = np.random.default_rng(seed)
    train_x, train_y = make_images(n_train, num_classes, (3, 32, 32), rng)
    test_x, test_y = make_images(n_test, num_classes, (3, 32, 32), rng)
    classes = [f"class_{i}" for i in range(num_classes)]
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for i, part in enumerate(np.array_split(np.arange(n_train), 5)):
            batch = {b"labels": train_y[part].tolist(), b"data": _cifar_rows(train_x[part])}
            _pickle(folder / f"data_batch_{i + 1}", batch)
        _pickle(folder / "test_batch", {b"labels": test_y.tolist(), b"data": _cifar_rows(test_x)})
        _pickle(folder / "batches.meta", {b"label_names": [c.encode() for c in classes], b"num_vis": 3072})
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
            rows = {b"fine_labels": y.tolist(), b"coarse_labels": (y // 5).tolist(), b"data": _cifar_rows(x)}
            _pickle(folder / split, rows)
        _pickle(folder / "meta", {b"fine_label_names": [c.encode() for c in classes], b"coarse_label_names": []})
    return FakeDataset(name, root, train_x, train_y, test_x, test_y, classes)


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes (gzipped when the name ends in .gz)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(
    root: Path, *, n_train: int = 250, n_test: int = 50, seed: int = 0, folder: str = "fashion_mnist", gz: bool = True
) -> FakeDataset:
    """The four Fashion-MNIST IDX files (28×28 grey) in root/folder."""
    rng = np.random.default_rng(seed)
    train_x, train_y = make_images(n_train, 10, (1, 28, 28), rng)
    test_x, test_y = make_images(n_test, 10, (1, 28, 28), rng)
    (root / folder).mkdir(parents=True)
    suffix = ".gz" if gz else ""
    for kind, x, y in (("train", train_x, train_y), ("t10k", test_x, test_y)):
        write_idx(root / folder / f"{kind}-images-idx3-ubyte{suffix}", x[:, 0])
        write_idx(root / folder / f"{kind}-labels-idx1-ubyte{suffix}", y)
    from dse.data import FASHION_MNIST_CLASSES

    return FakeDataset("fashion_mnist", root, train_x, train_y, test_x, test_y, list(FASHION_MNIST_CLASSES))


@pytest.fixture
def fake_data(tmp_path: Path) -> Callable[..., FakeDataset]:
    """Write a small dataset in its original format: fake_data("cifar10" | "cifar100" | "fashion_mnist", **kw).
    Its `root` is what `DataConfig.root` takes."""

    def make(name: str = "cifar10", **kwargs) -> FakeDataset:
        root = tmp_path / f"data_{name}"
        if name == "fashion_mnist":
            return write_fashion_mnist(root, **kwargs)
        return write_cifar(root, name, **kwargs)

    return make


@pytest.fixture
def cifar10(fake_data) -> FakeDataset:
    return fake_data("cifar10")


@pytest.fixture(autouse=True)
def _no_system_fashion_mnist(monkeypatch, tmp_path: Path) -> None:
    """Tests never read Debian's installed Fashion-MNIST: the system folder points at an empty place."""
    import dse.data

    monkeypatch.setattr(dse.data, "SYSTEM_FASHION_MNIST", tmp_path / "no-system-fashion-mnist")


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_bin() -> Path | None:
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / "initdb").exists():
            return folder
    found = shutil.which("initdb")
    return Path(found).parent if found else None


@dataclass
class Postgres:
    """A throwaway PostgreSQL cluster: `url` for SQLAlchemy; `stop()` and `start()` for outages."""

    url: str
    ctl: Callable[..., None]

    def stop(self) -> None:
        self.ctl("-m", "fast", "stop")

    def start(self) -> None:
        self.ctl("start")


@pytest.fixture
def postgres():
    """A PostgreSQL cluster on a loopback port, run as an unprivileged user, removed after the test."""
    pg = _postgres_bin()
    if pg is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) are not installed")
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[test]')")
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        if not shutil.which("runuser"):
            pytest.skip("running as root without runuser to drop privileges for initdb")
        as_user = ["runuser", "-u", "nobody", "--"]
    folder = Path(tempfile.mkdtemp(prefix="dse-pg-"))  # pytest's tmp folders are closed to other users
    os.chmod(folder, 0o777)
    data, port = folder / "data", free_port()
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True, timeout=120)
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
    ctl = lambda *args: run(str(pg / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w", "-o", options, *args)
    run(str(pg / "initdb"), "-D", str(data), "-U", "dse", "--auth=trust", "-E", "UTF8")
    ctl("start")
    try:
        yield Postgres(f"postgresql://dse@127.0.0.1:{port}/postgres", ctl)
    finally:
        subprocess.run(
            [*as_user, str(pg / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True, timeout=120
        )
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True, scope="session")
def _own_latency_locks(tmp_path_factory) -> None:
    """Tests' sweeps (here and in their subprocesses) pause only each other's training for a latency measurement,
    never a real sweep on the same machine (dse.latency's machine lock)."""
    os.environ["DSE_LOCK_DIR"] = str(tmp_path_factory.mktemp("locks"))
