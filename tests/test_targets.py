"""Target software stacks: the shipped ONNX target, and the new-operator list of every proxy."""
from __future__ import annotations

import dataclasses
import warnings

import pandas as pd
import pytest
import torch
import torch.nn as nn

from cohw_utils.studies.architecture import inventory
from cohw_utils.views import target_coverage as targets
from cohw_utils.core.errors import CohwError
from cohw_utils.spine.trace import trace

warnings.filterwarnings("ignore", category=FutureWarning)  # nerfstudio's torch.cuda.amp decorators

ONNX = "onnx-opset18"

# What an inference export to ONNX lacks, per proxy workload and phase (full scale on meta).
# Every forward op of the LLMs, Stable Diffusion and the vision models has an ONNX lowering; the
# NeRFs' inverse-CDF sampler (searchsorted) has none, and training adds backward-only ops.
EXPECTED_MISSING = {
    "llama-2-7b": {"prefill": set(), "decode": set()},
    "llama-2-13b": {"prefill": set(), "decode": set()},
    "llama-2-70b": {"prefill": set(), "decode": set()},
    "sd-1.5": {"text_encoder": set(), "unet_step": set(), "vae_decode": set()},
    "vit-b-16": {"forward": set()},
    "resnet-50": {"forward": set()},
    "nerfacto": {
        "render": {"searchsorted"},
        "train_step": {"searchsorted", "embedding_dense_backward", "mse_loss_backward", "select_backward",
                       "sigmoid_backward", "slice_backward", "threshold_backward"},
    },
    "vanilla-nerf": {
        "render": {"searchsorted"},
        "train_step": {"searchsorted", "mse_loss_backward", "sigmoid_backward", "slice_backward",
                       "softplus_backward", "threshold_backward"},
    },
    "dreamfusion-sd": {
        "sds_step": {"searchsorted", "_softmax_backward_data", "convolution_backward",
                     "native_group_norm_backward", "select_backward", "sigmoid_backward", "silu_backward",
                     "slice_backward", "threshold_backward", "upsample_bilinear2d_backward"},
    },
}


def test_target_api_and_data():
    assert ONNX in targets.list_targets()
    t = targets.load_target("ONNX-Opset18")  # case-insensitive
    assert [f.name for f in dataclasses.fields(targets.Target)] == ["name", "description", "source", "ops", "notes"]
    assert isinstance(t.ops, frozenset) and t.name == ONNX and "onnxscript 0.7.2" in t.source
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.name = "x"  # type: ignore[misc]
    # the contractions, norms and attention every proxy relies on are there...
    assert {"aten.mm", "aten.addmm", "aten.bmm", "aten.convolution", "aten.native_layer_norm",
            "aten.native_group_norm", "aten.scaled_dot_product_attention", "aten.embedding",
            "aten.cumsum", "aten.scatter_add", "aten.gather", "aten.index_put"} <= t.ops
    # ... an inference target has no backward op, and ONNX has no SearchSorted
    assert not [o for o in t.ops if "backward" in o]
    assert "aten.searchsorted" not in t.ops
    table = targets.target_ops_table(ONNX)
    assert set(table["via"]) == {"direct", "decomposition", "functionalization"}
    assert table.set_index("op").loc["aten.addmm", "evidence"] == "aten_addmm"
    assert table.set_index("op").loc["aten.rsub", "via"] == "decomposition"
    assert table.set_index("op").loc["aten.copy_", "via"] == "functionalization"


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(CohwError, match=f"unknown target 'tpu-v1'; known targets: .*{ONNX}"):
        targets.load_target("tpu-v1")


def test_shipped_target_matches_the_installed_exporter():
    """The data file is derived, not typed: regenerate it and compare."""
    shipped = targets.target_ops_table(ONNX)
    derived = targets.derive_onnx_export_ops()
    assert shipped.values.tolist() == derived.values.tolist(), \
        "rerun `python -m cohw_utils.views.target_coverage` and commit the CSV"


def _toy_table() -> pd.DataFrame:
    lin = nn.Linear(8, 4, bias=False)
    edges = torch.linspace(0, 1, 5)
    x = torch.rand(16, 8)

    def step():
        idx = torch.searchsorted(edges, x[:, :1].contiguous())
        y = torch.sigmoid(lin(x)) * idx
        y.sum().backward()

    return trace(step, model=lin)


def test_missing_ops_by_hand():
    table = _toy_table()
    tgt = targets.Target("toy", "a stack with only mm and sum", "test", frozenset({"aten.mm", "aten.sum"}))
    m = targets.missing_ops(table, tgt)
    assert list(m.columns) == targets.MISSING_COLUMNS
    rows = m.set_index("op")
    assert rows.loc["aten.searchsorted", "passes"] == "forward"
    assert rows.loc["aten.sigmoid_backward", "passes"] == "backward"
    assert rows.loc["aten.mul", "passes"] == "forward+backward"
    assert "aten.mm" not in rows.index and "aten.t" not in rows.index  # covered; views never count
    # shares are fractions of the non-view totals
    nv = table[table.op_class != "view"]
    total_f = nv.flops.sum()
    assert rows.loc["aten.searchsorted", "flops"] == 16 * 3  # ceil(log2 5) comparisons per query
    assert rows.loc["aten.searchsorted", "flops_share"] == pytest.approx(48 / total_f)
    assert list(m["flops_share"]) == sorted(m["flops_share"], reverse=True)
    c = targets.coverage(table, tgt)
    covered = nv[nv.op.str.startswith(("aten.mm.", "aten.sum."))]
    assert c["flops_share"] == pytest.approx(covered.flops.sum() / total_f)
    assert c["calls_share"] == pytest.approx(len(covered) / len(nv))
    assert c["missing_ops"] == len(m) and c["unique_ops"] == len(m) + 2
    # against the ONNX target only searchsorted and the backward ops are new
    onnx = targets.missing_ops(table, ONNX)
    assert set(onnx["op"]) == {"aten.searchsorted", "aten.sigmoid_backward"}


def test_full_coverage_is_an_empty_frame():
    lin = nn.Linear(8, 8)
    table = trace(lin, torch.randn(2, 8), model=lin)
    m = targets.missing_ops(table, ONNX)
    assert m.empty and list(m.columns) == targets.MISSING_COLUMNS
    assert targets.coverage(table, ONNX)["flops_share"] == 1.0


@pytest.fixture(scope="module")
def proxy_tables():
    return inventory.trace_all(seq_len=16, rays=64)


@pytest.mark.parametrize("workload", list(EXPECTED_MISSING))
def test_new_operators_of_every_proxy(proxy_tables, workload):
    for phase, expected in EXPECTED_MISSING[workload].items():
        m = targets.missing_ops(proxy_tables[f"{workload}:{phase}"], ONNX)
        assert {o.removeprefix("aten.") for o in m["op"]} == expected, (workload, phase)
        backward_only = {o for o, p in zip(m["op"], m["passes"]) if p == "backward"}
        assert backward_only == {f"aten.{o}" for o in expected if "backward" in o}


def test_gap_summary(proxy_tables):
    g = targets.gap_summary({k: v for k, v in proxy_tables.items() if k.startswith(("nerfacto", "llama-2-7b"))}, ONNX)
    assert g.loc["llama-2-7b:decode", "missing_ops"] == 0 and g.loc["llama-2-7b:decode", "missing"] == ""
    assert g.loc["nerfacto:render", "missing"] == "searchsorted"
    assert 0 < g.loc["nerfacto:render", "missing_flops_%"] < 1
