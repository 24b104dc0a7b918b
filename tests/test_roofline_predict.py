"""Latency predictor: the efficiency model by hand, fitting it back, errors per group, figures."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
from matplotlib.figure import Figure

from cohw_utils.views import roofline
from cohw_utils.core.errors import CohwError
from cohw_utils.hardware import Hardware, get_hardware
from cohw_utils.views.roofline import EfficiencyModel
from cohw_utils.spine.trace import trace

# Round numbers so every time is hand-checkable: fp32 ridge = 10 FLOP/B.
CHIP = Hardware(name="toy", vendor="-", year=None, mem_bw=1e9, mem_bytes=None, llc_bytes=None,
                tdp_w=None, source="test", peak_flops={"fp32": 1e10, "bf16": 1e11})


def _table():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256, bias=False), nn.GELU(), nn.LayerNorm(256))
    rows = [trace(model, torch.randn(n, 256), model=model) for n in (16, 64, 256, 1024)]
    return pd.concat(rows, ignore_index=True)


def test_op_group():
    assert roofline.op_group("aten.mm.default", "contraction") == "gemm"
    assert roofline.op_group("aten.convolution.default", "contraction") == "conv"
    assert roofline.op_group("aten._scaled_dot_product_flash_attention_for_cpu.default", "contraction") == "attention"
    assert roofline.op_group("aten.scaled_dot_product_attention", "contraction") == "attention"
    assert roofline.op_group("aten.gelu.default", "element-wise") == "element-wise"


def test_ideal_model_is_op_times():
    t = _table()
    np.testing.assert_allclose(roofline.predict_times(t, CHIP)["time"], roofline.op_times(t, CHIP)["time"])


def test_prediction_by_hand():
    lin = nn.Linear(64, 64, bias=False)
    t = trace(lin, torch.randn(128, 64), model=lin)
    model = EfficiencyModel(compute={"gemm": 0.5}, bandwidth={"gemm": 0.25}, overhead_s={"gemm": 2e-6})
    pt = roofline.predict_times(t, CHIP, model)
    p = pt[pt.op == "aten.mm.default"].iloc[0]
    assert (pt[pt.op_class == "view"].time == 0).all()       # views cost nothing, not even overhead
    flops, moved = 2 * 128 * 64 * 64, 4 * (128 * 64 + 64 * 64 + 128 * 64)
    assert p.t_compute == pytest.approx(flops / (0.5 * 1e10))
    assert p.t_memory == pytest.approx(moved / (0.25 * 1e9))
    assert p.time == pytest.approx(2e-6 + max(flops / 0.5e10, moved / 0.25e9))
    assert p.bound == "memory" and p.group == "gemm"       # derating bandwidth moved it under the memory roof
    assert model.params("element-wise") == (1.0, 1.0, 0.0)  # unset groups: the ideal roofline
    assert list(model.table().index) == ["gemm"]


def test_fit_recovers_known_efficiencies_and_reports_errors():
    t = _table()
    truth = EfficiencyModel(compute={"gemm": 0.6, "element-wise": 0.3, "normalization": 0.2},
                            bandwidth={"gemm": 0.8, "element-wise": 0.4, "normalization": 0.5},
                            overhead_s={g: 5e-6 for g in ("gemm", "element-wise", "normalization")})
    t["time_s"] = roofline.predict_times(t, CHIP, truth)["time"].to_numpy()
    fit = roofline.fit_efficiency(t, CHIP)
    pred = roofline.predict_times(t, CHIP, fit)["time"].to_numpy()
    np.testing.assert_allclose(pred, t["time_s"], rtol=0.03)
    assert fit.params("gemm")[:2] == pytest.approx((0.6, 0.8), rel=0.03)  # the 16-row GEMM is memory-bound
    assert fit.params("element-wise")[1] == pytest.approx(0.4, rel=0.03)
    assert fit.params("normalization")[1] == pytest.approx(0.5, rel=0.03)
    assert fit.params("normalization")[0] == 1.0   # LayerNorm is never compute-bound: not identified, left at 1
    assert fit.overhead_s["gemm"] == pytest.approx(5e-6, rel=0.05)
    err = roofline.prediction_error(t, CHIP, fit)
    assert list(err.index) == ["gemm", "normalization", "element-wise", "all"]
    assert err.loc["all", "ops"] == 12 and (err["median_abs_err_%"] < 3).all()
    ideal = roofline.prediction_error(t, CHIP)               # the spec roofline is too fast
    assert (ideal["median_err_%"] < -20).all()


def test_prediction_error_by_hand():
    lin = nn.Linear(64, 64, bias=False)
    one = trace(lin, torch.randn(128, 64), model=lin)
    t = pd.concat([one[one.op == "aten.mm.default"]] * 3, ignore_index=True)
    ideal = roofline.predict_times(t, CHIP)["time"].to_numpy()
    t["time_s"] = ideal * np.array([1.0, 2.0, 4.0])           # errors 0%, -50%, -75%
    e = roofline.prediction_error(t, CHIP).loc["gemm"]
    assert e["median_abs_err_%"] == pytest.approx(50.0) and e["median_err_%"] == pytest.approx(-50.0)
    assert e["total_err_%"] == pytest.approx(100 * (3 - 7) / 7)


def test_bad_input_is_named():
    with pytest.raises(CohwError, match="profile_ops"):
        roofline.fit_efficiency(_table(), CHIP)
    with pytest.raises(CohwError, match="positive finite"):
        EfficiencyModel(compute={"gemm": 0.0})
    with pytest.raises(CohwError, match="overhead"):
        EfficiencyModel(overhead_s={"gemm": -1.0})
    t = _table().assign(time_s=0.0)
    with pytest.raises(CohwError, match="no timed ops"):
        roofline.fit_efficiency(t, CHIP)


def test_roofline_figures():
    t = _table()
    t["time_s"] = roofline.predict_times(t, CHIP)["time"].to_numpy() * 2
    t["achieved_flops"] = t["flops"] / t["time_s"]
    fig = roofline.fig_roofline(CHIP, points=t)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    chips = [get_hardware("A100-80GB"), get_hardware("H100-SXM"), CHIP, get_hardware("MI300X")]
    fig = roofline.fig_roofline(chips, points={"toy": t})
    assert sum(ax.get_visible() for ax in fig.axes) == 4
    assert isinstance(roofline.fig_prediction(t, CHIP), Figure)
    with pytest.raises(CohwError):
        roofline.fig_roofline([])
