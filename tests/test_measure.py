"""Timing harness and per-op profiler join."""
from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn as nn

from cohw_utils.core.errors import CohwError
from cohw_utils.spine.measure import profile_ops, time_callable


def test_time_callable_statistics_and_method():
    calls = []
    t = time_callable(lambda: (calls.append(1), time.sleep(0.002)), repeats=5, warmup=2,
                      setup=lambda: calls.append(0))
    assert calls.count(1) == 7 and calls.count(0) == 7  # setup before every call
    assert 0.002 <= t.min <= t.median <= t.max and t.q1 <= t.q3 and len(t.samples) == 5
    assert "median of 5 timed calls after 2 warm-up" in t.method
    assert t.describe("ms").startswith(f"{t.median * 1e3:.3f} ms (min")
    with pytest.raises(CohwError, match="repeats"):
        time_callable(lambda: None, repeats=0)


def test_profile_ops_joins_every_working_row(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.GELU(), nn.LayerNorm(512))
    x = torch.randn(256, 512)
    path = tmp_path / "trace.json"
    with torch.no_grad():
        t = profile_ops(model, x, model=model, repeats=3, trace_file=str(path))
    assert t.attrs["unmatched"] == 0
    work = t[t.op_class != "view"]
    assert set(work.op) == {"aten.addmm.default", "aten.gelu.default", "aten.native_layer_norm.default"}
    assert (work.time_s > 0).all() and (t[t.op_class == "view"].time_s == 0).all()
    assert (work.time_min_s <= work.time_s).all() and (work.time_s <= work.time_max_s).all()
    mm = work[work.op == "aten.addmm.default"].iloc[0]
    assert mm.achieved_flops == pytest.approx(mm.flops / mm.time_s)
    assert work.time_min_s.sum() <= t.attrs["wall_s"]  # per-op minima fit inside any run
    assert "torch.profiler" in t.attrs["method"]
    events = json.loads(path.read_text())["traceEvents"]
    assert any(e.get("name") == "aten::addmm" for e in events)
