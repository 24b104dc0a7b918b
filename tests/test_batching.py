"""Latency and throughput against batch: measured rows, roofline predictions."""
from __future__ import annotations

import numpy as np
import pytest

from cohw_utils.studies.performance import batching
from cohw_utils.core.errors import CohwError
from cohw_utils.hardware import get_hardware
from cohw_utils.spine import optable


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COHW_CACHE_DIR", str(tmp_path / "cache"))


def test_measure_tiny_decode_and_nerf():
    d = batching.measure("llama-2-7b", "decode", [1, 2], scale="tiny", repeats=2, warmup=1, seq_len=16)
    assert d.batch.tolist() == [1, 2] and d.units.tolist() == [1, 2]
    np.testing.assert_allclose(d.throughput, d.units / (d.latency_ms / 1e3))
    assert (d.latency_min_ms <= d.latency_ms).all() and (d.latency_ms <= d.latency_max_ms).all()
    assert "freshly filled" in d.attrs["note"]
    n = batching.measure("nerfacto", "render", [32], scale="tiny", repeats=1, warmup=0)
    assert n.unit.iloc[0] == "ray" and n.units.iloc[0] == 32
    s = batching.measure("llama-slice", "prefill", [1], repeats=1, warmup=0, width="small", seq_len=8)
    assert s.units.iloc[0] == 8


def test_predict_decode_is_weight_bandwidth_bound():
    p = batching.predict("llama-2-7b", "decode", [1], ["H100-SXM"], seq_len=512)
    row = p.iloc[0]
    h100 = get_hardware("H100-SXM")
    weights = 6.74e9 * 2  # Llama-2-7B parameters in fp16
    assert row.latency_ms == pytest.approx(1e3 * weights / h100.mem_bw, rel=0.1)
    assert row.memory_bound_share > 0.9 and row.units == 1
    assert "ideal roofline" in p.attrs["model"]


def test_bad_batch_raises():
    with pytest.raises(CohwError, match="positive integers"):
        batching.measure("llama-2-7b", "decode", [0], scale="tiny")


def test_llm_predictions_come_from_the_cost_function_exactly():
    tables = {}
    p = batching.predict("llama-2-7b", "decode", [1, 5, 33], ["H100-SXM", "B200"], seq_len=128, tables=tables)
    traced = batching.trace_full_scale("llama-2-7b", "decode", 5, seq_len=128)
    assert optable.totals(tables[("llama-2-7b", "decode", 5)]) == optable.totals(traced)
    assert tables[("llama-2-7b", "decode", 5)].attrs["units"] == traced.attrs["units"] == 5
    c = batching.curve("llama-2-7b", "decode", ["H100-SXM", "B200"], seq_len=128, batches=range(1, 129))
    assert len(c) == 2 * 128 and (c.groupby("hardware")["throughput"].apply(lambda s: s.is_monotonic_increasing)).all()
    both = c.merge(p, on=["hardware", "batch"], suffixes=("_curve", ""))
    assert len(both) == 6
    np.testing.assert_allclose(both["latency_ms_curve"], both["latency_ms"], rtol=1e-9)


def test_latency_doubling_batch_is_the_first_batch_at_twice_batch_one():
    c = batching.curve("llama-2-7b", "decode", ["H100-SXM"], seq_len=2048, batches=range(1, 257))
    b = batching.latency_doubling_batch(c)["H100-SXM"]
    t = c.set_index("batch")["latency_ms"]
    assert t[b] >= 2 * t[1] > t[b - 1]
    # ideal roofline, memory-bound, no overhead: the step reads the weights (13.5 GB) and every
    # sequence's cache (0.5 MiB per token x 2,049 = 1.07 GB), so it doubles near 13.5 / 1.07 = 12.6
    assert 10 <= b <= 16
