"""dse.autotune: the layout `auto` stands for (a rule, a study's choice, a checkpoint's; never a timing), the layout
probe (advice) and the group-size probe."""

import pytest
import torch
from trainers import (
    quick,
    splits_fixture,  # noqa: F401  (the `splits` fixture)
    tiny_model,
)

from dse.autotune import (
    AUTO_LAYOUT,
    MEMORY_FORMATS,
    auto_layout,
    best_group_size,
    choose_memory_format,
    faster_layout,
    pick_group_size,
    pick_memory_format,
)
from dse.checkpoint import load_checkpoint, save_checkpoint
from dse.config import TrainConfig
from dse.train import train


def test_a_checkpoint_s_layout_wins_on_resume(splits, tmp_path):
    path = tmp_path / "c.pt"
    first = train(tiny_model(), splits, quick(epochs=1), checkpoint_path=path)
    assert first.memory_format == auto_layout(torch.device("cpu")) == "contiguous"
    state = load_checkpoint(path)
    assert state["memory_format"] == first.memory_format
    state["epoch"], state["records"] = 0, []  # as if killed before its first epoch ended
    state["memory_format"] = "channels_last"  # as an older dse's timing may have chosen
    save_checkpoint(path, state)
    again = train(tiny_model(), splits, quick(epochs=1), checkpoint_path=path)
    assert again.resumed_from == 0 and again.memory_format == "channels_last"


def test_auto_is_a_rule_a_study_s_choice_or_a_checkpoint_s_never_a_timing():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert AUTO_LAYOUT == {"cuda": "channels_last", "cpu": "contiguous"}
    assert choose_memory_format(quick(), cpu) == "contiguous" and choose_memory_format(quick(), cuda) == "channels_last"
    assert choose_memory_format(quick(), cpu, auto="channels_last") == "channels_last"  # the study's choice
    for layout in MEMORY_FORMATS:
        assert choose_memory_format(quick(), cpu, saved=layout, auto="contiguous") == layout
        assert choose_memory_format(quick(memory_format=layout), cpu, auto="contiguous") == layout
    assert choose_memory_format(quick(memory_format="contiguous"), cpu, saved="nhwc") == "contiguous"


def test_train_group_refuses_an_unknown_layout_naming_the_allowed_ones(splits):
    from dse.train import Member, train_group

    with pytest.raises(ValueError, match="layout='nhwc' is unknown; allowed: channels_last, contiguous"):
        train_group([Member(tiny_model(), quick())], splits, layout="nhwc")


def test_faster_layout_is_what_the_probe_says_on_the_first_batch(splits):
    seen = []

    def probe(model, x, y, autocast):
        seen.append((x.shape, y.shape, model.training))
        return "channels_last"

    assert faster_layout(tiny_model(), splits, quick(), probe=probe) == "channels_last"
    assert seen == [((quick().batch_size, *splits.train_x.shape[1:]), (quick().batch_size,), True)]


def test_layout_probe_leaves_the_model_and_the_rng_as_they_were(splits):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    torch.manual_seed(3)
    rng = torch.get_rng_state()
    layout = pick_memory_format(model, x, y, torch.autocast("cpu", enabled=False))
    assert layout in MEMORY_FORMATS and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # BN running stats included
    assert all(p.grad is None for p in model.parameters())


def test_unknown_memory_format_is_refused_naming_the_allowed_ones():
    with pytest.raises(ValueError, match="memory_format='nhwc' is unknown; allowed: auto, channels_last, contiguous"):
        TrainConfig(memory_format="nhwc")


def test_pick_group_size_times_each_size_and_leaves_the_model_alone(splits):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    size, rates = pick_group_size(model, splits, quick(), sizes=(1, 2), steps=2)
    assert set(rates) <= {1, 2} and 1 in rates and all(r > 0 for r in rates.values())
    assert size == (2 if rates.get(2, 0) >= 1.1 * rates[1] else 1)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_pick_group_size_steps_groups_vmapped_when_asked(splits):
    size, rates = pick_group_size(tiny_model(), splits, quick(), sizes=(1, 2), min_gain=-1.0, steps=1, vmapped=True)
    assert size == 2 and set(rates) == {1, 2} and all(r > 0 for r in rates.values())


def test_best_group_size_is_the_largest_that_still_gains_enough_over_the_one_before():
    assert best_group_size({1: 100.0, 2: 150.0, 4: 160.0, 8: 400.0}) == 2  # 4 adds under 10 %: 8 is not looked at
    assert best_group_size({1: 100.0, 2: 150.0, 4: 170.0}, min_gain=0.1) == 4
    assert best_group_size({1: 100.0, 2: 105.0}) == 1 and best_group_size({4: 1.0}) == 4
    assert best_group_size({2: 90.0, 1: 100.0}, min_gain=-0.5) == 2  # sorted by size


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_pick_group_size_captures_and_times_groups_on_cuda(splits):
    size, rates = pick_group_size(tiny_model(), splits, quick(device="cuda"), sizes=(1, 2), min_gain=-1.0, steps=3)
    assert size == 2 and set(rates) == {1, 2} and all(r > 0 for r in rates.values())
