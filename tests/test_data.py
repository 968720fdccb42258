"""dse.data on generated files in the original formats: layout, order, the split, errors, batches."""

import gzip

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dse.data import DATASETS, DataConfig, DataError, batches, crop_flip, crop_padding, load_data, normalize


def test_cifar10_pixels_and_labels_in_file_order_and_nchw(cifar10):
    s = load_data(DataConfig(name="cifar10", root=str(cifar10.root), val_size=0))
    assert s.train_x.dtype == torch.uint8 and s.train_y.dtype == torch.int64
    assert s.train_x.shape == (250, 3, 32, 32) and s.test_x.shape == (50, 3, 32, 32)
    assert np.array_equal(s.train_x.numpy(), cifar10.train_x)  # batches 1..5 concatenated, R/G/B planes
    assert np.array_equal(s.train_y.numpy(), cifar10.train_y)
    assert np.array_equal(s.test_x.numpy(), cifar10.test_x)
    assert np.array_equal(s.test_y.numpy(), cifar10.test_y)
    assert s.classes == cifar10.classes
    assert (s.in_channels, s.num_classes) == (3, 10)


def test_cifar100_reads_fine_labels(fake_data):
    d = fake_data("cifar100", n_train=120, n_test=30)
    s = load_data(DataConfig(name="cifar100", root=str(d.root), val_size=0))
    assert np.array_equal(s.train_x.numpy(), d.train_x) and np.array_equal(s.train_y.numpy(), d.train_y)
    assert np.array_equal(s.test_y.numpy(), d.test_y)
    assert s.num_classes == 100


@pytest.mark.parametrize("folder, gz", [("fashion_mnist", True), ("FashionMNIST/raw", False)])
def test_fashion_mnist_idx_files(fake_data, folder, gz):
    d = fake_data("fashion_mnist", folder=folder, gz=gz)
    s = load_data(DataConfig(name="fashion_mnist", root=str(d.root), val_size=0))
    assert s.train_x.shape == (250, 1, 28, 28) and s.in_channels == 1
    assert np.array_equal(s.train_x.numpy(), d.train_x) and np.array_equal(s.train_y.numpy(), d.train_y)
    assert np.array_equal(s.test_x.numpy(), d.test_x) and np.array_equal(s.test_y.numpy(), d.test_y)
    assert s.classes[0] == "T-shirt/top" and s.num_classes == 10


def test_split_is_fixed_by_its_seed_and_recorded(cifar10):
    cfg = DataConfig(name="cifar10", root=str(cifar10.root), val_size=50, seed=3)
    a, b = load_data(cfg), load_data(cfg)
    other = load_data(DataConfig(name="cifar10", root=str(cifar10.root), val_size=50, seed=4))
    assert a.split == b.split and torch.equal(a.val_x, b.val_x)
    assert a.split["indices_sha256"] != other.split["indices_sha256"]
    assert (a.split["seed"], a.split["train"], a.split["val"], a.split["test"]) == (3, 200, 50, 50)
    # train and validation partition the official training set, each kept in file order
    rows = {img.tobytes(): i for i, img in enumerate(cifar10.train_x)}
    train_ids = [rows[img.numpy().tobytes()] for img in a.train_x]
    val_ids = [rows[img.numpy().tobytes()] for img in a.val_x]
    assert sorted(train_ids + val_ids) == list(range(250))
    assert train_ids == sorted(train_ids) and val_ids == sorted(val_ids)
    assert np.array_equal(a.train_y.numpy(), cifar10.train_y[train_ids])


def test_subset_and_mean_std_come_from_the_training_split(cifar10):
    s = load_data(DataConfig(name="cifar10", root=str(cifar10.root), val_size=50, subset=64))
    assert len(s.train_x) == 64 and len(s.val_x) == 50 and s.split["train"] == 64
    pixels = s.train_x.numpy().astype(np.float64) / 255
    assert np.allclose(s.mean, pixels.mean(axis=(0, 2, 3)))
    assert np.allclose(s.std, pixels.std(axis=(0, 2, 3)))


def test_unknown_dataset_and_bad_sizes_are_refused(cifar10):
    with pytest.raises(ValueError, match="mnist.*" + ", ".join(DATASETS)):
        DataConfig(name="mnist")
    with pytest.raises(ValueError, match="val_size"):
        load_data(DataConfig(name="cifar10", root=str(cifar10.root), val_size=250))


def test_missing_cifar_says_what_where_and_how(tmp_path):
    with pytest.raises(DataError) as e:
        load_data(DataConfig(name="cifar10", root=str(tmp_path)))
    msg = str(e.value)
    assert "data_batch_1" in msg and str(tmp_path / "cifar-10-batches-py") in msg and "data.download=true" in msg


def test_missing_fashion_mnist_names_every_place_and_the_package(tmp_path):
    with pytest.raises(DataError) as e:
        load_data(DataConfig(name="fashion_mnist", root=str(tmp_path)))
    msg = str(e.value)
    assert "train-images-idx3-ubyte" in msg and str(tmp_path / "fashion_mnist") in msg
    assert "dataset-fashion-mnist" in msg and "data.download=true" in msg


def test_corrupt_cifar_batch_is_reported_with_its_path(cifar10):
    path = cifar10.root / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match="data_batch_3"):
        load_data(DataConfig(name="cifar10", root=str(cifar10.root)))


@pytest.mark.parametrize("damage", ["truncate", "magic"])
def test_corrupt_idx_file_is_reported_with_its_path(fake_data, damage):
    d = fake_data("fashion_mnist")
    path = d.root / "fashion_mnist" / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    else:
        path.write_bytes(gzip.compress(b"\x00\x00\x0d\x03" + raw[4:]))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        load_data(DataConfig(name="fashion_mnist", root=str(d.root)))


@pytest.mark.parametrize("channels_last", [False, True])
def test_crop_flip_is_a_shifted_window_of_the_zero_padded_image(channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
    dy, dx = torch.randint(0, 9, (2, 16), generator=g)
    flip = torch.rand(16, generator=g) < 0.5
    out = crop_flip(x, dy, dx, flip, pad=4, channels_last=channels_last)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(16):
        want = padded[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32]
        assert torch.equal(out[i], want.flip(-1) if flip[i] else want)


def test_crop_padding_is_a_fraction_of_the_shorter_side_rounded_half_up():
    assert [crop_padding(0.125, (s, s)) for s in (28, 32, 64)] == [4, 4, 8]  # 3.5 rounds up to the paper's 4
    assert [crop_padding(0.07, (s, s)) for s in (28, 32)] == [2, 2]
    assert crop_padding(0.1, (28, 40)) == 3 and crop_padding(0.0, (32, 32)) == 0
    with pytest.raises(ValueError, match=r"crop=0.5 must be in \[0, 0.5\)"):
        crop_padding(0.5, (32, 32))


@pytest.mark.parametrize("pad", [0, 2])
def test_training_batches_crop_within_the_padding(pad):
    n, size = 64, 28
    levels = torch.arange(1, n + 1, dtype=torch.uint8) * 3
    x = levels.view(n, 1, 1, 1).expand(n, 1, size, size).contiguous()
    for xb, yb in batches(x, torch.arange(n), 16, mean=(0.0,), std=(1.0,), train=True, pad=pad):
        kept = (torch.round(xb * 255).to(torch.int64) == levels[yb].view(-1, 1, 1, 1)).sum((1, 2, 3))
        assert (kept >= (size - pad) ** 2).all() and (pad == 0) == bool((kept == size * size).all())


def test_training_batches_keep_shapes_and_never_mix_images():
    # Every image is one flat grey level that names it; its label is its index.
    n = 100
    levels = torch.arange(1, n + 1, dtype=torch.uint8) * 2
    x = levels.view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()
    y = torch.arange(n)
    seen = []
    for xb, yb in batches(x, y, 32, mean=(0.0,) * 3, std=(1.0,) * 3, train=True, seed=1, epoch=0, channels_last=True):
        assert xb.shape == (32, 3, 32, 32) and xb.dtype == torch.float32
        assert xb.is_contiguous(memory_format=torch.channels_last)
        values = torch.round(xb * 255).to(torch.int64)
        for img, label in zip(values, yb):
            assert set(img.unique().tolist()) <= {0, int(levels[label])}  # its own level, or padding
            assert (img == int(levels[label])).sum() >= 3 * 28 * 28  # a pad-4 crop keeps at least 28×28
        seen += yb.tolist()
    assert len(seen) == 96 and len(set(seen)) == 96  # full batches only, no image twice


def test_training_order_depends_on_seed_and_epoch_only():
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(64)
    kw = dict(mean=(0.5,) * 3, std=(0.25,) * 3, train=True)

    def run(**more):
        return [(xb, yb) for xb, yb in batches(x, y, 16, **kw, **more)]

    a, b, c = run(seed=0, epoch=2), run(seed=0, epoch=2), run(seed=0, epoch=3)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert not torch.equal(torch.cat([p[1] for p in a]), torch.cat([p[1] for p in c]))


def test_evaluation_batches_are_every_image_in_order_normalized():
    x = torch.randint(0, 256, (70, 1, 28, 28), dtype=torch.uint8)
    y = torch.arange(70)
    out = list(batches(x, y, 32, mean=(0.3,), std=(0.2,)))
    assert [len(yb) for _, yb in out] == [32, 32, 6]
    got = torch.cat([xb for xb, _ in out])
    assert torch.equal(torch.cat([yb for _, yb in out]), y)
    assert torch.allclose(got, (x.float() / 255 - 0.3) / 0.2, atol=1e-5)


def test_normalize_keeps_channels_last():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    mean, std = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1), torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    out = normalize(x, mean, std)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, (x.float() / 255 - mean) / std, atol=1e-5)


def test_failed_download_names_the_offline_alternative(tmp_path, monkeypatch):
    import urllib.error

    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(
        DataError, match=r"CIFAR-10 download .* failed \(URLError.*data=fashion_mnist.*dataset-fashion-mnist"
    ):
        load_data(DataConfig(name="cifar10", root=str(tmp_path), download=True))
