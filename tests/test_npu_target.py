"""NPU targets with dtype and shape limits on core-ATen graphs (views.npu_target, spine.graph_table)."""
from __future__ import annotations

import warnings

import pandas as pd
import pytest
import torch
from torch import nn

from cohw_utils.core.errors import CohwError
from cohw_utils.spine.graph_table import GRAPH_COLUMNS, graph_table
from cohw_utils.views import npu_target
from cohw_utils.views.npu_target import NpuTarget, OpRule

warnings.filterwarnings("ignore", category=FutureWarning)


def _graph(module: nn.Module, *args) -> pd.DataFrame:
    return graph_table(torch.export.export(module, args, strict=False).run_decompositions())


class _AddRelu(nn.Module):
    def forward(self, x):
        return torch.relu(x + 1)


def _toy(**rules) -> NpuTarget:
    return NpuTarget("toy", "a hand-made target", "test", rules)


def test_graph_table_rows_by_hand():
    g = _graph(_AddRelu(), torch.randn(2, 3))
    assert list(g.columns) == GRAPH_COLUMNS
    assert list(g["op"]) == ["aten.add.Tensor", "aten.relu.default"]
    assert list(g["value_dtype"]) == ["fp32", "fp32"] and list(g["max_rank"]) == [2, 2]
    assert g.iloc[0]["shape"] == (2, 3) and not g["folded"].any() and set(g["pass"]) == {"forward"}


def test_an_op_in_the_wrong_dtype_is_missing_in_that_dtype():
    g = _graph(_AddRelu().half(), torch.randn(2, 3, dtype=torch.float16))
    tgt = _toy(**{"aten.add": OpRule(frozenset({"fp32"})), "aten.relu": OpRule(frozenset({"fp16", "fp32"}))})
    s = npu_target.node_verdicts(g, tgt)
    assert list(s["status"]) == ["missing in dtype", "supported"]
    assert s.iloc[0]["dtype"] == "fp16"
    m = npu_target.npu_missing(g, tgt)
    assert m[["op", "status", "dtype", "calls"]].values.tolist() == [["aten.add", "missing in dtype", "fp16", 1]]
    # after int8 quantization neither op runs in int8 on this target
    q = npu_target.node_verdicts(g, tgt, quantize="int8")
    assert list(q["dtype"]) == ["int8", "int8"]
    with pytest.raises(CohwError, match="quantize='int4'"):
        npu_target.node_verdicts(g, tgt, quantize="int4")


def test_a_rank5_tensor_violates_a_rank4_limit():
    g = _graph(_AddRelu(), torch.randn(1, 2, 3, 4, 5))
    rule = OpRule(frozenset({"fp32"}), max_rank=4)
    s = npu_target.node_verdicts(g, _toy(**{"aten.add": rule, "aten.relu": rule}))
    assert list(s["status"]) == ["shape limit", "shape limit"] and s.iloc[0]["reason"] == "rank 5 > 4"
    ok = npu_target.node_verdicts(_graph(_AddRelu(), torch.randn(2, 3, 4, 5)), _toy(**{"aten.add": rule, "aten.relu": rule}))
    assert set(ok["status"]) == {"supported"}


def test_max_dim_and_missing_op_and_folding():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return torch.sort(x * self.w.exp()).values   # w.exp() depends on no input: folded

    g = _graph(M(), torch.randn(3, 4))
    tgt = _toy(**{"aten.mul": OpRule(frozenset({"fp32"}), max_dim=3)})
    s = npu_target.node_verdicts(g, tgt).set_index("packet")
    assert s.loc["aten.exp", "status"] == "folded"
    assert s.loc["aten.mul", "status"] == "shape limit" and "dim 4 > 3" in s.loc["aten.mul", "reason"]
    assert s.loc["aten.sort", "status"] == "missing op"


def test_int64_user_input_and_quantized_int64():
    emb = nn.Embedding(10, 4)
    g = _graph(emb, torch.tensor([[1, 2, 3]]))
    tgt = _toy(**{"aten.embedding": OpRule(frozenset({"fp32", "int8"}), frozenset({"int32"}))})
    assert npu_target.node_verdicts(g, tgt).iloc[0][["status", "dtype"]].tolist() == ["missing in dtype", "int64"]
    # quantizing the weights does not narrow the token ids the user feeds
    assert npu_target.node_verdicts(g, tgt, "int8").iloc[0]["dtype"] == "int64"
    assert npu_target.node_verdicts(_graph(emb, torch.tensor([[1, 2]], dtype=torch.int32)), tgt)["status"].tolist() == ["supported"]


def test_shipped_targets_carry_their_source_limits():
    assert {"tosa-1.0-fp", "ethos-u55"} <= set(npu_target.list_npu_targets())
    fp, u55 = npu_target.load_npu_target("tosa-1.0-fp"), npu_target.load_npu_target("ethos-u55")
    assert "cff6f4dd32e630945b7188512c1f2b4f102b05ad" in fp.source and "ethos_u55_support.py" in u55.source
    assert fp.rules["aten.mm"].dtypes == {"fp32", "fp16"} and fp.rules["aten.mm"].max_rank == 6
    assert u55.rules["aten.mm"].dtypes == {"int8"}                      # EthosU55DtypeSupport: mm int8 only
    assert u55.rules["aten.exp"].dtypes == {"int8", "int16"}            # a table op
    assert u55.rules["aten.convolution"].max_dim == 65536
    assert fp.rules["aten.gather"].index_dtypes == {"int32"}
    # EthosU55NotSupported: comparisons, where, gather/scatter; embedding decomposes to index_select
    assert not {"aten.where", "aten.eq", "aten.gather", "aten.index_put", "aten.scatter_add", "aten.embedding"} & u55.ops
    assert {"aten.native_layer_norm", "aten._softmax", "aten.addmm"} <= u55.ops  # pre-quantization decompositions
    assert not [o for o in fp.ops | u55.ops if "backward" in o] and "aten.searchsorted" not in fp.ops
    with pytest.raises(CohwError, match="lists op packets only.*ethos-u55"):
        npu_target.load_npu_target("onnx-opset18")


@pytest.fixture(scope="module")
def vit_graph():
    from cohw_utils.studies.enabling import core_aten, export

    return core_aten.inference_graph(export.convert("vit-b-16", "forward", "fp32"))


def test_a_proxy_core_aten_graph_has_the_ops_expected(vit_graph):
    packets = set(vit_graph["packet"])
    # linear -> permute + addmm, attention -> bmm + _softmax, patches by convolution, no eager composites
    assert {"aten.addmm", "aten.bmm", "aten._softmax", "aten.convolution", "aten.native_layer_norm",
            "aten.gelu", "aten.permute", "aten.view"} <= packets
    assert not {"aten.linear", "aten.layer_norm", "aten.scaled_dot_product_attention", "aten.t"} & packets
    assert set(vit_graph["pass"]) == {"forward"}
    # every vit op is on the TOSA FP target in fp32; the int8 U55 path lacks the mask ops only
    assert npu_target.npu_missing(vit_graph, "tosa-1.0-fp").empty
    gaps = npu_target.npu_missing(vit_graph, "ethos-u55", "int8")
    assert "aten.native_layer_norm" not in set(gaps["op"]) and "aten.addmm" not in set(gaps["op"])


def test_joint_graph_labels_backward_nodes():
    from cohw_utils.studies.enabling import core_aten

    g = core_aten.training_graph("vanilla-nerf", "train_step")
    assert {"forward", "backward"} == set(g["pass"])
    bw = set(g.loc[g["pass"] == "backward", "packet"])
    assert "aten.mm" in bw and not [p for p in set(g["packet"]) if "backward" in p]  # decomposed to core ATen
