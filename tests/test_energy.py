"""The energy data (published figures, exact), the energy model (hand-computed joules for a
traced Linear + ReLU), its what-ifs and roofline tie, and the structural claims of Chapter 4.4
(the view :mod:`cohw_utils.views.energy_model` and the study :mod:`cohw_utils.studies.energy`)."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn as nn
from matplotlib.figure import Figure

from cohw_utils.studies.energy import estimates, figures
from cohw_utils.studies.proxies import proxy_set as proxies
from cohw_utils.views import energy_model as energy
from cohw_utils.views import memory_budget
from cohw_utils.views import roofline
from cohw_utils.spine.analyze import analyze
from cohw_utils.core.errors import CohwError
from cohw_utils.hardware import Hardware, get_hardware
from cohw_utils.spine.trace import trace

ROOT = Path(__file__).resolve().parents[1]
DATA = energy.load_energy_data()


def _value(kind, node="45 nm", **match) -> float:
    d = DATA[(DATA["kind"] == kind) & (DATA["node"] == node) & (DATA["preferred"] == "yes")]
    for k, v in match.items():
        d = d[d[k] == v]
    assert len(d) == 1, match
    return float(d["energy_pj"].iloc[0])


# ----------------------------------------------------------------------------- the data
def test_seed_figures_are_the_published_ones():
    # Horowitz ISSCC 2014 (45 nm, 0.9 V) as used by Han et al. 2015, in pJ
    published = {("add", "int8"): 0.03, ("add", "int32"): 0.1, ("add", "fp16"): 0.4,
                 ("add", "fp32"): 0.9, ("mult", "int8"): 0.2, ("mult", "int32"): 3.1,
                 ("mult", "fp16"): 1.1, ("mult", "fp32"): 3.7}
    for (op, dt), pj in published.items():
        assert _value("arith", op=op, dtype=dt) == pj, (op, dt)
    # Han et al. 2015 Fig. 1: 32-bit register file 1 pJ, SRAM cache 5 pJ, DRAM 640 pJ
    for level, pj in (("register", 1), ("sram_8kb", 5), ("dram", 640)):
        row = DATA[(DATA.level == level) & (DATA.preferred == "yes")].iloc[0]
        assert (row.bits, row.energy_pj) == (32, pj)
    # Horowitz's 64-bit cache rows and the 1.3-2.6 nJ DRAM range
    mem64 = DATA[(DATA.kind == "memory") & (DATA.bits == 64)].set_index(["level", "energy_pj"])
    for key in (("sram_8kb", 10), ("sram_32kb", 20), ("sram_1mb", 100), ("dram", 1300), ("dram", 2600)):
        assert key in mem64.index, key
    # newer memory, per bit: HBM2 (O'Connor 2017), HBM2E / GDDR6 / GDDR6X (Micron)
    for level, pj in (("hbm2", 3.9), ("hbm2e", 6.0), ("gddr6", 7.5), ("gddr6x", 7.25)):
        row = DATA[DATA.level == level].iloc[0]
        assert (row.bits, row.energy_pj, row.pj_per_byte) == (1, pj, pytest.approx(8 * pj))
    # a DRAM read costs ~6400x a 32-bit integer add (Han's 'relative cost')
    assert _value("memory", level="dram") / _value("arith", op="add", dtype="int32") == pytest.approx(6400)


def test_7nm_and_derived_bf16():
    j = {("add", "bf16"): 0.11, ("add", "fp16"): 0.16, ("mult", "bf16"): 0.21, ("mult", "fp16"): 0.34,
         ("mult", "fp32"): 1.31, ("add", "fp32"): 0.38, ("mult", "int8"): 0.07, ("add", "int8"): 0.007}
    for (op, dt), pj in j.items():
        assert _value("arith", "7 nm", op=op, dtype=dt) == pj
    # 45 nm bf16 is derived by the stated rule: fp16 at 45 nm x (bf16/fp16 at 7 nm)
    for op in ("add", "mult"):
        row = DATA[(DATA.node == "45 nm") & (DATA.op == op) & (DATA.dtype == "bf16")].iloc[0]
        assert row.derived == "yes" and "7 nm" in row.rule
        expect = _value("arith", op=op, dtype="fp16") * j[(op, "bf16")] / j[(op, "fp16")]
        assert row.energy_pj == pytest.approx(expect, abs=5e-4)
    # only the bf16 rows are derived
    assert set(DATA.loc[DATA.derived == "yes", "dtype"]) == {"bf16"}


def test_every_row_has_source_node_and_a_citation_in_the_bibliography():
    bib = (ROOT / "references.bib").read_text()
    keys = set(re.findall(r"@\w+\{([^,]+),", bib))
    assert DATA["source"].str.len().min() > 10 and DATA["node"].str.len().min() > 0
    missing = set(DATA["citation"]) - keys
    assert not missing, f"citation keys not in references.bib: {missing}"


def test_malformed_data_is_named(tmp_path):
    good = (ROOT / "cohw_utils" / "data" / "energy_per_op.csv").read_text().splitlines()
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join([good[0], good[1].replace(",0.03,", ",-1,")]) + "\n")
    with pytest.raises(energy.EnergyDataError, match=r"line 2.*not positive"):
        energy.load_energy_data(bad)
    bad.write_text("\n".join([good[0], good[1].replace("int8", "int7", 1)]) + "\n")
    with pytest.raises(energy.EnergyDataError, match="dtype"):
        energy.load_energy_data(bad)
    csv = ROOT / "cohw_utils" / "data" / "energy_per_op.csv"
    pd.read_csv(csv, dtype=str, keep_default_na=False).drop(columns="citation").head(2).to_csv(bad, index=False)
    with pytest.raises(energy.EnergyDataError, match="bad.csv: missing column.*citation"):
        energy.load_energy_data(bad)
    with pytest.raises(energy.EnergyDataError, match="does not exist"):
        energy.load_energy_data(tmp_path / "absent.csv")


# ----------------------------------------------------------------------------- the table
def test_energy_table_presets():
    t45 = energy.EnergyTable.load("45nm")
    assert t45.mac_pj("fp32") == pytest.approx(3.7 + 0.9)
    assert t45.mac_pj("fp16") == pytest.approx(1.1 + 0.9)  # fp16 multiply, fp32 accumulate
    assert t45.mac_pj("int8") == pytest.approx(0.2 + 0.1)  # int8 multiply, int32 accumulate
    assert t45.flop_pj("fp16") == 1.1 and t45.flop_pj("int64") == 0.1
    assert t45.byte_pj == pytest.approx({"register": 0.25, "local": 1.25, "buffer": 12.5, "offchip": 160.0})
    t7 = energy.EnergyTable.load("7nm-hbm2e")
    assert t7.mac_pj("bf16") == pytest.approx(0.21 + 0.38)
    assert t7.byte_pj["offchip"] == pytest.approx(48.0)
    assert energy.EnergyTable.load("7nm-hbm2").byte_pj["offchip"] == pytest.approx(31.2)
    assert energy.EnergyTable.load("45nm", offchip="gddr6").byte_pj["offchip"] == pytest.approx(60.0)
    shown = t7.table()
    assert {"source", "citation", "node", "derived"} <= set(shown.columns) and len(shown) == 14
    cheaper = t45.replace(op_scale=0.5, byte_pj={"offchip": 10.0})
    assert cheaper.mac_pj("fp32") == pytest.approx(2.3) and cheaper.byte_pj["offchip"] == 10.0
    for bad, match in ((lambda: energy.EnergyTable.load("5nm"), "preset"),
                       (lambda: energy.EnergyTable.load("45nm", offchip="sram"), "off-chip"),
                       (lambda: energy.EnergyTable.load("45nm", node="3 nm"), "node"),
                       (lambda: t45.mac_pj("fp8"), "fp8"),
                       (lambda: t45.replace(byte_pj={"l2": 1.0}), "level")):
        with pytest.raises(CohwError, match=match):
            bad()


# ----------------------------------------------------------------------------- the model
T45 = energy.EnergyTable.load("45nm")
H100 = get_hardware("H100-SXM")
# a traced Linear(64 -> 32, no bias) on 8 rows, then a ReLU, fp32
_lin = nn.Linear(64, 32, bias=False)
_x = torch.randn(8, 64)
with torch.no_grad():
    ET = trace(lambda: torch.relu(_lin(_x)), model=_lin)
MACS, MM_READ, MM_OUT, W = 8 * 64 * 32, 4 * (8 * 64 + 64 * 32), 4 * 8 * 32, 4 * 64 * 32
COMPUTE_PJ = MACS * 4.6 + 8 * 32 * 3.7  # fp32 MACs + one fp32 multiply per ReLU output
ALL_BYTES = MM_READ + MM_OUT + 2 * MM_OUT  # the ReLU reads and writes 8x32 floats


def test_roles_of_a_linear():
    r = energy.op_roles(ET)
    assert r.weight_bytes == W
    assert r.act_read.sum() + r.written.sum() == ALL_BYTES - W
    assert r.macs.sum() == MACS and r.fusable.sum() == 1


def test_energy_by_hand():
    e = energy.workload_energy(T45, ET, energy.ReuseModel(onchip_bytes=0))
    assert e["compute_J"] == pytest.approx(COMPUTE_PJ * 1e-12)
    assert e["arith_fp32_J"] == pytest.approx(COMPUTE_PJ * 1e-12)
    assert e["offchip_bytes"] == ALL_BYTES and not e["weights_resident"]
    assert e["offchip_J"] == pytest.approx(ALL_BYTES * 160e-12)
    assert e["local_J"] == pytest.approx(ALL_BYTES * 1.25e-12)
    assert e["total_J"] == pytest.approx((COMPUTE_PJ + ALL_BYTES * (160 + 1.25)) * 1e-12)
    assert e["memory_share"] == pytest.approx(e["memory_J"] / e["total_J"])
    # the weights (8 KiB) fit a 1 MB buffer: resident, served from on-chip SRAM at 12.5 pJ/B
    e = energy.workload_energy(T45, ET, energy.ReuseModel(onchip_bytes=1e6))
    assert e["weights_resident"] and e["buffer_bytes"] == W
    assert e["offchip_J"] == pytest.approx((ALL_BYTES - W) * 160e-12)
    assert e["buffer_J"] == pytest.approx(W * 12.5e-12)
    # fusion: the ReLU's 2 KiB working set fits, so its traffic stays on chip too
    e = energy.workload_energy(T45, ET, energy.ReuseModel(onchip_bytes=1e6, fusion=True))
    assert e["fused_ops"] == 1 and e["offchip_bytes"] == ALL_BYTES - W - 2 * MM_OUT
    # ... but not when the buffer is smaller than the ReLU's working set
    e = energy.workload_energy(T45, ET, energy.ReuseModel(onchip_bytes=1000, fusion=True))
    assert e["fused_ops"] == 0
    # processing in memory: weight bytes read in memory at half the off-chip energy
    e = energy.workload_energy(T45, ET, energy.ReuseModel(onchip_bytes=0, pim=True))
    assert e["pim_bytes"] == W and e["pim_J"] == pytest.approx(W * 160 * 0.5e-12)
    assert e["local_J"] == pytest.approx((ALL_BYTES - W) * 1.25e-12)
    # register-file operand reads: 12 bytes per MAC at 0.25 pJ/B
    e = energy.workload_energy(T45, ET, energy.ReuseModel(onchip_bytes=0, rf_bytes_per_mac=12))
    assert e["register_J"] == pytest.approx(MACS * 12 * 0.25e-12)
    assert energy.workload_energy(T45, ET, energy.ReuseModel(onchip_bytes=0), units=8)["total_J_per_unit"] \
        == pytest.approx(e["total_J"] / 8 - MACS * 12 * 0.25e-12 / 8)


def _row(op, cls, op_class, ins, outs, read, written, macs=0):
    return {"op": op, "module": "m", "module_class": cls, "op_class": op_class, "input_shapes": ins,
            "output_shapes": outs, "dtype": "float16", "flops": 2 * macs, "macs": macs,
            "bytes_read": read, "bytes_written": written, "costed": True}


# a hand-made fp16 decode step: q = x @ W (x a phase input), the new K/V entry appended to a
# 3-entry cache by cat, attention over the 4 entries, a GELU whose output is the phase output
TINY = pd.DataFrame([
    _row("aten.mm.default", "Linear", "contraction", ((1, 4), (4, 8)), ((1, 8),), 2 * (4 + 32), 16, 32),
    _row("aten.view.default", "LlamaAttention", "view", ((1, 8),), ((1, 2, 1, 4),), 0, 0),
    _row("aten.cat.default", "LlamaAttention", "data movement", ((1, 2, 3, 4), (1, 2, 1, 4)),
         ((1, 2, 4, 4),), 2 * (24 + 8), 64),
    _row("aten.scaled_dot_product_attention", "LlamaAttention", "contraction",
         ((1, 2, 1, 4), (1, 2, 4, 4), (1, 2, 4, 4)), ((1, 2, 1, 4),), 2 * (8 + 32 + 32), 16, 64),
    _row("aten.gelu.default", "GELUActivation", "element-wise", ((1, 2, 1, 4),), ((1, 2, 1, 4),), 16, 16),
])


def test_tensor_links_by_shape():
    r = energy.op_roles(TINY)
    links = r.links
    pairs = sorted(zip(links.in_row.tolist(), links.in_root.tolist(), links.in_share.round(4).tolist()))
    # mm's x is a phase input (the weight is left out); the cat's cache comes from outside, its new
    # entry from the mm through the view; attention's q from the mm, K and V from the cat
    assert pairs == [(0, -1, 1.0), (2, -1, 0.75), (2, 0, 0.25),
                     (3, 0, round(16 / 144, 4)), (3, 2, round(64 / 144, 4)), (3, 2, round(64 / 144, 4)),
                     (4, 3, 1.0)]
    assert links.consumed.tolist() == [True, False, True, True, False]  # the GELU's output: a phase output
    assert r.kv_append.tolist() == [False, False, True, False, False] and r.kv_new[2] == 16


def test_cache_resident_activations_by_hand():
    # weights (64 B) resident in a 1 MB buffer; the rest of the buffer holds activations
    e = energy.workload_energy(T45, TINY, energy.ReuseModel(onchip_bytes=1e6, activations_resident=True))
    # off-chip: x (8), the cache read (3/4 of the cat's 64 B read) and the whole cat write (a KV
    # write), attention's K and V reads but for their new entry (96 of 144 B), the GELU's output (16)
    assert e["offchip_bytes"] == 8 + 48 + 64 + 96 + 16
    # on chip: the mm's output (16), the cat's read of it (16), attention's q and new K/V entry
    # (48), its output (16) and the GELU's read of it (16), plus the weights
    assert e["buffer_bytes"] == 16 + 16 + 48 + 16 + 16 + 64 and e["weights_resident"]
    assert e["offchip_J"] == pytest.approx(232 * 160e-12) and e["buffer_J"] == pytest.approx(176 * 12.5e-12)
    # in place, the append reads only its new entry (on chip) and writes it (off chip)
    e = energy.workload_energy(T45, TINY, energy.ReuseModel(onchip_bytes=1e6, activations_resident=True,
                                                            kv_in_place=True))
    assert e["offchip_bytes"] == 8 + 0 + 16 + 96 + 16
    # a buffer smaller than every tensor keeps nothing: the eager count
    small = energy.ReuseModel(onchip_bytes=15, activations_resident=True)
    assert energy.workload_energy(T45, TINY, small)["offchip_bytes"] == TINY.bytes_read.sum() + TINY.bytes_written.sum()
    # the traced Linear + ReLU: x from outside, the mm's output kept, the ReLU's output is the phase's
    e = energy.workload_energy(T45, ET, energy.ReuseModel(onchip_bytes=1e6, activations_resident=True))
    assert e["offchip_bytes"] == 4 * 8 * 64 + MM_OUT and e["buffer_bytes"] == W + 2 * MM_OUT
    # resident weights leave less room: 8 KiB of weights in a 9 KiB buffer, the 1 KiB output does not fit
    e = energy.workload_energy(T45, ET, energy.ReuseModel(onchip_bytes=W + 1000, activations_resident=True))
    assert e["weights_resident"] and e["offchip_bytes"] == ALL_BYTES - W
    # precomputed links survive quantization; roles without links are refused with the fix
    q = energy.op_roles(ET).quantized("int8")
    assert energy.workload_energy(T45, q, energy.ReuseModel(onchip_bytes=1e6, activations_resident=True))[
        "offchip_bytes"] == 4 * 8 * 64 + MM_OUT
    with pytest.raises(CohwError, match="op_roles"):
        energy.workload_energy(T45, dataclasses.replace(q, links=None),
                               energy.ReuseModel(onchip_bytes=1e6, activations_resident=True))


def test_quantization_by_hand():
    r = energy.op_roles(ET)
    q8 = r.quantized("int8")
    assert q8.weight_bytes == W / 4  # 2048 fp32 weights -> 2048 bytes
    e = energy.workload_energy(T45, q8, energy.ReuseModel(onchip_bytes=0))
    assert e["compute_J"] == pytest.approx((COMPUTE_PJ + 64 * 32 * 3.7) * 1e-12)  # + one dequant multiply per weight
    q4 = r.quantized("int4")
    assert q4.weight_bytes == pytest.approx(64 * 32 * (0.5 + 2 / 128))  # + an fp16 scale per 128 weights
    w8a8 = r.quantized("int8", activations="int8")
    e = energy.workload_energy(T45, w8a8, energy.ReuseModel(onchip_bytes=0))
    assert e["arith_int8_J"] == pytest.approx(MACS * 0.3e-12)
    assert e["arith_fp32_J"] == pytest.approx((8 * 32 + 8 * 64 + 8 * 32) * 3.7e-12)  # ReLU + quantize x + dequantize y
    assert e["offchip_bytes"] == ALL_BYTES - W + W / 4 - (4 * 8 * 64 - 8 * 64)
    with pytest.raises(CohwError, match="activations"):
        r.quantized("int4", activations="fp16")


def test_roofline_tie():
    chip = Hardware(name="toy", vendor="-", year=None, mem_bw=1e9, mem_bytes=None, llc_bytes=1e6,
                    tdp_w=None, source="test", peak_flops={"fp32": 1e10, "int8": 4e10})
    base = roofline.roofline_summary(ET, chip)
    m0 = energy.ReuseModel(onchip_bytes=0)
    # with nothing on chip, the off-chip table is the op table: same roofline time
    assert energy.evaluate_energy(T45, ET, m0, chip)["time_s"] == pytest.approx(base["time_s"])
    t = energy.offchip_table(ET, energy.ReuseModel(), chip)  # 1 MB from the chip's LLC: weights resident
    assert (t["bytes_read"] + t["bytes_written"]).sum() == ALL_BYTES - W
    pim = energy.offchip_table(ET, energy.ReuseModel(onchip_bytes=0, pim=True, pim_bw_x=4), chip)
    assert pim["bytes_read"].sum() == ET["bytes_read"].sum() - W + W / 4
    q = energy.offchip_table(energy.op_roles(ET).quantized("int8", activations="int8"), m0, chip)
    assert q.loc[q.op == "aten.mm.default", "dtype"].item() == "int8"
    r = energy.evaluate_energy(T45, ET, m0, chip)
    assert r["power_W"] == pytest.approx(r["total_J"] / r["time_s"])
    with pytest.raises(CohwError, match="onchip_bytes"):
        energy.workload_energy(T45, ET, energy.ReuseModel())
    with pytest.raises(CohwError, match="hw="):
        energy.evaluate_energy(T45, ET, m0)
    with pytest.raises(CohwError, match="pim_read_fraction"):
        energy.workload_energy(T45, ET, energy.ReuseModel(onchip_bytes=0, pim_read_fraction=2))
    with pytest.raises(CohwError, match="op table"):
        energy.op_roles([1, 2])


def test_whatif_table_on_a_toy():
    chip = Hardware(name="toy", vendor="-", year=None, mem_bw=1e9, mem_bytes=None, llc_bytes=0,
                    tdp_w=None, source="test", peak_flops={"fp32": 1e10, "int8": 4e10})
    w = estimates.whatifs(energy.op_roles(ET), T45, chip)
    assert list(w.index) == ["baseline", "int8 weights (W8A16)", "int4 weights (W4A16, g128)",
                             "int8 weights and activations (W8A8)", "fusion (intermediates on chip)",
                             "cache-resident activations (fusing compiler)", "processing in memory (weights)"]
    assert w.loc["baseline", "energy_vs_baseline"] == 1 and w.loc["baseline", "unit"] == "run"
    assert w.loc["int8 weights (W8A16)", "offchip_MB_per_unit"] == pytest.approx((ALL_BYTES - W + W / 4) / 1e6)
    # PIM at the interface's bandwidth: less energy, the same time
    assert w.loc["processing in memory (weights)", "energy_vs_baseline"] < 1
    assert w.loc["processing in memory (weights)", "time_vs_baseline"] == pytest.approx(1)


def test_compare_measured_puts_model_beside_measurement():
    # a made-up measurement record, in the format benchmarks/capture_gpu_energy.py writes
    rec = {"device": "test", "date": "-", "versions": {}, "dtype": "fp16",
           "measurements": [{"workload": "llama-2-7b", "phase": "decode", "batch": 2, "seq_len": 64,
                             "joules_per_unit": 3.0, "joules_per_unit_net_idle": 1.5,
                             "seconds_per_call": 0.02}]}
    t = energy.EnergyTable.load("7nm-hbm2e")
    df = estimates.compare_measured(rec, t, H100)
    expect = energy.workload_energy(t, analyze("llama-2-7b", "decode", seq_len=64, batch=2), hw=H100)
    assert df.model_J_per_unit.item() == pytest.approx(expect["total_J_per_unit"])
    assert df.measured_over_model.item() == pytest.approx(1.5 / expect["total_J_per_unit"])
    plan = estimates.compare_measured(None, t, H100, plan=rec["measurements"][:1])
    assert plan.measured_J_per_unit.isna().all() and plan.model_J_per_unit.item() == df.model_J_per_unit.item()


# ----------------------------------------------------------------------------- the claims
@pytest.mark.parametrize("preset", ["45nm", "7nm-hbm2e"])
def test_decode_is_memory_and_prefill_unet_arithmetic(preset):
    table = energy.EnergyTable.load(preset)
    dec = energy.workload_energy(table, analyze("llama-2-7b", "decode", seq_len=256), hw=H100)
    pre = energy.workload_energy(table, analyze("llama-2-7b", "prefill", seq_len=512), hw=H100)
    unet = energy.workload_energy(table, analyze("sd-1.5", "unet_step"), hw=H100)
    assert dec["memory_share"] > 0.95 and dec["unit"] == "token"
    assert pre["memory_share"] < 0.5 and unet["memory_share"] < 0.5
    # decode reads every weight once per step: ~13.2 GB of fp16 (the embedding gathers one row)
    assert dec["weight_bytes"] == pytest.approx(2 * 6.607e9, rel=0.01)


def test_batch_amortises_weights_and_kv_in_place():
    table = energy.EnergyTable.load("7nm-hbm2e")
    r1, r8 = (energy.op_roles(analyze("llama-2-7b", "decode", seq_len=64, batch=b)) for b in (1, 8))
    # weights once per batch, not per sequence (the embedding gathers one row per sequence)
    assert r8.weight_bytes - r1.weight_bytes == 7 * 4096 * 2
    e1, e8 = (energy.workload_energy(table, r, hw=H100) for r in (r1, r8))
    assert e8["total_J_per_unit"] < e1["total_J_per_unit"] / 4
    # HF's DynamicCache is torch.cat (re-reads and re-writes the whole cache); in place writes one token,
    # as the default static cache's index_copy_ already does (K and V of each of the 32 layers)
    assert r1.kv_append.sum() == 2 * 32
    rd = energy.op_roles(analyze("llama-2-7b", "decode", seq_len=64, cache="dynamic"))
    assert rd.kv_append.sum() == 2 * 32
    ed = energy.workload_energy(table, rd, hw=H100)
    inplace = energy.workload_energy(table, rd, energy.ReuseModel(kv_in_place=True), hw=H100)
    assert inplace["offchip_bytes"] < ed["offchip_bytes"]
    assert inplace["offchip_bytes"] == pytest.approx(e1["offchip_bytes"], rel=0.01)
    sweep = estimates.decode_batch_sweep("llama-2-7b", [1, 4], table, hw=H100, seq_len=64)
    assert list(sweep.batch) == [1, 4] and sweep.J_per_token.is_monotonic_decreasing
    assert sweep.fits_memory.all()
    # "fits" is the one rule of memory_budget: a chip 5% larger than the need fits raw, not after
    # the 10% runtime reserve
    need = float(sweep.memory_needed_bytes.iloc[0])
    tight = dataclasses.replace(H100, mem_bytes=need * 1.05)
    assert not memory_budget.fits(tight, need) and memory_budget.fits(tight, need, reserve_fraction=0)
    assert not estimates.decode_batch_sweep("llama-2-7b", [1], table, hw=tight, seq_len=64).fits_memory.item()
    assert isinstance(figures.fig_energy_vs_batch({"7nm": sweep}), Figure)


def test_cache_resident_activations_on_real_phases():
    t7 = energy.EnergyTable.load("7nm-hbm2e")
    resident = energy.ReuseModel(activations_resident=True)
    # ViT-B/16 at batch 1: every intermediate (at most 1.2 MB) fits H100's L2, so what is left
    # off-chip is the 173 MB of fp16 weights (too many to stay resident), the image and the logits
    vit = estimates.phase_roles("vit-b-16", "forward")
    e = energy.workload_energy(t7, vit, resident, H100)
    assert not e["weights_resident"]
    assert e["offchip_bytes"] == pytest.approx(vit.weight_bytes + 3 * 224 * 224 * 2, rel=1e-3)
    eager = energy.workload_energy(t7, vit, hw=H100)
    assert e["offchip_bytes"] < 0.6 * eager["offchip_bytes"] and e["memory_share"] < eager["memory_share"]
    # Llama decode: the KV cache is read and written off-chip whatever the buffer holds
    dec = energy.op_roles(analyze("llama-2-7b", "decode", seq_len=64, cache="dynamic"))
    kv_cache = 2 * 32 * 64 * 4096 * 2  # K and V, 32 layers, 64 past tokens, fp16
    e = energy.workload_energy(t7, dec, energy.ReuseModel(activations_resident=True, kv_in_place=True), H100)
    assert e["offchip_bytes"] >= dec.weight_bytes + kv_cache
    assert e["offchip_bytes"] < dec.weight_bytes + 1.2 * kv_cache + 1e6
    # prefill writes the cache (a dynamic cache's first cat) off-chip; attention reads it on chip
    pre = energy.op_roles(analyze("llama-2-7b", "prefill", seq_len=64, cache="dynamic"))
    assert pre.kv_store.sum() == 2 * 32 and pre.kv_append.sum() == 0
    e = energy.workload_energy(t7, pre, resident, H100)
    logits = 64 * 32000 * 2
    assert e["offchip_bytes"] == pytest.approx(pre.weight_bytes + kv_cache + logits, rel=2e-3)


def test_figures():
    assert isinstance(figures.fig_energy(), Figure)
    ov = estimates.energy_overview([energy.op_roles(ET, label="toy:fwd")], T45, energy.ReuseModel(onchip_bytes=0), H100)
    assert list(ov.workload) == ["toy"] and isinstance(figures.fig_stacked_energy(ov), Figure)


def test_phase_roles_trace_in_the_proxy_dtype_at_the_chapter_sizes():
    r = estimates.phase_roles("llama-2-7b", "decode", seq_len=64, batch=2)
    direct = energy.op_roles(analyze("llama-2-7b", "decode", seq_len=64, batch=2,
                                     dtype=proxies.phase_dtype("llama-2-7b")))
    assert r.label == "llama-2-7b:decode" and (r.units, r.unit_name) == (2, "token")
    assert r.weight_bytes == direct.weight_bytes and len(r.table) == len(direct.table)
    assert "fp16" in set(r.dtype)  # the proxy set serves Llama in fp16
    # a context length means nothing to a ViT: ignored, not passed on
    v = estimates.phase_roles("vit-b-16", "forward", seq_len=7)
    assert v.label == "vit-b-16:forward" and v.unit_name == "image"
