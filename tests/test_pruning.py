"""The pareto pruner: decisions on hand-built trial histories, and a pruned sweep trial's record."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from dse.pruning import History, PruningConfig, decide, rungs

CFG = PruningConfig(min_trials=1)


def h(number: int, size: float, latency: float, *accuracy: float) -> History:
    return History(number, size, latency, {epoch: acc for epoch, acc in enumerate(accuracy, start=1)})


def test_rungs_are_geometric_and_stop_before_the_last_epoch():
    assert rungs(PruningConfig(), 30) == [1, 3, 9, 27]
    assert rungs(PruningConfig(), 27) == [1, 3, 9]
    assert rungs(PruningConfig(first_rung=2, base=2), 20) == [2, 4, 8, 16]


def test_dominated_trial_is_pruned_at_the_rung():
    small_good = h(0, 0.1, 1.0, 0.50, 0.60, 0.70)
    big_bad = h(1, 0.5, 2.0, 0.40, 0.45, 0.50)
    decision = decide(big_bad, 3, [small_good], CFG)
    assert decision is not None
    assert (decision.epoch, decision.dominated_by, decision.rule) == (3, 0, "dominated")
    assert decision.accuracy == 0.50 and decision.their_accuracy == 0.70


def test_only_trials_that_reached_the_epoch_count():
    leader = h(0, 0.1, 1.0, 0.90)  # finished epoch 1 only
    me = h(1, 0.5, 2.0, 0.40, 0.45, 0.50)
    assert decide(me, 1, [leader], CFG) is not None
    assert decide(me, 3, [leader], CFG) is None


def test_a_trial_on_the_front_is_never_pruned():
    front = [h(0, 0.1, 1.0, 0.5), h(1, 0.2, 0.5, 0.6), h(2, 0.4, 2.0, 0.8)]
    for me in front:
        others = [o for o in front if o is not me]
        assert decide(me, 1, others, CFG) is None, me.number


def test_smaller_model_with_lower_accuracy_is_not_pruned_by_a_larger_one():
    large = h(0, 1.0, 1.0, 0.9)
    small = h(1, 0.1, 1.0, 0.5)
    assert decide(small, 1, [large], CFG) is None
    slower_same_size = h(2, 0.1, 5.0, 0.9)
    assert decide(small, 1, [slower_same_size], CFG) is None


def test_margin_and_minimum_comparison_trials():
    me = h(1, 0.5, 1.0, 0.50)
    slightly_better = h(0, 0.5, 1.0, 0.52)
    assert decide(me, 1, [slightly_better], PruningConfig(min_trials=1, margin=0.05)) is None
    assert decide(me, 1, [slightly_better], PruningConfig(min_trials=1, margin=0.01)) is not None
    assert decide(me, 1, [slightly_better], PruningConfig(min_trials=2)) is None


def test_asha_rule_among_similar_sizes():
    me = h(9, 1.0, 1.0, 0.50)
    slightly_larger_better = [h(i, 1.1, 1.0, 0.6 + i / 100) for i in range(3)]
    assert decide(me, 1, slightly_larger_better, CFG) is None  # not dominated: they are larger
    decision = decide(me, 1, slightly_larger_better, PruningConfig(min_trials=1, eta=2, band=0.25))
    assert decision is not None and decision.rule == "asha" and decision.dominated_by == 2
    assert decide(me, 1, slightly_larger_better, PruningConfig(min_trials=1, eta=2, band=0.05)) is None


@pytest.mark.parametrize("bad", [dict(base=1), dict(first_rung=0), dict(margin=-0.1), dict(eta=1), dict(min_trials=0)])
def test_bad_pruning_config_is_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        PruningConfig(**bad)


def test_sweep_trial_dominated_by_a_stored_trial_is_pruned_and_recorded(tmp_path):
    from sweeps import run_tiny_sweep

    db = tmp_path / "prune.db"
    study = optuna.create_study(
        study_name="prune", storage=f"sqlite:///{db}", directions=["maximize", "minimize", "minimize"]
    )
    study.set_metric_names(["val_acc", "size_mb", "latency_ms"])
    curves = [{"epoch": e, "val_acc": 1.0} for e in (1, 2, 3)]
    for _ in range(2):  # two perfect, tiny, instant models
        study.add_trial(
            optuna.trial.create_trial(
                values=[1.0, 1e-6, 1e-6], user_attrs={"size_mb": 1e-6, "latency_ms": 1e-6, "curves": curves}
            )
        )
    url, name = run_tiny_sweep(
        tmp_path,
        "+space=width",
        "space.grid={model.width:[0.2]}",
        "space.seeds=[0]",
        "sweep.seeds=1",
        "train.epochs=3",
        "study.pruner=pareto",
        name="prune",
    )
    trial = optuna.load_study(study_name=name, storage=url).trials[-1]
    assert trial.state == TrialState.PRUNED
    assert trial.user_attrs["pruned_at_epoch"] == 1
    assert trial.user_attrs["dominated_by"] in (0, 1)
    assert len(trial.user_attrs["curves"]) == 1 and trial.user_attrs["epochs_planned"] == 3
    assert "dominated at epoch 1" in trial.user_attrs["pruned_reason"]


def test_optuna_pruners_need_a_single_objective():
    from dse.config import StudyConfig

    with pytest.raises(ValueError, match="pruner='median' works on single-objective studies only"):
        StudyConfig(pruner="median")
    assert StudyConfig(pruner="median", objectives=["val_acc"]).objectives == ["val_acc"]
    with pytest.raises(ValueError, match="metric 'accuracy' is unknown; allowed: val_acc, test_acc"):
        StudyConfig(objectives=["accuracy"])
    with pytest.raises(ValueError, match="must be 1 to 3 distinct metric names"):
        StudyConfig(objectives=["val_acc", "val_acc"])
