"""KV-cache paging simulation: allocator, hand-checked shares and throughput, the 13B case."""
from __future__ import annotations

import pytest

from cohw_utils.studies.performance import paging
from cohw_utils.core.errors import CohwError
from cohw_utils.hardware import get_hardware

import pandas as pd


def _sm(capacity=64, kv=0, weights=1e9, bw=1e9):
    return paging.ServingModel("toy", "toy", kv_bytes_per_token=kv, weight_bytes=weights, params_read=1.0,
                               attn_flops_per_token_ctx=0.0, kv_budget_bytes=capacity, capacity_tokens=capacity,
                               mem_bw=bw, peak_flops=1e30)


def test_first_fit_merges():
    a = paging._FirstFit(10)
    assert (a.alloc(4), a.alloc(4), a.alloc(4)) == (0, 4, None)
    a.free(0, 4)
    assert a.alloc(3) == 0 and a.alloc(2) == 8      # first fit: the 1-slot hole at 3 is skipped
    a.free(4, 4)
    a.free(0, 3)
    assert a.starts == [0] and a.sizes == {0: 8}     # 0..3 and 3..8 merged back with the gap


def test_contiguous_max_by_hand():
    req = pd.DataFrame({"prompt": [4] * 4, "output": [4] * 4})
    r = paging.simulate_serving(req, _sm(), "contiguous-max", max_len=32)
    # two requests of 32 slots fit; while two wait, lengths are 5, 6, 7, 8 (x2) of 64 slots
    assert r["max_batch"] == 2 and r["saturated_iterations"] == 4 and r["iterations"] == 8
    assert r["token_states_%"] == pytest.approx(100 * 13 / 64)
    assert r["reserved_%"] == pytest.approx(100 * 3 / 64)        # tokens still to come: 2 x (3, 2, 1, 0)
    assert r["internal_frag_%"] == pytest.approx(75.0)          # 2 x (32 - 8) never used
    assert r["external_free_%"] == pytest.approx(0.0)
    assert r["tokens_per_s"] == pytest.approx(2.0)              # 2 tokens per 1 s iteration (weights / bw)


def test_paged_by_hand():
    req = pd.DataFrame({"prompt": [4] * 10, "output": [4] * 10})
    r = paging.simulate_serving(req, _sm(), "paged", block_size=4, watermark=0.0)
    # 16 blocks; each request needs 2 (prompt + 1 token): 8 run, 2 wait; 8 x (5..8) tokens stored
    assert r["max_batch"] == 8 and r["preemptions"] == 0
    assert r["token_states_%"] == pytest.approx(100 * 8 * 6.5 / 64)
    assert r["internal_frag_%"] == pytest.approx(100 - 100 * 8 * 6.5 / 64)
    assert r["tokens_per_s"] == pytest.approx(8.0)


def test_thirteen_b_on_a100_40gb():
    sm = paging.serving_model("llama-2-13b", get_hardware("A100-40GB"))
    assert sm.kv_bytes_per_token == 819_200                 # the vLLM paper's "800 KB" per token
    assert sm.capacity_tokens == int((40 * 2**30 * 0.90 - 2 * 13_015_864_320) // 819_200) == 15_408  # 10% reserve
    out = paging.compare_schemes(n=250, seed=1)
    ts = out["token_states_%"]
    assert ts["paged"] > ts["contiguous-oracle"] > ts["contiguous-pow2"] > ts["contiguous-max"]
    assert out.loc["contiguous-max", "max_batch"] == 15_408 // 2048 == 7
    assert out.loc["paged", "x_vs_max"] > 2
    side = paging.beside_paper(out)
    assert side.loc["contiguous-max", "token states, paper %"] == 20.4
    assert side.loc["paged", "token states, paper %"] == 96.3


def test_requests_and_bad_input():
    req = paging.sample_requests(4000, "sharegpt", seed=0)
    assert (req.prompt + req.output <= 2048).all() and (req.output >= 1).all()
    assert req.prompt.mean() == pytest.approx(161.31, rel=0.15)   # the paper's Figure 11 means
    assert req.output.mean() == pytest.approx(337.99, rel=0.15)
    with pytest.raises(CohwError, match="unknown dataset"):
        paging.sample_requests(10, "wikipedia")
    with pytest.raises(CohwError, match="unknown scheme"):
        paging.simulate_serving(req, _sm(), "buddy")
    with pytest.raises(CohwError, match="does not fit"):
        paging.serving_model("llama-2-70b", get_hardware("A100-40GB"))
    with pytest.raises(CohwError, match="never waited"):
        paging.simulate_serving(req.head(2), _sm(capacity=4096), "paged")
