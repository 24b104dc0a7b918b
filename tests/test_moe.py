"""Mixture-of-experts parameters: total vs active, found in the built model."""
from __future__ import annotations

import pytest

from cohw_utils.core.errors import ConfigError
from cohw_utils.workloads import build
from cohw_utils.workloads.moe import active_parameters, moe_parameters

MIXTRAL = "cohw_utils/data/configs/capstone/mixtral-8x7b/config.json"


def test_mixtral_active_parameters_by_hand():
    b = build(MIXTRAL, device="meta")
    m = moe_parameters(b.model, b.config)
    # routed experts: per layer 8 experts x (gate+up 2 x 14336 x 4096 + down 4096 x 14336) = 8 x 3 x 14336 x 4096,
    # 32 layers -> 45,097,156,608; 2 of 8 active per token.
    routed = 32 * 8 * 3 * 14336 * 4096
    assert (m.experts, m.experts_per_token, m.routed) == (8, 2, routed)
    assert m.active == m.total - routed + routed * 2 // 8
    assert m.is_moe and 12.8e9 < m.active < 13.0e9 and 46.6e9 < m.total < 46.8e9


def test_dense_model_is_all_active():
    b = build("llama-2-7b", device="meta")
    m = moe_parameters(b.model, b.config)
    assert not m.is_moe and m.active == m.total == active_parameters(b.model, b.config)


def test_missing_top_k_is_a_clear_error():
    b = build(MIXTRAL, device="meta")
    cfg = b.config.to_dict()
    cfg.pop("num_experts_per_tok")
    with pytest.raises(ConfigError, match="experts-per-token"):
        moe_parameters(b.model, cfg)


def test_tiny_latent_attention_and_experts_run_on_cpu():
    import torch

    from cohw_utils.workloads import measure_cache

    b = build("deepseek-v2-lite", scale="tiny", device="cpu", seq_len=16, batch=2)
    m = moe_parameters(b.model, b.config)
    assert (m.experts, m.experts_per_token) == (4, 2)          # the tiny MoE keeps routing
    for phase in ("prefill", "decode"):
        args, kwargs = b.phase(phase).make_inputs()
        assert torch.isfinite(b.phase(phase).run(*args, **kwargs).logits).all()
    # tiny latent: (kv_lora_rank 32 + rope 8) x 2 layers x 4 bytes (fp32 on cpu)
    assert measure_cache(b, "prefill").kv_bytes_per_token == (32 + 8) * 2 * 4
