"""Test helper: a tiny model, quick CPU training configs and the composed conf/train recipes, for the trainer's
tests (test_train, test_step, test_autotune, test_checkpoint, test_optim)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dse.config import DataConfig, TrainConfig, register_schemas
from dse.data import load_data

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def tiny_model(in_channels: int = 3, num_classes: int = 10, seed: int = 0, dropout: float = 0.3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(8, num_classes),
    )


def quick(**kw) -> TrainConfig:
    """A few CPU seconds of training on the generated data."""
    base = dict(epochs=3, batch_size=32, eval_batch_size=64, threads=1, device="cpu", progress=False)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(name="splits")
def splits_fixture(cifar10):
    """`splits`: the generated CIFAR-10 (200 training images, 50 for validation). Import it to use it."""
    return load_data(DataConfig(name="cifar10", root=str(cifar10.root), val_size=50))


def composed_train(primary: str, *overrides: str) -> TrainConfig:
    register_schemas()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return OmegaConf.to_object(compose(primary, overrides=list(overrides)).train)


def train_config(name: str) -> TrainConfig:
    return composed_train("run", f"train={name}")
