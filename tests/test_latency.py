"""Latency per architecture: the key ignores what does not change the inference graph, a study measures each
architecture once and stores it, and a measurement waits for training workers' epoch boundaries."""

from __future__ import annotations

import threading
import time

import optuna
import pytest

from dse.latency import architecture, build, ensure, figures, pause_training, training_turns
from dse.models import ModelConfig

TINY = {"runs": 2, "window": 2, "max_rounds": 3, "warmup": 0}


def key(shape=(1, 28, 28), classes=10, **knobs) -> str:
    return architecture(ModelConfig(name="shallow_squeezenext", **knobs), shape, classes)[0]


def test_the_key_is_the_inference_graph_not_the_recipe():
    assert key(width=0.2, dropout=0.1) == key(width=0.2, dropout=0.5) == key(width=0.2)
    others = {
        key(width=0.3),
        key(width=0.2, activation="relu"),
        key(width=0.2, inplace=False),
        key(width=0.2, blocks=[1, 2, 2, 1]),
        key((3, 32, 32), width=0.2),
        key(classes=100, width=0.2),
    }
    assert len(others) == 6 and key(width=0.2) not in others
    assert key(width=1.0) == key()  # defaults resolved


def test_build_gives_the_architecture_back():
    k, spec = architecture(ModelConfig(name="shallow_squeezenext", width=0.25), (1, 28, 28), 10)
    model, shape = build(spec)
    assert shape == (1, 28, 28) and architecture(ModelConfig(**spec["model"]), shape, 10)[0] == k
    assert model(__import__("torch").zeros(1, *shape)).shape == (1, 10)


@pytest.fixture
def locks(tmp_path, monkeypatch):
    monkeypatch.setenv("DSE_LOCK_DIR", str(tmp_path))


def test_a_study_measures_each_architecture_once_and_stores_it(tmp_path, locks):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="s")
    specs = dict(architecture(ModelConfig(name="shallow_squeezenext", width=w), (1, 28, 28), 10) for w in (0.125, 0.5))
    calls = []

    def maker(spec):
        calls.append(spec["model"]["width"])
        return build(spec)

    models = {k: (lambda spec=spec: maker(spec)) for k, spec in specs.items()}
    first = ensure(study, models, "test", **TINY)
    assert sorted(calls) == [0.125, 0.5] and set(first) == set(specs) == set(figures(study.user_attrs))
    for figure in first.values():
        assert figure["ms"] > 0 and figure["iqr_ms"] >= 0 and figure["how"] == "test" and figure["paused_training"]
        assert figure["window"] == 2 and 2 <= figure["rounds"] <= 3 and isinstance(figure["under_load"], bool)
    assert ensure(study, models, "again", **TINY) == first and len(calls) == 2  # stored: not measured again
    again = ensure(study, models, "again", remeasure=True, **TINY)
    assert len(calls) == 4 and {f["how"] for f in again.values()} == {"again"}


def test_a_measurement_waits_for_the_training_workers_epoch_boundary(locks):
    events = []

    def trainer():
        with training_turns() as boundary:
            events.append("training")
            time.sleep(0.5)
            events.append("boundary")
            boundary()  # waits here while the measurement runs
            events.append("training again")

    worker = threading.Thread(target=trainer)
    worker.start()
    while not events:
        time.sleep(0.01)
    with pause_training(wait=30) as paused:
        assert paused and events == ["training", "boundary"]
        time.sleep(0.3)
        assert events == ["training", "boundary"]  # held at the boundary
    worker.join(timeout=30)
    assert events[-1] == "training again"


def test_a_measurement_goes_ahead_when_training_does_not_pause_in_time(locks):
    started, stop = threading.Event(), threading.Event()

    def trainer():
        with training_turns():
            started.set()
            stop.wait(30)

    worker = threading.Thread(target=trainer)
    worker.start()
    started.wait(30)
    t0 = time.monotonic()
    with pause_training(wait=0.3) as paused:
        assert not paused and time.monotonic() - t0 < 5
    stop.set()
    worker.join(timeout=30)


def test_a_sampled_space_measures_each_new_architecture_in_its_worker(tmp_path):
    from sweeps import run_tiny_sweep

    url, name = run_tiny_sweep(
        tmp_path,
        "+space=width",
        "space.sampler=tpe",
        "space.n_trials=3",
        "train.epochs=1",
        "+space.search={model.width:{choices:[0.125,0.2]}}",
    )
    study = optuna.load_study(study_name=name, storage=url)
    trials = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    stored = figures(study.user_attrs)
    assert len(trials) == 3 and {t.user_attrs["latency_key"] for t in trials} == set(stored)
    for t in trials:
        figure = stored[t.user_attrs["latency_key"]]
        assert t.user_attrs["latency_ms"] == figure["ms"] == t.values[2]
        assert figure["how"].startswith("by a worker at the first trial of the architecture")


def _direct_ort_ms(model, shape) -> float:
    """A direct ONNX Runtime timing of the fp32 file, one intra-op thread, on the thread's CPU time (a loaded
    test machine would blur the wall clock): median of 40 runs."""
    import tempfile
    from pathlib import Path

    from dse.measure import median_iqr, time_calls
    from dse.onnx import INPUT, as_trained, export_pair, random_calibration, session

    with tempfile.TemporaryDirectory() as tmp:
        fp32, _ = export_pair(as_trained(model), Path(tmp), shape, random_calibration(shape, 8, 0))
        sess, feed = session(fp32, 1), {INPUT: random_calibration(shape, 1, 1)[0]}
        return median_iqr(time_calls(lambda: sess.run(None, feed), warmup=10, runs=40, clock=time.thread_time))[0]


def test_elu_and_relu_get_onnx_runtime_latencies_in_the_ratio_onnx_runtime_gives_not_pytorch(tmp_path, locks):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="s")
    specs = dict(
        architecture(ModelConfig(name="shallow_squeezenext", activation=a), (3, 32, 32), 10) for a in ("elu", "relu")
    )
    elu, relu = specs
    got = ensure(
        study,
        {k: (lambda spec=spec: build(spec)) for k, spec in specs.items()},
        "test",
        ort=True,
        runs=3,
        window=5,
        max_rounds=10,
        warmup=2,
    )
    for figure in got.values():
        for name in ("onnx", "int8"):
            assert figure[name]["clock"] in ("wall", "thread cpu time") and figure[f"{name}_kb"] > 0
            assert figure[name]["ms"] in (figure[name]["wall_ms"], figure[name]["cpu_ms"])
    direct = {k: _direct_ort_ms(*build(spec)) for k, spec in specs.items()}
    # The study's ORT figures are those of an ORT session on the exported file, not PyTorch's (2-7x slower here,
    # and with another ELU/ReLU ratio). Shared cores drift, so the bands are wide.
    for k in specs:
        assert 0.6 < got[k]["onnx"]["ms"] / direct[k] < 1.6, (k, got[k]["onnx"]["ms"], direct[k])
    ort_ratio = got[elu]["onnx"]["ms"] / got[relu]["onnx"]["ms"]
    assert 0.6 < ort_ratio / (direct[elu] / direct[relu]) < 1.6, (ort_ratio, direct)


def test_old_figures_without_onnx_runtime_ones_are_completed_and_a_paper_study_measures_none(tmp_path, locks):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="s")
    k, spec = architecture(ModelConfig(name="shallow_squeezenext", width=0.125), (1, 28, 28), 10)
    paper = ensure(study, {k: lambda: build(spec)}, "paper", **TINY)[k]
    assert "onnx" not in paper and "int8" not in paper
    both = ensure(study, {k: lambda: build(spec)}, "ort", ort=True, **TINY)[k]
    assert both["onnx"]["ms"] > 0 and both["int8"]["ms"] > 0 and both["how"] == "ort"
