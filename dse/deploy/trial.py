"""The trial a bundle comes from: found in its study, its model rebuilt from its checkpoint, the ONNX files its sweep
shipped, its data split redone and checked."""

from __future__ import annotations

import tempfile
from pathlib import Path

import optuna
import torch.nn as nn
from optuna.trial import TrialState

from dse.checkpoint import load_model_state
from dse.data import DataConfig, Splits, load_data
from dse.deploy.bundle import predict as runtime
from dse.deploy.front import DeployError
from dse.models import ModelConfig, build_model, paper_name, resolve_config
from dse.study import study_workdir

__all__ = ["find_trial", "load_trial_data", "load_trial_model", "shipped_files", "trial_config"]


def find_trial(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    """A COMPLETE trial with a checkpoint artifact, or a DeployError that says what is wrong."""
    trials = study.get_trials(deepcopy=False)
    trial = next((t for t in trials if t.number == number), None)
    where = f"study {study.study_name!r}"
    if trial is None:
        have = f"0..{len(trials) - 1}" if trials else "none"
        raise DeployError(f"{where} has no trial {number}; its trials are {have}")
    if trial.state != TrialState.COMPLETE:
        raise DeployError(
            f"trial {number} of {where} is {trial.state.name}, not COMPLETE: only a finished "
            "training can be exported (python -m dse.deploy list shows the front)"
        )
    if not trial.user_attrs.get("artifact_checkpoint"):
        raise DeployError(
            f"trial {number} of {where} has no checkpoint (no artifact_checkpoint attribute); "
            "it was not trained by dse.sweep, or its upload failed: rerun the trial"
        )
    return trial


def trial_config(trial: optuna.trial.FrozenTrial) -> dict:
    """The resolved config a trial recorded (its provenance), with the model and data it was built from."""
    config = trial.user_attrs.get("provenance", {}).get("config")
    if not isinstance(config, dict) or "model" not in config or "data" not in config:
        raise DeployError(f"trial {trial.number} has no provenance.config with model and data; it cannot be rebuilt")
    return config


def load_trial_model(
    study: optuna.Study,
    trial: optuna.trial.FrozenTrial,
    *,
    storage: str,
    workdir: str | None,
    num_classes: int,
    in_channels: int,
) -> tuple[nn.Module, ModelConfig]:
    """The trial's model with its checkpoint's weights, in eval mode, and its resolved config."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoint.pt"
        _download(study, trial, "checkpoint", path, storage=storage, workdir=workdir)
        weights = load_model_state(path)
    cfg = ModelConfig(**trial_config(trial)["model"])
    model = build_model(cfg, num_classes=num_classes, in_channels=in_channels)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise DeployError(
            f"the checkpoint of trial {trial.number} does not fit its config {paper_name(cfg)}: "
            f"{str(e).splitlines()[0]}"
        ) from None
    return model.eval(), resolve_config(cfg)


def _download(
    study: optuna.Study, trial: optuna.trial.FrozenTrial, what: str, path: Path, *, storage: str, workdir: str | None
) -> None:
    """The trial's artifact `artifact_<what>` from the study's artifact store into `path`."""
    store_dir = study_workdir(study.study_name, storage, workdir) / "artifacts"
    if not store_dir.is_dir():
        raise DeployError(
            f"no artifact store at {store_dir}: pass the study's --workdir (where its sweep wrote artifacts/)"
        )
    store = optuna.artifacts.FileSystemArtifactStore(str(store_dir))
    try:
        optuna.artifacts.download_artifact(
            artifact_store=store, file_path=str(path), artifact_id=trial.user_attrs[f"artifact_{what}"]
        )
    except Exception as e:  # the store raises several types for a missing or unreadable artifact
        raise DeployError(
            f"{what} artifact of trial {trial.number} is not readable in {store_dir} ({type(e).__name__}: {e})"
        ) from None


def shipped_files(
    study: optuna.Study, trial: optuna.trial.FrozenTrial, folder: Path, *, storage: str, workdir: str | None
) -> dict[str, Path] | None:
    """The ONNX files the sweep exported and evaluated for this trial (precision -> path in `folder`), checked
    against their recorded sha256; None for a trial of an older dse or of a sweep with study.deployed=false."""
    attrs = trial.user_attrs
    if not all(f"artifact_{p}" in attrs for p in ("onnx", "int8")):
        return None
    out = {}
    for precision, what in (("fp32", "onnx"), ("int8", "int8")):
        out[precision] = path = folder / f"{what}.onnx"
        _download(study, trial, what, path, storage=storage, workdir=workdir)
        if runtime.sha256(str(path)) != attrs.get(f"{what}_sha256"):
            raise DeployError(
                f"the {what} ONNX artifact of trial {trial.number} does not match its recorded sha256 "
                f"{attrs.get(f'{what}_sha256')}: the artifact store was changed"
            )
    return out


def load_trial_data(trial: optuna.trial.FrozenTrial, data_root: str | None = None) -> Splits:
    """The trial's dataset and split (`data_root` overrides where it lives); refused when the files
    split differently from the trial's (another dataset copy)."""
    data = dict(trial_config(trial)["data"], download=False)
    if data_root is not None:
        data["root"] = str(data_root)
    splits = load_data(DataConfig(**data))
    theirs = trial.user_attrs.get("split", {}).get("indices_sha256")
    if theirs and theirs != splits.split["indices_sha256"]:
        raise DeployError(
            f"the data in {data['root']} splits differently from trial {trial.number}'s "
            f"(indices sha256 {splits.split['indices_sha256']}, trial {theirs}); pass --data-root"
        )
    return splits
