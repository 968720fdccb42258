"""The paper's model names: parse 'Shallow SqueezeNext-06-0.4x' into a ModelConfig and render one back."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import torch.nn as nn

from dse.models.registry import (
    ModelConfig,
    build_registered,
    check_blocks,
    check_width,
    list_models,
    model_family,
    resolve_config,
)
from dse.paper import load_paper

__all__ = ["config_from_name", "create_model", "parse_name", "paper_name", "paper_blocks", "candidate_blocks", "depth"]

# Stage counts of the SqueezeNext baselines, named by depth (and version) in the SqueezeNext paper.
SQUEEZENEXT_BLOCKS = {"23": (6, 6, 8, 1), "23v5": (2, 4, 14, 1)}

_SQUEEZENET = re.compile(r"^(?:Baseline\s+)?SqueezeNet[- ]?v?(?P<version>1\.[01])$", re.I)
_SQUEEZENEXT = re.compile(
    r"^(?:Baseline\s+)?(?P<kind>Shallow\s+|Modified\s+)?SqueezeNext-(?P<depth>\d+)(?P<v5>v5)?"
    r"-(?P<width>\d*\.?\d+)x?(?P<rerun>-v\d+)?(?:\s*\(R=(?P<blocks>[\d,\s]+)\))?$",
    re.I,
)
_FAMILY = {"": "squeezenext", "shallow": "shallow_squeezenext", "modified": "modified_squeezenext"}


def depth(blocks: Sequence[int]) -> int:
    """The paper's DD: total bottleneck blocks + 2 (one stem conv, one head conv)."""
    return sum(blocks) + 2


@functools.cache
def paper_blocks() -> dict[tuple[int, float | None], tuple[tuple[int, ...], ...]]:
    """The stage counts the paper's tables state, keyed by (depth, width) and by (depth, None)."""
    known: dict[tuple[int, float | None], set] = {}
    for table in load_paper()["tables"].values():
        for row in table["rows"]:
            if "blocks" in row:
                blocks = tuple(row["blocks"])
                width = float(_SQUEEZENEXT.match(row["model"])["width"])
                for key in ((depth(blocks), width), (depth(blocks), None)):
                    known.setdefault(key, set()).add(blocks)
    return {k: tuple(sorted(v)) for k, v in known.items()}


def candidate_blocks(name: str) -> tuple[tuple[int, ...], ...]:
    """Every stage-count tuple the paper's tables use for the depth of `name` (empty if none)."""
    m = _SQUEEZENEXT.match(" ".join(name.split()))
    return paper_blocks().get((int(m["depth"]), None), ()) if m else ()


def _fmt_blocks(blocks: Sequence[int]) -> str:
    return ",".join(map(str, blocks))


def _shallow_blocks(name: str, dd: int, width: float, blocks: Sequence[int] | None) -> tuple[int, ...]:
    if blocks is not None:
        return tuple(blocks)
    candidates = paper_blocks().get((dd, None), ())
    if len(candidates) > 1:
        candidates = paper_blocks().get((dd, width), candidates)
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        options = " or ".join(f"R={_fmt_blocks(c)}" for c in candidates)
        raise ValueError(f"{name!r} is ambiguous: depth {dd:02d} is {options} in the paper; pass blocks=[...]")
    raise ValueError(
        f"the paper gives no stage counts for {name!r}; pass blocks= (four positive integers summing to {dd - 2})"
    )


def config_from_name(name: str, *, blocks: Sequence[int] | None = None) -> ModelConfig:
    """A registered name (e.g. 'squeezenext_23_2x') or a paper name, as a config."""
    if name in list_models():
        return ModelConfig(name=name, blocks=None if blocks is None else list(blocks))
    return parse_name(name, blocks=blocks)


def parse_name(name: str, *, blocks: Sequence[int] | None = None) -> ModelConfig:
    """Parse a paper name ('Shallow SqueezeNext-06-0.4x', 'SqueezeNext-23-2x', 'SqueezeNet-v1.1', ...).

    Depth DD alone may not fix the stage counts: the paper's own R from its tables is used where it is
    unique (for that width, if needed); otherwise pass `blocks=` (or write the name with ' (R=1,2,8,1)').
    """
    text = " ".join(name.split())
    if m := _SQUEEZENET.match(text):
        return ModelConfig(name="squeezenet_v1_" + m["version"][-1])
    m = _SQUEEZENEXT.match(text)
    if not m:
        raise ValueError(
            f"unknown model {name!r}; registered models: {', '.join(list_models())}; or a paper name such as "
            "'Shallow SqueezeNext-06-0.4x', 'SqueezeNext-23-2x', 'Modified SqueezeNext-23-1x', 'SqueezeNet-v1.0'"
        )
    family = _FAMILY[(m["kind"] or "").strip().lower()]
    dd, width = int(m["depth"]), check_width(float(m["width"]))
    if m["blocks"]:
        written = [int(b) for b in m["blocks"].replace(" ", "").split(",") if b]
        if blocks is not None and list(blocks) != written:
            raise ValueError(f"{name!r} says R={_fmt_blocks(written)} but {blocks=}")
        blocks = written
    if blocks is not None:
        blocks = check_blocks(list(blocks))
        if depth(blocks) != dd:
            raise ValueError(f"{blocks=} give depth {depth(blocks):02d}, not the {dd:02d} of {name!r}")
    if family == "shallow_squeezenext":
        blocks = _shallow_blocks(name, dd, width, blocks)
    elif blocks is None:
        key = m["depth"] + ("v5" if m["v5"] else "")
        if key not in SQUEEZENEXT_BLOCKS:
            raise ValueError(
                f"no known stage counts for {name!r}; known depths: {', '.join(SQUEEZENEXT_BLOCKS)}; pass blocks="
            )
        blocks = SQUEEZENEXT_BLOCKS[key]
    return ModelConfig(name=family, blocks=list(blocks), width=width)


def paper_name(cfg: ModelConfig) -> str:
    """The paper-style name of a config; ' (R=...)' is added where the depth alone would parse differently."""
    cfg = resolve_config(cfg)
    family = model_family(cfg.name)
    if family == "squeezenet":
        return "SqueezeNet-v1." + cfg.name[-1]
    blocks, width = tuple(cfg.blocks), round(cfg.width, 6)
    dd = depth(blocks)
    if family == "shallow_squeezenext":
        base = f"Shallow SqueezeNext-{dd:02d}-{width:g}x"
    else:
        prefix = "Modified SqueezeNext" if family == "modified_squeezenext" else "SqueezeNext"
        version = "v5" if blocks == SQUEEZENEXT_BLOCKS["23v5"] else ""
        base = f"{prefix}-{dd}{version}-{width:g}x"
    try:
        unambiguous = tuple(parse_name(base).blocks) == blocks
    except ValueError:
        unambiguous = False
    return base if unambiguous else f"{base} (R={_fmt_blocks(blocks)})"


def create_model(name: str, *, num_classes: int = 10, in_channels: int = 3, **overrides) -> nn.Module:
    """Build a model from a registered name or a paper name (e.g. 'SqueezeNext-23-2x').

    `overrides` set the builder's knobs (blocks, width, dropout, activation, inplace).
    """
    if name not in list_models():
        cfg = parse_name(name, blocks=overrides.pop("blocks", None))
        name, overrides = cfg.name, {**cfg.overrides(), **overrides}
    return build_registered(name, num_classes=num_classes, in_channels=in_channels, **overrides)
