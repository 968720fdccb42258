"""dse.step: the device and precision a run trains in, the mode decided once per run (eager or CUDA graph, vmapped
or member by member), and the group's step behind one interface: per-step learning rates, graphs that train as
eager steps do, a capture that fails falling back to eager steps."""

import logging
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
from trainers import (
    quick,
    splits_fixture,  # noqa: F401  (the `splits` fixture)
    tiny_model,
    train_config,
)

from dse.optim import NOT_CAPTURABLE, OPTIMIZERS
from dse.step import (
    Step,
    mixed_precision,
    native_bf16,
    resolve_device,
    step_mode,
    time_steps,
)
from dse.train import train

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_devices_are_resolved_or_refused_naming_the_allowed_ones():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device='gpu' is not a device; allowed: auto, cpu, cuda, cuda:N"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available here; use device=auto or cpu"):
            resolve_device("cuda")


def test_amp_runs_bf16_only_where_the_device_has_bf16_units():
    cpu = torch.device("cpu")

    def dtype_under(autocast: torch.autocast) -> torch.dtype:
        with autocast:
            return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype

    assert dtype_under(mixed_precision(quick(amp=False), cpu)) == torch.float32
    assert dtype_under(mixed_precision(quick(amp=True), cpu)) == (torch.bfloat16 if native_bf16(cpu) else torch.float32)
    assert step_mode([quick(amp=False)], cpu).precision == "fp32"


def test_the_mode_is_decided_once_from_the_device_and_the_configs():
    cpu = torch.device("cpu")
    mode = step_mode([quick(cuda_graph=True)], cpu)
    assert not mode.graphed and not mode.vmapped  # CUDA graphs and vmap are CUDA's; the CPU steps member by member
    assert step_mode([quick()], cpu, vmapped=True).vmapped
    two = [mode.learner(tiny_model(seed=i), quick()) for i in range(2)]
    assert type(mode.step(two, steps=4)) is Step


def test_eager_steps_set_each_steps_learning_rate(splits):
    cfg = quick(amp=False)
    mode = step_mode([cfg], torch.device("cpu"))
    learners = [mode.learner(tiny_model(seed=i), cfg) for i in range(2)]
    step = mode.step(learners, steps=3)
    lrs = [[0.1, 0.2, 0.3], [0.01, 0.02, 0.03]]
    step.begin_epoch([0, 0], lrs)
    x, y = torch.randn(2, 8, 3, 32, 32), torch.randint(0, 10, (2, 8))
    for i in range(3):
        step(x, y)
        assert [learner.optimizer.param_groups[0]["lr"] for learner in learners] == [lrs[0][i], lrs[1][i]]
    losses, hits = step.totals()
    assert all(loss > 0 for loss in losses) and all(0 <= hit <= 3 * 8 for hit in hits)
    assert time_steps(mode, learners, x, y, 2) > 0


@cuda
@pytest.mark.filterwarnings("ignore:This overload of add:UserWarning")
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_graphed_steps_train_as_eager_ones_for_every_optimizer(splits, name, caplog):
    base = replace(
        train_config(name),
        epochs=3,
        batch_size=32,
        eval_batch_size=64,
        progress=False,
        device="cuda",
        amp=False,
        memory_format="contiguous",
        schedule="cosine",
        warmup=0.2,
    )
    # the lr changes every step after the capture
    eager_model, graph_model = tiny_model(), tiny_model()
    eager = train(eager_model, splits, replace(base, cuda_graph=False))
    graphed = train(graph_model, splits, base)
    assert graphed.cuda_graph == (name not in NOT_CAPTURABLE) and not eager.cuda_graph
    if name in NOT_CAPTURABLE:
        assert "no CUDA graph" in caplog.text
    for (key, x), y in zip(eager_model.state_dict().items(), graph_model.state_dict().values()):
        torch.testing.assert_close(x.float(), y.float(), rtol=1e-3, atol=1e-3, msg=key)
    assert [r.lr for r in graphed.epochs] == [r.lr for r in eager.epochs]


class HostSync(nn.Module):
    """Reads a value on the host in its forward pass, which a CUDA graph cannot record."""

    def forward(self, x):
        x.sum().item()
        return x


@cuda
def test_a_step_that_cannot_be_captured_trains_eagerly_as_it_would_without_a_graph(splits, caplog):
    def model():
        net = tiny_model()
        net.insert(3, HostSync())
        return net

    cfg = quick(device="cuda", amp=False, memory_format="contiguous", epochs=2, schedule="cosine", warmup=0.2)
    eager_model, graph_model = model(), model()
    eager = train(eager_model, splits, replace(cfg, cuda_graph=False))
    with caplog.at_level(logging.WARNING):
        fallen = train(graph_model, splits, cfg)
    assert "cannot be captured in a CUDA graph" in caplog.text and not fallen.cuda_graph
    assert step_mode([cfg], torch.device("cuda")).graphed  # the mode asked for a graph; the step fell back
    for (key, x), y in zip(eager_model.state_dict().items(), graph_model.state_dict().values()):
        torch.testing.assert_close(x.float(), y.float(), rtol=1e-3, atol=1e-3, msg=key)
    assert [r.lr for r in fallen.epochs] == [r.lr for r in eager.epochs]
