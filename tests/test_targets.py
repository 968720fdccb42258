"""Figures on a target machine stored on the study: the graph features a predictor reads are computed once per
architecture and stored, and computed again where an older dse stored fewer of them."""

from __future__ import annotations

import optuna

from dse.identity import architecture
from dse.models import ModelConfig
from dse.predict import FEATURES
from dse.targets import FEATURES_ATTR, study_features


def test_graph_features_are_stored_once_and_completed_where_an_older_dse_stored_fewer():
    key, spec = architecture(ModelConfig(name="shallow_squeezenext", blocks=[1, 1, 1, 1], width=0.25), (1, 16, 16), 4)
    study = optuna.create_study()
    first = study_features(study, {key: spec})
    assert set(FEATURES) <= set(first.columns) and study.user_attrs[FEATURES_ATTR + key] == first.loc[key].to_dict()
    older = {k: v for k, v in first.loc[key].items() if k != "count_elu"}
    study.set_user_attr(FEATURES_ATTR + key, older | {"macs": -1.0})  # -1: shows which row is read back
    assert study_features(study, {key: spec}).loc[key, "macs"] == first.loc[key, "macs"]
    assert study.user_attrs[FEATURES_ATTR + key]["count_elu"] == first.loc[key, "count_elu"]
    study.set_user_attr(FEATURES_ATTR + key, first.loc[key].to_dict() | {"macs": -1.0})
    assert study_features(study, {key: spec}).loc[key, "macs"] == -1.0  # complete rows are not computed again
