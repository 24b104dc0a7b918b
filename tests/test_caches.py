"""Caches measured from the model's own cache object, and decode traced against a static cache.

Every expected number is computed by hand in the test from the config's fields (the arithmetic is
in the comments); published configs are the repo's copies under ``cohw_utils/data/configs/``.
"""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from cohw_utils import workloads as W
from cohw_utils.core.errors import CohwError, ConfigError
from cohw_utils.spine import optable
from cohw_utils.spine.analyze import analyze
from cohw_utils.views import kvcache
from cohw_utils.workloads.caches import CacheReport, measure_cache
from cohw_utils.workloads.hf_config import attention_geometry, cache_layer_types, kv_cache_bytes_per_token

CONFIGS = W.CONFIG_DIR


def save(tmp_path, config: transformers.PretrainedConfig, name: str) -> str:
    d = tmp_path / name
    config.save_pretrained(d)
    return str(d)


# ------------------------------------------------------------------------ static-cache decode
def test_static_decode_equals_dynamic_decode_on_tiny_llama_cpu():
    logits = {}
    for cache in ("static", "dynamic"):
        built = W.build("llama-2-7b", scale="tiny", device="cpu", batch=2, seq_len=8, cache=cache)
        ph = built.phase("decode")
        args, kwargs = ph.make_inputs()
        held = kwargs["cache"]
        assert type(held).__name__ == {"static": "StaticCache", "dynamic": "DynamicCache"}[cache]
        out = ph.run(*args, **kwargs)
        logits[cache] = out.logits
        # static: 8 + 1 positions pre-allocated, position 8 written; dynamic: grown to 9 by a cat
        assert W.cache_tensors(out.cache)[0][0].shape == (2, 4, 9, 16)
    assert "static KV cache (StaticCache, 9 positions" in W.build(
        "llama-2-7b", scale="tiny", device="cpu", seq_len=8).phase("decode").description
    assert torch.allclose(logits["static"], logits["dynamic"], atol=1e-5, rtol=0)
    with pytest.raises(CohwError, match="cache must be one of 'static', 'dynamic', got 'paged'"):
        W.build("llama-2-7b", cache="paged")


def test_llama2_7b_decode_bytes_are_weights_plus_kv_read_plus_one_token_written():
    a = analyze("llama-2-7b", "decode", seq_len=2048)
    moved = optable.bytes_moved(a.table).sum()
    params, vocab, hidden = 6_738_415_616, 32_000, 4_096
    # Weights read once each, in fp16: every parameter but the input embedding table, of which the
    # step gathers one row (its other 31,999 rows are never read): (params - 32000 x 4096 + 4096) x 2.
    weights_read = (params - vocab * hidden + hidden) * 2  # = 13,214,695,424
    per_token = 524_288  # 2 (K, V) x 32 layers x 32 heads x 128 x 2 B
    # Attention reads all 2048 + 1 positions of the static cache (max_cache_len = seq_len + 1,
    # the new token's K/V included); the step writes one token's K/V (index_copy_ at position 2048).
    expected = weights_read + (2048 + 1) * per_token + per_token  # = 14,289,485,824
    assert abs(moved / expected - 1) < 0.01
    writes = a.table[a.table.op == "aten.index_copy_.default"]
    assert len(writes) == 2 * 32 and writes.bytes_written.sum() == per_token  # one position, K and V, 32 layers
    assert a.cache.cache_class == "StaticCache" and a.cache.context == 2049

    # transformers' DynamicCache instead concatenates the whole cache each step: torch.cat reads the
    # 2048 cached + 1 new positions and writes all 2049, per layer, K and V: 2 x 2049 x 524,288 more.
    dyn = analyze("llama-2-7b", "decode", seq_len=2048, cache="dynamic")
    extra = optable.bytes_moved(dyn.table).sum() - moved
    assert abs(extra / (2 * 2049 * per_token) - 1) < 0.01  # 2,148,532,224 B: the "2.15 GB of cat"


def test_static_decode_on_meta_knows_its_position(tmp_path):
    # OPT computes its positions from the cache length: on meta the static cache's counter would be a
    # tensor with no value (".item() cannot be called on meta tensors"); it is kept on the host.
    path = save(tmp_path, transformers.OPTConfig(
        num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64,
        vocab_size=1000, max_position_embeddings=64), "opt")
    ph = W.build(path, seq_len=12, batch=2).phase("decode")
    args, kwargs = ph.make_inputs()
    assert int(kwargs["cache"].get_seq_length()) == 12
    assert kwargs["position_ids"].shape == (2, 1)  # position 12 (on meta: a shape, its value lives in the counter)
    out = ph.run(*args, **kwargs)
    assert out.logits.shape == (2, 1, 1000) and int(out.cache.get_seq_length()) == 13


# ------------------------------------------------------------------------ full attention
def test_llama2_13b_cache_measured_on_meta():
    r = measure_cache(W.build("llama-2-13b", seq_len=8))
    assert isinstance(r, CacheReport) and r.cache_class == "DynamicCache" and r.context == 8
    # 2 (K, V) x 40 layers x 40 heads x 128 x 2 B = 819,200 B per token
    assert r.framework_bytes_per_token == r.serving_bytes_per_token == r.kv_bytes_per_token == 819_200
    assert r.closed_form_bytes_per_token == 819_200 and r.closed_form_difference == 0
    assert {la.layer_type for la in r.per_layer} == {"full attention"} and r.layers == 40
    assert r.key_shape == (1, 40, 8, 128) and r.measured_bytes == r.formula_bytes == 819_200 * 8 and r.agrees
    assert r.bytes_at(4096, batch=2) == 819_200 * 4096 * 2 and r.bytes_per_token(100_000) == 819_200
    json.dumps(r.summary())  # JSON-friendly


# ------------------------------------------------------------------------ MLA
def test_deepseek_v2_lite_latent_cache():
    path = CONFIGS / "deepseek-v2-lite"
    cfg = W.load_hf_config(path)
    assert (cfg.num_hidden_layers, cfg.kv_lora_rank, cfg.qk_rope_head_dim) == (27, 512, 64)  # the published config
    latent = (512 + 64) * 27 * 2  # = 31,104 B per token in bf16
    assert kv_cache_bytes_per_token(cfg, 2) == latent == 31_104
    assert kvcache.kv_bytes_per_token(path, "bf16") == 31_104
    assert kvcache.attention_summary(path)["kind"] == "MLA"
    with pytest.raises(ConfigError, match="multi-head latent attention .*measure_cache"):
        attention_geometry(cfg)  # no (kv_heads, head_dim) describes a latent cache: no silent number
    r = measure_cache(W.build(str(path), seq_len=8))
    assert r.dtype == "bf16" and r.used == "serving"
    assert r.serving_bytes_per_token == 31_104
    # measured: transformers 5 caches the latent too (K (1, 1, 8, 512), V (1, 1, 8, 64) per layer)
    assert r.per_layer[0].shapes == ((1, 1, 8, 512), (1, 1, 8, 64))
    assert r.framework_bytes_per_token == 31_104 and r.closed_form_difference == 0
    # a per-head cache would hold K (128 nope + 64 rope) and V (128) for 16 heads: 16 x 320 x 27 x 2
    assert r.decompressed_bytes_per_token == 276_480


# ------------------------------------------------------------------------ sliding windows
def test_gemma3_sliding_and_full_layers():
    path = CONFIGS / "gemma-3-1b-it"
    kinds = cache_layer_types(W.load_hf_config(path))
    assert kinds.count(("sliding_attention", 512)) == 22 and kinds.count(("full_attention", None)) == 4
    r = measure_cache(W.build(str(path), seq_len=16))
    per_layer = 2 * 1 * 256 * 2  # K and V, 1 KV head of 256, bf16 = 1,024 B per token
    t = r.by_type()
    assert t["sliding window (512)"]["layers"] == 22 and t["full attention"]["layers"] == 4
    assert t["sliding window (512)"]["serving_bytes_per_token"] == 22 * per_layer == 22_528
    assert t["full attention"]["serving_bytes_per_token"] == 4 * per_layer == 4_096
    assert r.bytes_per_token(100) == 26_624 and r.bytes_per_token(512) == 4_096  # window full
    # at 32k tokens: 4 full layers x 32768 + 22 sliding layers x 512 (not 26 x 32768: 6x more)
    at_32k = 4_096 * 32_768 + 22_528 * 512
    assert r.bytes_at(32_768) == at_32k == 145_752_064
    assert kvcache.kv_cache_bytes(path, 32_768, dtype="bf16") == at_32k
    assert kvcache.kv_cache_bytes(path, 100, dtype="bf16") == 26_624 * 100


def test_mistral_sliding_window_is_capped_by_transformers_cache(tmp_path):
    v01 = transformers.MistralConfig(num_hidden_layers=32, sliding_window=4096)  # v0.1: a window on every layer
    assert cache_layer_types(v01) == [("sliding_attention", 4096)] * 32
    path = save(tmp_path, transformers.MistralConfig(
        num_hidden_layers=2, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=512, vocab_size=1000, sliding_window=16), "mistral")
    built = W.build(path, seq_len=40, dtype="fp16")
    per_layer = 2 * 2 * 64 * 2  # K and V, 2 KV heads of 64, fp16 = 512 B per token
    pre = measure_cache(built, "prefill")
    assert {la.layer_type for la in pre.per_layer} == {"sliding window (16)"}
    # DynamicSlidingWindowLayer keeps the last W - 1 = 15 positions after 40 tokens: it caps
    assert pre.key_shape == (1, 2, 15, 64) and pre.measured_bytes == 2 * per_layer * 15
    assert pre.bytes_at(40) == pre.formula_bytes == 2 * per_layer * 16 and pre.agrees is False
    assert any("W - 1 = 15" in n for n in pre.notes)
    dec = measure_cache(built, "decode")  # StaticSlidingWindowLayer: min(W, 41) = 16 positions
    assert dec.cache_class == "StaticCache" and dec.key_shape == (1, 2, 16, 64)
    assert dec.measured_bytes == dec.formula_bytes == 2 * per_layer * 16 and dec.agrees


# ------------------------------------------------------------------------ recurrent state
def test_mamba_state_is_constant_in_length():
    path = CONFIGS / "mamba-2.8b"
    cfg = W.load_hf_config(path)
    assert (cfg.num_hidden_layers, cfg.intermediate_size, cfg.conv_kernel, cfg.state_size) == (64, 5120, 4, 16)
    with pytest.raises(ConfigError, match="no attention layers .*measure_cache"):
        kv_cache_bytes_per_token(cfg)
    with pytest.raises(ConfigError, match="no attention"):
        attention_geometry(cfg)
    built = W.build(str(path), seq_len=16)  # its config's dtype: float32
    r = measure_cache(built)
    # conv (5120 x 4) + SSM state (5120 x 16), fp32, x 64 layers = 26,214,400 B per sequence
    state = 5120 * (4 + 16) * 64 * 4
    assert r.state_bytes == state == 26_214_400 and r.kv_bytes_per_token == 0
    assert r.by_type()["recurrent state"]["layers"] == 64
    assert r.bytes_at(1) == r.bytes_at(100_000) == state and r.bytes_per_token(10) == 0
    assert r.formula_bytes == r.measured_bytes == state  # batch 1
    assert "model's own cache (linear_attention layers" in built.phase("decode").description
    dec = measure_cache(built, "decode")
    assert dec.cache_class == "DynamicCache" and dec.state_bytes == state

    # In bf16 the conv state is 2 B an element but the SSM state stays fp32 (the scan's dtype):
    # 64 x 5120 x (4 x 2 + 16 x 4) = 23,592,960, not the uniform 64 x 5120 x 20 x 2 = 13,107,200.
    bf16 = measure_cache(W.build(str(path), seq_len=4, dtype="bf16"))
    assert bf16.state_bytes == 64 * 5120 * (4 * 2 + 16 * 4) == 23_592_960
    assert any("float32" in n for n in bf16.notes)


def test_jamba_hybrid_attention_and_state(tmp_path):
    path = save(tmp_path, transformers.JambaConfig(
        num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1, num_experts=2, expert_layer_period=2,
        hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
        mamba_d_state=16, mamba_d_conv=4, mamba_expand=2), "jamba")
    cfg = W.load_hf_config(path)
    # layers 1 and 3 attend: 2 x 2 layers x 2 KV heads x 64 x 2 B; the SSM layers add nothing per token
    assert kv_cache_bytes_per_token(cfg, 2) == 2 * 2 * 2 * 64 * 2 == 1_024
    built = W.build(path, seq_len=16, dtype="bf16")
    r = measure_cache(built)
    t = r.by_type()
    assert t["full attention"]["layers"] == 2 and t["full attention"]["serving_bytes_per_token"] == 1_024
    # per SSM layer: conv 512 x 4 x 2 B + state 512 x 16 x 4 B (fp32) = 36,864; 2 layers
    assert t["recurrent state"]["constant_bytes"] == 2 * (512 * 4 * 2 + 512 * 16 * 4) == 73_728
    assert r.bytes_at(1000) == 1_024 * 1000 + 73_728 and r.agrees
    assert "model's own cache" in built.phase("decode").description


def test_encoder_decoder_cross_attention():
    path = CONFIGS / "bart-large"
    built = W.build(str(path), seq_len=32)  # fp32: bart-large's config names no dtype
    if "decode" not in built.phases:
        pytest.skip("the seq2seq family has no decode phase in this checkout")
    r = measure_cache(built)  # no prefill: the decode phase
    assert r.cache_class == "EncoderDecoderCache" and r.closed_form_bytes_per_token is None
    t = r.by_type()
    # decoder self-attention: 2 x 12 layers x 16 heads x 64 x 4 B per decoded token;
    # cross attention: the same width x the 32 source tokens, constant in the decoded context
    assert r.dtype == "fp32" and t["full attention"]["layers"] == t["cross attention"]["layers"] == 12
    assert t["full attention"]["serving_bytes_per_token"] == 2 * 12 * 16 * 64 * 4 == 98_304
    assert t["cross attention"]["constant_bytes"] == 98_304 * 32 and t["cross attention"]["serving_bytes_per_token"] == 0


# ------------------------------------------------------------------------ analyze and errors
def test_analyze_carries_the_measured_cache():
    a = analyze(str(CONFIGS / "gemma-3-1b-it"), "prefill", seq_len=1024)
    t = a.totals()
    json.dumps(t)
    assert t["kv_cache_bytes_per_token"] == a.kv_bytes_per_token == 26_624
    # 4 full layers x 1024 tokens + 22 sliding layers x 512 (their window) at 1,024 B per layer-token
    assert t["kv_cache_bytes_at_context"] == 4_096 * 1024 + 22_528 * 512
    c = t["cache"]
    assert c["context"] == 1024 and c["by_type"]["sliding window (512)"]["serving_bytes_per_token"] == 22_528
    assert c["framework_bytes_per_token"] == c["serving_bytes_per_token"] == 26_624
    assert analyze("vit-b-16").totals()["cache"] is None  # no cache, no number


def test_bad_input_is_one_clear_line():
    with pytest.raises(CohwError, match="returned no cache") as e:
        measure_cache(W.build("vit-b-16"), "forward")
    assert "\n" not in str(e.value)
    with pytest.raises(CohwError, match="got a Built and build options \\(seq_len\\)"):
        measure_cache(W.build("llama-2-7b", seq_len=4), seq_len=8)
    r = measure_cache("llama-2-7b", seq_len=4, batch=1)  # a name: tiny on cpu, as views.kvcache did
    with pytest.raises(CohwError, match="kind must be one of serving, framework"):
        r.bytes_at(10, kind="paged")
    with pytest.raises(ConfigError, match="no attention layers") as e:
        kv_cache_bytes_per_token(CONFIGS / "mamba-2.8b")
    assert "\n" not in str(e.value)
