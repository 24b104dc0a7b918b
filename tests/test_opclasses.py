"""Operator classes: the paper's table, the BERT-large FLOP shares, class shares of a profile."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cohw_utils.studies.performance import opclasses
from cohw_utils.spine import optable
from cohw_utils.core.errors import CohwError
from cohw_utils.spine.trace import trace


def test_paper_table_values():
    p = opclasses.ivanov_table()
    assert list(p.index) == ["tensor contraction", "statistical normalization", "element-wise"]
    assert p["flop_%"].tolist() == [99.80, 0.17, 0.03] and p["runtime_%"].tolist() == [61.0, 25.5, 13.5]
    assert p["flop_%"].sum() == pytest.approx(100) and p["runtime_%"].sum() == pytest.approx(100)
    assert p.attrs["citation"] == "ivanov2021data"


def test_bert_large_training_flops_at_paper_size():
    blk = opclasses.bert_layer(batch=8, seq_len=512, train=True, device="meta")
    args, kwargs = blk.make_inputs()
    table = trace(blk.run, *args, model=blk.model, **kwargs)
    assert table.attrs["uncosted"] == {}  # dropout's bernoulli_ has a rule
    s = optable.by_class(table)
    B, L, I, H, U = 8, 512, 1024, 16, 4096
    forward = 2 * B * L * (4 * I * I + 2 * I * U) + 4 * B * H * L * L * (I // H)
    assert s.loc["contraction", "flops"] == 3 * forward  # backward = 2 x forward for contractions
    # within a tenth of a point of Ivanov et al.'s 99.80 / 0.17 / 0.03 (counting conventions differ)
    assert s.loc["contraction", "flops_%"] == pytest.approx(99.80, abs=0.1)
    assert s.loc["normalization", "flops_%"] == pytest.approx(0.17, abs=0.1)
    assert s.loc["element-wise", "flops_%"] == pytest.approx(0.03, abs=0.1)


def _fake_profile():
    return pd.DataFrame({
        "op": ["aten.mm.default", "aten._softmax.default", "aten.add.Tensor", "aten.view.default", "aten.clone.default"],
        "module": ["a.q", "a", "a", "a", "a"], "op_class": ["contraction", "normalization", "element-wise", "view",
                                                            "data movement"],
        "pass": ["forward"] * 5, "flops": [998, 1, 1, 0, 0], "bytes_read": [10, 20, 30, 0, 40],
        "bytes_written": [10, 20, 30, 0, 40], "intensity": [49.9, 0.025, 1 / 60, np.nan, 0.0],
        "time_s": [0.6, 0.2, 0.1, 0.0, 0.1], "achieved_flops": [998 / 0.6, 5.0, 10.0, np.nan, 0.0],
        "achieved_bw": [20 / 0.6, 200.0, 600.0, np.nan, 800.0], "costed": [True] * 5})


def test_class_shares_and_comparison():
    t = _fake_profile()
    s = opclasses.measured_class_shares(t)
    assert list(s.index) == ["contraction", "normalization", "element-wise", "data movement"]
    assert s.loc["contraction", "flops_%"] == pytest.approx(99.8)
    assert s.loc["contraction", "runtime_%"] == pytest.approx(60.0)
    assert s.loc["normalization", "GB/s"] == pytest.approx(40 / 0.2 / 1e9)
    c = opclasses.compare_with_paper(s)
    assert c.loc["tensor contraction", "runtime_% (paper)"] == 61.0
    assert c.loc["statistical normalization", "runtime/FLOP share (ours)"] == pytest.approx(20.0 / 0.1)
    assert "data movement (no row in the paper)" in c.index
    hot = opclasses.slowest_ops(t, n=2, peak_flops=1e3, mem_bw=100.0)
    assert hot.op.tolist() == ["mm", "_softmax"] and hot["bound (roofline)"].tolist() == ["compute", "memory"]
    rates = opclasses.module_rates(t, depth=1)
    assert rates.loc["a", "time_%"] == pytest.approx(100.0)
    with pytest.raises(CohwError, match="profiled table"):
        opclasses.measured_class_shares(t.drop(columns=["time_s"]))


def test_profiled_small_blocks():
    bert = opclasses.profile(opclasses.bert_layer(batch=1, seq_len=16), repeats=1)
    assert bert.attrs["unmatched"] == 0 and bert.attrs["uncosted"] == {}
    assert {"contraction", "normalization", "element-wise"} <= set(bert.op_class)
    assert set(bert["pass"]) == {"forward", "backward"}
    llama = opclasses.llama_slice("decode", batch=1, seq_len=8, width="small")
    table = opclasses.profile(llama, repeats=1)
    layer = opclasses.layer_only(table, llama.layer_prefix)
    assert len(layer) < len(table) and layer.module.str.startswith("model.layers.0").all()
    unet = opclasses.unet_block(latent=8, batch=1)
    args, kwargs = unet.make_inputs()
    out, _ = unet.run(*args, **kwargs)
    assert out.shape == (2, 320, 4, 4)  # stride-2 downsample of the 8 x 8 latent


def test_bad_input_raises():
    with pytest.raises(CohwError, match="phase"):
        opclasses.llama_slice("train")
    with pytest.raises(CohwError, match="width"):
        opclasses.llama_slice("prefill", width="huge")
    with pytest.raises(CohwError, match="batch"):
        opclasses.bert_layer(batch=0)
    with pytest.raises(CohwError, match="unknown block"):
        opclasses.measure_class_shares("gpt")
