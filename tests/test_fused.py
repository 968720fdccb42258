"""dse.fused: dropout masks from seeds, stacked weights as views, one forward pass (vmapped or member by member) for
several models."""

import pytest
import torch
import torch.nn as nn

from dse.fused import SeededDropout, dropout_key, fused_forward, seed_dropouts, unfuse, unseed


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
        out.append(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Dropout(0.1 * (seed + 1)),
                                 nn.Linear(4 * 6 * 6, 5)))  # fmt: skip
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
