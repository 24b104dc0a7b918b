"""Roofline time of an op table on a piece of hardware.

Semantics (the simplest model that is still useful; the performance chapter calibrates it):

* Each op runs alone, at the roofline: ``time = max(flops / peak, bytes_moved / bandwidth)``
  with bytes moved as the op table counts them (unfused, every tensor from main memory).
* **Peak**: a contraction uses the chip's dense matrix peak for the op's dtype (fp32 GEMMs
  use the fp32 figure, not TF32, as PyTorch does by default); every other op runs on the
  vector units at the chip's ``fp32`` peak. Integer element-wise work is costed like fp32.
* An op is **memory-bound** when ``bytes / bandwidth > flops / peak``, i.e. its arithmetic
  intensity is below the ridge point ``peak / bandwidth``.
* ``efficiency`` scales both peaks down uniformly (1.0 = the spec sheet). Launch overheads,
  caches, overlap between ops and fusion are not modelled here.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .costs import CONTRACTION
from .dtypes import dtype_name
from .errors import CohwError
from .hardware import Hardware


def _peak_for(hw: Hardware, op_class: str, dtype: str) -> float:
    if op_class != CONTRACTION or not dtype:
        return hw.peak("fp32")
    try:
        name = dtype_name(dtype)
    except CohwError:
        return hw.peak("fp32")
    if name in ("int64", "int32", "bool", "uint8"):
        name = "int8" if name == "uint8" else "fp32"
    if name == "fp64" and "fp64" not in hw.peak_flops:
        name = "fp32"
    return hw.peak(name)


def op_times(table: pd.DataFrame, hw: Hardware, efficiency: float = 1.0) -> pd.DataFrame:
    """Per-op roofline times (seconds) on ``hw``: t_compute, t_memory, time and bound.

    Returns the op table's ``module``/``op``/``op_class`` columns plus the new ones; rows
    without costs (uncosted) get NaN times and bound ``uncosted``.
    """
    if not 0 < efficiency <= 1:
        raise CohwError(f"efficiency must be in (0, 1], got {efficiency}")
    peaks = {
        key: _peak_for(hw, *key) * efficiency
        for key in set(zip(table["op_class"], table["dtype"]))
    }
    peak = np.array([peaks[k] for k in zip(table["op_class"], table["dtype"])], dtype=float)
    bytes_moved = (table["bytes_read"] + table["bytes_written"]).to_numpy(dtype=float)
    t_compute = table["flops"].to_numpy(dtype=float) / peak
    t_memory = bytes_moved / (hw.mem_bw * efficiency)
    out = table[["op", "module", "op_class", "dtype"]].copy()
    out["t_compute"] = t_compute
    out["t_memory"] = t_memory
    out["time"] = np.maximum(t_compute, t_memory)
    bound = np.where(t_memory > t_compute, "memory", "compute")
    out["bound"] = np.where(table["costed"].to_numpy(), bound, "uncosted")
    return out


def roofline_summary(table: pd.DataFrame, hw: Hardware, efficiency: float = 1.0) -> dict[str, float]:
    """Total roofline time and the share of it spent in memory-bound ops."""
    t = op_times(table, hw, efficiency)
    total = float(t["time"].sum())
    mem = float(t.loc[t["bound"] == "memory", "time"].sum())
    return {"time_s": total, "memory_bound_share": mem / total if total else float("nan")}
