"""The ledger's multi-device rows under the parallelism model (Chapter 4.5, issue 17 item 5)."""
from __future__ import annotations

from collections import namedtuple

import numpy as np
import pandas as pd
import pytest

from cohw_utils.core.errors import CohwError
from cohw_utils.hardware import get_hardware
from cohw_utils.hardware.interconnects import get_interconnect
from cohw_utils.studies.parallel.plans import predict_plan
from cohw_utils.studies.validation import ledger as lg
from cohw_utils.studies.validation import multidevice as md
from cohw_utils.views.predictor import load_calibration

LEDGER = lg.load_ledger()


def _row(i: str) -> pd.Series:
    return LEDGER[LEDGER["id"] == i].iloc[0]


def test_plan_cells_parse_as_the_source_states_them():
    assert md.plan_of("tp=2") == (2, 1)
    assert md.plan_of("tp=4 (1 replica)") == (4, 1)
    assert md.plan_of("tp=4 x 16 replicas") == (4, 16)
    assert md.plan_of("tp=2 (multi-GPU mode not stated; post discusses tensor parallelism)") is None
    assert md.plan_of("model + sequence parallelism (degrees not stated)") is None


def test_gptfast_llama2_7b_tp2_row_is_predict_plans_tokens_per_s():
    """gpt-fast's Llama-2-7B at TP=2 on A100-80GB (batch 1, 5-token prompt, 200 new tokens, bf16):
    the ledger's prediction is predict_plan's tokens/s for those settings, to the bit, ideal and
    calibrated, and tokens/s = 200 / (TTFT + 199 TPOT)."""
    row = _row("gptfast_etc-019")
    assert row["covered"] and row["parallelism"] == "tp=2" and row["link"] == "nvlink3-a100"
    hw, link, cal = get_hardware("A100-80GB"), get_interconnect("nvlink3-a100"), load_calibration()
    for c in (cal, None):
        mine = md.plan_prediction(row, hw, link, c)
        plan = predict_plan("llama-2-7b", hw, link, tp=2, batch=1, input_len=5, output_len=200, dtype="bf16",
                            weight_fmt="bf16", calibration=c)
        assert mine.value == plan.tokens_per_s
        assert (mine.ttft_s, mine.tpot_s) == (plan.ttft_s, plan.tpot_s)
        assert mine.value == pytest.approx(200 / (mine.ttft_s + 199 * mine.tpot_s), rel=1e-12)
    err = md.multi_device_errors(LEDGER, cal, ["gptfast_etc-019"]).iloc[0]
    assert (err["tp"], err["dp"], err["devices"]) == (2, 1, 2)
    assert err["calibrated_ratio"] == pytest.approx(err["calibrated"] / 168.84)
    assert 0 < err["decode comm share"] < 1


def test_unstated_split_stays_uncovered_with_its_reason():
    r = _row("trtllm-068")  # TensorRT-LLM: '8xH200 = max TP/PP/DP config', the split not printed
    assert not r["covered"]
    assert r["why"] == ("8 devices (8xH200 'max TP/PP/DP config' (exact split not stated)): parallel split not "
                        "stated in the source")
    unstated = LEDGER[LEDGER["parallelism"].str.contains("multi-GPU mode not stated")]
    assert len(unstated) and unstated["why"].str.endswith("parallel split not stated in the source").all()
    Row = namedtuple("Row", "devices parallelism link")
    assert md.plan_coverage(Row(8, "tp=4", "")) == "8 devices (tp=4): tp x dp = 4 is not the row's 8 devices"
    assert md.plan_coverage(Row(64, "tp=4 x 16 replicas", "")) is None
    assert md.link_coverage(Row(2, "tp=2", "")) == "2 devices (tp=2): interconnect not stated (link column empty)"


def test_calibration_fit_ignores_multi_device_rows():
    multi_cal = LEDGER.loc[LEDGER["covered"] & (LEDGER["devices"] > 1) & (LEDGER["split"] == "calibration"), "id"]
    assert len(multi_cal), "there are covered multi-device calibration rows to be ignored"
    ids = lg.calibration_rows(LEDGER)
    assert not set(ids) & set(multi_cal)
    assert (LEDGER.set_index("id").loc[ids, "devices"] == 1).all()
    assert set(lg.pick_rows(LEDGER)) <= set(LEDGER.loc[LEDGER["devices"] == 1, "id"])
    assert set(lg.pick_rows(LEDGER, multi=True)) == set(LEDGER.loc[LEDGER["covered"] & (LEDGER["devices"] > 1), "id"])
    z = (np.zeros(1), np.zeros(0))
    fake = lg.RowTimes(pd.Series({"id": "gptfast_etc-021", "devices": 4.0}), None, z, z, z, z, (None, None))
    with pytest.raises(CohwError, match="one-chip rows only"):
        lg.fit_calibration([fake] * 5)
