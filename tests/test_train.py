"""dse.train: records, on_epoch, kill/resume, the weight average and test-time flips as scored, fused groups of
trials and their outcomes (each member yielded as it ends), and the command line."""

import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from trainers import (
    REPO,
    quick,
    splits_fixture,  # noqa: F401  (the `splits` fixture)
    tiny_model,
    train_config,
)

from dse.checkpoint import load_checkpoint
from dse.config import DataConfig, TrainConfig
from dse.data import batches, load_data
from dse.step import native_bf16
from dse.train import (
    Failed,
    Finished,
    Member,
    Stopped,
    TrainingDiverged,
    TrainingStopped,
    evaluate,
    train,
    train_group,
)


def score(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kw) -> tuple[float, float]:
    """(loss, accuracy) of one model in eval mode, scored as the trainer scores its members."""
    model.eval()
    [(loss, acc)] = evaluate(lambda images: model(images).unsqueeze(0), x, y, **kw)
    return loss, acc


def test_train_returns_a_record_per_epoch_and_calls_on_epoch(splits):
    seen = []
    result = train(tiny_model(), splits, quick(lr=0.05), on_epoch=seen.append)
    assert [r.epoch for r in result.epochs] == [1, 2, 3] and seen == result.epochs
    r = result.epochs[-1]
    assert r.seconds > 0 and r.images_per_s == pytest.approx(192 / r.seconds)  # 200 images: 6 full batches
    assert 0 <= r.train_acc <= 1 and 0 <= r.val_acc <= 1 and math.isfinite(r.val_loss)
    assert 0 <= result.test_acc <= 1 and result.split == splits.split and result.resumed_from == 0
    assert result.precision == ("bf16 autocast" if native_bf16(torch.device("cpu")) else "fp32")
    assert result.epochs[0].train_loss > result.epochs[-1].train_loss  # the generated classes are learnable


def test_on_epoch_may_stop_the_run(splits):
    class Stop(Exception):
        pass

    def stop_after_first(record):
        raise Stop

    with pytest.raises(Stop):
        train(tiny_model(), splits, quick(), on_epoch=stop_after_first)


RECIPE = dict(schedule="linear", warmup=0.25, label_smoothing=0.1, crop=0.07, ema=0.9, tta=True)


@pytest.mark.parametrize(
    "amp, layout, recipe",
    [
        (False, "contiguous", {}),
        (True, "channels_last", {}),
        (True, "contiguous", {}),
        (True, "contiguous", RECIPE),
        (False, "contiguous", {"optimizer": "adam"}),  # optimizers with state: moments, momentum buffers
        (False, "contiguous", {"optimizer_kwargs": {"momentum": 0.9, "nesterov": True}}),
    ],
)
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(splits, tmp_path, amp, layout, recipe):
    cfg = quick(lr=0.05, epochs=4, amp=amp, memory_format=layout, **recipe)
    whole = tiny_model()
    expected = train(whole, splits, cfg, checkpoint_path=tmp_path / "whole.pt")

    class Killed(Exception):
        pass

    def kill_after_epoch_2(record):
        if record.epoch == 2:
            raise Killed

    path = tmp_path / "run.pt"
    with pytest.raises(Killed):
        train(tiny_model(), splits, cfg, checkpoint_path=path, on_epoch=kill_after_epoch_2)
    torch.manual_seed(123)  # the resumed process starts from an unrelated RNG state and init
    resumed_model = tiny_model(seed=7)
    resumed = train(resumed_model, splits, cfg, checkpoint_path=path)

    assert resumed.resumed_from == 2 and [r.epoch for r in resumed.epochs] == [1, 2, 3, 4]
    for key, value in whole.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key]), key
    ends = load_checkpoint(tmp_path / "whole.pt"), load_checkpoint(path)
    for part in ("model", "trained") if recipe.get("ema") else ("model",):  # the average and the trained weights
        assert all(torch.equal(v, ends[1][part][k]) for k, v in ends[0][part].items()), part
    assert [r.train_loss for r in resumed.epochs] == [r.train_loss for r in expected.epochs]
    assert resumed.test_acc == expected.test_acc and resumed.memory_format == layout


def test_ema_weights_are_evaluated_saved_and_returned_and_differ_from_the_trained_ones(splits, tmp_path):
    cfg = quick(lr=0.05, epochs=2, ema=0.9, amp=False)
    model = tiny_model()
    result = train(model, splits, cfg, checkpoint_path=tmp_path / "c.pt")
    state = load_checkpoint(tmp_path / "c.pt")
    average, trained = state["model"], state["trained"]
    assert all(torch.equal(v, average[k]) for k, v in model.state_dict().items())  # the caller gets the average
    differ = [k for k, v in average.items() if v.is_floating_point() and not torch.equal(v, trained[k])]
    assert "0.weight" in differ and "1.running_mean" in differ  # weights and BatchNorm statistics
    raw = tiny_model()
    raw.load_state_dict(trained)
    kw = dict(mean=splits.mean, std=splits.std)
    loss, acc = score(model, splits.test_x, splits.test_y, **kw)
    assert (result.test_loss, result.test_acc) == pytest.approx((loss, acc), abs=1e-6)  # the average was tested
    assert result.test_loss != pytest.approx(score(raw, splits.test_x, splits.test_y, **kw)[0], abs=1e-6)
    assert result.epochs[-1].val_loss == pytest.approx(score(model, splits.val_x, splits.val_y, **kw)[0], abs=1e-6)
    train(tiny_model(), splits, replace(cfg, ema=0.0), checkpoint_path=tmp_path / "plain.pt")
    assert "trained" not in load_checkpoint(tmp_path / "plain.pt")  # without the average, "model" is what trained


def test_tta_averages_the_logits_of_each_image_and_its_mirror(splits):
    model = tiny_model().eval()
    x, y = splits.test_x, splits.test_y
    with torch.no_grad():
        xs = next(batches(x, y, len(x), mean=splits.mean, std=splits.std))[0]
        logits = (model(xs) + model(xs.flip(3))) / 2
    loss, acc = score(model, x, y, mean=splits.mean, std=splits.std, batch_size=16, tta=True)
    assert loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert round(acc * len(y)) == (logits.argmax(1) == y).sum().item()
    plain = score(model, x, y, mean=splits.mean, std=splits.std)
    assert plain[0] != pytest.approx(loss, rel=1e-5)  # the tiny model is not mirror-symmetric
    result = train(model, splits, quick(epochs=1, tta=True, amp=False))
    assert result.test_loss == pytest.approx(
        score(model, x, y, mean=splits.mean, std=splits.std, tta=True)[0], rel=1e-5
    )


def test_crop_padding_follows_the_image_size(splits):
    def trained(crop: float) -> list[float]:
        return [r.train_loss for r in train(tiny_model(), splits, quick(epochs=1, crop=crop)).epochs]

    default = trained(TrainConfig.crop)  # the paper's 4 pixels on 32×32
    assert trained(0.14) == default  # round(0.14·32) = 4 pixels too
    assert trained(0.05) == trained(0.07) != default  # round(0.05·32) = round(0.07·32) = 2


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "fashion_mnist"])
def test_fast_recipe_trains_on_every_dataset_format(fake_data, dataset):
    d = fake_data(dataset, n_train=300, n_test=40)
    s = load_data(DataConfig(name=dataset, root=str(d.root), val_size=40))
    cfg = replace(train_config("fast"), epochs=2, batch_size=64, threads=1, device="cpu", progress=False)
    result = train(tiny_model(in_channels=s.in_channels, num_classes=s.num_classes), s, cfg)
    assert len(result.epochs) == 2 and 0 <= result.test_acc <= 1 and math.isfinite(result.test_loss)


def test_finished_run_resumes_to_its_result_without_training(splits, tmp_path):
    cfg = quick(epochs=1)
    first = train(tiny_model(), splits, cfg, checkpoint_path=tmp_path / "c.pt")
    again = train(tiny_model(seed=5), splits, cfg, checkpoint_path=tmp_path / "c.pt")
    assert again.resumed_from == 1 and again.test_acc == first.test_acc
    assert again.seconds_per_epoch == first.seconds_per_epoch  # what the run that trained it measured


def test_evaluate_scores_every_image(splits):
    model = tiny_model()
    loss, acc = score(model, splits.test_x, splits.test_y, mean=splits.mean, std=splits.std, batch_size=7)
    assert math.isfinite(loss) and acc * len(splits.test_y) == pytest.approx(round(acc * len(splits.test_y)))


def run_cli(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dse.train", *overrides, f"hydra.run.dir={cwd / 'out'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_cli_trains_and_prints_a_summary(cifar10, tmp_path):
    done = run_cli(
        f"data.root={cifar10.root}",
        "data.val_size=50",
        "train.epochs=1",
        "train.batch_size=50",
        "train.progress=false",
        "train.threads=1",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    for field in ("test accuracy", "model size", "MB", "s/epoch", "Shallow SqueezeNext-06-0.4x"):
        assert field in done.stdout
    assert (tmp_path / "out" / "checkpoint.pt").exists() and (tmp_path / "out" / "result.json").exists()


def test_cli_reports_bad_input_without_a_traceback(cifar10, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    cases = {
        "unreadable": [f"data.root={cifar10.root}", "data.val_size=50", f"train.checkpoint={garbage}"],
        "allowed: sgd, adam": ["train.optimizer=lamb"],
        "CIFAR-10 not found": [f"data.root={tmp_path / 'nothing'}", "data.download=false"],
    }
    for expected, overrides in cases.items():
        done = run_cli(*overrides, cwd=tmp_path)
        assert done.returncode != 0 and expected in done.stderr, done.stderr
        assert "Traceback" not in done.stderr + done.stdout


def test_amp_off_trains_in_fp32(splits):
    result = train(tiny_model(), splits, quick(epochs=1, amp=False))
    assert result.precision == "fp32"


def test_training_draws_nothing_from_torchs_global_rng(splits):
    torch.manual_seed(0)
    model = tiny_model()
    rng = torch.get_rng_state()
    train(model, splits, quick(epochs=1))
    assert torch.equal(torch.get_rng_state(), rng)
    assert any(isinstance(m, nn.Dropout) for m in model.modules())  # the model gets its own modules back


# ---------------------------------------------------------------------------------------------- fused groups

# Four trials of one architecture that differ in everything a group lets them differ in.
GROUP = [
    dict(seed=0, dropout=0.1, lr=0.05),
    dict(seed=1, dropout=0.3, lr=0.02, label_smoothing=0.1, weight_decay=0.0),
    dict(seed=2, dropout=0.5, lr=0.003, optimizer="adam", optimizer_kwargs={"betas": [0.9, 0.99]}),
    dict(seed=3, dropout=0.2, lr=0.1, schedule="cosine", optimizer_kwargs={"momentum": 0.9, "nesterov": True}),
]


def outcomes(members: list[Member], splits, **kw) -> list:
    """Each member's outcome, in the members' order; each is yielded exactly once."""
    by_index = {}
    for i, outcome in train_group(members, splits, **kw):
        assert i not in by_index
        by_index[i] = outcome
    return [by_index[i] for i in range(len(members))]


def results(members: list[Member], splits, **kw) -> list:
    """Each member's TrainResult: all must finish."""
    ends = outcomes(members, splits, **kw)
    assert all(isinstance(end, Finished) for end in ends), ends
    return [end.result for end in ends]


def member(i: int, **kw) -> Member:
    spec = {**GROUP[i], **kw}
    dropout = spec.pop("dropout")
    cfg = quick(amp=False, memory_format="contiguous", **spec)
    return Member(tiny_model(seed=cfg.seed, dropout=dropout), cfg)


def assert_same_training(a: nn.Module, ra, b: nn.Module, rb) -> None:
    """Equal up to floating-point order: a grouped convolution sums in another order than a plain one."""
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        if x.is_floating_point():
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4, msg=key)
        else:
            assert torch.equal(x, y), key
    for r, s in zip(ra.epochs, rb.epochs, strict=True):
        assert r.epoch == s.epoch and r.lr == s.lr
        assert r.train_loss == pytest.approx(s.train_loss, rel=1e-5)
        assert r.val_loss == pytest.approx(s.val_loss, rel=1e-5)
        assert r.train_acc == s.train_acc and r.val_acc == s.val_acc
    assert ra.test_acc == rb.test_acc and ra.test_loss == pytest.approx(rb.test_loss, rel=1e-5)


@pytest.fixture(params=[True, False], ids=["vmapped", "member by member"])
def vmapped(request) -> bool:
    """Both ways a group runs its members: vmapped (CUDA's default) and one after the other (the CPU's)."""
    return request.param


def test_a_fused_group_of_4_ends_as_the_4_trials_trained_alone(splits, vmapped):
    alone = []
    for i in range(4):
        m = member(i)
        alone.append((m.model, train(m.model, splits, m.cfg)))
    group = [member(i) for i in range(4)]
    fused_results = results(group, splits, vmapped=vmapped)
    for (model, result), m, fused in zip(alone, group, fused_results):
        assert [r.trials for r in fused.epochs] == [4, 4, 4]
        assert_same_training(model, result, m.model, fused)
    assert len({tuple(r.train_loss for r in res.epochs) for res in fused_results}) == 4  # they did differ


def test_a_fused_group_with_the_recipe_knobs_ends_as_its_trials_alone(splits, vmapped):
    knobs = [dict(ema=0.9, warmup=0.25, schedule="linear"), dict(ema=0.8, warmup=0.5), dict(ema=0.95)]
    common = dict(crop=0.07, tta=True)
    alone = []
    for i, extra in enumerate(knobs):
        m = member(i, **common, **extra)
        alone.append((m.model, train(m.model, splits, m.cfg)))
    group = [member(i, **common, **extra) for i, extra in enumerate(knobs)]
    for (model, result), m, fused in zip(alone, group, results(group, splits, vmapped=vmapped)):
        assert_same_training(model, result, m.model, fused)  # the models end holding their weight averages


class Pruned(Exception):
    pass


def test_a_member_whose_on_epoch_raises_leaves_and_the_others_finish_as_alone(splits, tmp_path):
    def prune_after_epoch_1(record):
        if record.epoch == 1:
            raise Pruned

    group = [member(i, checkpoint=str(tmp_path / f"{i}.pt")) for i in range(3)]
    group[1].on_epoch = prune_after_epoch_1
    ends = outcomes(group, splits)
    assert isinstance(ends[1], Failed) and isinstance(ends[1].error, Pruned)
    assert load_checkpoint(tmp_path / "1.pt")["epoch"] == 1  # its checkpoint was written before on_epoch
    assert [r.trials for r in ends[0].result.epochs] == [3, 2, 2]
    for i in (0, 2):
        alone = member(i)
        assert_same_training(alone.model, train(alone.model, splits, alone.cfg), group[i].model, ends[i].result)


def test_stopped_and_failed_members_are_yielded_at_once_while_the_others_go_on(splits):
    events = []

    def watch(record):
        events.append(("epoch", record.epoch))

    def stop(record):
        return "pruned at epoch 1"

    def fail(record):
        raise Pruned("taken over")

    group = [member(0), member(1), member(2)]
    group[0].on_epoch, group[1].on_epoch, group[2].on_epoch = watch, stop, fail
    ends = {}
    for i, outcome in train_group(group, splits):
        events.append(("ended", i))
        ends[i] = outcome
        if i != 0:
            assert type(group[i].model[5]) is nn.Dropout  # its model is given back as it leaves
    assert events == [("epoch", 1), ("ended", 1), ("ended", 2), ("epoch", 2), ("epoch", 3), ("ended", 0)]
    assert ends[1] == Stopped(epoch=1, reason="pruned at epoch 1")
    assert isinstance(ends[2], Failed) and str(ends[2].error) == "taken over"
    assert isinstance(ends[0], Finished) and [r.trials for r in ends[0].result.epochs] == [3, 1, 1]


def test_train_raises_training_stopped_with_the_reason_on_epoch_gave(splits):
    with pytest.raises(TrainingStopped, match="enough"):
        train(tiny_model(), splits, quick(), on_epoch=lambda record: "enough")


def test_a_member_whose_checkpoint_cannot_be_written_fails_and_the_others_finish(splits, tmp_path):
    def full_disk(path, state):
        raise OSError(28, "No space left on device")

    group = [member(i, checkpoint=str(tmp_path / f"{i}.pt")) for i in range(2)]
    group[1].writer = full_disk
    ends = outcomes(group, splits)
    assert isinstance(ends[1], Failed) and isinstance(ends[1].error, OSError)
    assert isinstance(ends[0], Finished) and load_checkpoint(tmp_path / "0.pt")["epoch"] == 3
    assert not (tmp_path / "1.pt").exists()


def test_a_caller_that_stops_iterating_gets_every_model_back(splits):
    group = [member(0), member(1)]
    group[1].on_epoch = lambda record: "stop"
    weights = [m.model[0].weight for m in group]
    for i, _ in train_group(group, splits):
        assert i == 1
        break  # member 0 is half-way through its epochs
    for m, weight in zip(group, weights):
        assert m.model[0].weight is weight and type(m.model[5]) is nn.Dropout
    assert weights[0].untyped_storage().data_ptr() != weights[1].untyped_storage().data_ptr()  # not one stack


def test_a_diverging_member_leaves_with_training_diverged(splits):
    group = [member(0), member(1, lr=1e30, label_smoothing=0.0)]
    ends = outcomes(group, splits)
    assert isinstance(ends[1], Failed) and isinstance(ends[1].error, TrainingDiverged)
    assert "lower train.lr" in str(ends[1].error)
    alone = member(0)
    assert_same_training(alone.model, train(alone.model, splits, alone.cfg), group[0].model, ends[0].result)


def test_members_resume_from_different_epochs_in_one_group(splits, tmp_path):
    class Killed(Exception):
        pass

    def kill_after_epoch_2(record):
        if record.epoch == 2:
            raise Killed

    first = member(0, checkpoint=str(tmp_path / "0.pt"))
    first.on_epoch = kill_after_epoch_2
    with pytest.raises(Killed):
        train(first.model, splits, first.cfg, on_epoch=first.on_epoch)
    group = [member(0, checkpoint=str(tmp_path / "0.pt")), member(1)]
    fused = results(group, splits)
    assert fused[0].resumed_from == 2 and [r.trials for r in fused[0].epochs] == [1, 1, 2]
    for i in (0, 1):
        alone = member(i)
        assert_same_training(alone.model, train(alone.model, splits, alone.cfg), group[i].model, fused[i])


def test_a_group_that_cannot_fuse_is_refused_when_train_group_is_called(splits):
    with pytest.raises(ValueError, match="member 1 cannot be fused with member 0: its train batch_size differ"):
        train_group([member(0), member(1, batch_size=64)], splits)


# ---------------------------------------------------------------------------------------------- CUDA graphs

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_a_graphed_group_trains_each_member_as_alone(splits):
    knobs = dict(device="cuda", amp=False, memory_format="channels_last", ema=0.9, warmup=0.2, tta=True)
    alone = []
    for i in range(3):
        m = member(i, **knobs)
        alone.append((m.model, train(m.model, splits, m.cfg)))
    group = [member(i, **knobs) for i in range(3)]
    for (model, result), m, fused in zip(alone, group, results(group, splits)):
        assert fused.cuda_graph and result.cuda_graph
        for (key, x), y in zip(model.state_dict().items(), m.model.state_dict().values()):
            torch.testing.assert_close(x.float(), y.float(), rtol=1e-2, atol=1e-2, msg=key)  # TF32 convolutions
        assert fused.test_acc == pytest.approx(result.test_acc, abs=0.05)
