"""The published numbers in dse/paper.yaml agree with the paper's text."""

from pathlib import Path

import pytest

import dse.paper
from dse.paper import TABLES, paper_table, size_comparable, size_contradictions, size_note

PAPER = Path(__file__).resolve().parents[2] / "shared" / "paper" / "shallow-squeezenext-2020.txt"


def table_lines(text: str, number: str) -> list[list[str]]:
    """The tab-separated rows that follow 'Table N.' in the paper text."""
    start = text.index(f"\nTable {number}.")
    block = text[start:].split("\nModel\t", 1)[1]
    rows = []
    for line in block.splitlines()[1:]:
        if "\t" not in line:
            if rows:
                break
            continue
        rows.append(line.split("\t"))
    return rows


@pytest.mark.skipif(not PAPER.exists(), reason=f"the paper text is not at {PAPER}")
@pytest.mark.parametrize("number", TABLES)
def test_published_numbers_match_paper_text(number):
    lines = table_lines(PAPER.read_text(), number)
    ours = paper_table(number)
    assert len(lines) == len(ours)
    for fields, (_, row) in zip(lines, ours.iterrows()):
        assert fields[0].strip() == row["model"]
        assert float(fields[1]) == row["acc"]
        size = row["as_printed"] if isinstance(row.get("as_printed"), str) else row["size_mb"]
        assert fields[2].strip() == size or float(fields[2]) == size
        assert int(fields[3]) == row["speed_s"]


def test_unknown_table_is_refused():
    with pytest.raises(ValueError, match=r"table=8 is not a table of the paper; allowed: 1, 2, 3"):
        paper_table(8)


def test_the_papers_shallow_squeezenext_sizes_contradict_each_other():
    narrow, wide = size_contradictions()[0]
    assert (narrow["table"], narrow["model"], narrow["size_mb"]) == ("1", "Shallow SqueezeNext-06-0.2x", 0.273)
    assert (wide["table"], wide["model"], wide["size_mb"]) == ("1", "Shallow SqueezeNext-06-0.4x", 0.272)
    same = [(a["size_mb"], b["size_mb"]) for a, b in size_contradictions() if a["model"] == b["model"]]
    assert same == [(0.273, 0.296)]  # 06-0.2x in Tables 1 and 3
    assert {a["family"] for pair in size_contradictions() for a in pair} == {"Shallow SqueezeNext"}
    assert not size_comparable("Shallow SqueezeNext-12-1.0x") and not size_comparable("Shallow SqueezeNext-09-0.5")
    assert size_comparable("Baseline SqueezeNet-v1.0") and size_comparable("SqueezeNext-23-2x")
    note = size_note(["3"])
    assert "\n" not in note and note.startswith("The paper's Shallow SqueezeNext sizes contradict each other")
    assert (
        "Table 3 lists Shallow SqueezeNext-06-0.3x at 0.196 MB, no larger than the narrower Shallow SqueezeNext-06-0.2x at 0.296 MB"
        in note
    )


def test_consistent_sizes_give_no_note(monkeypatch):
    rows = [
        {"model": f"Shallow SqueezeNext-06-{w}x", "acc": 80.0, "size_mb": mb, "speed_s": 4}
        for w, mb in ((0.2, 0.1), (0.4, 0.2))
    ]
    fake = {
        "dataset": dict.fromkeys(TABLES, "cifar10"),
        "tables": {t: {"rows": rows if t == "1" else []} for t in TABLES},
    }
    monkeypatch.setattr(dse.paper, "load_paper", lambda: fake)
    size_contradictions.cache_clear()
    try:
        assert size_contradictions() == () and size_note() == "" and size_comparable("Shallow SqueezeNext-06-0.2x")
    finally:
        size_contradictions.cache_clear()
