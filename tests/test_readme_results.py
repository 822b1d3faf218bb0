"""The README's Results quote the CPU study's table: every figure is the study row's own, as measured."""

import re
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
TABLE = REPO / "experiments" / "results" / "lite_cpu" / "table.csv"
SETS = {"Kvasir": "Kvasir DSC", "ClinicDB": "CVC-ClinicDB DSC"}  # README column -> the study table's per-image Dice


def results_rows(readme: str) -> list[dict[str, str]]:
    """The Results table of the README, one dict per row keyed by its header."""
    section = readme.split("\n## Results\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def quoted(values: pd.Series) -> str:
    """One row's figure, or several seeds' mean with their range, as the README writes them."""
    if len(values) == 1:
        return f"{values.iloc[0]:.3f}"
    return f"{values.mean():.3f} ({values.min():.3f}-{values.max():.3f})"


def test_every_results_figure_is_the_study_tables():
    """Each README row names its study rows; where the study table has them, the README quotes their per-image
    Dice (seeds: mean and range), and where it has none the README gives no figure. Checked by editing one
    figure of the README and one value of table.csv: each made this test fail."""
    table = pd.read_csv(TABLE).set_index("run")
    rows = results_rows((REPO / "README.md").read_text())
    assert len(rows) >= 10
    for row in rows:
        names = re.findall(r"`([a-z0-9_]+)`", row["study rows"])
        assert names, f"README Results row {row['row'][:60]!r} names no study row"
        have = [n for n in names if n in table.index]
        for readme_col, table_col in SETS.items():
            cell = row[readme_col]
            if not have:
                assert not re.search(r"\d\.\d{3}", cell), f"{names}: no record in {TABLE.name}, but README says {cell}"
                continue
            assert have == names, f"{names}: only {have} in {TABLE.name}; quote all or none"
            assert cell == quoted(table.loc[names, table_col]), f"{names} {readme_col}: README {cell}"


def test_results_rows_are_read_from_the_section_alone():
    text = "x\n## Results\n\n| row | study rows | Kvasir |\n|---|---|---:|\n| a | `r` | 0.5 |\n\n## Next\n| no |"
    assert results_rows(text) == [{"row": "a", "study rows": "`r`", "Kvasir": "0.5"}]
    assert quoted(pd.Series([0.9, 0.8])) == "0.850 (0.800-0.900)"
    with pytest.raises(IndexError):
        results_rows("no results here")
