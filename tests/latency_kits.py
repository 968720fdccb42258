"""Test helper: a study as a sweep leaves it for a latency kit (its definition's space, trials with architecture
keys), made through Optuna's public API without training; and running a kit's runner on this machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import yaml

from dse.identity import architecture
from dse.models import ModelConfig
from dse.study import fingerprint
from dse.sweep.compose import CONF_DIR

QUICK = ["--runs", "2", "--rounds", "2", "--warmup", "0"]  # the runner, as fast as it goes


def make_study(storage: str, name: str, space: str, widths=(0.125, 0.25), **space_changes) -> optuna.Study:
    """A study of conf/space/<space>.yaml (with `space_changes`) holding one COMPLETE trial per width of
    Shallow SqueezeNext-06 on 1x16x16 images (small graphs: quick to export and time)."""
    conf = yaml.safe_load((CONF_DIR / "space" / f"{space}.yaml").read_text())
    definition = {"space": {k: conf.get(k, {}) for k in ("sampler", "grid", "points", "search")} | space_changes}
    study = optuna.create_study(study_name=name, storage=storage, directions=["maximize", "minimize"])
    study.set_user_attr("definition", definition)
    study.set_user_attr("definition_sha256", fingerprint(definition))
    for i, width in enumerate(widths):
        key, _ = architecture(ModelConfig(name="shallow_squeezenext", blocks=[1, 1, 1, 1], width=width), (1, 16, 16), 4)
        study.add_trial(optuna.trial.create_trial(values=[0.5 + i / 10, width], user_attrs={"latency_key": key}))
    return study


def run_kit(kit: Path, *args: str) -> subprocess.CompletedProcess:
    """The kit's runner in a fresh Python that cannot import torch or dse."""
    block = "import runpy, sys; sys.modules.update(torch=None, dse=None); sys.argv = sys.argv[1:]; "
    block += "runpy.run_path(sys.argv[0], run_name='__main__')"
    command = [sys.executable, "-c", block, str(kit / "latency_runner.py"), *QUICK, *args]
    return subprocess.run(command, capture_output=True, text=True, check=True)
