"""dse.fused: what may fuse (group_key), dropout masks from seeds, stacked weights as views, one forward pass
(vmapped or member by member) for several models."""

from dataclasses import replace

import pytest
import torch
import torch.nn as nn

from dse.config import TrainConfig
from dse.fused import (
    SeededDropout,
    check_group,
    dropout_key,
    fused_forward,
    group_key,
    seed_dropouts,
    unfuse,
    unseed,
    vmaps_on,
)


def test_seeded_dropout_drops_a_fraction_p_with_masks_fixed_by_key_and_step():
    step = torch.zeros(1, dtype=torch.int64)
    drop = SeededDropout(0.3, site=0, step=step).train()
    x = torch.ones(64, 1000)
    first = drop(x)
    assert (first == 0).float().mean().item() == pytest.approx(0.3, abs=0.01)
    assert torch.allclose(first[first != 0], torch.tensor(1 / 0.7))
    assert torch.equal(drop(x), first)  # same key, same step: same mask
    step += 1
    second = drop(x)
    drop.key.fill_(dropout_key(0, 1))
    third = drop(x)
    for other in (second, third):  # another step or key: an unrelated mask
        assert ((first == 0) & (other == 0)).float().mean().item() == pytest.approx(0.09, abs=0.01)
    assert torch.equal(drop.eval()(x), x)


def models(n: int) -> list[nn.Module]:
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(
            nn.Sequential(
                nn.Conv2d(3, 4, 3),
                nn.BatchNorm2d(4),
                nn.Flatten(),
                nn.Dropout(0.1 * (seed + 1)),
                nn.Linear(4 * 6 * 6, 5),
            )
        )
    return out


@pytest.mark.parametrize("vmapped", [True, False], ids=["vmapped", "member by member"])
def test_a_fused_forward_computes_each_models_own_output_and_batchnorm_statistics(vmapped):
    fused, alone = models(3), models(3)
    step = torch.zeros(1, dtype=torch.int64)
    for group in (fused, alone):
        for i, m in enumerate(group):
            for drop in (getattr(parent, attr) for parent, attr, _ in seed_dropouts(m, step)):
                drop.key.fill_(dropout_key(i, 0))
    forward, stacks = fused_forward(fused, vmapped=vmapped)
    x = torch.randn(3, 16, 3, 8, 8)
    logits = forward(x, False)
    logits.sum().backward()
    for i, m in enumerate(alone):
        out = m(x[i])
        out.sum().backward()
        torch.testing.assert_close(logits[i], out)
        for (name, mine), theirs in zip(fused[i].state_dict().items(), m.state_dict().values()):
            torch.testing.assert_close(mine, theirs, msg=name)  # running stats updated per member
        for p, q in zip(fused[i].parameters(), m.parameters()):
            torch.testing.assert_close(p.grad, q.grad)  # each member's .grad is its slice of the stacked gradient
    assert all(t.shape[0] == 3 for t in stacks.values()) and stacks["0.weight"].grad is not None
    shared = forward(x[0, :4], True)  # one batch for every member (evaluation)
    assert shared.shape == (3, 4, 5)


def test_unfuse_and_unseed_give_a_member_back_its_own_memory_and_modules():
    group = models(2)
    swapped = [seed_dropouts(m, torch.zeros(1, dtype=torch.int64)) for m in group]
    fused_forward(group)
    weight = group[0][0].weight
    assert weight.untyped_storage().data_ptr() == group[1][0].weight.untyped_storage().data_ptr()  # one stack
    unfuse(group[0])
    unseed(swapped[0])
    assert weight is group[0][0].weight and weight.grad is None  # the same Parameter, its optimizer still valid
    assert weight.untyped_storage().data_ptr() != group[1][0].weight.untyped_storage().data_ptr()
    assert type(group[0][3]) is nn.Dropout and group[0][3].p == pytest.approx(0.1)


def test_fusing_keeps_each_members_state_dict_and_buffers_registered_as_they_were():
    group = models(2)
    keys = [list(m.state_dict()) for m in group]
    fused_forward(group)
    assert [list(m.state_dict()) for m in group] == keys
    bn = group[1][1]
    assert bn.running_mean.data_ptr() != group[0][1].running_mean.data_ptr()  # each member its slice of one stack
    assert bn.running_mean.untyped_storage().data_ptr() == group[0][1].running_mean.untyped_storage().data_ptr()


def test_groups_are_vmapped_by_default_on_cuda_only():
    assert vmaps_on(torch.device("cuda")) and not vmaps_on(torch.device("cpu"))


def tiny(width: int = 8, dropout: float = 0.3) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(width, 10),
    )


def test_group_key_fuses_what_may_differ_and_refuses_what_may_not():
    base = TrainConfig(device="cpu")
    differing = [  # what trials of one group may differ in
        replace(base, seed=1, lr=0.02, label_smoothing=0.1, weight_decay=0.0),
        replace(base, seed=2, lr=0.003, optimizer="adam", optimizer_kwargs={"betas": [0.9, 0.99]}),
        replace(base, seed=3, lr=0.1, schedule="cosine", optimizer_kwargs={"momentum": 0.9, "nesterov": True}),
    ]
    key = group_key(tiny(), base)
    assert all(group_key(tiny(dropout=0.1 * i), cfg) == key for i, cfg in enumerate(differing))
    assert group_key(tiny(width=16), base) != key
    assert group_key(tiny(), replace(base, batch_size=64)) != key
    assert group_key(tiny(), replace(base, optimizer="adagrad", optimizer_kwargs={})) != key
    check_group([tiny(), tiny()], [base, differing[1]])
    with pytest.raises(ValueError, match="member 1 cannot be fused with member 0: its train batch_size differ"):
        check_group([tiny(), tiny()], [base, replace(base, batch_size=64)])
    with pytest.raises(ValueError, match="model structure, weight average or optimizer"):
        check_group([tiny(), tiny(width=16)], [base, base])
    with pytest.raises(ValueError, match="the same model object appears twice"):
        model = tiny()
        check_group([model, model], [base, base])
