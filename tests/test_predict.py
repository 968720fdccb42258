"""The latency predictor: graph features that count what the graph computes (MACs as PyTorch counts them, nodes,
elements per activation), a non-negative linear fit that recovers a latency made of per-op costs and says its
held-out error, and refusal of too few measured architectures."""

from __future__ import annotations

import pandas as pd
import pytest

from dse.identity import architecture
from dse.latency import build
from dse.measure import count_macs
from dse.models import ModelConfig
from dse.predict import FEATURES, fit, held_out, spec_features, within


def spec(width=0.25, activation="elu", blocks=(1, 1, 1, 1)) -> dict:
    config = ModelConfig(name="shallow_squeezenext", width=width, activation=activation, blocks=list(blocks))
    return architecture(config, (1, 16, 16), 4)[1]


def test_features_count_the_graph_s_work_as_pytorch_does():
    s = spec()
    f = spec_features(s)
    model, shape = build(s)
    assert f["macs"] == pytest.approx(count_macs(model, shape)[0], rel=1e-6)
    assert f["params"] == sum(p.numel() for p in model.parameters())
    assert f["count_conv"] == sum(isinstance(m, __import__("torch").nn.Conv2d) for m in model.modules())
    assert f["elems_elu"] > 0 and f["elems_relu"] == 0 and f["input_elems"] == 256
    assert f["count_elu"] == sum(isinstance(m, __import__("torch").nn.ELU) for m in model.modules()) > 0
    relu = spec_features(spec(activation="relu"))
    assert relu["elems_relu"] == f["elems_elu"] and relu["macs"] == f["macs"]
    deeper = spec_features(spec(blocks=(1, 2, 2, 1)))
    assert deeper["count_conv"] > f["count_conv"] and deeper["macs"] > f["macs"]


def test_a_latency_made_of_per_op_costs_is_recovered_and_predicted_within_10_percent():
    specs = [
        spec(w, a, b) for w in (0.125, 0.2, 0.3, 0.5) for a in ("elu", "relu") for b in ((1, 1, 1, 1), (1, 2, 2, 1))
    ]
    features = pd.DataFrame({str(i): spec_features(s) for i, s in enumerate(specs)}).T
    # a made-up machine: 2 ns per MAC, 5 us per node (a ReLU is fused into its Conv), ELU 10x ReLU per element,
    # 50 us per call
    cost = 2e-6 * features["macs"] + 5e-3 * (features["count_conv"] + features["count_elu"] + features["count_bn"])
    cost += 1e-5 * features["elems_elu"] + 1e-6 * features["elems_relu"] + 0.05
    fitted = fit(features.iloc[:12], cost.iloc[:12], "latency_onnx_ms")
    assert (fitted.model.coef_ >= 0).all() and fitted.features == FEATURES
    assert within(fitted.held_out) == 1.0 and "within +-10 %: 100 %" in fitted.summary()
    assert within(held_out(fitted, features, cost.iloc[12:])) == 1.0


def test_a_naive_single_feature_predictor_cannot_recover_it():
    specs = [spec(w, a) for w in (0.125, 0.2, 0.3, 0.5, 0.8) for a in ("elu", "relu")]
    features = pd.DataFrame({str(i): spec_features(s) for i, s in enumerate(specs)}).T
    cost = 1e-4 * features["elems_elu"] + 1e-6 * features["macs"] + 0.05
    naive = fit(features, cost, "latency_onnx_ms", columns=("macs",))
    assert within(naive.held_out) < 1.0


def test_fewer_than_three_measured_architectures_are_refused():
    features = pd.DataFrame({"a": spec_features(spec()), "b": spec_features(spec(0.5))}).T
    with pytest.raises(ValueError, match="latency_int8_ms: 2 measured architecture"):
        fit(features, pd.Series({"a": 1.0, "b": 2.0}), "latency_int8_ms")
