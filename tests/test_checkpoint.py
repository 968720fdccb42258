"""dse.checkpoint: the format a run's state round-trips through, atomic writes, and the clear refusals of a file that
is unreadable, older, another run's or another model's."""

import os

import pytest
import torch
import torch.nn as nn
from trainers import (
    quick,
    splits_fixture,  # noqa: F401  (the `splits` fixture)
    tiny_model,
)

from dse.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    checkpoint_state,
    load_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from dse.train import train

RUN = {"train": {"lr": 0.05, "seed": 0}, "split": {"dataset": "cifar10", "seed": 0}, "num_classes": 10}


def trained_state(seed: int) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    """A model, its weight average and an optimizer with momentum buffers, all from `seed`."""
    model = tiny_model(seed=seed)
    average = tiny_model(seed=seed + 100)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    optimizer.step()
    return model, average, optimizer


def test_a_runs_state_round_trips_through_a_checkpoint(tmp_path):
    model, average, optimizer = trained_state(0)
    optimizer.param_groups[0]["lr"] = torch.tensor(0.05)  # as a graphed run keeps it
    records = [{"epoch": 1, "val_acc": 0.5}, {"epoch": 2, "val_acc": 0.6}]
    save_checkpoint(tmp_path / "c.pt", checkpoint_state(2, model, average, optimizer, records, RUN, "channels_last"))
    state = load_checkpoint(tmp_path / "c.pt")
    assert state["format"] == CHECKPOINT_FORMAT and state["memory_format"] == "channels_last"
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.05)  # a plain number in the file
    assert type(state["optimizer"]["param_groups"][0]["lr"]) is float
    model2, average2, optimizer2 = trained_state(1)
    optimizer2.param_groups[0]["lr"] = torch.tensor(0.01)
    assert restore_checkpoint(state, "c.pt", model2, average2, optimizer2, RUN) == (2, records)
    for ours, theirs in ((model, model2), (average, average2)):  # "trained" and the evaluated "model"
        assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())
    buffers = [optimizer.state[p]["momentum_buffer"] for p in model.parameters()]
    assert all(torch.equal(b, optimizer2.state[p]["momentum_buffer"]) for b, p in zip(buffers, model2.parameters()))
    lr = optimizer2.param_groups[0]["lr"]
    assert torch.is_tensor(lr) and lr.item() == pytest.approx(0.01)  # this run's kind of lr and value, not the file's


def test_without_an_average_model_holds_the_trained_weights(tmp_path):
    model, _, optimizer = trained_state(0)
    state = checkpoint_state(1, model, None, optimizer, [], RUN, "contiguous")
    assert "trained" not in state and all(torch.equal(v, state["model"][k]) for k, v in model.state_dict().items())


def test_a_checkpoint_written_for_another_model_is_refused(tmp_path):
    model, _, optimizer = trained_state(0)
    state = checkpoint_state(1, model, None, optimizer, [], RUN, "contiguous")
    other = nn.Sequential(nn.Conv2d(3, 16, 3))
    with pytest.raises(CheckpointError, match="'c.pt' was written for another model .*delete it to start over"):
        restore_checkpoint(state, "c.pt", other, None, torch.optim.SGD(other.parameters(), lr=0.05), RUN)


def test_a_checkpoint_written_for_another_model_is_refused_by_train(splits, tmp_path):
    path = tmp_path / "c.pt"
    train(tiny_model(), splits, quick(epochs=1), checkpoint_path=path)
    wider = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    with pytest.raises(CheckpointError, match="written for another model"):
        train(wider, splits, quick(epochs=1), checkpoint_path=path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_checkpoint_raises_a_clear_error(splits, tmp_path, damage):
    path = tmp_path / "c.pt"
    train(tiny_model(), splits, quick(epochs=1), checkpoint_path=path)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="c.pt.*unreadable.*delete it"):
        train(tiny_model(), splits, quick(epochs=2), checkpoint_path=path)


def test_checkpoint_of_another_run_is_refused_naming_the_difference(splits, tmp_path):
    path = tmp_path / "c.pt"
    train(tiny_model(), splits, quick(epochs=1, lr=0.05), checkpoint_path=path)
    with pytest.raises(CheckpointError, match="lr: 0.05 there, 0.01 here"):
        train(tiny_model(), splits, quick(epochs=1, lr=0.01), checkpoint_path=path)


def test_old_checkpoint_format_is_refused_with_a_clear_message(splits, tmp_path):
    path = tmp_path / "c.pt"
    train(tiny_model(), splits, quick(epochs=1), checkpoint_path=path)
    state = load_checkpoint(path)
    save_checkpoint(path, {**state, "format": "dse.train/1"})
    with pytest.raises(CheckpointError, match="older format 'dse.train/1'.*delete it"):
        train(tiny_model(), splits, quick(epochs=2), checkpoint_path=path)


class FullDisk:
    """What torch.save cannot write: pickling it fails half-way through the file."""

    def __reduce__(self):
        raise OSError("disk full")


def test_checkpoint_write_is_atomic(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "epoch": 1})
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "epoch": 2, "weights": torch.zeros(1000), "x": FullDisk()})
    assert load_checkpoint(path)["epoch"] == 1  # the old one is intact
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # and no temp file is left behind
