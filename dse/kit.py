"""A latency kit: the architectures a board times (a study's, a grid's, a sampled space's calibration draw), their
ONNX graphs (fp32 and int8, random weights), the manifest `kit.json` and the shipped runner, in one folder."""

from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import math
import random
import shutil
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path

import torch
import yaml

from dse.identity import architecture
from dse.latency import build
from dse.models import ModelConfig
from dse.onnx import as_trained, export_pair, random_calibration
from dse.predict import graph_features

__all__ = [
    "KIT_FORMAT",
    "MANIFEST",
    "PRECISIONS",
    "RUNNER_FILES",
    "KitError",
    "grid_architectures",
    "sample_architectures",
    "kit_id",
    "write_kit",
]

KIT_FORMAT = "dse-latency-kit/2"  # /2: kit.json names the reference graphs
MANIFEST = "kit.json"
PRECISIONS = {"fp32": "onnx", "int8": "int8"}  # a graph's precision -> the metric word (latency_onnx_ms, ...)
BUNDLE = Path(__file__).resolve().parent / "deploy" / "bundle"
# The runner and the runtime library it imports (sessions, timing, the CPU's name): no torch, no dse.
RUNNER_FILES = ("latency_runner.py", "predict.py")
README = BUNDLE / "KIT_README.md"
MODEL_KNOBS = {f.name for f in fields(ModelConfig)}


class KitError(ValueError):
    """A kit cannot be made from this study or space."""


def _model_changes(space: Mapping) -> dict[str, object]:
    """The `model.*` keys a space's grid or search sets (dropout aside: it is no part of the inference graph)."""
    keys = {**space.get("grid", {}), **space.get("search", {})}
    out = {}
    for key, value in keys.items():
        knob = key.removeprefix("model.")
        if key.startswith("model.") and knob != "dropout":
            if knob not in MODEL_KNOBS:
                raise KitError(f"space key {key!r} is no model knob; allowed: {', '.join(sorted(MODEL_KNOBS))}")
            out[knob] = value
    return out


def _fixed(space: Mapping) -> dict[str, object]:
    """The model knobs a space file's `overrides` set for all its trials (`model.blocks=[1,1,1,1]`)."""
    out = {}
    for override in space.get("overrides") or []:
        key, _, value = str(override).partition("=")
        if key.startswith("model.") and key.removeprefix("model.") in MODEL_KNOBS - {"name", "dropout"}:
            out[key.removeprefix("model.")] = yaml.safe_load(value)
    return out


def _spec_with(template: Mapping, changes: Mapping) -> tuple[str, dict]:
    """(key, spec) of the template architecture with some model knobs changed."""
    model = {k: v for k, v in template["model"].items() if k in MODEL_KNOBS}
    model.update(changes)
    return architecture(ModelConfig(**model), template["input_shape"], template["num_classes"])


def grid_architectures(template: Mapping, space: Mapping) -> dict[str, dict]:
    """Every architecture of a grid space (its `model.*` keys, and those its `overrides` fix) on a template spec
    (input shape, classes, the knobs the space does not set), by key."""
    if space.get("points"):
        raise KitError("a space of named points is not supported; kits cover grid and search spaces of model.* keys")
    grid = _model_changes({"grid": space.get("grid", {})})
    combos = itertools.product(*grid.values())
    return dict(_spec_with(template, {**_fixed(space), **dict(zip(grid, combo))}) for combo in combos)


def _draw(dist: Mapping, rng: random.Random):
    if "choices" in dist:
        return rng.choice(list(dist["choices"]))
    low, high = float(dist["low"]), float(dist["high"])
    if dist.get("log"):
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    return rng.uniform(low, high)


def sample_architectures(
    template: Mapping, space: Mapping, n: int, *, seed: int = 0, exclude: frozenset = frozenset()
) -> dict[str, dict]:
    """`n` distinct architectures drawn with `seed` from a sampled space's `model.*` distributions (uniform, or
    log-uniform where the space says `log`), none of `exclude`, on a template spec; by key."""
    search = _model_changes({"search": space.get("search", {})})
    if not search:
        raise KitError("the space searches no model.* key: it has one architecture, nothing to calibrate on")
    rng = random.Random(seed)
    out: dict[str, dict] = {}
    for _ in range(100 * n):  # a space of few choices may hold fewer than n architectures
        if len(out) == n:
            break
        key, spec = _spec_with(template, {**_fixed(space), **{k: _draw(d, rng) for k, d in search.items()}})
        if key not in exclude:
            out[key] = spec
    if len(out) < n:
        raise KitError(f"calibration={n}: the space holds only {len(out)} architectures besides the study's")
    return out


def kit_id(study: str, keys: list[str]) -> str:
    """A short key of what a kit times: its study and architectures (a latency.json names it)."""
    return hashlib.sha256(json.dumps([study, sorted(keys)]).encode()).hexdigest()[:16]


def _reference(out: Path, graphs: list[dict]) -> dict[str, str]:
    """The graphs the runner pairs every timed run with, by precision: those of the kit's architecture of median
    MACs, whose work is typical of the kit's (a machine's drift then slows both alike)."""
    import onnx

    fp32 = [g for g in graphs if g["precision"] == "fp32"]
    macs = {g["id"]: graph_features(onnx.load(out / g["file"]))["macs"] for g in fp32}
    middle = sorted(fp32, key=lambda g: (macs[g["id"]], g["id"]))[(len(fp32) - 1) // 2]["architecture"]
    return {g["precision"]: g["id"] for g in graphs if g["architecture"] == middle}


def write_kit(
    out: Path,
    sets: Mapping[str, Mapping[str, dict]],
    *,
    study: str,
    definition_sha256: str | None,
    force: bool = False,
) -> dict:
    """Write the kit folder: ONNX fp32 and int8 graphs of every architecture of `sets` (set name -> {key: spec}, e.g.
    "study", "calibration", "front"), `kit.json`, the runner files and README. Returns the manifest."""
    out = Path(out)
    if out.exists():
        if not force:
            raise KitError(f"{out} exists; pass --force to replace it or --out another folder")
        shutil.rmtree(out)
    (out / "graphs").mkdir(parents=True)
    graphs = []
    seen: set[str] = set()
    torch.manual_seed(0)  # random weights: they do not change the time, only the files' bytes
    for name, specs in sets.items():
        for key, spec in specs.items():
            if key in seen:
                continue
            seen.add(key)
            n = len(seen) - 1
            model, shape = build(spec)
            folder = out / "graphs" / f"a{n:04d}"
            folder.mkdir()
            files = export_pair(as_trained(model.eval()), folder, shape, random_calibration(shape, 32, 0))
            for precision, path in zip(PRECISIONS, files):
                graphs.append(
                    {
                        "id": f"a{n:04d}-{precision}",
                        "architecture": key,
                        "precision": precision,
                        "set": name,
                        "file": path.relative_to(out).as_posix(),
                        "input_shape": [1, *shape],
                    }
                )
    manifest = {
        "format": KIT_FORMAT,
        "reference": _reference(out, graphs),
        "kit": kit_id(study, sorted(seen)),
        "study": study,
        "definition_sha256": definition_sha256,
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "graphs": graphs,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    for name in RUNNER_FILES:
        shutil.copy2(BUNDLE / name, out / name)
    shutil.copy2(README, out / "README.md")
    return manifest
