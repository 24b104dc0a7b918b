"""Roofline times and the proxy-priority ranking."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn as nn

from cohw_utils.studies.proxies import ranking as priority
from cohw_utils.views import roofline
from cohw_utils.core.errors import CohwError
from cohw_utils.hardware import Hardware
from cohw_utils.spine.trace import trace

# A made-up chip with round numbers so every time below is hand-checkable.
CHIP = Hardware(name="toy", vendor="-", year=None, mem_bw=1e9, mem_bytes=None, llc_bytes=None,
                tdp_w=None, source="test", peak_flops={"fp32": 1e10, "bf16": 1e11})


def test_roofline_times_by_hand():
    lin = nn.Linear(64, 64, bias=False)
    x = torch.randn(128, 64)
    t = roofline.op_times(trace(lin, x, model=lin), CHIP)
    mm = t[t.op == "aten.mm.default"].iloc[0]
    flops, moved = 2 * 128 * 64 * 64, 4 * (128 * 64 + 64 * 64 + 128 * 64)
    assert mm.t_compute == pytest.approx(flops / 1e10)
    assert mm.t_memory == pytest.approx(moved / 1e9)
    assert mm.time == pytest.approx(max(flops / 1e10, moved / 1e9))
    assert mm.bound == "compute"  # intensity 12.8 FLOP/B is above the fp32 ridge of 10

def test_roofline_bound_follows_ridge_point():
    # intensity of a square fp32 GEMM of size n is n/6 FLOP/B; ridge of CHIP in fp32 is 10
    for n, bound in ((24, "memory"), (256, "compute")):
        lin = nn.Linear(n, n, bias=False)
        t = roofline.op_times(trace(lin, torch.randn(n, n), model=lin), CHIP)
        assert t[t.op == "aten.mm.default"].bound.item() == bound, n
    # bf16 contractions use the bf16 peak, element-wise ops the fp32 (vector) peak
    a = torch.randn(64, 64, dtype=torch.bfloat16)
    t = roofline.op_times(trace(lambda: (a @ a) + 1), CHIP)
    assert t.iloc[0].t_compute == pytest.approx(2 * 64**3 / 1e11)
    assert t.iloc[1].t_compute == pytest.approx(64 * 64 / 1e10)
    s = roofline.roofline_summary(trace(lambda: a + 1), CHIP)
    assert s["memory_bound_share"] == 1.0
    with pytest.raises(CohwError, match="efficiency"):
        roofline.op_times(trace(lambda: a + 1), CHIP, efficiency=0)


def test_rank_by_hand_and_reasoning():
    f = pd.DataFrame({"trend": [5, 1], "demand": [3, 5], "novelty": [0.5, 0.0],
                      "memory_bound": [1.0, 0.0]}, index=["a", "b"])
    r = priority.rank(f, {"trend": 1, "demand": 1, "novelty": 1, "memory_bound": 1})
    # a: (1 + 0.5 + 0.5 + 1) / 4 = 0.75; b: (0 + 1 + 0 + 0) / 4 = 0.25
    assert r.loc["a", "score"] == pytest.approx(0.75) and r.loc["b", "score"] == pytest.approx(0.25)
    assert list(r.index) == ["a", "b"] and r.loc["a", "rank"] == 1
    assert r.loc["b", "reasoning"].startswith("score 0.25: demand 1.00")
    # weights change the order
    r = priority.rank(f, {"demand": 1})
    assert list(r.index) == ["b", "a"]


def test_bad_weights_are_named():
    f = pd.DataFrame({"trend": [5], "demand": [3], "novelty": [0.5], "memory_bound": [1.0]}, index=["a"])
    with pytest.raises(CohwError, match="unknown criteria.*speed"):
        priority.rank(f, {"speed": 1})
    with pytest.raises(CohwError, match="not all zero"):
        priority.rank(f, {"trend": 0})
    with pytest.raises(CohwError, match=">= 0"):
        priority.rank(f, {"trend": -1, "demand": 2})


def test_novelty_and_op_sets():
    x = torch.randn(4, 4)
    base = priority.op_set(trace(lambda: (x @ x).relu()))
    assert base == {"aten.mm", "aten.relu"}
    new = priority.op_set(trace(lambda: (x @ x).relu().cumsum(0).sort(0)))
    nov = priority.novelty({"resnet-50": base, "vit-b-16": base, "w": new})
    assert nov["w"] == pytest.approx(2 / 4) and nov["resnet-50"] == 0
    with pytest.raises(CohwError, match="vit-b-16"):
        priority.novelty({"resnet-50": base})


def test_judgements_file_is_complete():
    j = priority.load_judgements()
    assert {"llama-2-70b", "sd-1.5", "nerfacto", "resnet-50", "vit-b-16", "dreamfusion-sd"} <= set(j.index)
    assert j["source"].str.len().min() > 10 and j["trend"].between(1, 5).all()
