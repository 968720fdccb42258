"""A trial's config: the Hydra override grammar (merging, quoting, a trial's params as overrides), composing
`conf/sweep.yaml` (with the user's config folders and space files) into typed, checked dataclasses, and Hydra's
composition errors as one line naming the bad override and the closest valid names."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.resources
import json
import os
import re
import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dse import identity
from dse.config import (
    DataConfig,
    SpaceConfig,
    StudyConfig,
    SweepConfig,
    TrainConfig,
    finite,
    register_schemas,
    to_object,
)
from dse.models import ModelConfig, build_model, config_from_name, resolve_config

__all__ = [
    "CONF_DIR",
    "CONFIG_PATH_ENV",
    "REPO",
    "SCHEMAS",
    "TrialSetup",
    "override_key",
    "quote",
    "hydra_value",
    "param_value",
    "merge_overrides",
    "model_overrides",
    "point_label",
    "point_parts",
    "trial_overrides",
    "portable",
    "folder_override",
    "config_folders",
    "group_options",
    "key_problem",
    "compose",
    "typed",
    "trial_identity",
    "data_key",
]

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
REPO = CONF_DIR.parent
CONFIG_PATH_ENV = "DSE_CONFIG_PATH"  # folders (os.pathsep between them) searched after conf/, as hydra.searchpath
SCHEMAS = {  # the config's top-level nodes and their schemas: what keys an override may set
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "study": StudyConfig,
    "space": SpaceConfig,
    "sweep": SweepConfig,
}
_SEARCHPATH = "hydra.searchpath"
_WHOLE = ("space.grid", "space.search")  # dicts the command line replaces as a whole (Hydra would merge them)
_HIDDEN = ("schema",)  # group options that are no config to pick (the schemas registered by register_schemas)


def override_key(override: str) -> str:
    """The key an override sets: 'model.width' of '+model.width=0.2'."""
    return override.lstrip("+~").split("=", 1)[0]


def quote(text: str) -> str:
    """A string as a quoted Hydra override value (URLs with `?a=b`, names in any script)."""
    from hydra.core.override_parser.types import Quote, QuotedString

    return QuotedString(text=text, quote=Quote.single).with_quotes()


def hydra_value(value: Any) -> str:
    """A Python value as Hydra reads it back from an override."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, str) and not re.fullmatch(r"[A-Za-z0-9_.\-]+", value):  # what Hydra reads unquoted
        return quote(value)
    return str(value)


def param_value(value: Any) -> Any:
    """Optuna categorical choices must be scalars: lists become '1,2,8,1'."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value


def merge_overrides(*groups: list[str]) -> list[str]:
    """Concatenate override lists; a later override of the same key replaces an earlier one."""
    merged: dict[str, str] = {}
    for group in groups:
        for override in group:
            merged.pop(override_key(override), None)
            merged[override_key(override)] = override
    return list(merged.values())


def model_overrides(cfg: ModelConfig) -> list[str]:
    """Hydra overrides that select a model config: its conf/model group and the knobs the name fixes."""
    out = [f"model={cfg.name}"]
    if cfg.blocks is not None:
        out.append(f"model.blocks={hydra_value(list(cfg.blocks))}")
    if cfg.width is not None:
        out.append(f"model.width={cfg.width}")
    return out


def point_label(point: Any) -> str:
    """How a space point is named in a trial's params: its model name, with its extra overrides."""
    name, extra = point_parts(point)
    return name if not extra else f"{name} [{' '.join(extra)}]"


def point_parts(point: Any) -> tuple[str, list[str]]:
    """(model name, extra overrides) of a space point."""
    if isinstance(point, str):
        return point, []
    if isinstance(point, dict) and isinstance(point.get("model"), str) and set(point) <= {"model", "overrides"}:
        return point["model"], list(point.get("overrides", []))
    raise ValueError(f"space point {point!r} must be a model name or {{model: NAME, overrides: [...]}}")


def trial_overrides(params: dict, space: SpaceConfig) -> tuple[list[str], list[str]]:
    """(static, varying) Hydra overrides for a trial's params: static ones (a point's extra overrides)
    yield to the command line; varying ones (the swept knobs, the seed) always win."""
    static, varying = [], []
    for key, value in params.items():
        if key == "seed":
            varying.append(f"train.seed={value}")
        elif key == "point":
            point = {point_label(p): p for p in space.points}[value]
            name, extra = point_parts(point)
            varying += model_overrides(config_from_name(name))
            static += extra
        else:
            choices = space.grid.get(key) or space.search.get(key, {}).get("choices")
            if choices:
                value = next(c for c in choices if param_value(c) == value)
            varying.append(f"{key}={hydra_value(value)}")
    return static, varying


def _parse(override: str):
    """Hydra's parse of one override; a syntax error raises ValueError naming the override."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_override(override)
    except HydraException as e:
        raise ValueError(f"{override}: {str(e).splitlines()[0]} (Hydra's override grammar)") from None


def _space_file(override: str) -> Path | None:
    """The file a `+space=PATH.yaml` override names (None: a space of the config folders)."""
    if override_key(override) != "space" or "=" not in override:
        return None
    value = _parse(override).value()
    return Path(value) if isinstance(value, str) and value.endswith((".yaml", ".yml")) else None


def _folder(entry: str) -> str:
    """A search-path entry with a file folder made absolute (`file://x`, or a plain path); `pkg://` as is."""
    if "://" in entry and not entry.startswith("file://"):
        return entry
    folder = Path(entry.removeprefix("file://")).expanduser().resolve()
    if not folder.is_dir():
        raise ValueError(f"{_SEARCHPATH}: config folder {str(folder)!r} does not exist")
    return f"file://{folder}"


def portable(overrides: list[str]) -> list[str]:
    """The overrides as every process composes them alike, whatever its folder or environment: a space file's
    path made absolute, the config folders of `hydra.searchpath` and of $DSE_CONFIG_PATH as one absolute list."""
    out, folders = [], []
    for override in overrides:
        path = _space_file(override)
        if override_key(override) == _SEARCHPATH:
            value = _parse(override).value()
            folders += value if isinstance(value, list) else [value]
            continue
        if path is not None:
            if not path.expanduser().is_file():
                raise ValueError(f"{override}: no space file {str(path.expanduser().resolve())!r}")
            override = f"{override.split('space=', 1)[0]}space={quote(str(path.expanduser().resolve()))}"
        out.append(override)
    folders += [f for f in os.environ.get(CONFIG_PATH_ENV, "").split(os.pathsep) if f]
    folders = list(dict.fromkeys(map(_folder, folders)))
    return out + [f"{_SEARCHPATH}={hydra_value(folders)}"] if folders else out


def folder_override(folder: str) -> str:
    """The override that adds a config folder to the search path (`--config-dir DIR`)."""
    return f"{_SEARCHPATH}={hydra_value([folder])}"


def config_folders(overrides: list[str]) -> list[Path]:
    """The folders configs are read from, in Hydra's order: dse's conf/, then the search path's folders."""
    folders = [CONF_DIR]
    for override in portable(overrides):
        if override_key(override) == _SEARCHPATH:
            for entry in _parse(override).value():
                scheme, _, where = entry.partition("://")
                if scheme == "file":
                    folders.append(Path(where))
                elif scheme == "pkg":
                    package, _, sub = where.partition("/")
                    folders.append(Path(str(importlib.resources.files(package))) / sub)
    return folders


def group_options(group: str, overrides: list[str] = ()) -> list[str]:
    """The configs a group offers (`data`: cifar10, cifar100, ...) in every config folder, without `schema`."""
    names = {p.stem for folder in config_folders(list(overrides)) for p in (folder / group).glob("*.yaml")}
    return sorted(names - set(_HIDDEN))


def _groups(overrides: list[str]) -> set[str]:
    return {p.name for folder in config_folders(overrides) if folder.is_dir() for p in folder.iterdir() if p.is_dir()}


def _close(word: str, names) -> str:
    match = difflib.get_close_matches(word, list(names), n=1)
    return f"; did you mean {match[0]}?" if match else ""


def key_problem(key: str, overrides: list[str] = ()) -> str | None:
    """What is wrong with a config key (`model.widht`: model has no key 'widht'; did you mean width?), or None:
    a key of the schemas, a config group (`train`, to pick one of its configs), or inside a free dict."""
    head, *rest = key.split(".")
    if head == "hydra":
        return None
    if head not in SCHEMAS:
        groups = _groups(list(overrides))
        if not rest and head in groups:
            return None
        names = sorted(set(SCHEMAS) | groups)
        return f"no key or config group {head!r}{_close(head, names)} (allowed: {', '.join(names)})"
    node, path = SCHEMAS[head], head
    for part in rest:
        if not dataclasses.is_dataclass(node):  # a dict of any keys (train.optimizer_kwargs)
            return None
        fields = typing.get_type_hints(node)
        if part not in fields:
            return f"{path} has no key {part!r}{_close(part, fields)}"
        node, path = fields[part], f"{path}.{part}"
    return None


def _found(pattern: str, text: str) -> str | None:
    match = re.search(pattern, text)
    return next((g for g in match.groups() if g), None) if match else None


def _explain(error: Exception, overrides: list[str]) -> str:
    """Hydra's composition error as one line: the override (or the config file) at fault, what is wrong, the
    closest valid names."""
    text, cause = str(error), error.__cause__
    missing = re.search(r"Could not find '(.+)/([^/']+)'", text)
    if missing:
        group, name = missing.groups()
        given = next((o for o in overrides if override_key(o) == group), f"{group}={name}")
        options = group_options(group, overrides)
        return f"{given}: Could not find '{group}/{name}'{_close(name, options)} ({group}: {', '.join(options)})"
    full_key = getattr(cause, "full_key", None) or _found(r"full_key: (\S+)", text)
    problem = key_problem(full_key, overrides) if full_key else None
    if problem is None:  # not a key: the error's own first line (after Hydra's "In 'x': ... raised" header)
        lines = str(cause or error).splitlines()
        problem = lines[1] if len(lines) > 1 and lines[0].endswith("while composing config:") else lines[0]
    # The override at fault, or the override that picked the config file at fault (`In 'space/mine': ...`).
    key = _found(r"override (?:'([^']+)'|[+~]*([\w.]+))", text) or _found(r"^In '([^'/]+)/", text)
    given = next((o for o in overrides if key and override_key(o) == key), key)
    return f"{given}: {problem}" if given else problem


def _whole(cfg: DictConfig, override: str) -> None:
    """`space.grid=` or `space.search=`: the space's grid or search replaced as a whole, checked as a space file's."""
    key = override_key(override)
    if "space" not in cfg:
        raise ValueError(f"{override}: there is no space to change; add +space=NAME or +space=PATH.yaml")
    value = {} if override.startswith("~") else _parse(override).value()
    field = key.split(".", 1)[1]
    check = SpaceConfig.check_grid if field == "grid" else SpaceConfig.check_search
    check(cfg.space.get("name", "custom"), value)
    cfg.space[field] = value


def _load(override: str, path: Path) -> DictConfig:
    import yaml

    try:
        node = OmegaConf.load(path)
    except (yaml.YAMLError, OSError) as e:
        raise ValueError(f"{override}: cannot read the space file: {str(e).splitlines()[0]}") from None
    if not isinstance(node, DictConfig):
        raise ValueError(f"{override}: a space file holds a mapping (name:, grid: ...), not {type(node).__name__}")
    return node


def compose(overrides: list[str]) -> DictConfig:
    """The `conf/sweep.yaml` config with these overrides (works inside and outside @hydra.main).

    Configs are found in conf/, then in the folders of `hydra.searchpath=[file:///...]` and $DSE_CONFIG_PATH;
    `+space=PATH.yaml` names a space file anywhere; `space.grid=` and `space.search=` replace the space's own.
    A bad override raises ValueError of one line naming it and the closest valid names; HYDRA_FULL_ERROR=1 lets
    Hydra's own error through."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = portable(overrides)
    register_schemas()
    given, whole = [], []
    for override in overrides:
        _parse(override)
        problem = key_problem(override_key(override), overrides)
        if problem:  # before Hydra, which would add an unknown key after a `+` and advise one otherwise
            raise ValueError(f"{override}: {problem}")
        path = _space_file(override)
        if override_key(override) in _WHOLE:
            whole.append(override)
        elif path is not None:  # stored under a name of its own: any process composes it from its path
            name = "_file_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
            ConfigStore.instance().store(group="space", name=name, node=_load(override, path))
            given.append(f"{override.split('space=', 1)[0]}space={name}")
        else:
            given.append(override)
    try:
        if GlobalHydra.instance().is_initialized():
            cfg = hydra_compose("sweep", overrides=given)
        else:
            with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
                cfg = hydra_compose("sweep", overrides=given)
    except (HydraException, OmegaConfBaseException) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise ValueError(_explain(e, overrides)) from None
    for override in whole:
        _whole(cfg, override)
    return cfg


@dataclass
class TrialSetup:
    """A trial's composed config as typed dataclasses."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    resolved: dict
    full: ModelConfig  # the model config with every knob filled in (what it builds)


def typed(cfg: DictConfig) -> TrialSetup:
    """The composed config as typed dataclasses; bad values raise ValueError naming them."""
    model = to_object(ModelConfig, cfg.model)
    data = to_object(DataConfig, cfg.data)
    train_cfg = to_object(TrainConfig, cfg.train)
    for group, node in (("model", model), ("data", data), ("train", train_cfg)):
        bad = {k: v for k, v in asdict(node).items() if not finite(v)}
        if bad:
            raise ValueError(f"{', '.join(f'{group}.{k}={v!r}' for k, v in bad.items())} must be finite")
    full = resolve_config(model)
    try:
        with torch.device("meta"):  # builds every layer (checks every knob) without allocating weights
            build_model(model, num_classes=10, in_channels=1 if data.name == "fashion_mnist" else 3)
    except (RuntimeError, OverflowError, MemoryError) as e:  # e.g. a width so large that sizes overflow
        raise ValueError(
            f"model {model.name} with {model.overrides()} cannot be built: {str(e).splitlines()[0]}"
        ) from None
    return TrialSetup(model, data, train_cfg, OmegaConf.to_container(cfg, resolve=True), full)


def trial_identity(setup: TrialSetup, *, seed: bool = True) -> dict:
    """What a trial computes (`dse.identity.trial_identity`)."""
    return identity.trial_identity(setup.model, setup.data, setup.train, seed=seed)


def data_key(data: DataConfig) -> str:
    """A dataset config as a key: trials with one key share their loaded data."""
    return json.dumps(asdict(data), sort_keys=True)
