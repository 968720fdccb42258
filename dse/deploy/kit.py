"""Which architectures a study's latency kit holds: the study's own, a grid space's, a sampled space's calibration
draw, or just the front's; and the import of a kit's latency.json back into the study."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import optuna
import yaml

from dse.deploy.front import DeployError
from dse.kit import KitError, grid_architectures, sample_architectures, write_kit
from dse.predict import Fitted
from dse.sweep.compose import CONF_DIR
from dse.targets import TEMPLATE_ATTR, check_target, predict_target, read_results, store

__all__ = ["CALIBRATION", "study_architectures", "load_space", "kit_sets", "write_study_kit", "import_results"]

CALIBRATION = 60  # architectures a sampled space's kit draws for the predictor to fit on (besides the study's)


def study_architectures(study: optuna.Study, trials: Sequence[int] | None = None) -> dict[str, dict]:
    """The distinct inference graphs of the study's trials (all, or these numbers): key -> spec."""
    keys = {
        t.user_attrs["latency_key"]
        for t in study.get_trials(deepcopy=False)
        if "latency_key" in t.user_attrs and (trials is None or t.number in trials)
    }
    return {k: json.loads(k) for k in sorted(keys)}


def load_space(name: str) -> dict:
    """A space of conf/space/ by name, as the study definition holds one (sampler, grid, points, search)."""
    path = CONF_DIR / "space" / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in path.parent.glob("*.yaml") if p.stem != "schema")
        raise DeployError(f"space {name!r} is unknown; allowed: {', '.join(names)}")
    return yaml.safe_load(path.read_text())


def kit_sets(
    study: optuna.Study,
    *,
    space: dict | None = None,
    calibration: int = CALIBRATION,
    front: Sequence[int] | None = None,
) -> dict[str, dict[str, dict]]:
    """The kit's architectures by set: "front" (the front's, with `front` trial numbers) or "study" (every trial's),
    plus "grid" (a grid space's) or "calibration" (`calibration` drawn from a sampled space); the space is the
    study's own unless given."""
    own = study_architectures(study, front)
    template = next(iter(own.values()), None) or study.user_attrs.get(TEMPLATE_ATTR)
    if template is None:
        raise DeployError(
            f"study {study.study_name!r} has no trial with an architecture (latency_key) yet: run its sweep first"
        )
    if front is not None:
        return {"front": own}
    space = space or study.user_attrs.get("definition", {}).get("space") or {}
    try:
        if space.get("sampler", "grid") == "grid":
            return {"study": own, "grid": grid_architectures(template, space)}
        drawn = sample_architectures(template, space, calibration, exclude=frozenset(own)) if calibration else {}
        return {"study": own, "calibration": drawn}
    except KitError as e:
        raise DeployError(str(e)) from None


def write_study_kit(study: optuna.Study, out: Path, *, force: bool = False, **which) -> dict:
    """Write the study's kit (see `kit_sets` for `which`) into `out`; returns its manifest."""
    sets = kit_sets(study, **which)
    try:
        return write_kit(
            out, sets, study=study.study_name, definition_sha256=study.user_attrs.get("definition_sha256"), force=force
        )
    except KitError as e:
        raise DeployError(str(e)) from None


def import_results(study: optuna.Study, path: Path, target: str) -> tuple[dict, list[Fitted]]:
    """Check a latency.json against the study, then store its figures for `target` and predict the study's
    architectures the target has not measured; returns what `read_results` read and the predictor's fits. Nothing
    is stored when anything in the file is wrong."""
    check_target(target)
    results = read_results(path, study.study_name, study.user_attrs.get("definition_sha256"))
    store(study, target, results)
    return results, predict_target(study, target, study_architectures(study))
