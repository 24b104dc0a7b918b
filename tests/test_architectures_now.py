"""Chapter 2's "Architectures of now" table: every number pinned by hand from the configs (or to the
published parameter counts, within their rounding)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest

from cohw_utils.core.errors import CohwError
from cohw_utils.studies.architecture import now


@pytest.fixture(scope="module")
def table():
    t, reports = now.architectures_table(seq_len=2048, long_context=32768)
    return t.set_index("architecture"), reports


# (layers x KV heads x head_dim x 2 (K and V) x 2 bytes): the serving KV bytes one token adds
KV = {
    "Llama-2-7B": 2 * 32 * 32 * 128 * 2,        # 524,288 (MHA)
    "Llama-2-70B": 2 * 80 * 8 * 128 * 2,        # 327,680 (GQA, 8 KV heads)
    "Qwen2.5-7B": 2 * 28 * 4 * 128 * 2,         # 57,344
    "Phi-3.5-mini": 2 * 32 * 32 * 96 * 2,       # 393,216 (hidden 3072 / 32 heads)
    "Gemma-3-1B": 2 * 26 * 1 * 256 * 2,         # 26,624 (MQA, head_dim 256), every layer before its window fills
    "gpt-oss-20b": 2 * 24 * 8 * 64 * 2,         # 49,152
    "Mixtral-8x7B": 2 * 32 * 8 * 128 * 2,       # 131,072
    "Qwen3-30B-A3B": 2 * 48 * 4 * 128 * 2,      # 98,304
    "DeepSeek-V2-Lite": (512 + 64) * 27 * 2,    # 31,104: MLA latent (kv_lora_rank + qk_rope_head_dim)
    "DeepSeek-V3": (512 + 64) * 61 * 2,         # 70,272
    "LLaVA-1.5-7B": 2 * 32 * 32 * 128 * 2,      # its Vicuna-7B decoder
    "Mamba-2.8B": 0,                            # recurrent state: nothing per token
}


@pytest.mark.parametrize("arch", list(KV))
def test_kv_bytes_per_token_by_hand(table, arch):
    assert table[0].loc[arch, "kv_bytes_per_token"] == KV[arch]


def test_windows_latent_and_state(table):
    t, reports = table
    # Gemma-3-1B at 32k: 4 global layers x 1,024 B (2 x 1 x 256 x 2) x 32,768 + 22 sliding layers x 1,024 B x 512
    assert t.loc["Gemma-3-1B", "cache_bytes_at_long_context"] == 4 * 1024 * 32768 + 22 * 1024 * 512
    assert t.loc["Gemma-3-1B", "cache_layers"] == "22 x sliding window (512) + 4 x full attention"
    # MLA: a per-head cache would hold heads x (nope 128 + rope 64 + v 128) x 2 bytes per layer
    assert t.loc["DeepSeek-V2-Lite", "decompressed_bytes_per_token"] == 27 * 16 * (128 + 64 + 128) * 2
    # Mamba-2.8B in bf16: conv state 5120 x 4 in bf16 + SSM state 5120 x 16 in fp32, 64 layers, any context
    assert t.loc["Mamba-2.8B", "state_bytes"] == 64 * 5120 * (4 * 2 + 16 * 4)
    assert reports["Mamba-2.8B"].bytes_at(1) == reports["Mamba-2.8B"].bytes_at(1 << 20)
    assert t.loc["Mamba-2.8B", "tokens"] == now.PROMPT_CAP["Mamba-2.8B"]
    for arch in ("BERT-base", "ViT-B/16", "SDXL UNet", "FLUX.1-dev"):
        assert t.loc[arch, "cache_layers"] == "no cache"


# published totals (B) and their rounding; active where the model card states it
PUBLISHED = {"Llama-2-7B": (6.74, 0.01), "Mixtral-8x7B": (46.7, 0.05), "DeepSeek-V2-Lite": (15.7, 0.05),
             "DeepSeek-V3": (671, 0.5), "Qwen3-30B-A3B": (30.5, 0.05), "gpt-oss-20b": (20.9, 0.05),
             "SDXL UNet": (2.6, 0.05), "FLUX.1-dev": (12, 0.5), "BART-large": (0.406, 0.001)}


@pytest.mark.parametrize("arch", list(PUBLISHED))
def test_parameters_match_published(table, arch):
    value, tol = PUBLISHED[arch]
    assert abs(table[0].loc[arch, "parameters"] / 1e9 - value) <= tol


def test_active_parameters(table):
    t = table[0]
    # Qwen3-30B-A3B: 48 layers x 128 experts x 3 x 2048 x 768 routed, 8 of 128 active
    routed = 48 * 128 * 3 * 2048 * 768
    assert t.loc["Qwen3-30B-A3B", "active_parameters"] == t.loc["Qwen3-30B-A3B", "parameters"] - routed + routed * 8 // 128
    assert t.loc["Llama-2-7B", "active_parameters"] == t.loc["Llama-2-7B", "parameters"]
    assert 36e9 < t.loc["DeepSeek-V3", "active_parameters"] < 38e9     # "37B activated"


def test_flops_two_ways(table):
    t = table[0]
    llama = t.loc["Llama-2-7B"]
    # attention FLOPs counted full: 4 x T^2 x hidden per layer; causal keeps (T+1)/(2T) of them
    attn = 32 * 4 * 2048 * 2048 * 4096
    assert llama.flops - llama.flops_effective == attn - attn * 2049 // 4096
    assert t.loc["BERT-base", "flops_effective"] == t.loc["BERT-base", "flops"]  # bidirectional
    assert (t["flops_effective"] <= t["flops"]).all()


def test_kv_vs_context_and_figure(table):
    _, reports = table
    curves = now.kv_vs_context(reports, [1024, 4096, 32768])
    assert "BERT-base" not in curves.columns
    assert curves.loc[4096, "Llama-2-7B"] == 4096 * KV["Llama-2-7B"]
    fig = now.fig_kv_vs_context(curves)
    assert len(fig.axes[0].lines) == curves.shape[1]


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(CohwError, match="unknown architectures"):
        now.architectures_table(["GPT-5"])
