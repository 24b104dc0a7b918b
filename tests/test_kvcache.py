"""KV cache: per-token size of any decoder config (MHA, GQA, MQA) by hand, real caches, memory layout."""
from __future__ import annotations

import json

import pytest

from cohw_utils.views import kvcache
from cohw_utils.core.errors import CohwError, ConfigError
from cohw_utils.hardware import get_hardware

# Published config.json values (only the fields that size the cache, plus model_type).
CONFIGS = {
    # MHA: 32 layers x 32 KV heads x 128 = 2 x 32 x 32 x 128 x 2 B
    "llama-2-7b-mha": ({"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32,
                        "num_key_value_heads": 32, "num_hidden_layers": 32, "intermediate_size": 11008,
                        "vocab_size": 32000}, "MHA", 2 * 32 * 32 * 128 * 2),
    # GQA: Llama-2-70B, 80 layers, 8 KV heads of 128
    "llama-2-70b-gqa": ({"model_type": "llama", "hidden_size": 8192, "num_attention_heads": 64,
                         "num_key_value_heads": 8, "num_hidden_layers": 80, "intermediate_size": 28672,
                         "vocab_size": 32000}, "GQA", 2 * 80 * 8 * 128 * 2),
    # GQA: Mistral-7B-v0.1, 32 layers, 8 KV heads of 128
    "mistral-7b-gqa": ({"model_type": "mistral", "hidden_size": 4096, "num_attention_heads": 32,
                        "num_key_value_heads": 8, "num_hidden_layers": 32, "intermediate_size": 14336,
                        "vocab_size": 32000}, "GQA", 2 * 32 * 8 * 128 * 2),
    # MQA: Falcon-7B, 32 layers, one KV head of 4544 / 71 = 64
    "falcon-7b-mqa": ({"model_type": "falcon", "hidden_size": 4544, "num_attention_heads": 71,
                       "num_hidden_layers": 32, "multi_query": True, "new_decoder_architecture": False,
                       "vocab_size": 65024}, "MQA", 2 * 32 * 1 * 64 * 2),
    # MQA: StarCoder (gpt_bigcode), 40 layers, one KV head of 6144 / 48 = 128
    "starcoder-mqa": ({"model_type": "gpt_bigcode", "n_embd": 6144, "n_head": 48, "n_layer": 40,
                       "multi_query": True, "vocab_size": 49152}, "MQA", 2 * 40 * 1 * 128 * 2),
    # MHA without num_key_value_heads: GPT-2 small, 12 layers x 12 heads of 64
    "gpt2-mha": ({"model_type": "gpt2", "n_embd": 768, "n_head": 12, "n_layer": 12, "vocab_size": 50257},
                 "MHA", 2 * 12 * 12 * 64 * 2),
}


def write_config(tmp_path, name):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIGS[name][0]))
    return d


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kv_per_token_of_a_config_path_by_hand(tmp_path, name):
    path = write_config(tmp_path, name)
    _, kind, fp16 = CONFIGS[name]
    assert kvcache.kv_bytes_per_token(path) == fp16                      # folder
    assert kvcache.kv_bytes_per_token(path / "config.json", "fp32") == 2 * fp16  # file
    assert kvcache.kv_bytes_per_token(str(path), "int8") == fp16 // 2
    assert kvcache.kv_bytes_per_token(path, "int4") == fp16 // 4
    assert kvcache.attention_summary(path)["kind"] == kind


def test_registry_llamas_and_published_numbers():
    # the numbers cohw_utils.workloads documents for Llama-2 in fp16
    assert kvcache.kv_bytes_per_token("llama-2-7b") == 524_288
    assert kvcache.kv_bytes_per_token("llama-2-13b") == 819_200
    assert kvcache.kv_bytes_per_token("llama-2-70b") == 327_680
    g = kvcache.geometry_table({"70b": "llama-2-70b"})
    assert g.loc["70b", ["layers", "heads", "kv_heads", "head_dim", "kind"]].tolist() == [80, 64, 8, 128, "GQA"]
    # batch and length are linear; a paged cache rounds up to whole blocks
    assert kvcache.kv_cache_bytes("llama-2-13b", 4096, batch=8) == 819_200 * 4096 * 8
    assert kvcache.kv_cache_bytes("llama-2-13b", 17, block_size=16) == 819_200 * 32
    t = kvcache.kv_table({"13b": "llama-2-13b"}, [1024, 2048], [1, 4])
    assert t.set_index(["batch", "seq_len"]).loc[(4, 2048), "kv_bytes"] == 819_200 * 2048 * 4


def test_bad_configs_are_named(tmp_path):
    with pytest.raises(CohwError, match="unknown decoder LM 'llama-2-13'; use one of llama-2-7b"):
        kvcache.kv_bytes_per_token("llama-2-13")
    with pytest.raises(CohwError, match="'sd-1.5' is not a decoder LM"):
        kvcache.kv_bytes_per_token("sd-1.5")
    with pytest.raises(ConfigError, match="no such file"):
        kvcache.kv_bytes_per_token(tmp_path / "nope" / "config.json")


@pytest.mark.parametrize("name", ["llama-2-7b-mha", "mistral-7b-gqa", "falcon-7b-mqa"])
def test_real_tiny_cache_matches_the_formula(tmp_path, name):
    check = kvcache.measure_cache(str(write_config(tmp_path, name)), seq_len=12, batch=3)
    kv_heads = {"MHA": 4, "GQA": 2, "MQA": 1}[CONFIGS[name][1]]  # tiny keeps the attention kind
    assert check.key_shape == (3, kv_heads, 12, 16) and check.layers == 2
    assert check.measured_bytes == check.formula_bytes == 2 * 2 * kv_heads * 16 * 4 * 12 * 3
    assert check.agrees


def test_meta_cache_of_the_full_70b_matches_the_formula():
    check = kvcache.measure_cache("llama-2-70b", seq_len=16, batch=2, scale="full", device="meta")
    assert check.key_shape == (2, 8, 16, 128) and check.layers == 80 and check.dtype == "fp16"
    assert check.measured_bytes == 327_680 * 16 * 2 == check.formula_bytes


def test_kv_exceeds_weights_at():
    weights_13b = 13_015_864_320 * 2  # published parameter count x fp16
    assert kvcache.weight_bytes("llama-2-13b") == weights_13b
    # 26,031,728,640 / 819,200 = 31,777.99: the 31,778th token tips it over
    assert kvcache.exceeds_weights_at("llama-2-13b", weights_13b) == 31_778
    assert kvcache.exceeds_weights_at("llama-2-13b", weights_13b, batch=8) == 3_973


def test_13b_on_a100_40gb_layout_by_hand():
    hw = get_hardware("A100-40GB")
    weights = 13_015_864_320 * 2
    lay = kvcache.memory_layout(hw, weights, 819_200, activations=0)
    tab = lay.table()
    # the seed's (and vLLM's) "26 GB (65%)" divides decimal GB by the vendor's binary 40 GB;
    # the chip holds 40 x 2**30 = 42.95e9 bytes, so the weights are 60.6% of it
    assert tab.loc["weights", "% of capacity"] == pytest.approx(100 * weights / 2**30 / 40, abs=1e-9)
    assert tab.loc["weights", "% of capacity"] == pytest.approx(60.61, abs=0.01)
    assert tab.loc["runtime reserve", "GB"] == pytest.approx(4.294967296)
    budget = 40 * 2**30 * 0.9 - weights
    assert lay.kv_budget == pytest.approx(budget)
    assert lay.max_tokens == int(budget // 819_200) == 15_408
    assert lay.max_sequences(2048) == 7 and lay.max_sequences(4096) == 3 and lay.max_sequences(512) == 30
    conc = kvcache.concurrency_table(lay, [2048])
    assert conc.loc[2048, "max_sequences"] == 7
    with pytest.raises(CohwError, match="does not fit on A100-40GB"):
        kvcache.memory_layout(hw, 138e9, 327_680)  # Llama-2-70B in fp16
    with pytest.raises(CohwError, match="reserve_fraction"):
        kvcache.memory_layout(hw, weights, 819_200, reserve_fraction=1.5)


def test_figures_return_figures():
    from matplotlib.figure import Figure

    fig = kvcache.fig_kv_growth({"13b": "llama-2-13b"}, {"13b": 26e9}, seq_lens=[1024, 65536])
    assert isinstance(fig, Figure)
    lay = kvcache.memory_layout(get_hardware("A100-40GB"), 26e9, 819_200)
    assert isinstance(kvcache.fig_memory_layout({"A100": lay}, 2048), Figure)
