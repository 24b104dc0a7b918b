"""The ledger of published measurements (data/ledger.csv) and the calibration stored beside it."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from cohw_utils.core.errors import DataFileError
from cohw_utils.studies.validation import ledger as lg
from cohw_utils.views.predictor import WEIGHT_FORMATS, load_calibration

ROOT = Path(__file__).resolve().parents[1]
LEDGER = lg.load_ledger()
BIB_KEYS = set(re.findall(r"^@\w+\{([^,]+),", (ROOT / "references.bib").read_text(), flags=re.M))


def test_ledger_size_sources_and_hardware():
    assert len(LEDGER) >= 40
    assert LEDGER["citation"].nunique() >= 6, "at least 6 independent sources"
    assert LEDGER["hardware"].nunique() >= 4
    assert {"AMD", "Google"} & set(LEDGER["vendor"]), "AMD or TPU rows"


def test_every_row_is_sourced_and_parses():
    missing = sorted(set(LEDGER["citation"]) - BIB_KEYS)
    assert not missing, f"citation keys not in references.bib: {missing}"
    for col in ("source", "table_figure", "evidence", "metric", "unit", "model", "hardware", "vendor"):
        assert (LEDGER[col].astype(str).str.strip() != "").all(), f"empty {col}"
    assert (LEDGER["value"] > 0).all() and (LEDGER["devices"].dropna() >= 1).all()
    assert not LEDGER.loc[LEDGER["devices"].isna(), "covered"].any()
    assert set(LEDGER["format"]) - {""} <= set(WEIGHT_FORMATS)
    assert LEDGER["id"].is_unique


def test_split_is_fixed_and_both_halves_are_used():
    assert set(LEDGER["split"]) == {"calibration", "heldout"}
    cov = LEDGER[LEDGER["covered"]]
    assert (cov["split"] == "calibration").sum() >= 4 and (cov["split"] == "heldout").sum() >= 4


def test_multi_device_rows_need_a_stated_split_and_unstated_rows_are_never_covered():
    before = lg.load_ledger(parallel=False)  # without the parallelism model: every multi-device row out
    multi = (before["devices"] > 1) & (before["task"] == "inference")
    assert not before.loc[before["devices"] > 1, "covered"].any()
    assert multi.any() and before.loc[multi, "why"].str.contains("needs the parallelism model").all()
    covered = LEDGER[LEDGER["covered"] & (LEDGER["devices"] > 1)]
    assert len(covered) >= 6, "the stated-TP rows on chips with a spec are covered"
    assert covered["parallelism"].str.fullmatch(r"tp=\d+").all() and (covered["link"] != "").all()
    assert not LEDGER.loc[LEDGER["parallelism"].str.contains("not stated"), "covered"].any()
    assert (before.loc[before["devices"] == 1, "covered"] == LEDGER.loc[LEDGER["devices"] == 1, "covered"]).all()
    assert LEDGER.loc[LEDGER["task"] == "training", "why"].str.contains("training predictor").all()
    no_batch = LEDGER["batch"].isna() & (LEDGER["devices"] == 1)
    assert not LEDGER.loc[no_batch, "covered"].any()


def test_stored_calibration_was_fitted_on_todays_calibration_split():
    """Editing the ledger without refitting (`bench_ledger.py --fit --write`) fails here."""
    cal = load_calibration()
    expected = LEDGER.loc[LEDGER["covered"] & (LEDGER["devices"] == 1) & (LEDGER["split"] == "calibration"), "id"].tolist()
    assert lg.calibration_rows(LEDGER) == expected
    assert list(cal.fit["rows"]) == expected
    assert "*" in cal.params


def test_bad_ledger_rows_get_a_clear_error(tmp_path):
    bad = LEDGER.drop(columns=["covered", "why"]).head(3).copy()
    bad.loc[0, "split"] = "test"
    path = tmp_path / "ledger.csv"
    bad.to_csv(path, index=False)
    with pytest.raises(DataFileError, match="split other than calibration / heldout"):
        lg.load_ledger(str(path))
    bad.loc[0, "split"] = "calibration"
    bad.loc[1, "id"] = bad.loc[0, "id"]
    bad.to_csv(path, index=False)
    with pytest.raises(DataFileError, match="ids repeat"):
        lg.load_ledger(str(path))


def test_peers_table_is_sourced():
    peers = lg.load_peers()
    assert len(peers) >= 3
    assert not sorted(set(peers["citation"]) - BIB_KEYS)


def test_one_covered_row_end_to_end():
    """The first covered row: traced, predicted, and its ratio is the prediction over the value."""
    row = LEDGER[LEDGER["covered"]].iloc[0]
    rt = lg.row_times(row)
    cal = load_calibration()
    err = lg.ledger_errors(LEDGER[LEDGER["id"] == row["id"]], {row["id"]: rt}, cal)
    assert len(err) == 1
    e = err.iloc[0]
    assert e["calibrated"] == pytest.approx(lg.predicted_value(rt, cal.for_vendor(rt.hw.vendor)))
    assert e["calibrated_ratio"] == pytest.approx(e["calibrated"] / row["value"])
    assert e["regime"] in ("prefill", "decode")
