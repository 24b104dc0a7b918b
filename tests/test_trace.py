"""The tracer and its counting semantics, pinned by hand-computed costs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from cohw_utils.spine import costs
from cohw_utils.spine import optable
from cohw_utils.core.errors import UncostedOpError
from cohw_utils.spine.trace import COLUMNS, trace


def rows(table, op_prefix):
    return table[table["op"].str.startswith(op_prefix)]


def test_linear_layer_hand_computed():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = torch.randn(8, 64)
    t = trace(lin, x, model=lin)
    assert list(t.columns) == COLUMNS
    mm = rows(t, "aten.addmm")
    assert len(mm) == 1
    r = mm.iloc[0]
    assert r.flops == 2 * 8 * 64 * 32 == 32768
    assert r.macs == 8 * 64 * 32
    # reads bias (32), input (8x64) and weight (64x32, a transposed view) in fp32
    assert r.bytes_read == 4 * (32 + 8 * 64 + 64 * 32)
    assert r.bytes_written == 4 * 8 * 32
    assert r.intensity == pytest.approx(32768 / (4 * (32 + 512 + 2048 + 256)))
    assert r.op_class == "contraction" and r.module == "<root>" and r.module_class == "Linear"
    # the weight transpose is a view: no FLOPs, no bytes
    view = rows(t, "aten.t.")
    assert (view.op_class == "view").all() and view.bytes_read.sum() == 0


def test_elementwise_broadcast_counts_distinct_bytes():
    x, b = torch.randn(4, 5), torch.randn(5)
    t = trace(lambda: x + b)
    r = t.iloc[0]
    assert r.op == "aten.add.Tensor" and r.op_class == "element-wise"
    assert r.flops == 20 and r.macs == 0
    assert r.bytes_read == 4 * (20 + 5) and r.bytes_written == 80
    assert costs.tensor_bytes(torch.zeros(5).expand(4, 5)) == 20


def test_normalizations_and_reductions():
    x = torch.randn(2, 8)
    ln = nn.LayerNorm(8)
    t = trace(ln, x, model=ln)
    assert rows(t, "aten.native_layer_norm").flops.sum() == 7 * 16  # 5/elt + weight + bias
    t = trace(lambda: F.layer_norm(x, (8,)))
    assert rows(t, "aten.native_layer_norm").flops.sum() == 5 * 16
    t = trace(lambda: x.softmax(-1))
    r = rows(t, "aten._softmax").iloc[0]
    assert r.flops == 5 * 16 and r.op_class == "normalization"
    t = trace(lambda: x.sum(-1))
    assert t.iloc[0].flops == 16  # 1 per input element


def test_elementwise_inside_norm_module_is_normalization():
    class RMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8))

        def forward(self, x):
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = RMSNorm()
            self.act = nn.SiLU()

        def forward(self, x):
            return self.act(self.norm(x))

    blk = Block()
    t = trace(blk, torch.randn(3, 8), model=blk)
    norm_rows = t[t.module == "norm"]
    assert len(norm_rows) >= 5 and (norm_rows.op_class == "normalization").all()
    assert (t[t.module == "act"].op_class == "element-wise").all()


def test_conv2d_hand_computed():
    conv = nn.Conv2d(3, 8, 3, bias=False)
    t = trace(conv, torch.randn(1, 3, 10, 10), model=conv)
    r = rows(t, "aten.convolution").iloc[0]
    assert r.flops == 2 * (8 * 8 * 8) * (3 * 3 * 3) == 27648


def test_sdpa_cpu_meta_and_math_paths_agree_on_flops():
    b, h, s, d = 2, 4, 16, 8
    expected = 4 * b * h * s * s * d
    for device in ("cpu", "meta"):
        q = torch.randn(b, h, s, d, device=device)
        t = trace(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True))
        c = t[t.op_class == "contraction"]
        assert len(c) == 1 and c.flops.sum() == expected, device
    # meta, fused row: reads q, k, v once, writes the output once
    q = torch.empty(b, h, s, d, device="meta")
    r = trace(lambda: F.scaled_dot_product_attention(q, q, q)).iloc[0]
    assert r.op == "aten.scaled_dot_product_attention"
    assert r.bytes_read == 3 * 4 * b * h * s * d and r.bytes_written == 4 * b * h * s * d
    # the math path materialises the scores: two bmm, same FLOPs
    t = trace(lambda: F.scaled_dot_product_attention(q, q, q), fused_attention=False)
    assert (t.op == "aten.bmm.default").sum() == 2
    assert t[t.op_class == "contraction"].flops.sum() == expected


def test_gqa_fused_row_reads_small_kv_counts_full_heads():
    q = torch.empty(1, 8, 16, 4, device="meta")
    kv = torch.empty(1, 2, 16, 4, device="meta")
    r = trace(lambda: F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)).iloc[0]
    assert r.flops == 4 * 1 * 8 * 16 * 16 * 4
    assert r.bytes_read == 4 * (8 * 16 * 4 + 2 * 2 * 16 * 4)


def test_backward_is_traced_and_attributed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(5, 16)

    def step():
        model(x).sum().backward()

    t = trace(step, model=model, phase="train")
    fwd = t[(t["pass"] == "forward") & (t.op_class == "contraction")].flops.sum()
    bwd = t[(t["pass"] == "backward") & (t.op_class == "contraction")].flops.sum()
    assert fwd == 2 * 5 * (16 * 32 + 32 * 4)
    # weight gradients of both layers + input gradient of the second (the first's input needs none)
    assert bwd == 2 * 5 * (16 * 32 + 32 * 4) + 2 * 5 * 32 * 4
    assert set(t[t["pass"] == "backward"].module) >= {"0", "2"}
    assert (t.phase == "train").all()


def test_matches_flop_counter_mode_on_a_transformer_layer():
    torch.manual_seed(0)
    # dropout=0 in train mode: the regular path (eval + no_grad would take PyTorch's fused
    # encoder fast path, which FlopCounterMode silently counts as 0 FLOPs)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0,
                                       batch_first=True)
    x = torch.randn(2, 10, 32)
    t = trace(layer, x, model=layer)
    with FlopCounterMode(display=False) as fc:
        layer(x)
    ours = t[t.op_class == "contraction"].flops.sum()
    # torch's registry lacks the CPU flash-attention op, so FlopCounterMode misses attention on
    # CPU; everything else agrees exactly.
    attention = 4 * 2 * 4 * 10 * 10 * 8
    assert rows(t, "aten._scaled_dot_product_flash_attention_for_cpu").flops.sum() == attention
    assert ours == fc.get_total_flops() + attention


def test_module_paths_are_named_modules_paths():
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4)), nn.Linear(4, 2))
    t = trace(model, torch.randn(1, 4), model=model)
    assert set(t[t.op_class == "contraction"].module) == {"0.0", "1"}
    # without a root, torch's class-based naming is used
    t = trace(model, torch.randn(1, 4))
    assert "Sequential.0.0" in set(t.module)


@pytest.fixture(scope="module")
def mystery_op():
    lib = torch.library.Library("cohw_test", "DEF")
    lib.define("mystery(Tensor x) -> Tensor")
    lib.impl("mystery", lambda x: x * 2, "CPU")
    yield torch.ops.cohw_test.mystery
    del lib


def test_uncosted_ops_are_reported_never_zero(mystery_op):
    x = torch.randn(3)
    t = trace(lambda: mystery_op(x))
    r = t[t.op == "cohw_test.mystery.default"].iloc[0]
    assert not r.costed and math.isnan(r.flops) and math.isnan(r.bytes_read)
    assert t.attrs["uncosted"] == {"cohw_test.mystery.default": 1}
    tot = optable.totals(t)
    assert tot["uncosted_ops"] == 1
    with pytest.raises(UncostedOpError, match="cohw_test.mystery.default.*register_cost"):
        trace(lambda: mystery_op(x), strict=True)


def test_register_cost_makes_an_op_costed(mystery_op):
    costs.register_cost(mystery_op, lambda a, k, o: ("element-wise", 7 * a[0].numel(), 0, None))
    try:
        x = torch.randn(3)
        t = trace(lambda: mystery_op(x), strict=True)
        assert t.iloc[0].flops == 21 and t.iloc[0].costed
    finally:
        costs._RULES.pop(mystery_op)


def test_summary_views():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.GELU())
    t = trace(model, torch.randn(4, 8), model=model, phase="fwd")
    tot = optable.totals(t)
    assert tot["contraction_flops"] == 2 * 4 * 8 * 8
    assert tot["flops"] == 2 * 4 * 8 * 8 + 7 * 32 + 32
    cls = optable.by_class(t)
    assert cls["flops_%"].sum() == pytest.approx(100.0)
    assert list(cls.index) == ["contraction", "normalization", "element-wise", "view"]
    ops = optable.by_op(t)
    assert ops.iloc[0].op == "aten.addmm.default" and "aten.t.default" not in set(ops.op)
    hot = optable.hotspots(t, "flops", n=1)
    assert list(hot.index) == ["0"]
    assert optable.module_prefix("model.layers.3.mlp.up_proj", 3) == "model.layers.3"
    with pytest.raises(ValueError, match="flops"):
        optable.hotspots(t, "time")


def test_grouped_mm_mixture_of_experts():
    # 8 routed rows through 4 experts of 16 -> 32: each row meets one expert's weights
    a = torch.empty(8, 16, dtype=torch.bfloat16, device="meta")
    b = torch.empty(4, 16, 32, dtype=torch.bfloat16, device="meta")
    offs = torch.empty(4, dtype=torch.int32, device="meta")
    r = trace(lambda: torch._grouped_mm(a, b, offs=offs)).iloc[0]
    assert r.op_class == "contraction" and r.flops == 2 * 8 * 16 * 32 and r.macs == 8 * 16 * 32
    assert r.bytes_read == 2 * (8 * 16 + 4 * 16 * 32) + 4 * 4  # 8 rows can reach all 4 experts
    # one token routed to 2 of 4 experts: a grouped kernel reads only those experts' weights
    a2 = torch.empty(2, 16, dtype=torch.bfloat16, device="meta")
    r = trace(lambda: torch._grouped_mm(a2, b, offs=offs)).iloc[0]
    assert r.flops == 2 * 2 * 16 * 32 and r.bytes_read == 2 * (2 * 16 + 2 * 16 * 32) + 4 * 4


def test_sort_and_topk_comparisons():
    x = torch.randn(10, 5)
    assert trace(lambda: x.topk(3, dim=1)).iloc[0].flops == int(50 * math.log2(3))
    assert trace(lambda: x.sort(dim=0)).iloc[0].flops == int(50 * math.log2(10))
    s, q = torch.arange(16.0), torch.rand(6)
    assert trace(lambda: torch.searchsorted(s, q)).iloc[0].flops == 6 * 4  # ceil(log2 16) each


def test_a_failing_rule_is_uncosted_with_its_reason(mystery_op):
    def broken(a, k, o):
        raise IndexError("tuple index out of range")

    costs.register_cost(mystery_op, broken)
    try:
        x = torch.randn(3)
        t = trace(lambda: mystery_op(x))
        assert not t.iloc[0].costed and t.attrs["uncosted"] == {"cohw_test.mystery.default": 1}
        assert "IndexError" in t.attrs["rule_errors"]["cohw_test.mystery.default"]
        with pytest.raises(UncostedOpError, match="cost rule failed.*IndexError"):
            trace(lambda: mystery_op(x), strict=True)
    finally:
        costs._RULES.pop(mystery_op)
