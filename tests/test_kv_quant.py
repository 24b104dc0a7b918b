"""Quantized KV caches (int4, fp8) and the int8 attention paths that read the codes directly."""
from __future__ import annotations

import pytest
import torch

from cohw_utils.core.errors import CohwError
from cohw_utils.studies.quantization import kv_int8, kv_quant
from cohw_utils.studies.quantization.tinylm import TinyLMConfig, make_model, perplexity


def _tiny_model():
    return make_model(TinyLMConfig(vocab_size=320, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=2))


def test_int4_asymmetric_by_hand():
    f = kv_quant.kv_quant_format("int4")
    x = (-0.5 + 0.1 * torch.arange(16.0))[None, :]          # min -0.5 (exact in fp16), span 1.5
    codes, s, lo = f.quantize(x)
    assert float(lo) == -0.5 and float(s) == pytest.approx(0.1, rel=1e-3) and float(s) >= 0.1  # rounded up
    assert codes.flatten().tolist() == list(range(16))
    back = f.dequantize((codes, s, lo))
    assert back.shape == x.shape and (back - x).abs().max() <= float(s) / 2


@pytest.mark.parametrize("name", ["int4", "int4-g32", "fp8-e4m3", "int8"])
def test_formats_read_back_within_their_step(name):
    f = kv_quant.kv_quant_format(name)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 64, generator=g) * 3
    parts = f.quantize(x)
    err = (f.dequantize(parts) - x).abs()
    step = parts[1].float().expand(*parts[0].shape).reshape(x.shape)   # each element's group scale
    if name == "fp8-e4m3":            # 3 mantissa bits: relative error <= 2^-4, plus the subnormal floor
        assert (err <= x.abs() / 16 + step * 2 ** -9).all()
    else:
        assert (err <= step / 2 * (1 + 1e-6)).all()


def test_bytes_per_vector_and_per_token_llama2():
    from cohw_utils.workloads import CONFIG_DIR, load_hf_config

    assert kv_quant.kv_quant_format("int4").bytes_per_vector(64) == 32 + 4
    assert kv_quant.kv_quant_format("int4-g32").bytes_per_vector(64) == 32 + 8
    assert kv_quant.kv_quant_format("fp8-e4m3").bytes_per_vector(64) == 66
    cfg = load_hf_config(CONFIG_DIR / "llama-2-7b" / "config.json")
    per = lambda kv: kv_int8.kv_format_bytes_per_token(cfg, kv)  # noqa: E731
    assert per("int4") == 2 * 32 * 32 * (64 + 4)             # 139,264: 0.266 of fp16
    assert per("int4-g32") == 2 * 32 * 32 * (64 + 4 * 4)
    assert per("fp8-e4m3") == per("int8") == 2 * 32 * 32 * 130
    with pytest.raises(CohwError, match="unknown quantized KV format"):
        kv_quant.kv_quant_format("int2")


@pytest.mark.parametrize("name", ["int4", "int4-g32", "fp8-e4m3"])
def test_quant_cache_stores_its_bytes_and_keeps_perplexity_close(name):
    model = _tiny_model().eval()
    cache = kv_quant.quant_kv_cache(model.config, name)
    ids = torch.randint(0, 320, (1, 12))
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)
        model(input_ids=ids[:, :1], cache=cache, use_cache=True)   # one decode step appends
    assert cache.layers[0].keys.shape == (1, 2, 13, 32)
    assert sum(l.stored_bytes() for l in cache.layers) == kv_int8.kv_format_bytes_per_token(model.config, name) * 13
    w = torch.randint(0, 320, (4, 32))
    base = perplexity(model, w)
    q = perplexity(model, w, cache_factory=lambda: kv_quant.quant_kv_cache(model.config, name))
    assert abs(q / base - 1) < 0.02


def _int8_cache(T=300, H=3, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(2, H, T, D, generator=g), torch.randn(2, H, T, D, generator=g)
    q = torch.randn(2, H, 1, D, generator=g)
    qk, sk = kv_quant.quantize_int8_vectors(k)
    qv, sv = kv_quant.quantize_int8_vectors(v)
    return q, k, v, qk, sk, qv, sv


def test_fused_int8_attention_equals_the_dequantized_reference():
    q, k, v, qk, sk, qv, sv = _int8_cache()
    ref = kv_quant.dequant_attention(q, qk, sk, qv, sv)
    # the reference is plain attention on the dequantized cache (SDPA agrees)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, qk.float() * sk.float(), qv.float() * sv.float())
    assert torch.allclose(ref, sdpa, atol=1e-5)
    for tile in (1, 64, 256, 1000):                          # tiles that do and do not divide T = 300
        assert torch.allclose(kv_quant.int8_attention(q, qk, sk, qv, sv, tile=tile), ref, atol=1e-5)
    # int_mm path: q rounded to int8 (relative error <= 1/254 per element), so close, not equal
    out = kv_quant.int8_attention_int_mm(q, qk, sk, qv, sv)
    assert torch.allclose(out, ref, atol=2e-2) and not torch.equal(out, ref)
    # and the int8 cache is close to the fp32 one it came from
    assert torch.allclose(kv_quant.fp32_attention(q, k, v), ref, atol=3e-2)
    with pytest.raises(CohwError, match="tile"):
        kv_quant.int8_attention(q, qk, sk, qv, sv, tile=0)


def test_quantize_int8_vectors_is_what_the_int8_cache_stores():
    model = _tiny_model().eval()
    cache = kv_int8.int8_kv_cache(model.config)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 320, (1, 5)), cache=cache, use_cache=True)
    layer = cache.layers[0]
    k = layer.qk.float() * layer.sk.float()
    qk, sk = kv_quant.quantize_int8_vectors(k)
    assert torch.equal(qk, layer.qk) and torch.equal(sk, layer.sk)


def test_time_kv_attention_table_shape():
    t = kv_quant.time_kv_attention([32], heads=2, head_dim=16, repeats=1, warmup=0)
    assert list(t.path) == ["fp32 cache", "int8, dequantize all", "int8, fused tiles", "int8, int_mm scores"]
    assert t.cache_MB.iloc[0] == pytest.approx(2 * 2 * 32 * 16 * 4 / 1e6)
    assert t.cache_MB.iloc[1] == pytest.approx((2 * 2 * 32 * 16 + 2 * 2 * 2 * 32) / 1e6)
    assert t.vs_fp32.iloc[0] == 1.0 and (t.max_abs_err.iloc[1:3] < 1e-5).all()
