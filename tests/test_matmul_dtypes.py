"""Matmul throughput per dtype: the sweep's arithmetic, skips with reasons, the GPU capture file."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cohw_utils.studies.performance import matmul_dtypes as md
from cohw_utils.core.errors import CohwError

SHAPES = [("square 64", 64, 64, 64), ("LLM M=1", 1, 256, 256)]


def test_sweep_rates_and_utilization():
    df = md.sweep_dtypes(dtypes=("fp32", "bf16", "int8", "tf32"), shapes=SHAPES, peaks={"fp32": 1e11, "bf16": 4e11},
                  repeats=2, warmup=1)
    assert len(df) == 8
    ran = df[df.skipped == ""]
    assert set(ran.dtype) >= {"fp32", "bf16"}
    np.testing.assert_allclose(ran.rate, ran.ops / ran.best_s)
    assert (ran.ops == 2.0 * ran.M * ran.K * ran.N).all()
    fp32 = ran[ran.dtype == "fp32"]
    np.testing.assert_allclose(fp32.utilization, fp32.rate / 1e11)
    if hasattr(torch, "_int_mm"):  # int8 has no peak given: utilization is NaN, not borrowed
        assert ran[ran.dtype == "int8"].utilization.isna().all()
    tf32 = df[df.dtype == "tf32"]
    assert (tf32.skipped.str.contains("GPU")).all() and tf32.rate.isna().all()
    t = md.pivot(df)
    assert list(t.index) == ["square 64", "LLM M=1"] and "fp32" in t.columns


def test_time_budget_skips_with_the_reason():
    df = md.sweep_dtypes(dtypes=("fp32",), shapes=[("small", 64, 64, 64), ("huge", 8192, 8192, 8192)],
                  repeats=1, warmup=0, max_seconds_per_call=1e-6)
    huge = df.set_index("shape").loc["huge"]
    assert "exceeds" in huge.skipped and np.isnan(huge.rate)


def test_capture_round_trip(tmp_path):
    assert md.gpu_matmul_capture(tmp_path / "missing.json") is None
    df = md.sweep_dtypes(dtypes=("fp32",), shapes=SHAPES[:1], repeats=1, warmup=0)
    rec = md.capture_record(df, torch.device("cpu"))
    assert {"device", "date", "torch", "rows"} <= set(rec)
    path = tmp_path / "matmul.json"
    import json

    path.write_text(json.dumps(rec))
    back = md.gpu_matmul_capture(path)
    assert back.attrs["torch"] == torch.__version__ and back.rate.iloc[0] == pytest.approx(df.rate.iloc[0])
    path.write_text("{}")
    with pytest.raises(CohwError, match="no device, date recorded"):
        md.gpu_matmul_capture(path)


def test_unknown_dtype_raises():
    with pytest.raises(CohwError, match="unknown dtype"):
        md.sweep_dtypes(dtypes=("fp128",), shapes=SHAPES)
