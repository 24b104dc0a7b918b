"""The proxy overview, ranking inputs, device choice and figures."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest
import torch

from cohw_utils.book import plotting
from cohw_utils.studies.proxies import ranking as priority
from cohw_utils.studies.proxies import proxy_set as proxies
from cohw_utils.core.device import resolve_device
from cohw_utils.core.errors import CohwError
from cohw_utils.hardware import get_hardware


@pytest.fixture(scope="module")
def small_overview():
    return proxies.overview(["resnet-50", "vit-b-16", "llama-2-7b"], "H100-SXM", seq_len=128)


def test_overview_rows_and_llm_character(small_overview):
    table, ops = small_overview
    assert list(table["phase"]) == ["forward", "forward", "prefill", "decode"]
    llm = table.set_index("phase").loc[["prefill", "decode"]]
    assert llm.loc["prefill", "units"] == 128 and llm.loc["decode", "units"] == 1
    # decode reads every fp16 weight once for one token: ~2 FLOPs per 2 bytes
    assert 0.5 < llm.loc["decode", "intensity"] < 1.5
    assert llm.loc["decode", "memory_bound_share"] > 0.95
    assert (table["dtype"] == "fp16").all() and (table["uncosted_ops"] == 0).all()
    assert "aten.convolution" in ops["resnet-50"] and "aten.embedding" in ops["llama-2-7b"]


def test_criteria_and_ranking(small_overview):
    table, ops = small_overview
    f = proxies.criteria(table, ops)
    assert f.loc["resnet-50", "novelty"] == 0 and f.loc["vit-b-16", "novelty"] == 0
    assert 0 < f.loc["llama-2-7b", "novelty"] < 1
    assert "aten.embedding" in priority.novel_ops(ops)["llama-2-7b"]
    r = priority.rank(f)
    assert r.index[0] == "llama-2-7b"
    j = priority.load_judgements().drop(index="vit-b-16")
    with pytest.raises(CohwError, match="vit-b-16.*proxy_criteria.csv"):
        proxies.criteria(table, ops, j)


def test_phase_dtype():
    assert proxies.phase_dtype("nerfacto") == "fp32" and proxies.phase_dtype("sd-1.5") == "fp16"


def test_figures_draw(small_overview):
    table, ops = small_overview
    table = table.assign(domain=table["workload"].map(lambda w: "llm" if "llama" in w else "vision"))
    fig = plotting.fig_flops_vs_bytes(table, get_hardware("H100-SXM"))
    assert len(fig.axes[0].collections) == len(table)
    r = priority.rank(proxies.criteria(*small_overview))
    fig = plotting.fig_priority_bars(r, priority.DEFAULT_WEIGHTS)
    assert len(fig.axes[0].patches) == 4 * len(r)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(CohwError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(CohwError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_memory_bound_share_is_per_request_time():
    import pandas as pd

    # One image: 2 text encodes of 1 ms (share 0.5), 50 steps of 10 ms (share 0.2), a 20 ms decode (share 1.0):
    # memory-bound time = 2*1*0.5 + 50*10*0.2 + 1*20*1.0 = 1 + 100 + 20 = 121 ms of 2 + 500 + 20 = 522 ms.
    t = pd.DataFrame({"workload": ["sd"] * 3, "phase": ["te", "step", "vae"], "time_X_ms": [1.0, 10.0, 20.0],
                      "memory_bound_share": [0.5, 0.2, 1.0], "calls_per_request": [2, 50, 1]})
    assert proxies.request_memory_bound_share(t)["sd"] == pytest.approx(121 / 522)
    # each phase once (the old, equal weighting would give (0.5 + 0.2 + 1.0) / 3 = 0.567)
    once = proxies.request_memory_bound_share(t.drop(columns="calls_per_request"))["sd"]
    assert once == pytest.approx((0.5 + 2 + 20) / 31)


def test_calls_per_request_of_the_registry():
    from cohw_utils.workloads import get_workload

    sd = get_workload("sd-1.5")
    assert (sd.calls("text_encoder"), sd.calls("unet_step"), sd.calls("vae_decode")) == (2, 50, 1)
    llm = get_workload("llama-2-7b")
    assert llm.calls("prefill") == 1 and llm.calls("decode") == 338
    with pytest.raises(CohwError, match="no phase 'forward'"):
        llm.calls("forward")
