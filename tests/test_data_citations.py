"""Every data file that states a source also carries its key in the shared bibliography.

Chapters cite with ``{cite}`key``` and the data files the numbers come from carry the same
keys in a ``citation`` column (several keys separated by ``;``), so a reader can go from a
printed figure to the paper or spec sheet it came from.
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "cohw_utils" / "data"
BIB_KEYS = set(re.findall(r"@\w+\{([^,\s]+),", (ROOT / "references.bib").read_text()))
SOURCED = sorted(p for p in DATA.rglob("*.csv") if {"source", "citation"} & set(pd.read_csv(p, nrows=0).columns))


def test_the_sourced_files_are_found():
    names = {p.name for p in SOURCED}
    assert {"hardware.csv", "energy_per_op.csv", "published_mbu.csv", "vllm_paging.csv",
            "quant_reference.csv", "ivanov2021_bert.csv", "leiserson2020_table1.csv", "targets.csv",
            "proxy_criteria.csv", "runtime_formats.csv"} <= names


@pytest.mark.parametrize("path", SOURCED, ids=lambda p: str(p.relative_to(DATA)))
def test_every_sourced_row_cites_a_key_of_the_bibliography(path):
    table = pd.read_csv(path)
    assert "citation" in table.columns, f"{path.name} has sources but no citation column"
    cited = table["citation"].dropna().astype(str)
    assert len(cited) == len(table), f"{path.name}: rows without a citation key: {table.index[table['citation'].isna()].tolist()}"
    keys = {k.strip() for cell in cited for k in cell.split(";")}
    missing = keys - BIB_KEYS
    assert not missing, f"{path.name}: keys not in references.bib: {sorted(missing)}"
