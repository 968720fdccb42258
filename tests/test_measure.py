"""measure.profile: counts and sizes checked against hand-computed values and the file torch writes."""

import pytest
import torch
import torch.nn as nn

from dse.measure import count_macs, int8_bytes, measure_latency, profile
from dse.models import create_model


def tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def test_macs_match_hand_count():
    macs, flops = count_macs(tiny(), (3, 32, 32))
    assert macs == 8 * 3 * 9 * 32 * 32 + 8 * 10
    assert flops == 2 * macs


def test_int8_estimate_hand_count():
    # weight 40 x 1 byte + 4 fp32 scales, bias 4 x fp32
    assert int8_bytes(nn.Linear(10, 4)) == 40 + 4 * 4 + 4 * 4


def test_profile_sizes_match_saved_file(tmp_path):
    model = create_model("Shallow SqueezeNext-06-0.4x")
    p = profile(model, (3, 32, 32), repeats=3, warmup=1)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    assert p.size_bytes == path.stat().st_size
    assert p.size_mb == p.size_bytes / 1e6
    assert p.params == sum(t.numel() for t in model.parameters())
    assert 0 < p.int8_bytes < p.size_bytes
    assert p.macs > 0 and p.flops == 2 * p.macs


def test_latency_is_recorded_with_threads_and_restores_state():
    model = tiny().train()
    before = torch.get_num_threads()
    p = profile(model, (3, 32, 32), threads=1, repeats=5, warmup=2)
    assert p.latency_ms > 0 and p.latency_iqr_ms >= 0
    assert (p.threads, p.latency_runs) == (1, 5)
    assert torch.get_num_threads() == before
    assert model.training


def test_profile_without_latency():
    p = profile(tiny(), (3, 28, 28), latency=False)
    assert p.latency_ms is None and p.latency_runs == 0
    assert p.input_shape == (3, 28, 28)


def test_bad_latency_arguments_are_refused():
    with pytest.raises(ValueError, match=r"repeats=0 must be >= 1"):
        measure_latency(tiny(), (3, 32, 32), repeats=0)
