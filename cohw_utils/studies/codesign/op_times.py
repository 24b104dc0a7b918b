"""Per-op times of one phase on one design: the roofline with one roof per memory tier.

Each op runs alone, as in :func:`cohw_utils.views.roofline.op_times`: compute time = FLOPs / peak
for the op's class and dtype (the roofline's own rule,
:func:`cohw_utils.studies.codesign.phases.peak_key`), and each memory tier is one more roof:
``time = max(FLOPs / peak, bytes_sram / sram_bw, bytes_hbm / hbm_bw, bytes_slow / slow_bw,
bytes_host / link_bw)`` (seconds; bytes and bytes/s). The tiers transfer concurrently with each
other and with compute (the roofline's overlap assumption, extended); the *binding resource* of
an op is the term that attains the max, and of a phase the resource whose bound ops take the
most time. With every byte in HBM, this is ``op_times`` exactly (tested). Bytes are placed as
:mod:`cohw_utils.studies.codesign.placement` states.

A ``matrix_unit`` of ``(rows, cols)`` divides each forward contraction's compute time by the
utilization of that weight-stationary systolic array (:func:`matrix_utilization`). An optional
:class:`cohw_utils.views.roofline.EfficiencyModel` (the Chapter 4 predictor) divides each op's
compute time by its group's compute efficiency, its byte times by the bandwidth efficiency,
and adds its overhead (:func:`efficiency_factors`).

:func:`design_op_times` is the per-op reference; :mod:`cohw_utils.studies.codesign.sweep`
computes the same for many designs at once (tested equal).

Used by Chapter 5 (the co-design loop).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from cohw_utils.views import roofline
from cohw_utils.spine.costs import CONTRACTION
from cohw_utils.core.errors import CohwError
from cohw_utils.studies.codesign.accelerator import RESOURCES, TIERS, Accelerator
from cohw_utils.studies.codesign.phases import PreparedPhase, prepare
from cohw_utils.studies.codesign.placement import placement

__all__ = ["matrix_utilization", "efficiency_factors", "design_op_times"]


def matrix_utilization(p: PreparedPhase, shape: tuple[int, int] | None) -> np.ndarray:
    """Per-row utilization (0-1) of a weight-stationary ``shape`` = (rows, cols) systolic array on
    ``p``'s op rows: MACs / (rows x cols x cycles) of each forward contraction, 1 for every other
    row and for ``shape=None`` (the ideal matrix peak). The array double-buffers its weights, as
    a TPU-class array does (:func:`cohw_utils.views.systolic.cycles` with ``double_buffer=True``:
    the next tile loads while the current one streams), so a batch-M decode is bound by the
    weight-load rate, M/rows, not by every tile's fill and drain. Cached on the phase."""
    n = len(p.table)
    if shape is None:
        return np.ones(n)
    key = ("util", tuple(shape), "double-buffered")
    if key not in p._cache:
        try:
            from cohw_utils.views import systolic
        except ImportError:  # Chapter 4's systolic-array model is not installed
            raise CohwError("matrix_unit needs cohw_utils.views.systolic (Chapter 4's systolic-array model), which "
                            "is not importable here; use matrix_unit=None (the ideal matrix peak)") from None

        r, c = int(shape[0]), int(shape[1])
        util = np.ones(n)
        t = p.table
        for i, (op, cls, ins, outs, ps) in enumerate(zip(t["op"], t["op_class"], t["input_shapes"],
                                                         t["output_shapes"], t["pass"])):
            if cls != CONTRACTION or ps != "forward":
                continue
            gemms = systolic._row_gemms(op, ins, outs)  # noqa: SLF001 - the chapter 4 GEMM extraction
            macs = sum(g.M * g.K * g.N * g.count for _, g in gemms)
            cyc = sum(systolic.cycles(int(g.M), int(g.K), int(g.N), r, c, "ws", double_buffer=True) * g.count
                      for _, g in gemms)
            if macs and cyc:
                util[i] = macs / (r * c * cyc)
        p._cache[key] = util
    return p._cache[key]


def efficiency_factors(groups: np.ndarray, model: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row compute efficiency, bandwidth efficiency (fractions) and overhead (seconds) of an
    efficiency model for op rows in ``groups``: ones and zeros when ``model`` is None (the ideal
    roofline); ``view`` rows get no overhead."""
    if model is None:
        one = np.ones(len(groups))
        return one, one, np.zeros(len(groups))
    params = {g: model.params(g) for g in set(groups)}
    e = np.array([params[g][0] for g in groups], dtype=float)
    b = np.array([params[g][1] for g in groups], dtype=float)
    t0 = np.array([0.0 if g == "view" else params[g][2] for g in groups], dtype=float)
    return e, b, t0


def design_op_times(design: Accelerator, phase: PreparedPhase | Any, quantize: bool = False,
                    spill: str = "weights", efficiency: Any = None) -> pd.DataFrame:
    """Per-op times of one phase on one design: :func:`cohw_utils.views.roofline.op_times` (or
    :func:`~cohw_utils.views.roofline.predict_times` with an ``efficiency`` model) on
    ``design.to_hardware()`` for the compute roof, plus one roof per memory tier.

    ``phase`` is a :class:`PreparedPhase` or an Analysis. Columns: op, module, op_class,
    ``t_compute``, ``t_sram``, ``t_hbm``, ``t_slow``, ``t_host``, ``time``, ``bound`` (one of
    :data:`RESOURCES`, or ``uncosted``)."""
    p = phase if isinstance(phase, PreparedPhase) else prepare(phase)
    v = p.variant_for(design.weight_bits, quantize)
    rows = p.rows(v)
    hw = design.to_hardware()
    table = p.table
    if efficiency is None:
        base = roofline.op_times(table, hw)
        e_b, t0 = np.ones(len(table)), np.zeros(len(table))
    else:
        base = roofline.predict_times(table, hw, efficiency)
        _, e_b, t0 = efficiency_factors(rows.group, efficiency)
    t_c = np.nan_to_num(base["t_compute"].to_numpy(dtype=float)) / matrix_utilization(p, design.matrix_unit)
    fw, fkv, _ = placement(rows.weight_footprint, p.kv_bytes, design.sram_bytes, design.hbm_bytes,
                            design.slow_bytes, spill)
    out = table[["op", "module", "op_class"]].copy()
    out["t_compute"] = t_c
    main = TIERS.index(design.main_tier)
    for i, tier in enumerate(TIERS):
        b = rows.w * fw[i] + rows.kv * fkv[i] + (rows.act if i == main else 0.0)
        bw = design.bandwidth(tier)
        out[f"t_{tier}"] = np.divide(b, bw * e_b, out=np.where(b > 0, np.inf, 0.0), where=bw > 0)
    stack = out[["t_compute", *(f"t_{t}" for t in TIERS)]].to_numpy()
    costed = table["costed"].to_numpy(dtype=bool)
    out["time"] = stack.max(axis=1) + t0 * costed
    bound = np.array(RESOURCES, dtype=object)[stack.argmax(axis=1)]
    out["bound"] = np.where(costed, bound, "uncosted")
    return out
