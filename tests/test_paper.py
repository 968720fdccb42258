"""The published numbers in dse/paper.yaml agree with the paper's text."""

from pathlib import Path

import pytest

from dse.paper import TABLES, paper_table

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
