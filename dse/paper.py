"""The paper's published figures, read from the one data file `dse/paper.yaml`."""

from __future__ import annotations

import functools
from pathlib import Path

import pandas as pd
import yaml

__all__ = ["PAPER_FILE", "load_paper", "paper_table", "TABLES"]

PAPER_FILE = Path(__file__).with_name("paper.yaml")
TABLES = ("1", "2", "3", "4", "5", "6", "7")


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
