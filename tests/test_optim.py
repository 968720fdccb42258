"""dse.optim: optimizers by name (each lowers the loss of a fixed batch in one training step), the learning-rate
schedule with warm-up and batch-size scaling, and the weight average."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
from trainers import CONF, tiny_model, train_config

from dse.config import TrainConfig
from dse.optim import OPTIMIZERS, average_into, ema_decay, learning_rate
from dse.step import step_mode

RECIPES = {"fast"}  # conf/train files that are a whole recipe rather than one optimizer's settings


def test_every_optimizer_has_a_config_file():
    assert {p.stem for p in (CONF / "train").glob("*.yaml")} == set(OPTIMIZERS) | RECIPES


@pytest.mark.filterwarnings("ignore:This overload of add:UserWarning")  # adabound 0.0.5 on current torch
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_lowers_the_loss_of_a_fixed_batch_in_one_step(name):
    cfg = train_config(name)
    assert cfg.optimizer == name
    cfg = replace(cfg, device="cpu", amp=False, label_smoothing=0.0)  # the plain cross-entropy, in fp32
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    mode = step_mode([cfg], torch.device("cpu"))
    step = mode.step([mode.learner(model, cfg)], steps=1)  # the trainer's step, as its loop makes and runs it
    step.begin_epoch([0], [[cfg.lr]])
    step(x[None], y[None])  # one member's batch
    (loss_sum,), _ = step.totals()
    with torch.no_grad():
        after = nn.CrossEntropyLoss()(model(x), y)
    assert after < loss_sum / len(y)


def test_unknown_optimizer_is_refused_naming_the_allowed_ones():
    with pytest.raises(ValueError) as e:
        TrainConfig(optimizer="lamb")
    assert "'lamb'" in str(e.value) and all(name in str(e.value) for name in OPTIMIZERS)


def test_optimizer_options_it_does_not_take_are_refused():
    with pytest.raises(ValueError, match="adam.*momentum.*it takes:.*betas"):
        TrainConfig(optimizer="adam", optimizer_kwargs={"momentum": 0.9})
    with pytest.raises(ValueError, match="weight_decay=0"):
        TrainConfig(optimizer="rprop", weight_decay=5e-4)
    with pytest.raises(ValueError, match="schedule='exponential'.*step, cosine, linear"):
        TrainConfig(schedule="exponential")


def test_step_schedule_decays_at_the_papers_epochs_and_cosine_ends_near_zero():
    cfg = TrainConfig(lr=0.1, epochs=200)
    lrs = [learning_rate(cfg, e) for e in range(200)]
    changes = [e for e in range(1, 200) if lrs[e] != lrs[e - 1]]
    assert changes == [60, 120, 160] and lrs[0] == 0.1 and math.isclose(lrs[-1], 0.1 * 0.2**3)
    cos = replace(cfg, schedule="cosine")
    assert learning_rate(cos, 0) == 0.1 and learning_rate(cos, 199) < 1e-4


def test_warmup_rises_linearly_from_zero_then_linear_and_cosine_end_at_zero_per_step():
    steps = 50  # per epoch; the schedule takes fractional epochs
    for schedule in ("linear", "cosine"):
        cfg = TrainConfig(lr=0.2, epochs=10, schedule=schedule, warmup=0.2)
        lrs = [learning_rate(cfg, s / steps) for s in range(10 * steps)]
        peak = lrs.index(max(lrs))
        assert lrs[0] == 0 and peak == 2 * steps and max(lrs) == pytest.approx(0.2)
        assert lrs[steps] == pytest.approx(0.1)  # half-way through the warm-up
        assert all(a < b for a, b in zip(lrs[:peak], lrs[1 : peak + 1]))  # rises every step
        assert all(a > b for a, b in zip(lrs[peak:], lrs[peak + 1 :]))  # then falls every step
        assert 0 < lrs[-1] < 0.2 * 0.01 and learning_rate(cfg, 10) == pytest.approx(0, abs=1e-12)
    half = TrainConfig(lr=0.2, epochs=10, schedule="linear", warmup=0.2)
    assert learning_rate(half, 6) == pytest.approx(0.1)  # half-way down from the end of the warm-up


def test_lr_scales_linearly_with_the_batch_size_when_asked():
    assert learning_rate(TrainConfig(lr=0.1, batch_size=512), 0) == 0.1  # lr_batch_size null: lr as given
    cfg = TrainConfig(lr=0.1, batch_size=512, lr_batch_size=128, schedule="linear", epochs=4)
    assert learning_rate(cfg, 0) == pytest.approx(0.4) and learning_rate(cfg, 2) == pytest.approx(0.2)


def test_ema_decay_ramps_up_to_the_configured_value():
    cfg = TrainConfig(ema=0.99)
    decays = [ema_decay(cfg, step) for step in range(2000)]
    assert decays[0] == pytest.approx(0.1) and decays[-1] == 0.99
    assert all(a <= b for a, b in zip(decays, decays[1:]))


def test_the_average_lerps_every_float_tensor_and_copies_integer_buffers():
    model, average = tiny_model(seed=0), tiny_model(seed=1)
    model.train()(torch.randn(4, 3, 8, 8))  # BatchNorm statistics and its batch count move
    before = {k: v.clone() for k, v in average.state_dict().items()}
    pairs = list(zip(average.state_dict().values(), model.state_dict().values()))
    average_into(pairs, [1 - 0.75] * len(pairs))  # decay 0.75, as the step averages
    now, current = average.state_dict(), model.state_dict()
    for key, value in now.items():
        if value.is_floating_point():
            assert torch.allclose(value, 0.75 * before[key] + 0.25 * current[key]), key
        else:
            assert torch.equal(value, current[key]), key
    assert any(not v.is_floating_point() for v in now.values())  # num_batches_tracked was among them
