"""Systolic-array model: hand-derived cycle counts, a register-level simulation, SCALE-Sim."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cohw_utils.views import systolic
from cohw_utils.core.errors import CohwError
from cohw_utils.spine.trace import trace


@pytest.mark.parametrize("M,K,N,R,C,df,hand", [
    # WS, one fold: load R rows of weights (4), stream M rows skewed over R rows (4 + 4 - 1),
    # the last partial sums cross the C columns (4 - 1): 4 + 7 + 3 = 14.
    (4, 4, 4, 4, 4, "ws", 14),
    # OS, one fold: cell (i, j) does its k-th MAC at cycle i + j + k; last at (3, 3, 3) = 9.
    (4, 4, 4, 4, 4, "os", 10),
    # WS, K = 3 < R: one row fold, N = 6 > C: two column folds of 2*4 + 4 + 5 - 2 = 15.
    (5, 3, 6, 4, 4, "ws", 30),
    # OS, M = 5 > R: two row folds x two column folds of 3 + 4 + 4 - 2 = 9.
    (5, 3, 6, 4, 4, "os", 36),
    # decode GEMV on a 128 x 128 WS array: 32 x 32 folds of 2*128 + 128 + 1 - 2 = 383 cycles.
    (1, 4096, 4096, 128, 128, "ws", 1024 * 383),
    # prefill, 512 tokens, same weight: 1024 folds of 2*128 + 128 + 512 - 2 = 894 cycles.
    (512, 4096, 4096, 128, 128, "ws", 1024 * 894),
])
def test_cycles_match_hand_derivation(M, K, N, R, C, df, hand):
    assert systolic.cycles(M, K, N, R, C, df) == hand
    assert systolic.utilization(M, K, N, R, C, df) == pytest.approx(M * K * N / (R * C * hand))


def test_utilization_values_pinned():
    assert systolic.utilization(4, 4, 4, 4, 4, "ws") == pytest.approx(2 / 7)
    assert systolic.utilization(4, 4, 4, 4, 4, "os") == pytest.approx(0.4)
    decode = systolic.utilization(1, 4096, 4096, 128, 128, "ws")
    prefill = systolic.utilization(512, 4096, 4096, 128, 128, "ws")
    assert decode == pytest.approx(1 / 383, rel=1e-12)          # one row of work per 383-cycle fold
    assert prefill == pytest.approx(512 / 894, rel=1e-12)
    # mapping efficiency: no padding when the dimensions divide the array
    assert systolic.mapping_efficiency(512, 4096, 4096, 128, 128, "ws") == 1.0
    assert systolic.mapping_efficiency(5, 3, 6, 4, 4, "ws") == pytest.approx(90 / (16 * 2 * 5))


@pytest.mark.parametrize("M,K,N,R,C", [(4, 4, 4, 4, 4), (5, 3, 6, 4, 4), (7, 9, 13, 4, 8), (1, 10, 5, 4, 4),
                                       (9, 2, 3, 3, 2)])
@pytest.mark.parametrize("df", ["ws", "os"])
def test_simulation_multiplies_and_counts_the_model_cycles(M, K, N, R, C, df):
    rng = np.random.default_rng(M * 100 + K)
    a, b = rng.standard_normal((M, K)), rng.standard_normal((K, N))
    product, cycles = systolic.simulate_array(a, b, R, C, df)
    np.testing.assert_allclose(product, a @ b, atol=1e-12)
    assert cycles == systolic.cycles(M, K, N, R, C, df)


@pytest.mark.parametrize("M,K,N,R,C", [(4, 4, 4, 4, 4), (16, 40, 24, 8, 8), (1, 64, 64, 16, 16),
                                       (100, 20, 7, 8, 4), (7, 9, 13, 4, 8)])
@pytest.mark.parametrize("df", ["ws", "os"])
def test_model_matches_scalesim_compute_cycles(M, K, N, R, C, df):
    pytest.importorskip("scalesim")
    assert systolic.scalesim_cycles(M, K, N, R, C, df) == systolic.cycles(M, K, N, R, C, df)


@pytest.mark.parametrize("M,K,N,R,C,hand", [
    # one fold: nothing to overlap, the sequential count 2R + C + M - 2
    (4, 4, 4, 4, 4, 14),
    # M = 5 > R = 4, two column folds: 15 + max(4, 5) = 20 (sequential: 30)
    (5, 3, 6, 4, 4, 20),
    # M = 2 < R = 4: 3 x 3 = 9 folds, each further fold waits R = 4 cycles for its weights:
    # 2*4 + 3 + 2 - 2 + 8*4 = 43 (sequential 9 x 11 = 99)
    (2, 12, 9, 4, 3, 43),
    # decode GEMV on 128 x 128: 1024 folds, 383 + 1023 * 128 (the weight-load rate binds)
    (1, 4096, 4096, 128, 128, 383 + 1023 * 128),
    # prefill, 512 tokens: 894 + 1023 * 512 (the stream binds)
    (512, 4096, 4096, 128, 128, 894 + 1023 * 512),
])
def test_double_buffered_cycles_by_hand(M, K, N, R, C, hand):
    assert systolic.cycles(M, K, N, R, C, "ws", double_buffer=True) == hand
    # never slower than back-to-back folds, equal with one fold
    assert hand <= systolic.cycles(M, K, N, R, C, "ws")


def test_double_buffered_decode_is_bound_by_the_weight_load_rate():
    # M < R: utilization tends to M / R (one tile row per cycle into the array), not to M / (2R + C - 1)
    for m in (1, 2, 4, 8):
        u = systolic.utilization(m, 4096, 4096, 128, 128, "ws", double_buffer=True)
        assert u == pytest.approx(m * 1024 / (2 * 128 + 128 + m - 2 + 1023 * 128), rel=1e-12)
        assert m / 128 * 0.99 < u < m / 128
        assert systolic.utilization(m, 4096, 4096, 128, 128, "ws") == pytest.approx(
            m / (2 * 128 + 128 + m - 2), rel=1e-12)
    assert systolic.utilization(512, 4096, 4096, 128, 128, "ws", double_buffer=True) > 0.999


def test_schedule_is_the_closed_form():
    for M, R, F in ((1, 4, 6), (3, 4, 6), (4, 4, 6), (9, 4, 6), (128, 128, 5), (1, 128, 5)):
        load, start = systolic.ws_schedule(M, R, F)
        assert start == [R + f * max(R, M) for f in range(F)]
        assert load[0] == 0 and all(s >= l + R for l, s in zip(load, start))


@pytest.mark.parametrize("M,K,N,R,C", [(4, 4, 4, 4, 4), (5, 3, 6, 4, 4), (7, 9, 13, 4, 8), (1, 10, 5, 4, 4),
                                       (9, 2, 3, 3, 2), (2, 12, 9, 4, 3), (6, 16, 4, 4, 2)])
def test_double_buffered_simulation_multiplies_and_counts_the_formula(M, K, N, R, C):
    rng = np.random.default_rng(M * 10 + N)
    a, b = rng.standard_normal((M, K)), rng.standard_normal((K, N))
    product, cycles = systolic.simulate_array(a, b, R, C, "ws", double_buffer=True)
    np.testing.assert_allclose(product, a @ b, atol=1e-12)
    assert cycles == systolic.cycles(M, K, N, R, C, "ws", double_buffer=True)


@pytest.mark.parametrize("M,K,N,R,C", [(2, 12, 9, 4, 3), (6, 16, 4, 4, 2), (4, 8, 8, 4, 4)])
def test_a_schedule_one_cycle_tighter_breaks(M, K, N, R, C):
    # every load and stream start of the formula's schedule is tight: one cycle earlier and a PE
    # multiplies by a weight still in transit or another fold's, two loads share a column's port,
    # or two folds' activations meet at a row's input
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((M, K)), rng.standard_normal((K, N))
    tiles = list(systolic._ws_tiles(a, b, R, C))
    xs, ws = [t[4] for t in tiles], [t[5] for t in tiles]
    load, start = systolic.ws_schedule(M, R, len(tiles))
    assert systolic._simulate_ws_double_buffered(xs, ws, R, C, load, start)[2] == 0
    for f in range(1, len(tiles)):
        for which in ("load", "start"):
            ll, ss = list(load), list(start)
            (ll if which == "load" else ss)[f] -= 1
            assert systolic._simulate_ws_double_buffered(xs, ws, R, C, ll, ss)[2] > 0, (which, f)


def test_gemms_from_table_linear_bmm_conv_and_attention():
    torch.manual_seed(0)
    lin = nn.Linear(32, 48)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4)

    def fn(x, img, q, k, v):
        y = lin(x)                                        # (6, 32) @ (32, 48)
        z = torch.bmm(q[0], k[0].transpose(-1, -2))       # 2 heads x (5, 4) @ (4, 7)
        c = conv(img)                                     # im2col: M = 2*10*10, K = 8*9, N = 16
        g = grouped(img)                                  # 4 groups: M = 200, K = 2*9, N = 2
        return y, z, c, g

    x, img = torch.randn(6, 32), torch.randn(2, 8, 10, 10)
    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 3)
    with torch.no_grad():
        table = trace(fn, x, img, q, k, v, model=nn.ModuleDict({"lin": lin, "conv": conv, "g": grouped}))
    g = systolic.gemms_from_table(table)
    got = sorted(zip(g.kind, g.M, g.K, g.N, g["count"]))
    assert ("mm", 6, 32, 48, 1) in got
    assert ("bmm", 5, 4, 7, 2) in got
    assert ("conv (im2col)", 200, 72, 16, 1) in got
    assert ("conv (im2col)", 200, 18, 2, 4) in got
    assert (g.macs == g.M * g.K * g.N * g["count"]).all()
    # fused attention (the tracer's one-row record on meta): QK^T 5x4x7 and PV 5x7x3 per head
    qm, km, vm = (t.to("meta") for t in (q, k, v))
    with torch.no_grad():
        att = systolic.gemms_from_table(trace(F.scaled_dot_product_attention, qm, km, vm))
    assert sorted(zip(att.kind, att.M, att.K, att.N, att["count"])) == [
        ("attention PV", 5, 7, 3, 2), ("attention QK^T", 5, 4, 7, 2)]


def test_utilization_table_is_mac_weighted():
    import pandas as pd

    gemms = pd.DataFrame({"kind": ["mm", "mm"], "module": ["a", "b"], "M": [1, 512], "K": [4096, 4096],
                          "N": [4096, 4096], "count": [1, 1]})
    gemms["macs"] = gemms.M * gemms.K * gemms.N
    t = systolic.utilization_table({"x": gemms}, sizes=(128,), dataflows=("ws",))
    expected = gemms.macs.sum() / (128 * 128 * 1024 * (383 + 894))
    assert t.loc["x", "ws 128x128"] == pytest.approx(expected)
    db = systolic.utilization_table({"x": gemms}, sizes=(128,), double_buffer=True)
    cyc = (383 + 1023 * 128) + (894 + 1023 * 512)
    assert db.loc["x", "ws 128x128"] == pytest.approx(gemms.macs.sum() / (128 * 128 * cyc))
    assert db.loc["x", "os 128x128"] == systolic.utilization_table({"x": gemms}, sizes=(128,)).loc["x", "os 128x128"]


def test_bad_input_raises():
    with pytest.raises(CohwError, match="dataflow"):
        systolic.cycles(4, 4, 4, 4, 4, "is")
    with pytest.raises(CohwError, match="M must be a positive integer"):
        systolic.cycles(0, 4, 4, 4, 4)
    with pytest.raises(CohwError, match="needs a"):
        systolic.simulate_array(np.ones((2, 3)), np.ones((2, 3)), 2, 2)
    with pytest.raises(CohwError, match="only a weight-stationary array"):
        systolic.cycles(4, 4, 4, 4, 4, "os", double_buffer=True)
