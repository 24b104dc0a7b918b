"""The co-design view (Chapter 5, ``cohw_utils.studies.codesign``): reproduces the roofline and
energy models it views, places bytes in tiers as stated, prices designs as stated, and finds
Pareto fronts correctly."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cohw_utils.studies.codesign import accelerator as acc
from cohw_utils.studies.codesign import generations, op_times, pareto, placement, power, proxy_phases, sweep, what_if
from cohw_utils.studies.codesign.phases import PreparedPhase, prepare
from cohw_utils.views import energy_model as energy
from cohw_utils.views import roofline
from cohw_utils.spine.analyze import Analysis, analyze
from cohw_utils.core.errors import CohwError
from cohw_utils.hardware import get_hardware
from cohw_utils.spine.trace import COLUMNS

H100 = get_hardware("H100-SXM")
TABLE = energy.EnergyTable.load("7nm-hbm2e")


@pytest.fixture(scope="module")
def vit():
    return analyze("vit-b-16", "forward", dtype="fp16")  # 173 MB of fp16 weights: not resident in 50 MB


@pytest.fixture(scope="module")
def decode():
    return analyze("llama-2-7b", "decode", seq_len=128)


@pytest.fixture(scope="module")
def nerf():
    return analyze("vanilla-nerf", "render", rays=256, dtype="fp32")  # 4 MB of weights: resident


# ---------------------------------------------------------------------------- the view is exact
@pytest.mark.parametrize("fixture", ["vit", "decode"])
def test_h100_design_reproduces_roofline_summary_and_energy(fixture, request):
    a = request.getfixturevalue(fixture)
    ref = acc.from_hardware("H100-SXM")
    r = sweep.evaluate_designs(ref, prepare(a), TABLE, quantize=False).iloc[0]
    assert r.time_s == pytest.approx(roofline.roofline_summary(a.table, H100)["time_s"], rel=1e-12)
    e = energy.workload_energy(TABLE, energy.op_roles(a), energy.ReuseModel(), H100)
    assert e["weights_resident"] is False
    assert r.energy_J == pytest.approx(e["total_J"], rel=1e-12)
    # the per-op path calls roofline.op_times itself and agrees op by op
    ops = op_times.design_op_times(ref, a)
    ref_ops = roofline.op_times(a.table, H100)
    assert np.allclose(ops["time"].to_numpy(), np.nan_to_num(ref_ops["time"].to_numpy()), rtol=1e-12, atol=0)


def test_resident_weights_read_at_sram_speed_and_priced_as_buffer(nerf):
    ref = acc.from_hardware("H100-SXM")
    ph = prepare(nerf)
    r = sweep.evaluate_designs(ref, ph, TABLE, quantize=False).iloc[0]
    assert r.resident
    roles = energy.op_roles(nerf)
    e = energy.workload_energy(TABLE, roles, energy.ReuseModel(onchip_bytes=ref.sram_bytes), H100)
    assert e["weights_resident"] is True
    assert r.energy_J == pytest.approx(e["total_J"], rel=1e-12)
    t_c = np.nan_to_num(roofline.op_times(nerf.table, H100)["t_compute"].to_numpy())
    w = roles.weight_read
    act = roles.act_read + roles.written
    by_hand = np.maximum.reduce([t_c, w / ref.sram_bw, act / ref.hbm_bw]).sum()
    assert r.time_s == pytest.approx(by_hand, rel=1e-12)
    assert r.time_s < roofline.roofline_summary(nerf.table, H100)["time_s"]


@pytest.mark.parametrize("quantize", [False, True])
def test_sweep_equals_per_op_path_on_varied_designs(decode, vit, quantize):
    designs = [
        acc.from_hardware("H100-SXM"),
        acc.make_accelerator("small-hbm", 500, hbm_gb=8, hbm_tbs=2, sram_mb=16, slow="LPDDR5X"),
        acc.make_accelerator("int4", 700, hbm_gb=80, hbm_tbs=4, sram_mb=512, formats=("fp8", "int8", "int4")),
        acc.make_accelerator("tiny-hbm", 300, hbm_gb=4, hbm_tbs=1, sram_mb=8),     # spills over the link
        acc.sram_only(sram_gb=2.0),
    ]
    try:
        import cohw_utils.views.systolic  # noqa: F401
        designs.append(acc.make_accelerator("array", 1000, hbm_gb=80, hbm_tbs=3, sram_mb=64, matrix_unit=(128, 128)))
    except ImportError:
        pass
    phases = [prepare(decode), prepare(vit)]
    res = sweep.evaluate_designs(designs, phases, TABLE, quantize=quantize)
    for d in designs:
        for p in phases:
            row = res[(res.design == d.name) & (res.phase == p.label)].iloc[0]
            ops = op_times.design_op_times(d, p, quantize=quantize)
            assert row.time_s == pytest.approx(ops["time"].sum(), rel=1e-9), (d.name, p.label)
            shares = ops.groupby("bound")["time"].sum()
            assert row.binding == shares.idxmax()


def test_matrix_unit_slows_small_m_contractions(decode):
    pytest.importorskip("cohw_utils.views.systolic")
    p = prepare(decode)
    ideal = acc.make_accelerator("ideal", 1000, 80, 3.35, 50)
    array = ideal.replace(name="128x128", matrix_unit=(128, 128))
    t_ideal = op_times.design_op_times(ideal, p)
    t_arr = op_times.design_op_times(array, p)
    mm = (p.table["op"] == "aten.mm.default").to_numpy()
    # decode at batch 1: M = 1, so even double-buffered a weight-stationary 128x128 array waits on
    # its weight loads (128 cycles per tile for one row): utilization about 1/128
    assert (t_arr["t_compute"].to_numpy()[mm] > 100 * t_ideal["t_compute"].to_numpy()[mm]).all()
    assert (t_arr["t_compute"].to_numpy()[mm] < 140 * t_ideal["t_compute"].to_numpy()[mm]).all()
    assert t_arr["time"].sum() >= t_ideal["time"].sum()


def test_efficiency_model_path_matches_predict_times(decode):
    if not hasattr(roofline, "EfficiencyModel"):
        pytest.skip("roofline has no EfficiencyModel")
    m = roofline.EfficiencyModel(compute={"gemm": 0.5}, bandwidth={"gemm": 0.8, "element-wise": 0.6},
                                 overhead_s={"gemm": 2e-6, "element-wise": 1e-6})
    ref = acc.from_hardware("H100-SXM")
    p = prepare(decode)
    ops = op_times.design_op_times(ref, p, efficiency=m)
    pred = roofline.predict_times(decode.table, H100, m)
    assert ops["time"].sum() == pytest.approx(np.nan_to_num(pred["time"].to_numpy()).sum(), rel=1e-12)
    r = sweep.evaluate_designs(ref, p, TABLE, quantize=False, efficiency=m).iloc[0]
    assert r.time_s == pytest.approx(ops["time"].sum(), rel=1e-9)


# ---------------------------------------------------------------------------- tiers by hand
def _one_gemm_phase(weight_footprint: float) -> Analysis:
    """A decode 'phase' of one Linear mm (4096 x 4096 fp16 weight) whose model has
    ``weight_footprint`` bytes of weights."""
    k = 4096
    row = {"op": "aten.mm.default", "module": "model.layers.0.mlp.up_proj", "module_class": "Linear",
           "phase": "decode", "pass": "forward", "op_class": "contraction",
           "input_shapes": ((1, k), (k, k)), "output_shapes": ((1, k),), "dtype": "float16",
           "flops": 2 * k * k, "macs": k * k, "bytes_read": (k + k * k) * 2, "bytes_written": k * 2,
           "intensity": 0.0, "costed": True}
    table = pd.DataFrame([row], columns=COLUMNS)
    return Analysis(workload="llama-2-7b", phase="decode", scale="full", device="meta", dtype="fp16", batch=1,
                    seq_len=512, parameters=int(weight_footprint // 2), weight_bytes=int(weight_footprint),
                    kv_bytes_per_token=None, units=1, unit_name="token", table=table)


def test_spill_time_by_hand():
    a = _one_gemm_phase(100e9)                   # 100 GB of weights, 80 GiB (85.9 GB) of HBM: 14% streams from LPDDR5X
    d = acc.make_accelerator("t", 1000, hbm_gb=80, hbm_tbs=4, sram_mb=32, slow="LPDDR5X")
    r = sweep.evaluate_designs(d, prepare(a), TABLE, quantize=False).iloc[0]
    w = 4096 * 4096 * 2
    act = 4096 * 2 * 2
    in_hbm = 80 * 2**30 / 100e9
    t_hbm = (in_hbm * w + act) / 4e12
    t_slow = (1 - in_hbm) * w / 450e9
    t_comp = 2 * 4096 * 4096 / 1000e12
    assert r.time_s == pytest.approx(max(t_hbm, t_slow, t_comp), rel=1e-12)
    assert r.time_s == pytest.approx((1 - in_hbm) * w / 450e9, rel=1e-12)
    assert r.binding == "slow tier" and not r.fits and r.spilled_bytes == pytest.approx(100e9 - 80 * 2**30)
    assert r.bytes_slow == pytest.approx((1 - in_hbm) * w) and r.bytes_hbm == pytest.approx(in_hbm * w + act)
    # no slow tier: the same 14% goes over the 63 GB/s host link
    r2 = sweep.evaluate_designs(d.replace(name="t2", slow_bytes=0.0, slow_bw=0.0), prepare(a), TABLE,
                         quantize=False).iloc[0]
    assert r2.time_s == pytest.approx((1 - in_hbm) * w / 63e9, rel=1e-12) and r2.binding == "link"
    # energy: the spilled bytes cost the data file's DRAM figure instead of HBM's
    pj = sweep._tier_pj(TABLE)
    fits = sweep.evaluate_designs(d.replace(name="big", hbm_bytes=200e9), prepare(a), TABLE, quantize=False).iloc[0]
    assert r.energy_J - fits.energy_J == pytest.approx((1 - in_hbm) * w * (pj[2] - pj[1]) * 1e-12, rel=1e-9)


def test_placement_policies():
    fw, fkv, res = placement.placement(100, 30, sram=10, hbm=80, slow=100, spill="weights")
    assert np.allclose(fkv, [0, 1, 0, 0]) and np.allclose(fw, [0, 0.5, 0.5, 0]) and not res
    fw, fkv, res = placement.placement(100, 30, sram=10, hbm=80, slow=100, spill="kv")
    assert np.allclose(fw, [0, 0.8, 0.2, 0]) and np.allclose(fkv, [0, 0, 1, 0])
    fw, fkv, res = placement.placement(5, 30, sram=10, hbm=80, slow=0, spill="weights")
    assert res and np.allclose(fw, [1, 0, 0, 0]) and np.allclose(fkv, [0, 1, 0, 0])
    # SRAM-only: the SRAM is main memory. Weights that all fit are placed first (resident) ...
    fw, fkv, res = placement.placement(30, 10, sram=35, hbm=0, slow=0, spill="weights")
    assert res and np.allclose(fw, [1, 0, 0, 0]) and np.allclose(fkv, [0.5, 0, 0, 0.5])
    # ... otherwise the KV cache goes first and 25 of 40 weight bytes fit, 15 go over the link
    fw, fkv, res = placement.placement(40, 10, sram=35, hbm=0, slow=0, spill="weights")
    assert not res and np.allclose(fkv, [1, 0, 0, 0]) and np.allclose(fw, [25 / 40, 0, 0, 15 / 40])
    with pytest.raises(CohwError, match="spill"):
        placement.placement(1, 1, 1, 1, 0, spill="activations")


def test_prepare_kv_footprint_and_in_place_append(decode):
    # the in-place what-if matters for transformers' DynamicCache (torch.cat of the whole cache)...
    dynamic = analyze("llama-2-7b", "decode", seq_len=128, cache="dynamic")
    eager = prepare(dynamic)
    inplace = prepare(dynamic, kv_in_place=True)
    assert eager.kv_bytes == dynamic.kv_bytes_per_token * (128 + 1) * 1
    assert eager.variants["native"].kv.sum() > inplace.variants["native"].kv.sum() > 0
    # ...and is already what the default static cache does (one token written in place)
    static = prepare(decode)
    # (equal but for the 8-byte position index each index_copy_ reads)
    assert static.variants["native"].kv.sum() == pytest.approx(prepare(decode, kv_in_place=True).variants["native"].kv.sum(), rel=1e-4)
    assert static.variants["native"].kv.sum() == pytest.approx(inplace.variants["native"].kv.sum(), rel=0.01)
    e = energy.workload_energy(TABLE, energy.op_roles(dynamic), energy.ReuseModel(onchip_bytes=0, kv_in_place=True))
    r = inplace.variants["native"]
    assert (r.w + r.kv + r.act).sum() == pytest.approx(e["offchip_bytes"], rel=1e-12)


def test_quantized_variant_follows_design_and_domain(decode, vit):
    p, v = prepare(decode), prepare(vit)
    assert p.variant_for(4) == "int4" and p.variant_for(8) == "int8" and p.variant_for(16) == "native"
    assert p.variant_for(4, quantize=False) == "native"
    assert v.variant_for(4) == "int8"          # vision is assumed to tolerate 8-bit weights, not 4
    r4 = p.rows("int4")
    assert r4.w.sum() == pytest.approx(p.variants["native"].w.sum() * (0.5 + 2 / 128) / 2, rel=1e-12)
    assert r4.weight_footprint < p.weight_bytes / 3


# ---------------------------------------------------------------------------- designs and cost
def test_make_accelerator_peaks_and_validation():
    d = acc.make_accelerator("x", 800, hbm_gb=96, hbm_tbs=5, sram_mb=128, formats=("fp8", "int8", "int4"))
    assert d.peak("bf16") == 800e12 and d.peak("fp32") == 50e12 and d.peak("int4") == 3200e12
    assert d.peak("fp8") == d.peak("int8") == 1600e12 and d.weight_bits == 4
    assert d.sram_bytes == 128 * 2**20 and d.sram_bw == 15e12 and d.hbm_bytes == 96 * 2**30   # a vendor's binary GB
    assert acc.make_accelerator("y", 800, 96, 5, 128, formats=()).weight_bits == 16
    with pytest.raises(CohwError, match="formats"):
        acc.make_accelerator("z", 800, 96, 5, 128, formats=("fp4",))
    with pytest.raises(CohwError, match="slow tier"):
        acc.make_accelerator("z", 800, 96, 5, 128, slow="HDD")
    with pytest.raises(CohwError, match="fp32"):
        acc.Accelerator("z", {"bf16": 1e15}, 1e6, 1e12, 1e9, 1e12)
    with pytest.raises(CohwError, match="no fp8 peak"):
        acc.make_accelerator("z", 800, 96, 5, 128, formats=()).peak("fp8")


def test_from_hardware_is_the_catalog_row():
    d = acc.from_hardware("H100-SXM")
    assert dict(d.peak_flops) == H100.peak_flops and d.hbm_bw == H100.mem_bw and d.hbm_bytes == H100.mem_bytes
    assert d.sram_bytes == H100.llc_bytes and d.link_bw == 63e9 and d.slow_bytes == 0
    hw = d.to_hardware()
    assert hw.mem_bw == H100.mem_bw and hw.peak_flops == H100.peak_flops and hw.llc_bytes == H100.llc_bytes
    assert acc.from_hardware("B200").sram_bytes == 0.0     # L2 not published
    assert acc.from_hardware("V100-SXM2-32GB").link_bw == 15.75e9


def test_cost_model_arithmetic():
    cm = acc.CostModel(mm2_per_tflops=0.5)
    d = acc.make_accelerator("c", 1000, hbm_gb=80, hbm_tbs=4, sram_mb=64)     # fp8 + int8
    b = cm.breakdown(d)
    assert b["compute"] == pytest.approx(500.0)
    assert b["formats"] == pytest.approx(500 * (0.08 + 0.04))
    assert b["sram"] == pytest.approx(32.0) and b["hbm_phy"] == pytest.approx(48.0)
    assert b["link_phy"] == pytest.approx(0.063 * 60)
    assert b["die"] == pytest.approx(120 + 500 + 60 + 32 + 48 + 3.78)
    assert b["hbm_stacks"] == pytest.approx(4 / 1.2)          # bandwidth needs more stacks than 80 GB
    assert b["package"] == pytest.approx(b["die"] + 121 * 4 / 1.2)
    # the default model is calibrated on GH100's 814 mm^2
    assert acc.from_hardware("H100-SXM").cost()["die"] == pytest.approx(acc.GH100_DIE_MM2, rel=1e-12)


def test_fit_area_spends_the_budget_on_compute():
    ref = acc.from_hardware("H100-SXM")
    bigger = ref.replace(sram_bytes=4 * ref.sram_bytes)
    fitted = acc.fit_area(bigger, ref.cost()["package"])
    assert fitted.cost()["package"] == pytest.approx(ref.cost()["package"], rel=1e-12)
    assert fitted.peak16 < ref.peak16 and fitted.sram_bytes == 4 * ref.sram_bytes
    with pytest.raises(CohwError, match="non-compute area"):
        acc.fit_area(bigger, 100.0)


# ---------------------------------------------------------------------------- Pareto, scores
def test_pareto_mask_hand_made_set():
    pts = np.array([[1, 5], [2, 3], [3, 3], [4, 1], [2, 3], [5, 5]])
    assert pareto.pareto_mask(pts).tolist() == [True, True, False, True, True, False]
    three = np.array([[1, 1, 9], [1, 1, 8], [2, 0, 9], [0, 3, 9]])
    assert pareto.pareto_mask(three).tolist() == [False, True, True, True]
    with pytest.raises(CohwError):
        pareto.pareto_mask(np.array([1.0, 2.0]))


def test_class_scores_choose_and_weights(decode, vit):
    phases = [prepare(decode), prepare(vit)]
    ref = acc.from_hardware("H100-SXM")
    fast = acc.make_accelerator("bw", 500, hbm_gb=80, hbm_tbs=6.7, sram_mb=32)
    res = sweep.evaluate_designs([ref, fast], phases, TABLE)
    w = pd.Series({phases[0].label: 0.75, phases[1].label: 0.25})
    sc = pareto.class_scores(res, ref.name, w).set_index(["design", "klass"])
    assert sc.loc[(ref.name, "weighted proxy set"), "time_rel"] == pytest.approx(1.0)
    t = res.set_index(["design", "phase"])["time_s"]
    rel = [t[(fast.name, p.label)] / t[(ref.name, p.label)] for p in phases]
    assert sc.loc[(fast.name, "weighted proxy set"), "time_rel"] == pytest.approx(rel[0] ** 0.75 * rel[1] ** 0.25)
    assert sc.loc[(fast.name, "LLM decode"), "time_rel"] == pytest.approx(rel[0])
    picked = pareto.choose(sc.reset_index(), budget_mm2=1e9)
    assert picked.loc["LLM decode", "design"] == fast.name
    with pytest.raises(CohwError, match="reference"):
        pareto.class_scores(res, "nope")


def test_sensitivity_on_a_small_grid(decode):
    grid = sweep.design_grid([500, 1000], [2, 4], [80], [32])
    res = sweep.evaluate_designs(grid, prepare(decode), TABLE)
    sc = pareto.class_scores(res, grid[0].name)
    s = pareto.design_sensitivity(sc, sweep.design_params(grid))
    assert s.loc["LLM decode", "hbm_tbs"] == pytest.approx(2.0, rel=0.01)     # bytes bound: time halves
    assert s.loc["LLM decode", "tflops16"] == pytest.approx(1.0, abs=0.01)    # FLOP/s buys nothing
    assert len(grid) == 4 and grid[0].name == "500T 2TB/s 80GB 32MB fp8/int8"


def test_feature_gains_and_iteration(decode):
    ref = acc.from_hardware("H100-SXM")
    g = what_if.feature_gains(ref, [prepare(decode)], table=TABLE).set_index("feature")
    assert g.loc["2x HBM bandwidth", "speedup"] == pytest.approx(2.0, rel=1e-3)
    assert g.loc["2x FLOP/s", "speedup"] == pytest.approx(1.0, abs=1e-3)
    assert g.loc["int4 weights", "speedup"] > 1.8 and g.loc["int4 weights", "area_added_mm2"] > 0
    after = what_if.FEATURES["int4 weights"][0](ref).replace(name="after")
    it = what_if.iteration(ref, after, [prepare(decode)], table=TABLE)
    assert it["verdict"].iloc[0] == "improved" and it["variant_after"].iloc[0] == "int4"


def test_growth_table_from_hardware_data():
    g = generations.growth_table()
    assert g.loc["B200", "tflops16_x"] == pytest.approx(2250 / 125)
    assert g.loc["B200", "hbm_tbs_x"] == pytest.approx(7.7 / 0.9)
    assert g.loc["H200-SXM", "flop_per_byte"] < g.loc["H100-SXM", "flop_per_byte"]
    with pytest.raises(CohwError, match="unknown accelerator"):
        generations.growth_table(["V100", "H100-SXM"])


def test_evaluate_rejects_bad_input(decode):
    p = prepare(decode)
    ref = acc.from_hardware("H100-SXM")
    with pytest.raises(CohwError, match="unique"):
        sweep.evaluate_designs([ref, ref], p)
    with pytest.raises(CohwError, match="spill"):
        sweep.evaluate_designs(ref, p, spill="both")
    with pytest.raises(CohwError, match="Analysis"):
        prepare(decode.table)


# ---------------------------------------------------------------------------- helpers the chapter calls
def test_validate_spill_and_spill_time():
    assert placement.validate_spill("kv") == "kv"
    with pytest.raises(CohwError, match="spill"):
        placement.validate_spill("activations")
    # 60 of 140 bytes spill: the slow tier's 60 / 450 is longer than HBM's 80 / 3350
    assert placement.spill_time(140, 80, 3350, 450) == pytest.approx(60 / 450)
    assert placement.spill_time(50, 80, 3350, 450) == pytest.approx(50 / 3350)   # all in HBM


def test_weighted_gmean():
    v = pd.Series({"a": 2.0, "b": 8.0, "c": 1.0})
    assert pareto.weighted_gmean(v, pd.Series({"a": 1.0, "b": 1.0, "c": 0.0})) == pytest.approx(4.0)
    assert pareto.weighted_gmean(v, pd.Series({"b": 3.0, "a": 1.0, "c": 0.0})) == pytest.approx(2 ** 0.25 * 8 ** 0.75)
    assert pareto.weighted_gmean(v, pd.Series(1.0, index=v.index)) == pytest.approx(16 ** (1 / 3))


def test_phase_table_lists_class_weight_and_footprint(decode, vit):
    phases = [prepare(decode), prepare(vit)]
    w = pd.Series({phases[0].label: 0.75, phases[1].label: 0.25})
    t = proxy_phases.phase_table(phases, w)
    assert list(t.index) == [p.label for p in phases]
    assert list(t.columns) == ["class", "weight", "unit", "weights_GB", "kv_cache_GB"]
    assert t["class"].tolist() == ["LLM decode", "vision"] and t["weight"].tolist() == [0.75, 0.25]
    assert t.loc[phases[0].label, "kv_cache_GB"] == pytest.approx(phases[0].kv_bytes / 1e9)
    assert t.loc[phases[1].label, "weights_GB"] == pytest.approx(vit.weight_bytes / 1e9)


def test_matrix_utilization_and_efficiency_factors(decode):
    p = prepare(decode)
    assert isinstance(p, PreparedPhase)
    assert (op_times.matrix_utilization(p, None) == 1.0).all()
    e, b, t0 = op_times.efficiency_factors(p.variants["native"].group, None)
    assert (e == 1).all() and (b == 1).all() and (t0 == 0).all()
    pytest.importorskip("cohw_utils.views.systolic")
    u = op_times.matrix_utilization(p, (128, 128))
    mm = (p.table["op"] == "aten.mm.default").to_numpy()
    assert ((u > 0) & (u <= 1)).all() and (u[mm] < 0.01).all()   # M = 1 on a 128-row array


def test_sweep_designs_times_evaluate_designs(decode):
    p = prepare(decode)
    ds = [acc.from_hardware("H100-SXM"), acc.make_accelerator("x", 500, 80, 4, 32)]
    res, seconds = sweep.sweep_designs(ds, [p], table=TABLE)
    assert seconds >= 0
    pd.testing.assert_frame_equal(res, sweep.evaluate_designs(ds, p, TABLE))


def test_figures_return_figures(decode, vit):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    from cohw_utils.studies.codesign import figures

    phases = [prepare(decode), prepare(vit)]
    ref = acc.from_hardware("H100-SXM")
    grid = sweep.design_grid([500, 1000], [2, 4], [80], [32])
    sc = pareto.class_scores(sweep.evaluate_designs([ref, *grid], phases, TABLE), ref.name)
    gains = what_if.feature_gains(ref, phases, table=TABLE)
    it = what_if.iteration(ref, what_if.FEATURES["2x HBM bandwidth"][0](ref).replace(name="after"), phases,
                           table=TABLE)
    for fig in (figures.fig_growth(), figures.fig_pareto(sc, pareto.choose(sc, 1e9), marks={ref.name: "H100"}),
                figures.fig_gains(gains), figures.fig_iteration(it)):
        assert isinstance(fig, Figure)
        plt.close(fig)


# ---------------------------------------------------------------------------- reticle, power, format rates
def test_a_die_beyond_the_reticle_splits_and_pays_die_to_die_area():
    cm = acc.CostModel(mm2_per_tflops=0.5)
    b = cm.breakdown(acc.make_accelerator("big", 2000, hbm_gb=80, hbm_tbs=4, sram_mb=64))
    logic = 120 + 1000 + 1000 * 0.12 + 32 + 48 + 3.78           # 1,323.78 mm^2 > 858
    assert b["dies"] == 2 and b["d2d"] == pytest.approx(40.0)
    assert b["die"] == pytest.approx(logic + 40.0)
    assert cm.breakdown(acc.make_accelerator("small", 1000, hbm_gb=80, hbm_tbs=4, sram_mb=64))["dies"] == 1


def test_fit_area_lands_on_the_budget_across_a_die_count_change():
    ref = acc.from_hardware("H100-SXM")
    budget = ref.cost()["package"]
    for sram in (4, 16):   # 4x SRAM alone overflows one reticle at H100's compute; the fit shrinks compute
        fitted = acc.fit_area(ref.replace(sram_bytes=sram * ref.sram_bytes), budget)
        assert fitted.cost()["package"] == pytest.approx(budget, rel=1e-12)


def _rows(time_s, energy_j, die_mm2, units=2.0):
    return pd.DataFrame({"design": ["a"], "time_s": [time_s], "time_per_unit_s": [time_s / units],
                         "throughput": [units / time_s], "energy_J": [energy_j], "J_per_unit": [energy_j / units],
                         "util_compute": [0.8], "util_memory": [0.4], "die_mm2": [die_mm2]})


def test_power_cap_stretches_time_to_the_dynamic_budget():
    d = acc.make_accelerator("a", 1000, hbm_gb=80, hbm_tbs=4, sram_mb=64)          # no tdp_w: the model's cap
    m = power.PowerModel(static_w_per_mm2=0.1, cap_w=700.0)
    r = power.apply_power(_rows(1.0, 1000.0, 500.0), [d], m).iloc[0]   # static 50 W; 1,000 W dynamic > 650
    assert r.static_W == pytest.approx(50.0) and r.dynamic_W == pytest.approx(1000.0) and r.power_capped
    assert r.time_s == pytest.approx(1000.0 / 650.0) and r.time_per_unit_s == pytest.approx(r.time_s / 2)
    assert r.energy_J == pytest.approx(1000.0 + 50.0 * 1000.0 / 650.0) and r.power_W == pytest.approx(700.0)
    assert r.util_compute == pytest.approx(0.8 * 650.0 / 1000.0)
    r = power.apply_power(_rows(1.0, 100.0, 500.0), [d], m).iloc[0]     # under the cap: static only added
    assert not r.power_capped and r.time_s == 1.0 and r.energy_J == pytest.approx(150.0)
    assert r.power_W == pytest.approx(150.0)
    own = d.replace(tdp_w=2000.0)                                          # a design's own TDP wins
    assert not power.apply_power(_rows(1.0, 1000.0, 500.0), [own], m).iloc[0].power_capped


def test_power_model_bad_input_is_a_clear_error():
    d = acc.make_accelerator("a", 1000, hbm_gb=80, hbm_tbs=4, sram_mb=64)
    with pytest.raises(CohwError, match="static power 100 W alone reaches its 90 W cap"):
        power.apply_power(_rows(1.0, 1.0, 1000.0), [d], power.PowerModel(cap_w=90.0))
    with pytest.raises(CohwError, match="cap_w must be a positive power"):
        power.PowerModel(cap_w=0.0)
    with pytest.raises(CohwError, match="tdp_w = -1"):
        d.replace(tdp_w=-1.0)


def test_evaluate_designs_with_power_keeps_every_design_under_its_cap(decode):
    ref = acc.from_hardware("H100-SXM")
    fast = acc.make_accelerator("4000T", 4000, hbm_gb=80, hbm_tbs=3.35, sram_mb=50)
    phases = [prepare(decode)]
    plain = sweep.evaluate_designs([ref, fast], phases, TABLE)
    capped = sweep.evaluate_designs([ref, fast], phases, TABLE, power=power.PowerModel(cap_w=700.0))
    assert (capped.power_W <= capped.cap_W * (1 + 1e-9)).all()
    assert (capped.time_s >= plain.time_s * (1 - 1e-12)).all()
    assert (capped.energy_J > plain.energy_J).all()                       # static energy added
    assert capped.loc[capped.design == "H100-SXM", "cap_W"].iloc[0] == 700.0   # the catalog TDP


def test_format_rates_are_each_generations_own():
    r = acc.format_rates(["A100-80GB", "H100-SXM"])
    assert r.loc["A100-80GB", "int8"] == pytest.approx(2.0) and r.loc["A100-80GB", "int4"] == pytest.approx(4.0)
    assert np.isnan(r.loc["A100-80GB", "fp8"]) and np.isnan(r.loc["H100-SXM", "int4"])   # Hopper: no INT4
    assert r.loc["H100-SXM", "fp8"] == pytest.approx(2.0, rel=1e-3)
    assert r.loc["parametric design", "int4"] == 4.0


def test_resident_activations_move_bytes_from_hbm_to_sram(vit):
    ref = acc.from_hardware("H100-SXM")
    ph = prepare(vit)
    plain = sweep.evaluate_designs(ref, ph, TABLE, quantize=False).iloc[0]
    fused = sweep.evaluate_designs(ref, ph, TABLE, quantize=False, resident_activations=True).iloc[0]
    moved = plain.bytes_hbm - fused.bytes_hbm
    assert moved > 0 and fused.bytes_sram - plain.bytes_sram == pytest.approx(moved)   # bytes conserved
    assert fused.time_s <= plain.time_s and fused.energy_J < plain.energy_J
    # what moved is what the energy model's cache-resident rule keeps on chip (weights off chip: 50 MB < 173 MB)
    m = energy.ReuseModel(onchip_bytes=ref.sram_bytes, weights_resident=False, activations_resident=True)
    split = energy._split(energy.op_roles(vit), m)
    assert 0 < moved <= split["a_buf"].sum() * (1 + 1e-9)   # at most its bytes (K/V inputs stay KV rows)
    no_sram = ref.replace(name="no sram", sram_bytes=0.0)
    a = sweep.evaluate_designs(no_sram, ph, TABLE, quantize=False).iloc[0]
    b = sweep.evaluate_designs(no_sram, ph, TABLE, quantize=False, resident_activations=True).iloc[0]
    assert a.time_s == b.time_s and a.bytes_hbm == b.bytes_hbm                           # nowhere to keep them
