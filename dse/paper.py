"""The paper's published figures, read from the one data file `dse/paper.yaml`, and where its model sizes
contradict each other (so cannot be matched)."""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import yaml

__all__ = ["PAPER_FILE", "load_paper", "paper_table", "TABLES", "size_contradictions", "size_comparable", "size_note"]

PAPER_FILE = Path(__file__).with_name("paper.yaml")
TABLES = ("1", "2", "3", "4", "5", "6", "7")
# 'Shallow SqueezeNext-06-0.4x-v1' -> family 'Shallow SqueezeNext', depth 06, width 0.4, version v1 ('Baseline ' dropped).
_NAME = re.compile(
    r"^(?:Baseline )?(?P<family>.+?)-(?P<depth>\d{2})-(?P<width>\d+(?:\.\d+)?)x?(?:-(?P<version>v\d+))?$"
)


@functools.cache
def load_paper() -> dict:
    """The raw contents of `dse/paper.yaml` (tables keyed by their number as a string)."""
    with PAPER_FILE.open() as f:
        return yaml.safe_load(f)


def paper_table(table: int | str) -> pd.DataFrame:
    """One published table as a frame: model, acc, size_mb, speed_s and the table's own knob columns."""
    key = str(table)
    tables = load_paper()["tables"]
    if key not in tables:
        raise ValueError(f"{table=} is not a table of the paper; allowed: {', '.join(TABLES)}")
    frame = pd.DataFrame(tables[key]["rows"])
    frame.insert(0, "table", key)
    frame["dataset"] = load_paper()["dataset"][key]
    return frame


def _sized_rows() -> list[dict]:
    """Every published size whose row name gives a family, depth and width, once per table (Table 4 repeats
    its model for each dropout), with its table and dataset."""
    paper, rows, seen = load_paper(), [], set()
    for table in TABLES:
        for row in paper["tables"][table]["rows"]:
            m = _NAME.match(row["model"])
            key = (table, row["model"], row["size_mb"], str(row.get("blocks")), row.get("optimizer"))
            if m and key not in seen:
                seen.add(key)
                rows.append(
                    {
                        **row,
                        "table": table,
                        "dataset": paper["dataset"][table],
                        "family": m["family"],
                        "version": m["version"],
                        "depth": m["depth"],
                        "width": float(m["width"]),
                    }
                )
    return rows


def _contradict(a: dict, b: dict) -> bool:
    """Two published sizes of one architecture family, depth, stated R, dataset and optimizer that cannot both
    be true: the same width at two sizes, or the wider model no larger (a model grows with its width)."""
    same = ("family", "version", "depth", "dataset")
    if any(a[k] != b[k] for k in same) or any(a.get(k) != b.get(k) for k in ("blocks", "optimizer")):
        return False
    narrow, wide = sorted((a, b), key=lambda r: r["width"])
    if narrow["width"] == wide["width"]:
        return narrow["size_mb"] != wide["size_mb"]
    return wide["size_mb"] <= narrow["size_mb"]


@functools.cache
def size_contradictions() -> tuple[tuple[dict, dict], ...]:
    """Pairs of the paper's rows (narrower first) whose sizes contradict each other, in the paper's order."""
    pairs = itertools.combinations(_sized_rows(), 2)
    return tuple(tuple(sorted(pair, key=lambda r: r["width"])) for pair in pairs if _contradict(*pair))


def _family(model: str) -> str | None:
    m = _NAME.match(model)
    return m["family"] if m else None


def size_comparable(model: str) -> bool:
    """False for a paper row of a family whose published sizes contradict each other: no size of it can be
    matched, so a difference to ours would mislead."""
    return _family(model) not in {a["family"] for a, _ in size_contradictions()}


def _pair_text(narrow: dict, wide: dict) -> str:
    where = f"Table {narrow['table']}" + ("" if narrow["table"] == wide["table"] else f" and Table {wide['table']}")
    if narrow["width"] == wide["width"]:
        return f"{where} list {narrow['model']} at {narrow['size_mb']:g} MB and at {wide['size_mb']:g} MB"
    verb = "lists" if narrow["table"] == wide["table"] else "list"
    return (
        f"{where} {verb} {wide['model']} at {wide['size_mb']:g} MB, no larger than the narrower "
        f"{narrow['model']} at {narrow['size_mb']:g} MB, though a model grows with its width"
    )


def size_note(tables: Sequence[str] = TABLES) -> str:
    """One line: why the paper's sizes of some families cannot be matched, naming a contradiction from `tables`
    (else the first), and how many more there are; '' when the paper's sizes are consistent."""
    pairs = size_contradictions()
    if not pairs:
        return ""
    shown = next((p for p in pairs if {p[0]["table"], p[1]["table"]} <= set(map(str, tables))), pairs[0])
    families = " and ".join(sorted({a["family"] for a, _ in pairs}))
    where = ", ".join(sorted({r["table"] for p in pairs for r in p}))
    return (
        f"The paper's {families} sizes contradict each other, so ours cannot match them and are not compared "
        f"('not comparable'): {_pair_text(*shown)} ({len(pairs)} such pairs in Tables {where})."
    )
