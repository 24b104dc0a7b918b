"""FLOP counters compared: probe numbers by hand, the reconciliation, crash handling."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cohw_utils.studies.performance import counter_comparison as counters
from cohw_utils.core.errors import CohwError

LINEAR = 2 * 8 * 64 * 64            # Linear(64, 64) on (8, 64): FLOPs = 2 x MACs
SDPA = 4 * 1 * 2 * 16 * 16 * 8      # 4 B H Tq Tk D, causal or not


@pytest.fixture(scope="module")
def matrix():
    return counters.probe_matrix()


def test_probe_numbers_by_hand(matrix):
    m = matrix
    assert m.loc["Linear", "ours"] == LINEAR and m.loc["Linear", "FlopCounterMode"] == LINEAR
    for mac_counter in ("fvcore", "thop", "ptflops"):        # MACs reported as "flops"
        assert m.loc["Linear", mac_counter] == LINEAR / 2, mac_counter
    assert m.loc["Linear", "calflops"] == LINEAR              # calflops' first number is FLOPs
    # attention: full count for causal too; FlopCounterMode misses the CPU flash kernel only
    assert m.loc["F.sdpa", "ours"] == m.loc["F.sdpa causal", "ours"] == SDPA
    assert m.loc["F.sdpa", "FlopCounterMode"] == 0 and m.loc["F.sdpa on meta", "FlopCounterMode"] == SDPA
    assert (m.loc["F.sdpa", ["fvcore", "thop", "ptflops", "calflops"]] == 0).all()
    # `@` vs torch.matmul: module-hook and function-patching counters see different things
    assert m.loc["x @ w", "thop"] == 0 and m.loc["torch.matmul", "thop"] == 0
    assert m.loc["x @ w", "ptflops"] == 0 and m.loc["torch.matmul", "ptflops"] == LINEAR / 2
    assert m.loc["x @ w", "calflops"] == 0 and m.loc["torch.matmul", "calflops"] == LINEAR
    # element-wise: one FLOP per output element for us, zero for FlopCounterMode and fvcore
    assert m.loc["F.gelu", "ours"] == 8 * 64
    assert m.loc["F.gelu", "FlopCounterMode"] == 0 and m.loc["F.gelu", "fvcore"] == 0
    assert m.loc["LayerNorm", "ours"] == 7 * 8 * 64           # 5 per element + affine weight and bias


def test_coverage_converts_macs(matrix):
    cov = counters.counter_coverage(matrix)
    assert cov.loc["Linear"].tolist() == [1.0] * len(counters.COUNTERS)
    assert cov.loc["F.sdpa", "FlopCounterMode"] == 0 and cov.loc["F.sdpa on meta", "FlopCounterMode"] == 1


def test_reconciliation_on_tiny_llama(matrix):
    cov = counters.counter_coverage(matrix)
    m = counters.build_model("tiny-llama")
    res = counters.count_all(m.module, m.inputs, ("ours", "FlopCounterMode", "thop"))
    ex = counters.explain(res, cov, causal=True)
    feats = counters.features(res["ours"].detail["table"])
    # FlopCounterMode counts exactly our contractions minus the (CPU flash) attention
    assert res["FlopCounterMode"].reported == feats["linear"] + feats["matmul"] + feats["conv"]
    assert feats["sdpa"] == 2 * 4 * 1 * 4 * 64 * 64 * 16      # 2 layers, 4 heads, 64 tokens, dim 16
    assert ex["residual_pct"].abs().max() < 0.01             # the reasons account for everything
    assert "not in FlopCounterMode's registry" in ex.loc["FlopCounterMode", "reason"]
    assert ex.loc["thop", "reason"].startswith("reports MACs")
    assert "causal attention counted full" in ex.loc["ours", "reason"]
    assert ex.loc["thop", "reported_over_ours"] == pytest.approx(res["thop"].reported / sum(feats.values()))


def test_crash_is_a_finding_and_torch_is_restored():
    def boom(m, x):
        raise ValueError("no forward for you\nsecond line")

    bad = counters.Wrapped(torch.nn.Linear(2, 2), boom)
    res = counters.run_counter("thop", bad, (torch.randn(1, 2),))
    assert res.reported is None and res.flops is None
    assert res.error == "ValueError: no forward for you"
    gelu = F.gelu
    with pytest.raises(RuntimeError):
        with counters._torch_namespace_guard():
            F.gelu = lambda x: x
            raise RuntimeError
    assert F.gelu is gelu
    with pytest.raises(CohwError, match="unknown counter"):
        counters.run_counter("flops-o-matic", bad, ())
    with pytest.raises(CohwError, match="unknown comparison model"):
        counters.build_model("gpt-5")
    with pytest.raises(CohwError, match="unknown probe"):
        counters.probe_matrix(names=["Linear", "nope"])


def test_bert_config_is_the_published_one():
    cfg = counters.workloads.load_hf_config(counters.CONFIG_BERT)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size,
            cfg.vocab_size, cfg.max_position_embeddings, cfg.type_vocab_size) == (768, 12, 12, 3072, 30522, 512, 2)
    assert not np.isnan(cfg.layer_norm_eps)
