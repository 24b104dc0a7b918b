"""Cost functions (:mod:`cohw_utils.spine.costfn`, :mod:`cohw_utils.spine.phase_costs`): exact against
direct traces at shapes the build never traced, for a hand-countable layer, a dense LLM, a
sliding-window LLM, a mixture of experts and the SD UNet; the disk cache; bad input."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from cohw_utils.core.counting import search_comparisons, sort_comparisons, sort_comparisons_array
from cohw_utils.core.errors import CohwError
from cohw_utils.hardware import get_hardware
from cohw_utils.spine import phase_costs
from cohw_utils.spine.analyze import analyze
from cohw_utils.spine.costfn import QUANTITIES, Variable, build_cost_function
from cohw_utils.spine.trace import trace
from cohw_utils.views.predictor import apply_weight_format, load_calibration, phase_seconds, sweep_seconds

GEMMA = "cohw_utils/data/configs/gemma-3-1b-it/config.json"
MIXTRAL = "cohw_utils/data/configs/mixtral-8x7b-v0.1"


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COHW_CACHE_DIR", str(tmp_path / "cache"))


def _traced(cf, point) -> set:
    return {p for b in cf.boxes for p in (*b.fitted, *b.checked)}


def _assert_matches(cf, point, table, quantities=QUANTITIES):
    """The function's exact table equals the direct trace row by row at ``point``."""
    assert tuple(point) not in _traced(cf, point), "pick a shape the build did not trace"
    mine = cf.table_at(point)
    assert len(mine) == len(table)
    assert list(mine["op"]) == list(table["op"])
    assert list(mine["input_shapes"]) == list(table["input_shapes"])
    for q in quantities:
        pd.testing.assert_series_equal(mine[q].astype(float), table[q].astype(float), check_names=False)
    got = cf.totals_exact(point)
    for q in quantities:
        assert got[q] == table.loc[table["costed"], q].sum()


def test_linear_layer_by_hand():
    lin = torch.nn.Linear(16, 32, device="meta")

    def at(p):
        x = torch.empty(p["batch"], p["seq_len"], 16, device="meta")
        with torch.no_grad():
            return trace(lin, x, model=lin)

    cf = build_cost_function(at, [Variable("batch"), Variable("seq_len", hi=512, degree=2)])
    assert cf.exact
    for b, t in ((7, 301), (1, 1), (64, 512)):
        tot = cf.totals_exact((b, t))
        assert tot["flops"] == 2 * b * t * 16 * 32  # FLOPs = 2 x MACs of the GEMM (bias add fused in addmm)
        assert tot["macs"] == b * t * 16 * 32
    vals = cf.totals(np.array([[3, 5], [9, 100]]), ("flops",))
    assert vals[:, 0].tolist() == [2 * 3 * 5 * 512, 2 * 9 * 100 * 512]


def test_dense_llm_prefill_exact_at_new_shapes():
    cf = phase_costs.phase_cost_function("llama-2-7b", "prefill", "fp16", scale="tiny")
    assert cf.exact
    for point in ((5, 77), (13, 1000), (1, 333)):
        ref = analyze("llama-2-7b", "prefill", batch=point[0], seq_len=point[1], dtype="fp16", scale="tiny").table
        _assert_matches(cf, point, ref)


def test_sliding_window_prefill_and_decode_exact_both_sides_of_the_window():
    for phase in ("prefill", "decode"):
        cf = phase_costs.phase_cost_function(GEMMA, phase, "fp16", scale="tiny")
        assert cf.exact, [(b.lo, b.note) for b in cf.boxes]
        assert any(b.lo[1] == 512 for b in cf.boxes)  # the window (512) starts a box
        for point in ((3, 300), (6, 700)):
            a = analyze(GEMMA, phase, batch=point[0], seq_len=point[1], dtype="fp16", scale="tiny")
            _assert_matches(cf, point, a.table)
            # the whole analysis, the measured cache (sliding layers capped at W) included
            got = phase_costs.cached_analysis(GEMMA, phase, batch=point[0], seq_len=point[1], dtype="fp16", scale="tiny")
            assert got == a.totals()
    # decode's cache reaches the window at context 512 = seq_len 511, one token before its attention
    # switches path (512): the builder splits that top value off as a box of its own
    assert any(b.lo[1] == b.hi[1] == 511 for b in cf.boxes)


def test_moe_decode_exact_including_the_routing_sort():
    cf = phase_costs.phase_cost_function(MIXTRAL, "decode", "fp16", scale="tiny")
    # tiny Mixtral: 4 experts, 2 per token -> every expert is touched from batch 2 on
    assert 2 in cf.variables[0].breakpoints and cf.exact
    for point in ((9, 411), (1, 100)):
        ref = analyze(MIXTRAL, "decode", batch=point[0], seq_len=point[1], dtype="fp16", scale="tiny").table
        _assert_matches(cf, point, ref)
    # the sort of the batch x 2 routed (token, expert) pairs: n log2 n comparisons, by formula
    box = cf.boxes[int(cf.box_index([(9, 411)])[0])]
    sorts = [k for k in box.kinds if k["op"].startswith("aten.sort")]
    assert sorts and all(k["derived"] == ["sort", 0] for k in sorts)
    tab = cf.table_at((9, 411))
    row = tab[tab["op"].str.startswith("aten.sort")].iloc[0]
    assert row["input_shapes"][0] == (18,) and row["flops"] == int(18 * math.log2(18))  # 75
    vals = cf.totals(np.array([[9, 411]]), ("flops",))
    assert vals[0, 0] == pytest.approx(float(cf.totals_exact((9, 411))["flops"]), rel=1e-12)


def test_moe_prefill_top6_of_64_exact():
    # DeepSeek-V2-Lite routes each token to 6 of 64 experts: log2(6) per element is irrational, so
    # neither the top-k nor the sort of tokens x 6 pairs is a polynomial; both come from their formula
    cf = phase_costs.phase_cost_function("deepseek-v2-lite", "prefill", "fp16", scale="tiny")
    assert cf.exact
    for point in ((3, 301), (11, 1234)):
        ref = analyze("deepseek-v2-lite", "prefill", batch=point[0], seq_len=point[1], dtype="fp16", scale="tiny").table
        _assert_matches(cf, point, ref)


def test_sort_and_search_counts_by_hand():
    assert sort_comparisons(12, 12) == 43  # 12 log2 12 = 43.02
    assert sort_comparisons(2 * 64, 64, 6) == int(128 * math.log2(6))  # top-6 of 64, two rows
    assert sort_comparisons(5, 1) == 5  # at least one comparison per element
    assert search_comparisons(10, 33) == 60  # ceil(log2 33) = 6 per query
    assert sort_comparisons_array(np.array([12.0]), np.array([12.0]), np.array([12.0]))[0] == 43


def test_sd_unet_step_exact_in_batch_and_image_size():
    cf = phase_costs.phase_cost_function("sd-1.5", "unet_step", "fp16", scale="tiny")
    assert cf.names == ("batch", "image_size") and cf.exact
    step = cf.variables[1].step
    point = (3, 7 * step)
    ref = analyze("sd-1.5", "unet_step", batch=3, image_size=7 * step, dtype="fp16", scale="tiny").table
    _assert_matches(cf, point, ref)


def test_disk_cache_round_trip_and_no_second_build(monkeypatch):
    cf = phase_costs.phase_cost_function("llama-2-7b", "decode", "fp16", scale="tiny")
    cached = phase_costs.load_cached("llama-2-7b", "decode", "fp16", scale="tiny")
    assert cached is not None
    pd.testing.assert_frame_equal(cached.table_at((4, 99)), cf.table_at((4, 99)))
    monkeypatch.setattr("cohw_utils.spine.costfn.build_cost_function",
                        lambda *a, **k: pytest.fail("built again despite the cache"))
    again = phase_costs.phase_cost_function("llama-2-7b", "decode", "fp16", scale="tiny")
    assert again.totals_exact((2, 10)) == cf.totals_exact((2, 10))
    assert phase_costs.load_cached("llama-2-7b", "decode", "bf16", scale="tiny") is None


def test_sweep_seconds_equals_phase_seconds_of_the_table():
    cf = phase_costs.phase_cost_function("llama-2-7b", "decode", "fp16", scale="tiny")
    hw, cal = get_hardware("H100-SXM"), load_calibration()
    pts = np.array([[1, 10], [16, 2000], [5, 333]])
    for fmt in ("fp16", "int4-wo-g128", "fp8-kv8"):
        fast = sweep_seconds(cf, pts, hw, cal, fmt)
        slow = [phase_seconds(apply_weight_format(cf.table_at(tuple(p)), fmt), hw, cal) for p in pts]
        np.testing.assert_allclose(fast, slow, rtol=1e-12)
    assert len(set(sweep_seconds(cf, pts, hw, cal))) == 3


def test_bad_points_name_the_range():
    cf = phase_costs.phase_cost_function("llama-2-7b", "decode", "fp16", scale="tiny")
    top = cf.variables[1].hi
    with pytest.raises(CohwError, match="outside this cost function's range"):
        cf.totals([[1, top + 1]])
    with pytest.raises(CohwError, match="outside"):
        cf.table_at((0, 5))
    with pytest.raises(CohwError, match="2 columns"):
        cf.totals([[1, 2, 3]])
    with pytest.raises(CohwError, match="no phase"):
        phase_costs.phase_variables("llama-2-7b", "unet_step")


def test_cli_sweep_writes_the_grid_and_refuses_bad_input(tmp_path, capsys):
    from cohw_utils.cli import EXIT_BAD_INPUT, main
    out = tmp_path / "grid.csv"
    assert main(["sweep", "tinyllama-1.1b", "--phase", "decode", "--batch", "1,3", "--seq-len", "16:48:16",
                 "--hardware", "H100-SXM", "--csv", str(out)]) == 0
    grid = pd.read_csv(out)
    assert len(grid) == 6 and grid["exact"].all() and (grid["step_ms"] > 0).all()
    row = grid[(grid["batch"] == 3) & (grid["seq_len"] == 32)].iloc[0]
    ref = analyze(phase_costs.resolve_model("tinyllama-1.1b"), "decode", batch=3, seq_len=32, dtype="fp16").table
    assert row["flops"] == ref.loc[ref["costed"], "flops"].sum()
    assert main(["sweep", "tinyllama-1.1b", "--batch", "0,2", "--seq-len", "16"]) == EXIT_BAD_INPUT
    assert main(["sweep", "tinyllama-1.1b", "--batch", "2"]) == EXIT_BAD_INPUT  # decode needs --seq-len
    err = capsys.readouterr().err
    assert "positive integers" in err and "--seq-len" in err


def test_cli_analyze_answers_from_the_cached_cost_function(capsys):
    from cohw_utils.cli import main
    args = ["analyze", "tinyllama-1.1b", "--batch", "3", "--seq-len", "40"]  # its first phase and own dtype
    assert main([*args, "--json"]) == 0  # nothing cached: a trace
    traced = capsys.readouterr().out
    assert main([*args, "--cost-function"]) == 0  # builds the function, answers from it
    assert "source: the phase's cached cost function" in capsys.readouterr().out
    assert main([*args, "--json"]) == 0  # now warm without the flag: the same JSON, byte for byte
    assert capsys.readouterr().out == traced
    assert main(["analyze", "tinyllama-1.1b", "--phase", "prefill", "--batch", "5", "--seq-len", "77"]) == 0
    assert "cached cost function" in capsys.readouterr().out  # a new shape, warm
    assert main(["analyze", "tinyllama-1.1b", "--phase", "decode", "--batch", "5", "--seq-len", "77"]) == 0
    assert "source: a trace on meta" in capsys.readouterr().out  # no decode function cached


def test_layer_prefill_formula_is_the_textbook_count():
    import sympy

    from cohw_utils.studies.performance import shape_costs
    lf = shape_costs.layer_formulas("llama-2-7b")
    B, T = sympy.symbols("B T", positive=True, integer=True)
    d, f = 4096, 11008  # Llama-2-7B: MHA (d_kv = d), gated MLP
    assert lf.config == {"hidden": d, "kv_dim": d, "intermediate": f}
    assert sympy.expand(lf.contraction - (2 * B * T * (4 * d * d + 3 * d * f) + 4 * B * T ** 2 * d)) == 0
    # causal attention: a flash kernel computes T(T+1)/2 of the T^2 scores
    assert sympy.expand(lf.contraction_effective - lf.contraction + 2 * B * T * (T - 1) * d) == 0
    # the formula is the function: equal to the exact totals of the layer's rows at a new shape
    tab = lf.cost_function.table_at((3, 777))
    layer = tab[tab["module"].str.startswith("model.layers.0.") & tab["costed"]]
    assert lf.flops.subs({B: 3, T: 777}) == layer["flops"].sum()
    with pytest.raises(CohwError, match="quantity must be one of"):
        lf.cost_function.formula("watts")


def test_formula_refuses_a_sorted_row():
    cf = phase_costs.phase_cost_function(MIXTRAL, "decode", "fp16", scale="tiny")
    with pytest.raises(CohwError, match="not a polynomial"):
        cf.formula("flops")
    assert cf.formula("bytes_read") != 0  # bytes of a sort are a polynomial
