"""The outcome-claim guard of Chapters 4.2b and 5 (cohw_utils.book.claims)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cohw_utils.book import claims
from cohw_utils.core.errors import CohwError

CHAPTERS = Path(__file__).resolve().parents[1] / "chapters"


def _parameters_cell(stem: str) -> dict:
    nb = json.loads((CHAPTERS / f"{stem}.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    namespace: dict = {}
    exec("".join(cell["source"]), namespace)  # the cell only assigns literals (and imports os)
    return {k: v for k, v in namespace.items() if k.isupper()}


@pytest.mark.parametrize("stem", sorted(claims.DEFAULTS))
def test_defaults_equal_the_notebooks_parameters_cell(stem):
    cell = _parameters_cell(stem)
    assert claims.edited_parameters(stem, cell) == ()
    assert set(cell) == set(claims.DEFAULTS[stem]) | set(claims.NEUTRAL[stem])


def test_an_edit_is_named_and_a_tuple_list_round_trip_is_not():
    ns = dict(claims.DEFAULTS["04c_quantization"])
    ns["LADDER_SHAPE"] = [11008, 4096]          # papermill passes tuples as lists
    assert claims.edited_parameters("04c_quantization", ns) == ()
    ns["METHODS"] = ["fp32"]
    del ns["CONTEXT"]
    assert claims.edited_parameters("04c_quantization", ns) == ("METHODS", "CONTEXT")


def test_claim_asserts_on_defaults_and_reports_on_edits(capsys):
    assert claims.claim(True, "x", ())
    with pytest.raises(AssertionError, match="default parameters: decode is faster"):
        claims.claim(False, "decode is faster", ())
    assert claims.claim(False, "decode is faster", ("SPILL",)) is False
    assert "does NOT hold with your parameters (SPILL)" in capsys.readouterr().out


def test_unknown_chapter_is_a_clear_error():
    with pytest.raises(CohwError, match="no guarded parameters for chapter '99_x'"):
        claims.edited_parameters("99_x", {})
