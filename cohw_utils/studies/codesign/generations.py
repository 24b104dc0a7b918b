"""Compute, bandwidth and capacity across NVIDIA GPU generations, from ``hardware.csv``: the
trend that makes memory the co-design problem (compute grew faster than bandwidth).

Units: dense 16-bit TFLOP/s, HBM TB/s and GB (1e9 bytes), FLOP per byte of HBM (the ridge
point); the ``*_x`` columns are ratios to the first generation listed.

Used by Chapter 5 (the co-design loop).
"""
from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from cohw_utils.core.errors import CohwError
from cohw_utils.hardware import load_hardware

__all__ = ["GENERATIONS", "growth_table"]

GENERATIONS = ("V100-SXM2-32GB", "A100-80GB", "H100-SXM", "H200-SXM", "B200")


def growth_table(names: Sequence[str] = GENERATIONS) -> pd.DataFrame:
    """Per GPU generation (from ``hardware.csv``): dense 16-bit TFLOP/s, HBM TB/s and GB, the
    FLOP-per-byte ratio (ridge point) and each relative to the first."""
    table = load_hardware()
    rows = []
    for n in names:
        if n not in table:
            raise CohwError(f"unknown accelerator {n!r}; known: {', '.join(table)}")
        h = table[n]
        f16 = h.peak_flops.get("bf16", h.peak_flops.get("fp16"))
        rows.append({"name": n, "year": h.year, "tflops16": f16 / 1e12, "hbm_tbs": h.mem_bw / 1e12,
                     "hbm_gb": h.mem_bytes / 1e9, "flop_per_byte": f16 / h.mem_bw})
    df = pd.DataFrame(rows).set_index("name")
    for c in ("tflops16", "hbm_tbs", "hbm_gb", "flop_per_byte"):
        df[f"{c}_x"] = df[c] / df[c].iloc[0]
    return df
