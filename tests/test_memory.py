"""Memory footprint: liveness by hand, storage identity, fused attention, training state,
accelerate's estimate, serving memory and maximum batch."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cohw_utils.studies.performance import memory
from cohw_utils import workloads
from cohw_utils.hardware import get_hardware


def test_liveness_by_hand():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    with torch.no_grad():
        live = memory.liveness(mlp, torch.randn(32, 64), model=mlp)
    peak = live.peak()
    # at the GELU both the first Linear's output and the GELU's output are live: 2 x 32 x 256 x 4 B
    assert peak["bytes"] == 2 * 32 * 256 * 4 and peak["op"] == "aten.gelu.default" and peak["module"] == "1"
    assert peak["weight_bytes"] == 4 * (64 * 256 + 256 + 256 * 64 + 64) and peak["input_bytes"] == 32 * 64 * 4
    t = live.tensors
    assert sorted(t[t.kind == "activation"].bytes) == [32768, 32768]
    assert t[t.kind == "output"].bytes.tolist() == [32 * 64 * 4]      # the result outlives the call


def test_views_and_in_place_create_no_storage():
    x = torch.randn(16, 16)

    def f(x):
        y = x * 2               # one new storage
        y.t(), y.view(256)      # views: the same storage (a reshape of y.t() would copy)
        y.add_(1)               # in place: the same storage
        return (y + 1).sum()    # two more, the sum is the output

    live = memory.liveness(f, x)
    kinds = live.tensors.kind.value_counts().to_dict()
    assert kinds == {"activation": 2, "input": 1, "output": 1}
    assert live.peak()["bytes"] == 2 * 16 * 16 * 4     # y and y + 1 together


def test_state_reachable_from_arguments_is_an_output():
    cache: list[torch.Tensor] = []

    def f(x, cache):
        cache.append(x @ x)     # like a KV cache the call extends
        return x.sum()

    live = memory.liveness(f, torch.randn(8, 8), cache)
    assert (live.tensors.kind == "output").sum() == 2     # the appended tensor and the result


def test_fused_attention_on_meta_never_stores_scores():
    q = torch.empty(1, 8, 1024, 64, device="meta")

    def attn(q):
        return F.scaled_dot_product_attention(q, q, q, is_causal=True)

    fused = memory.liveness(attn, q).peak()["bytes"]
    math_path = memory.liveness(attn, q, fused_attention=False).peak()["bytes"]
    assert fused < 3 * q.numel() * 4                       # output + a per-row log-sum-exp
    assert math_path >= 8 * 1024 * 1024 * 4               # the T x T scores of 8 heads


def test_training_step_gradients_are_their_own_kind():
    lin = nn.Linear(32, 32)

    def step(x):
        lin(x).pow(2).mean().backward()

    live = memory.liveness(step, torch.randn(4, 32), model=lin)
    grads = live.tensors[live.tensors.kind == "gradient"]
    assert grads.bytes.sum() == 4 * (32 * 32 + 32)


def test_training_state_and_weights():
    assert memory.training_state(1000)["total"] == 16_000              # 2 + 2 + 4 + 8 bytes per parameter
    assert memory.training_state(1000, mixed_precision=False)["total"] == 16_000  # 4 + 4 + 8
    w = memory.weight_bytes_by_dtype(1000)
    assert (w["fp32"], w["bf16"], w["int8"], w["int4"]) == (4000, 2000, 1000, 500)


def test_accelerate_estimate_is_accelerates_own_arithmetic():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(1000, 1000, bias=False), nn.Linear(1000, 10, bias=False))
    est = memory.accelerate_estimate(model)
    n = 1000 * 1000 + 1000 * 10
    assert est.loc["float32", "total_size"] == 4 * n and est.loc["float16", "total_size"] == 2 * n
    assert est.loc["float32", "training_adam"] == 16 * n
    assert est.loc["float16", "training_adam"] == 8 * n   # the largest component, not the 16 B/param sum
    assert est.loc["float32", "largest_layer"] == 4 * 1000 * 1000


def test_serving_memory_and_max_batch():
    a100 = get_hardware("A100-40GB")
    m = memory.serving_memory("llama-2-13b", [0, 1, 4], 2048, hw=a100)
    assert m["weights"].iloc[0] == 2 * 13_015_864_320
    assert m["kv_cache"].tolist() == [0, 819_200 * 2048, 4 * 819_200 * 2048]
    assert m["reserve"].iloc[0] == pytest.approx(0.10 * 40 * 2**30)
    # (42.95 x 0.9 - 26.03) GB / 1.68 GB per 2048-token sequence = 7.5
    assert memory.max_batch("llama-2-13b", a100, 2048) == 7
    assert memory.max_batch("llama-2-70b", a100, 2048) == 0
    with pytest.raises(memory.CohwError, match="batch and context"):
        memory.serving_memory("llama-2-13b", -1, 2048)


def test_footprint_of_a_small_proxy():
    row = memory.footprint(memory.ProxySpec("resnet-50", "forward", "forward"), dtype="bf16")
    assert row["parameters"] == 25_557_032 and row["weights_bf16"] == 2 * 25_557_032
    assert row["train_state"] == 16 * 25_557_032
    assert 0 < row["infer_peak"] < row["train_peak"]
    assert row["kv_cache"] == 0


def test_accelerate_comparison_agrees_on_fp16_weights():
    t = memory.accelerate_comparison(("llama-2-7b",))
    row = t.loc["llama-2-7b"]
    assert row["parameters"] == 6_738_415_616
    assert row["ours bf16 weights GB"] == pytest.approx(2 * 6_738_415_616 / 1e9)
    # accelerate divides its fp32 size by 2 for fp16: the same bytes as our bf16 weights, within 1%
    assert row["accelerate fp16 total GB"] == pytest.approx(row["ours bf16 weights GB"], rel=0.01)
