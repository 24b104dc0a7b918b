"""Quantization formats: error bounds, byte accounting, GGUF blocks and files, CPU kernels,
AWQ scaling, the int8 KV cache and the scale-up arithmetic."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from cohw_utils.core.errors import CohwError
from cohw_utils.studies.quantization import awq, blocks, gguf_blocks, kv_int8, ladder, methods, results, scale_up
from cohw_utils.studies.quantization.gguf_blocks import gguf_quantize
from cohw_utils.studies.quantization.kernels import QuantLinear
from cohw_utils.studies.quantization.schemes import Scheme, quantize_rtn, scheme


def _w(n=64, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[3, 17] = 0.5  # an outlier
    return w


def test_rtn_int8_per_channel_error_is_at_most_half_a_step():
    w = _w()
    q = quantize_rtn(w, scheme(8))
    assert q.scheme.symmetric and q.codes.dtype == torch.int8 and q.scale.shape == (64, 1)
    assert q.codes.abs().max() <= 127
    err = (q.dequantize() - w).abs()
    assert (err <= q.error_bound() + 1e-12).all()          # |w - deq| <= scale / 2
    # fp16 scales, rounded up from amax / 127 so that nothing clips
    amax = w.abs().amax(1)
    assert torch.equal(q.scale[:, 0].half().float(), q.scale[:, 0])
    assert (q.scale[:, 0] >= amax / 127).all() and (q.scale[:, 0] <= amax / 127 * (1 + 2**-10)).all()


@pytest.mark.parametrize("group", [None, 32, 64, 128])
def test_rtn_int4_error_is_at_most_half_a_step(group):
    w = _w()
    q = quantize_rtn(w, scheme(4, group))
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 15
    assert ((q.zero >= 0) & (q.zero <= 15)).all() and torch.equal(q.zero, q.zero.round())
    assert ((q.dequantize() - w).abs() <= q.error_bound() + 1e-12).all()


def test_int4_hand_example_with_clamped_top_code():
    # lo = -0.9375, hi = 0.9375: scale 1.875/15 = 0.125, zero round(7.5) = 8 (half to even);
    # 0.9375 -> round(7.5) + 8 = 16 clamps to 15 and dequantizes to 7 * 0.125 = 0.875: still
    # exactly half a step (0.0625) away. -0.9375 -> round(-7.5) + 8 = 0 -> -1.0, also half a step.
    w = torch.tensor([[-0.9375, 0.0, 0.5, 0.9375]])
    q = quantize_rtn(w, Scheme(4, None, symmetric=False, scale_bits=32))
    assert q.scale.item() == 0.125 and q.zero.item() == 8 and q.codes.tolist() == [[0, 8, 12, 15]]
    assert q.dequantize()[0].tolist() == [-1.0, 0.0, 0.5, 0.875]
    assert (q.dequantize() - w).abs().max().item() == 0.0625 == q.scale.item() / 2


def test_bits_and_bytes_include_scales_and_zeros():
    w = torch.zeros(64, 256)
    q4 = quantize_rtn(_w(), scheme(4, 32))
    # codes 64*256/2 = 8192 B; 64*8 groups: fp16 scales 1024 B, 4-bit zeros 256 B
    assert q4.nbytes == 8192 + 1024 + 256 and q4.bits_per_weight == pytest.approx(4 + 20 / 32)
    q8 = quantize_rtn(w, scheme(8))
    assert q8.nbytes == 64 * 256 + 64 * 2 and q8.bits_per_weight == pytest.approx(8 + 16 / 256)
    assert scheme(4, 128).bits_per_weight(4096) == pytest.approx(4.15625)
    assert scheme(8).bits_per_weight(4096) == pytest.approx(8.00390625)
    with pytest.raises(CohwError, match="does not divide"):
        scheme(4, 48).bits_per_weight(256)
    with pytest.raises(CohwError, match="bits"):
        Scheme(9)


@pytest.mark.parametrize("qtype, block_bytes, bpw", [("Q8_0", 34, 8.5), ("Q4_0", 18, 4.5)])
def test_gguf_blocks_match_llama_cpp_layout_and_dequantization(qtype, block_bytes, bpw):
    w = _w()
    raw, q = gguf_quantize(w, qtype)
    assert raw.dtype == np.uint8 and raw.nbytes == 64 * 256 // 32 * block_bytes == q.nbytes
    assert q.bits_per_weight == pytest.approx(bpw)
    ref = gguf_blocks.gguf_dequantize(raw, qtype)        # llama.cpp's reference, via the gguf package
    assert torch.equal(q.dequantize(), ref.view(64, 256))
    d = q.scale.abs().repeat_interleave(32, dim=1)
    err = (q.dequantize() - w).abs()
    # llama.cpp rounds with the fp32 scale and then stores it as fp16 (relative error <= 2^-11),
    # which adds up to |code| * 2^-11 * d to the usual half step.
    if qtype == "Q8_0":
        assert (err <= d * (0.5 + 127 * 2**-11) * (1 + 1e-6)).all()
        assert not (err <= d / 2).all()   # ... and that extra really shows up
    else:  # Q4_0 maps the signed extreme to -8; the opposite extreme can clip to +7: error <= d
        assert (err <= d * (1 + 8 * 2**-11) * (1 + 1e-6)).all()
        assert q.codes.min() >= -8 and q.codes.max() <= 7
    with pytest.raises(CohwError, match="Q8_0, Q4_0"):
        gguf_quantize(w, "Q2_K")


def _tiny_model(layers=2):
    from cohw_utils.studies.quantization.tinylm import TinyLMConfig, make_model

    return make_model(TinyLMConfig(vocab_size=320, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=layers, num_attention_heads=2))


def test_gguf_file_round_trip(tmp_path):
    model = _tiny_model()
    path = tmp_path / "tiny-q4_0.gguf"
    written = gguf_blocks.write_gguf(path, model, "Q4_0")
    table = gguf_blocks.read_gguf(path).set_index("name")
    assert dict(table["bytes"]) == written
    assert table.loc["blk.0.ffn_down.weight", "type"] == "Q4_0"
    assert table.loc["blk.0.ffn_down.weight", "bytes"] == 64 * 128 // 32 * 18
    assert table.loc["token_embd.weight", "type"] == "F16" and table.loc["output_norm.weight", "type"] == "F32"
    assert path.stat().st_size > sum(written.values())  # plus header, metadata and alignment
    import gguf

    t = {x.name: x for x in gguf.GGUFReader(str(path)).tensors}["blk.1.attn_q.weight"]
    _, q = gguf_quantize(model.model.layers[1].self_attn.q_proj.weight, "Q4_0")
    assert torch.equal(gguf_blocks.gguf_dequantize(np.asarray(t.data), "Q4_0").view(64, 64), q.dequantize())


@pytest.mark.parametrize("fmt, kernel", [("int8", "int8pack"), ("int8", "dequant"), ("int4-g32", "int4pack"),
                                         ("int4-g128", "int4pack"), ("int4-g128", "dequant"), ("Q4_0", "int4pack"),
                                         ("Q8_0", "dequant")])
def test_cpu_kernels_compute_the_dequantized_linear(fmt, kernel):
    w = _w(96, 256)
    if fmt.startswith("Q"):
        q = gguf_quantize(w, fmt)[1]
    else:
        bits, _, g = fmt.partition("-g")
        q = quantize_rtn(w, scheme(int(bits[3:]), int(g) if g else None))
    layer = QuantLinear(q, kernel=kernel)
    assert layer.kernel == kernel
    x = torch.randn(3, 5, 256, generator=torch.Generator().manual_seed(1))
    ref = x @ q.dequantize().T
    assert torch.allclose(layer(x), ref, atol=1e-4, rtol=1e-4)


def test_kernel_choice_and_bad_kernel():
    q4 = quantize_rtn(_w(), scheme(4, 128))
    assert QuantLinear(q4).kernel == "int4pack"
    assert QuantLinear(quantize_rtn(_w(), scheme(8))).kernel == "int8pack"
    assert QuantLinear(quantize_rtn(_w(), scheme(8, 128))).kernel == "dequant"
    with pytest.raises(CohwError, match="cannot run"):
        QuantLinear(q4, kernel="int8pack")
    with pytest.raises(CohwError, match="unknown kernel"):
        QuantLinear(q4, kernel="fast")


def test_parse_method_names():
    m = methods.parse_method("gptq-int4-g128")
    assert (m.algo, m.scheme.bits, m.scheme.group_size, m.scheme.symmetric) == ("gptq", 4, 128, False)
    assert methods.parse_method("rtn-int8").scheme == Scheme(8, None, True)
    assert methods.parse_method("gguf-q4_0").gguf_type == "Q4_0"
    with pytest.raises(CohwError, match="unknown quantization method"):
        methods.parse_method("int3-magic")


def test_quantize_lm_accounting_and_input_untouched():
    model = _tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = methods.quantize_lm(model, "rtn-int4-g32")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    lin = 2 * (4 * 64 * 64 + 3 * 64 * 128)           # 2 blocks x (q,k,v,o + gate,up,down)
    assert q.linear_params() == lin
    other = sum(p.numel() for p in model.parameters()) - lin
    assert q.weight_bytes() == sum(t.nbytes for t in q.weights.values()) + 2 * other
    assert q.linear_bits_per_weight() == pytest.approx(4 + 20 / 32)
    assert methods.quantize_lm(model, "fp32").weight_bytes() == 4 * sum(p.numel() for p in model.parameters())
    with pytest.raises(CohwError, match="calibration"):
        methods.quantize_lm(model, "gptq-int4")
    km, used = q.kernel_model()
    assert used == {"int4pack": 14}
    ids = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        assert torch.allclose(km(input_ids=ids).logits, q.model(input_ids=ids).logits, atol=1e-3)


def test_awq_scaling_preserves_the_block_and_never_loses_to_rtn():
    model = _tiny_model(layers=1)
    calib = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    states, kwargs = blocks.block_inputs(model, calib, batch=2)
    layer = blocks.decoder_layers(model)[0]
    before = blocks.run_block(layer, states, kwargs)
    stats = blocks.collect_stats(layer, states, kwargs)
    assert stats["self_attn.q_proj"] is stats["self_attn.v_proj"]   # one input, one set of stats
    w = layer.mlp.down_proj.weight.detach().clone()
    s, alpha, losses = awq.awq_search([w], stats["mlp.down_proj"], scheme(4, 32))
    assert losses[0] == pytest.approx(blocks.output_error(w, quantize_rtn(w, scheme(4, 32)).dequantize(),
                                                         stats["mlp.down_proj"].H))  # alpha 0 = RTN
    assert min(losses) <= losses[0] and s.shape == (128,)
    awq.awq_scale_block(layer, stats, scheme(4, 32))
    after = blocks.run_block(layer, states, kwargs)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(before, after))  # same function


def test_int8_kv_cache_stores_int8_and_reads_back_within_half_a_step():
    model = _tiny_model()
    cache = kv_int8.int8_kv_cache(model.config)
    ids = torch.randint(0, 320, (1, 12))
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)
        model(input_ids=ids[:, :1], cache=cache, use_cache=True)   # one decode step appends
    layer = cache.layers[0]
    assert layer.qk.dtype == torch.int8 and layer.qk.shape == (1, 2, 13, 32)
    assert layer.stored_bytes() == 2 * (2 * 13 * 32 + 2 * 13 * 2)
    err = (layer.keys - layer.qk.float() * layer.sk.float()).abs().max()
    assert err == 0
    assert kv_int8.kv_format_bytes_per_token(model.config, "int8") * 13 == sum(l.stored_bytes() for l in cache.layers)


def test_kv_format_bytes_per_token_llama2():
    from cohw_utils.workloads import load_hf_config, CONFIG_DIR

    cfg = load_hf_config(CONFIG_DIR / "llama-2-7b" / "config.json")
    assert kv_int8.kv_format_bytes_per_token(cfg, "fp16") == 524_288          # 2 * 32 layers * 32 heads * 128 * 2
    assert kv_int8.kv_format_bytes_per_token(cfg, "int8") == 2 * 32 * 32 * 130  # 128 int8 + one fp16 scale
    with pytest.raises(CohwError, match="KV-cache format"):
        kv_int8.kv_format_bytes_per_token(cfg, "int3")


def test_scaleup_bytes_llama2_7b_by_hand():
    from cohw_utils.workloads import build

    model = build("llama-2-7b", device="meta").model
    lin = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)      # 6,476,005,376 linear weights
    total = 6_738_415_616
    fp16 = scale_up.model_bytes(model, "fp16")
    assert fp16["linear_params"] == lin and fp16["params"] == total and fp16["bytes"] == 2 * total
    int4 = scale_up.model_bytes(model, "int4 g128")
    assert int4["bytes"] == pytest.approx(lin * (4 + 20 / 128) / 8 + 2 * (total - lin))
    q40 = scale_up.model_bytes(model, "Q4_0")["bytes"]
    assert q40 == pytest.approx(lin * 4.5 / 8 + 2 * (total - lin))
    t = scale_up.scaleup_table(["llama-2-7b"], context=4096)
    row = t[(t.format == "fp16") & (t.chip == "H100-SXM")].iloc[0]
    assert row.fits and row.bound_tok_s == pytest.approx(3350e9 / (2 * total + 524_288 * 4096))


def test_scaleup_fits_keeps_the_runtime_reserve():
    # llama-2-13b fp16 + a 6144-token fp16 KV cache = 26.03 + 5.03 = 31.06 GB: under a
    # V100-32GB's raw 32 GiB (34.36 GB), over its usable 30.92 GB (views.memory_budget: 10% reserve)
    t = scale_up.scaleup_table(["llama-2-13b"], context=6144).set_index(["format", "chip"])
    row = t.loc[("fp16", "V100-SXM2-32GB")]
    assert 0.9 * 32 * 2**30 / 1e9 < row.weight_GB + row.kv_GB < 32 * 2**30 / 1e9 and not row.fits
    assert t.loc[("Q8_0", "V100-SXM2-32GB"), "fits"]           # 14.14 + 3.36 GB
    best = scale_up.largest_fitting_format(t.reset_index()).set_index("chip")
    assert best.loc["V100-SXM2-32GB", "format"] == "Q8_0" and best.loc["A100-40GB", "format"] == "fp16"
    assert best.loc["V100-SXM2-16GB", "format"] == "Q4_0"        # 7.79 + 3.36 <= 14.4 GB
    none = scale_up.largest_fitting_format(scale_up.scaleup_table(["llama-2-70b"], context=4096))
    row = none.set_index("chip").loc["V100-SXM2-32GB"]
    assert pd.isna(row.format) and np.isnan(row.bound_tok_s)


def test_reference_results_file():
    ref = scale_up.load_reference()
    awq_7b = ref[(ref.model == "Llama-2-7B") & (ref.method == "AWQ")]
    assert awq_7b.value.iloc[0] == pytest.approx(5.60)
    assert set(ref.citation) <= {"lin2024awq"}


def test_gemv_ladder_rows_and_bad_shapes():
    t = ladder.gemv_ladder(64, 128, layers=2, repeats=1, warmup=0)
    assert list(t.format) == ["fp32", "bf16", "int8 per-channel", "int8 per-channel", "int4 g128", "int4 g128", "Q4_0"]
    assert t.loc[0, "bytes"] == 4 * 64 * 128 * 2 and t.loc[6, "bytes"] == 2 * 64 * 128 // 32 * 18
    assert (t["GB/s"] > 0).all()
    with pytest.raises(CohwError, match="multiple of 32"):
        ladder.gemv_ladder(64, 100)
    with pytest.raises(CohwError, match="context"):
        scale_up.scaleup_table(["llama-2-7b"], context=-1)


def test_sensitivity_one_layer_at_a_time_and_its_figure():
    model = _tiny_model()
    windows = torch.randint(0, 320, (3, 16), generator=torch.Generator().manual_seed(2))
    t = results.quant_sensitivity(model, windows, scheme(2))
    assert len(t) == 14 and set(t.linear) == set(blocks.LINEAR_NAMES) and set(t.block) == {0, 1}
    assert ((t.delta_lo <= t.delta_pct) & (t.delta_pct <= t.delta_hi)).all()
    assert t.resolved.dtype == bool
    fig = results.fig_sensitivity(t)
    assert len(fig.axes) == 2  # the map and its colour bar


def test_weight_kurtosis_and_output_errors_against_rtn():
    model = _tiny_model(layers=1)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.copy_(torch.tensor([1.0, -1.0]).repeat(64 * 32).view(64, 64))
    k = results.weight_kurtosis(model)
    assert list(k.index) == list(blocks.block_linears(model))
    # w = +-1: central 4th moment 1, unbiased variance n/(n-1): kurtosis ((n-1)/n)^2
    n = 64 * 64
    assert k["model.layers.0.self_attn.q_proj"] == pytest.approx(((n - 1) / n) ** 2)
    assert 2.8 < k["model.layers.0.mlp.down_proj"] < 3.2   # seeded Gaussian init: about 3
    calib = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    qs = {m: methods.quantize_lm(model, m, calib=calib, batch=2) for m in ("rtn-int4-g32", "gptq-int4-g32")}
    H = blocks.input_second_moments(model, calib, batch=2)
    t = results.output_error_table(model, qs, {"calibration": H})
    assert list(t.columns) == ["calibration", "vs RTN (calibration)"]
    assert t.loc["rtn-int4-g32", "vs RTN (calibration)"] == 1.0
    assert 0 < t.loc["gptq-int4-g32", "vs RTN (calibration)"] < 1   # GPTQ lowers what it minimises
    per_layer = results.layer_errors(model, qs, H).set_index("layer")
    assert t.loc["gptq-int4-g32", "calibration"] == pytest.approx(per_layer["gptq-int4-g32"].sum())


def test_rtn_baseline_and_compare_with_rtn():
    assert results.rtn_baseline("gptq-int4-g128") == "rtn-int4-g128"
    assert results.rtn_baseline("gptq-int4-act") == "rtn-int4"
    assert results.rtn_baseline("awq-int3-g64") == "rtn-int3-g64"
    with pytest.raises(CohwError, match="no round-to-nearest baseline"):
        results.rtn_baseline("gguf-q4_0")
    model = _tiny_model(layers=1)
    windows = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(3))
    df, qs = results.evaluate_methods(model, ["fp32", "rtn-int2-g32", "awq-int2-g32", "gptq-int3"], windows,
                                      calib=windows, batch=2)
    # fp32: every weight once at 4 bytes, but only one 64-wide row of the 320-row embedding
    assert df.bytes_per_token.iloc[0] == 4 * (sum(p.numel() for p in model.parameters()) - 320 * 64 + 64)
    v = results.compare_with_rtn(qs)
    assert list(v.method) == ["awq-int2-g32"] and v.vs.iloc[0] == "rtn-int2-g32"   # gptq-int3 has no rtn-int3
    row = v.iloc[0]
    assert row.ppl == pytest.approx(df.set_index("method").loc["awq-int2-g32", "ppl"])
    assert row["95% lo"] <= row["change %"] <= row["95% hi"]
    assert row.verdict == ("better" if row["95% hi"] < 0 else "worse" if row["95% lo"] > 0 else "not resolved")
    assert results.compare_with_rtn({"fp32": qs["fp32"]}).empty
