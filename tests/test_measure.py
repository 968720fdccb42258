"""measure.profile: counts and sizes checked against hand-computed values and the file torch writes;
measure_latencies: interleaved rounds, the noise check, the load recorded."""

import pytest
import torch
import torch.nn as nn

from dse.measure import Latency, count_macs, int8_bytes, measure_calls, measure_latencies, measure_latency, profile
from dse.models import create_model


def tiny() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


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


class Sleeper(nn.Module):
    """Takes `slow` ms per call in the first `noisy` rounds' odd rounds, else `fast` ms (6 calls a round:
    one untimed, then 5 timed), on a fake clock (`clock[0]`, seconds) so that machine load cannot change it."""

    def __init__(self, clock: list[float], fast: float, slow: float = 0.0, noisy: int = 0) -> None:
        super().__init__()
        self.clock, self.fast, self.slow, self.noisy, self.calls = clock, fast, slow, noisy, 0

    def forward(self, x):
        round_ = self.calls // 6
        self.calls += 1
        self.clock[0] += (self.slow if round_ < self.noisy and round_ % 2 else self.fast) / 1e3
        return x


def test_rounds_interleave_and_a_wide_spread_gets_more_rounds():
    clock = [0.0]
    models = {
        "steady": (Sleeper(clock, 2.0), (1, 4, 4)),
        "noisy": (Sleeper(clock, 2.0, slow=12.0, noisy=10), (1, 4, 4)),
    }
    out = measure_latencies(
        models,
        warmup=0,
        runs=5,
        window=5,
        max_rounds=30,
        max_spread=0.5,
        clock=lambda: clock[0],
        cpu_clock=lambda: clock[0],
    )
    steady, noisy = out["steady"], out["noisy"]
    assert isinstance(steady, Latency) and steady.rounds == steady.window == 5
    assert noisy.rounds >= 14  # the slow rounds 1, 3, ..., 9 left the window before it was steady
    assert 1.9 < noisy.ms < 4 and 1.9 < steady.ms < 4 and noisy.spread <= 0.5
    assert models["steady"][0].calls == 5 * 6 and models["noisy"][0].calls == 6 * noisy.rounds
    assert steady.cpus >= 1 and (steady.other_cores is None or steady.other_cores >= 0)
    assert steady.under_load == (steady.other_cores is not None and steady.other_cores > 0.25 * steady.cpus)


def test_a_larger_model_measures_slower_in_one_sitting():
    small = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    large = nn.Sequential(nn.Conv2d(3, 128, 3, padding=1), nn.ReLU(), nn.Conv2d(128, 128, 3, padding=1))
    out = measure_latencies({"small": (small, (3, 32, 32)), "large": (large, (3, 32, 32))}, runs=3, window=3)
    assert out["large"].ms > 3 * out["small"].ms
    assert out["small"].to_dict()["spread"] == out["small"].iqr_ms / out["small"].ms


def test_bad_latency_sitting_arguments_are_refused():
    with pytest.raises(ValueError, match=r"max_rounds=2 >= window"):
        measure_latencies({"m": (tiny(), (3, 8, 8))}, window=3, max_rounds=2)


def test_a_run_that_lost_the_core_is_timed_on_the_thread_s_cpu_time():
    wall, cpu = [0.0], [0.0]

    def call():  # 1 ms of work, 3 ms on the wall clock: another process held the core
        cpu[0] += 1e-3
        wall[0] += 3e-3

    out = measure_calls(
        {"m": call}, warmup=0, runs=2, window=2, max_rounds=2, clock=lambda: wall[0], cpu_clock=lambda: cpu[0]
    )["m"]
    assert out.clock == "thread cpu time" and out.ms == pytest.approx(1.0) and out.wall_ms == pytest.approx(3.0)
    calm = measure_calls(
        {"m": call}, warmup=0, runs=2, window=2, max_rounds=2, clock=lambda: cpu[0], cpu_clock=lambda: cpu[0]
    )["m"]
    assert calm.clock == "wall" and calm.ms == pytest.approx(1.0)
