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

Latency prediction (Chapter 4): :class:`EfficiencyModel` refines the roofline with
per-operator-group compute and bandwidth efficiencies and a fixed per-op overhead (its
docstring states the model); :func:`predict_times` applies it, :func:`fit_efficiency` fits it
to a run measured with :func:`cohw_utils.spine.measure.profile_ops`, and :func:`prediction_error`
reports the error per group. :func:`fig_roofline` draws rooflines with ops placed on them.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pandas as pd

from cohw_utils.core.opclasses import CONTRACTION, DATA_MOVEMENT, ELEMENTWISE, NORMALIZATION, OTHER, VIEW
from cohw_utils.core.dtypes import dtype_name
from cohw_utils.core.errors import CohwError
from cohw_utils.hardware import Hardware
from cohw_utils.spine import optable

if TYPE_CHECKING:  # matplotlib is imported where a figure is drawn (a warm CLI call draws none)
    from matplotlib.figure import Figure


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
    bytes_moved = optable.bytes_moved(table).to_numpy(dtype=float)
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


# ============================================================================================
# Latency prediction with an efficiency model, fitted against measurement; roofline figures.
# ============================================================================================
#: Operator groups of the efficiency model: contractions split by kernel family, then the
#: op table's other classes. A GEMM, a convolution and a fused attention kernel reach very
#: different fractions of peak on the same chip, so each gets its own efficiencies.
GEMM, CONV, ATTENTION = "gemm", "conv", "attention"
OP_GROUPS = (GEMM, CONV, ATTENTION, NORMALIZATION, ELEMENTWISE, DATA_MOVEMENT, OTHER)


def op_group(op: str, op_class: str) -> str:
    """The efficiency-model group of one op-table row.

    Contractions: ``conv`` (any aten convolution), ``attention`` (scaled-dot-product / flash
    attention kernels) and ``gemm`` (everything else: mm, addmm, bmm, baddbmm, mv, dot, int8
    and packed-weight matmuls). Other rows keep their op class (``normalization``,
    ``element-wise``, ``data movement``, ``view``, ``other``).
    """
    if op_class != CONTRACTION:
        return op_class
    name = op.lower()
    if "conv" in name:  # convolution, _convolution, convolution_backward, cudnn_convolution...
        return CONV
    if "attention" in name:
        return ATTENTION
    return GEMM


def _groups(table: pd.DataFrame) -> np.ndarray:
    return np.array([op_group(o, c) for o, c in zip(table["op"], table["op_class"])], dtype=object)


@dataclass(frozen=True)
class EfficiencyModel:
    """Per-operator-group efficiencies that turn the ideal roofline into a latency predictor.

    **The model.** An op of group ``g`` (see :func:`op_group`) with ``F`` FLOPs and ``B``
    bytes moved (the op table's unfused-eager count) takes::

        t = overhead_s[g] + max( F / (compute[g] * peak),  B / (bandwidth[g] * mem_bw) )

    where ``peak`` is the chip's peak for the op (:func:`op_times`' rule: the dtype's matrix
    peak for contractions, the fp32 peak for everything else) and ``mem_bw`` its memory
    bandwidth. So:

    * ``compute[g]`` (> 0, normally <= 1) is the fraction of peak FLOP/s the group's kernels
      reach when compute-bound (GEMM on a CPU: 0.5-0.9 of the best square-GEMM rate;
      element-wise ops far less, because ``peak`` is the *matrix* peak and they run on
      vector units).
    * ``bandwidth[g]`` (> 0) is the fraction of the streaming bandwidth reached when
      memory-bound. It may exceed 1: the op table counts every tensor as a trip to DRAM,
      and an operand that stays in cache (an 8 MB activation on a chip with a 32 MB LLC)
      costs less than that.
    * ``overhead_s[g]`` is a fixed cost per op of the group (framework dispatch, kernel launch
      and library set-up, profiler bookkeeping; on a machine shared with other busy
      processes, also the wait for descheduled threads), which dominates small ops.

    A group the model has no entry for uses ``default`` = ``(compute, bandwidth, overhead_s)``,
    ``(1, 1, 0)`` unless set: the ideal roofline. :meth:`ideal` is that model for every group;
    :func:`fit_efficiency` fits one to a measured run. Not modelled: overlap between ops,
    fusion, cache reuse *across* ops (the ops are assumed to run one after another, each from
    memory), and contention from other processes (which a fit on a busy machine absorbs).
    """

    compute: Mapping[str, float] = field(default_factory=dict)
    bandwidth: Mapping[str, float] = field(default_factory=dict)
    overhead_s: Mapping[str, float] = field(default_factory=dict)
    default: tuple[float, float, float] = (1.0, 1.0, 0.0)
    source: str = "ideal roofline (spec-sheet peaks, no overhead)"

    def __post_init__(self) -> None:
        for name, values in (("compute", self.compute), ("bandwidth", self.bandwidth)):
            for g, v in values.items():
                if not (np.isfinite(v) and v > 0):
                    raise CohwError(f"EfficiencyModel.{name}['{g}'] = {v!r}: efficiencies must be "
                                    "positive finite fractions of peak (e.g. 0.7)")
        for g, v in self.overhead_s.items():
            if not (np.isfinite(v) and v >= 0):
                raise CohwError(f"EfficiencyModel.overhead_s['{g}'] = {v!r}: must be >= 0 seconds")
        e, b, t0 = self.default
        if not (e > 0 and b > 0 and t0 >= 0):
            raise CohwError(f"EfficiencyModel.default = {self.default!r}: use (compute > 0, "
                            "bandwidth > 0, overhead_s >= 0)")

    @classmethod
    def ideal(cls) -> "EfficiencyModel":
        """Every group at the spec-sheet roofline: :func:`op_times` with ``efficiency=1``."""
        return cls()

    def params(self, group: str) -> tuple[float, float, float]:
        """``(compute, bandwidth, overhead_s)`` for one group (the default where unset)."""
        e, b, t0 = self.default
        return (float(self.compute.get(group, e)), float(self.bandwidth.get(group, b)),
                float(self.overhead_s.get(group, t0)))

    def table(self) -> pd.DataFrame:
        """The efficiencies as a DataFrame, one row per group the model sets."""
        groups = [g for g in OP_GROUPS if g in {*self.compute, *self.bandwidth, *self.overhead_s}]
        rows = [dict(zip(("compute", "bandwidth", "overhead_us"), self.params(g))) for g in groups]
        out = pd.DataFrame(rows, index=pd.Index(groups, name="group"))
        if len(out):
            out["overhead_us"] *= 1e6
        return out


def predict_times(table: pd.DataFrame, hw: Hardware, model: EfficiencyModel | None = None) -> pd.DataFrame:
    """Predicted time (seconds) of every op of an op table on ``hw`` under ``model``.

    Returns ``op``, ``module``, ``op_class``, ``group``, ``dtype``, ``t_compute``,
    ``t_memory``, ``overhead_s``, ``time`` (= overhead + max of the two) and ``bound``
    (``compute`` / ``memory`` / ``uncosted``; views take 0 s). With
    :meth:`EfficiencyModel.ideal` the times equal :func:`op_times`' (``efficiency=1``).
    """
    model = model or EfficiencyModel.ideal()
    groups = _groups(table)
    peaks = {key: _peak_for(hw, *key) for key in set(zip(table["op_class"], table["dtype"]))}
    peak = np.array([peaks[k] for k in zip(table["op_class"], table["dtype"])], dtype=float)
    params = {g: model.params(g) for g in set(groups)}
    e = np.array([params[g][0] for g in groups], dtype=float)
    b = np.array([params[g][1] for g in groups], dtype=float)
    t0 = np.array([0.0 if g == VIEW else params[g][2] for g in groups], dtype=float)
    flops = table["flops"].to_numpy(dtype=float)
    moved = optable.bytes_moved(table).to_numpy(dtype=float)
    out = table[["op", "module", "op_class"]].copy()
    out["group"] = groups
    out["dtype"] = table["dtype"].to_numpy()
    out["t_compute"] = flops / (e * peak)
    out["t_memory"] = moved / (b * hw.mem_bw)
    out["overhead_s"] = t0
    out["time"] = t0 + np.maximum(out["t_compute"], out["t_memory"])
    bound = np.where(out["t_memory"] > out["t_compute"], "memory", "compute")
    out["bound"] = np.where(table["costed"].to_numpy(), bound, "uncosted")
    return out


@contextlib.contextmanager
def _silence_fd2():
    """Hide what C++ libraries write straight to file descriptor 2 (torch.profiler's kineto logs
    a ``profiler_start`` / ``profiler_stop`` line per run there, which a notebook would show)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def profile_quietly(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> pd.DataFrame:
    """:func:`cohw_utils.spine.measure.profile_ops` (same arguments, same result) with the profiler's
    C++ start/stop log lines silenced; Python warnings and exceptions are unaffected."""
    from cohw_utils.spine.measure import profile_ops

    with _silence_fd2():
        return profile_ops(fn, *args, **kwargs)


def _measured_rows(measured_table: pd.DataFrame) -> pd.DataFrame:
    if "time_s" not in measured_table.columns:
        raise CohwError("the table has no 'time_s' column; pass the output of "
                        "cohw_utils.spine.measure.profile_ops (an op table with measured times)")
    t = measured_table
    keep = (t["costed"].to_numpy() & (t["op_class"] != VIEW).to_numpy()
            & np.isfinite(t["time_s"].to_numpy(dtype=float)) & (t["time_s"].to_numpy(dtype=float) > 0))
    return t[keep]


#: Search ranges of :func:`fit_efficiency`: compute and bandwidth efficiency, overhead (s).
_E_RANGE, _B_RANGE, _T0_RANGE = (1e-5, 1.5), (1e-4, 30.0), (1e-6, 0.1)


def _fit_rate(work: np.ndarray, rate: np.ndarray, logm: np.ndarray, t0: float,
              lo: float, hi: float) -> tuple[float, float]:
    """(loss, x): the efficiency x in [lo, hi] minimising sum |log(t0 + work / (x * rate)) -
    logm|, by a log grid refined three times; a tiny penalty on |log x| breaks ties towards 1."""
    xs = np.logspace(np.log10(lo), np.log10(hi), 61)
    best = (np.inf, 1.0)
    for _ in range(4):
        pred = t0 + work[None, :] / (xs[:, None] * rate[None, :])
        loss = np.abs(np.log(pred) - logm[None, :]).sum(axis=1) + 1e-6 * np.abs(np.log(xs))
        j = int(np.argmin(loss))
        best = (float(loss[j]), float(xs[j]))
        xs = np.clip(np.logspace(np.log10(xs[max(j - 1, 0)]), np.log10(xs[min(j + 1, len(xs) - 1)]), 21), lo, hi)
    return best


def _fit_roof(work: np.ndarray, rate: np.ndarray, measured: np.ndarray, lo: float, hi: float,
              t0: float | None = None) -> tuple[float, float, float]:
    """(loss, overhead, efficiency x) minimising sum |log((t0 + work / (x * rate)) / measured)|.

    With ``t0`` given, only x is fitted. Otherwise t0 runs over {0} and a log grid from 1 us
    to 100 ms, refined three times around the best value, and for each t0 the best x is found
    (the loss valley is diagonal in (t0, x), so x is profiled out rather than gridded
    jointly). A tiny penalty on t0 breaks ties towards no overhead: ops of a single size
    cannot tell a fixed cost from a slower rate."""
    logm = np.log(measured)
    if t0 is not None:
        loss, x = _fit_rate(work, rate, logm, t0, lo, hi)
        return loss, t0, x
    ts = np.concatenate([[0.0], np.logspace(*np.log10(_T0_RANGE), 41)])
    best = (np.inf, 0.0, 1.0)
    for _ in range(4):
        fits = [_fit_rate(work, rate, logm, float(t), lo, hi) for t in ts]
        losses = np.array([f[0] for f in fits]) + 1e-6 * ts / 1e-3
        i = int(np.argmin(losses))
        if losses[i] < best[0]:
            best = (float(losses[i]), float(ts[i]), fits[i][1])
        ts = np.linspace(ts[max(i - 1, 0)], ts[min(i + 1, len(ts) - 1)], 21)
    return best


def fit_efficiency(measured_table: pd.DataFrame, hw: Hardware, min_ops: int = 3) -> EfficiencyModel:
    """Fit an :class:`EfficiencyModel` to a measured run (the output of
    :func:`cohw_utils.spine.measure.profile_ops`) on the machine ``hw`` describes.

    Method. Each op sits under one roof of the *ideal* roofline: compute if its intensity is
    above the ridge point, memory if below. For every op group with at least ``min_ops``
    timed ops:

    1. On the roof that holds more of the group's ops, the overhead (0 or 1 us to 100 ms)
       and that roof's efficiency are fitted together: ops of different sizes separate a
       fixed cost per op from a rate.
    2. The other roof's efficiency is fitted on its own ops with that overhead, so each
       efficiency is identified by the ops it governs (a GEMM group with no memory-bound op
       keeps bandwidth 1).

    Each fit minimises the sum over its ops of ``|log(predicted / measured)|``, the relative
    error, robust to outliers (its minimiser is a median), by grid search (compute 1e-5 to
    1.5, bandwidth 1e-4 to 30; a log grid refined three times). Groups with fewer ops keep the
    ideal roofline (1, 1, no overhead) and are named in ``source``. Views, uncosted ops and
    ops without a matched time are ignored.
    """
    rows = _measured_rows(measured_table)
    if not len(rows):
        raise CohwError("no timed ops to fit: the measured table has no costed, non-view rows "
                        "with time_s > 0 (did profile_ops match the profiler events?)")
    if min_ops < 1:
        raise CohwError(f"min_ops must be >= 1, got {min_ops}")
    groups = _groups(rows)
    peak = np.array([_peak_for(hw, c, d) for c, d in zip(rows["op_class"], rows["dtype"])], dtype=float)
    flops = rows["flops"].to_numpy(dtype=float)
    moved = optable.bytes_moved(rows).to_numpy(dtype=float)
    measured = rows["time_s"].to_numpy(dtype=float)
    bw = np.full(len(rows), hw.mem_bw)
    compute_bound = flops / peak >= moved / hw.mem_bw
    present = [g for g in OP_GROUPS if g in set(groups)]
    fitted = [g for g in present if (groups == g).sum() >= min_ops]
    skipped = [f"{g} ({int((groups == g).sum())} ops)" for g in present if g not in fitted]
    compute, bandwidth, overhead = {}, {}, {}
    for g in fitted:
        c, m = (groups == g) & compute_bound, (groups == g) & ~compute_bound
        if c.sum() >= m.sum():
            _, t0, e = _fit_roof(flops[c], peak[c], measured[c], *_E_RANGE)
            b = _fit_roof(moved[m], bw[m], measured[m], *_B_RANGE, t0=t0)[2] if m.any() else 1.0
        else:
            _, t0, b = _fit_roof(moved[m], bw[m], measured[m], *_B_RANGE)
            e = _fit_roof(flops[c], peak[c], measured[c], *_E_RANGE, t0=t0)[2] if c.any() else 1.0
        compute[g], bandwidth[g], overhead[g] = e, b, t0
    note = (f"fitted on {len(rows)} timed ops against {hw.name} (peak fp32 {hw.peak('fp32') / 1e9:.0f} "
            f"GFLOP/s, {hw.mem_bw / 1e9:.1f} GB/s)")
    if skipped:
        note += f"; too few ops to fit, left at the ideal roofline: {', '.join(skipped)}"
    return EfficiencyModel(compute, bandwidth, overhead, source=note)


def prediction_error(measured_table: pd.DataFrame, hw: Hardware,
                     model: EfficiencyModel | None = None) -> pd.DataFrame:
    """Prediction error of ``model`` against a measured run, per op group and overall.

    Per op, error = (predicted - measured) / measured in %. Columns: ``ops``, ``measured_ms``
    and ``predicted_ms`` (sums), ``time_share_%`` (of the measured total), ``median_abs_err_%``,
    ``p90_abs_err_%``, ``median_err_%`` (signed: the bias; negative = predicted too fast) and
    ``total_err_%`` (error of the summed time). Row ``all`` pools every op.
    """
    rows = _measured_rows(measured_table)
    pred = predict_times(rows, hw, model)
    err = 100.0 * (pred["time"].to_numpy() - rows["time_s"].to_numpy()) / rows["time_s"].to_numpy()
    frame = pd.DataFrame({"group": pred["group"].to_numpy(), "measured": rows["time_s"].to_numpy(),
                          "predicted": pred["time"].to_numpy(), "err": err})
    total = frame["measured"].sum()

    def summarise(d: pd.DataFrame) -> dict[str, float]:
        return {"ops": len(d), "measured_ms": 1e3 * d["measured"].sum(),
                "predicted_ms": 1e3 * d["predicted"].sum(),
                "time_share_%": 100.0 * d["measured"].sum() / total,
                "median_abs_err_%": float(np.median(np.abs(d["err"]))),
                "p90_abs_err_%": float(np.percentile(np.abs(d["err"]), 90)),
                "median_err_%": float(np.median(d["err"])),
                "total_err_%": 100.0 * (d["predicted"].sum() - d["measured"].sum()) / d["measured"].sum()}

    out = {g: summarise(frame[frame["group"] == g]) for g in OP_GROUPS if g in set(frame["group"])}
    out["all"] = summarise(frame)
    res = pd.DataFrame.from_dict(out, orient="index")
    res.index.name = "group"
    res["ops"] = res["ops"].astype(int)
    return res


# ---------------------------------------------------------------------------- figures
_GROUP_COLORS = {GEMM: "tab:blue", CONV: "tab:cyan", ATTENTION: "tab:purple",
                 NORMALIZATION: "tab:orange", ELEMENTWISE: "tab:green",
                 DATA_MOVEMENT: "tab:red", OTHER: "tab:gray"}


def _roof_dtypes(hw: Hardware) -> list[str]:
    """fp32 and the chip's 16-bit matrix dtype (bf16, else fp16), where it has them."""
    half = "bf16" if "bf16" in hw.peak_flops else ("fp16" if "fp16" in hw.peak_flops else None)
    return [d for d in ("fp32", half) if d and d in hw.peak_flops]


def _draw_roof(ax, hw: Hardware, dtypes: list[str], color, x: np.ndarray, label_prefix: str) -> None:
    styles = {"fp32": "--", "tf32": "-.", "bf16": "-", "fp16": "-", "fp8": ":", "int8": ":"}
    for d in dtypes:
        peak = hw.peak(d)
        ax.plot(x, np.minimum(peak, hw.mem_bw * x), styles.get(d, "-"), color=color, lw=1.6,
                label=f"{label_prefix}{d}: {peak / 1e12:.3g} TFLOP/s, {hw.mem_bw / 1e9:.0f} GB/s, "
                      f"ridge {hw.ridge_point(d):.0f} FLOP/B")


def _draw_points(ax, points: pd.DataFrame, y: str) -> None:
    p = points[np.isfinite(points["intensity"]) & (points["intensity"] > 0)
               & np.isfinite(points[y]) & (points[y] > 0)]
    if "group" in p.columns:
        groups = p["group"].to_numpy()
    elif "op_class" in p.columns and "op" in p.columns:
        groups = _groups(p)
    else:
        groups = np.array(["points"] * len(p), dtype=object)
    size = np.full(len(p), 25.0)
    if "time_s" in p.columns and p["time_s"].sum() > 0:
        size = 8 + 400 * p["time_s"].to_numpy() / p["time_s"].sum()
    for g in dict.fromkeys(groups):
        m = groups == g
        ax.scatter(p["intensity"].to_numpy()[m], p[y].to_numpy()[m], s=size[m], alpha=0.6,
                   color=_GROUP_COLORS.get(g, "black"), edgecolors="none", label=str(g))
    if "label" in p.columns:
        for _, r in p.iterrows():
            ax.annotate(str(r["label"]), (r["intensity"], r[y]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")


def fig_roofline(hw_or_list: Hardware | list[Hardware], points: pd.DataFrame | dict | None = None,
                  dtypes: list[str] | None = None, y: str = "achieved_flops",
                  title: str | None = None, ncols: int = 3) -> Figure:
    """Roofline plot(s): attainable FLOP/s = min(peak, bandwidth x intensity), log-log.

    One chip: one panel with a roof per dtype (default: fp32 and bf16/fp16). A list: one
    panel per chip. ``points`` (an op table with ``intensity`` and the column ``y``,
    default ``achieved_flops`` as :func:`cohw_utils.spine.measure.profile_ops` adds it) are drawn
    on every panel, or pass ``{chip name: table}`` to put different points on each panel;
    points are coloured by op group and sized by their share of ``time_s`` when present; a
    ``label`` column annotates them.
    """
    chips = hw_or_list if isinstance(hw_or_list, (list, tuple)) else [hw_or_list]
    if not chips:
        raise CohwError("plot_roofline needs at least one Hardware")
    n = len(chips)
    cols = 1 if n == 1 else min(ncols, n)
    rows = int(np.ceil(n / cols))
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(7.5 if n == 1 else 4.3 * cols, 5.2 if n == 1 else 3.6 * rows),
                             squeeze=False)
    lo, hi = 1e-2, 1e4
    for ax, hw in zip(axes.flat, chips):
        pts = points.get(hw.name) if isinstance(points, dict) else points
        if pts is not None and len(pts):
            finite = pts["intensity"][np.isfinite(pts["intensity"]) & (pts["intensity"] > 0)]
            if len(finite):
                lo, hi = min(1e-2, finite.min() / 3), max(1e4, finite.max() * 3)
        x = np.logspace(np.log10(lo), np.log10(hi), 200)
        _draw_roof(ax, hw, dtypes or _roof_dtypes(hw), "black", x, "")
        if pts is not None and len(pts):
            _draw_points(ax, pts, y)
        ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP/byte)",
               ylabel="FLOP/s", title=hw.name if n > 1 or title is None else title)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=6 if n > 1 else 7, loc="lower right")
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    if title and n > 1:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def fig_prediction(measured_table: pd.DataFrame, hw: Hardware, model: EfficiencyModel | None = None,
                    title: str | None = None) -> Figure:
    """Predicted against measured time per op (log-log), coloured by group, with the y = x
    line and a +-25% band."""
    rows = _measured_rows(measured_table)
    pred = predict_times(rows, hw, model)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    meas, p = rows["time_s"].to_numpy(), pred["time"].to_numpy()
    for g in dict.fromkeys(pred["group"]):
        m = pred["group"].to_numpy() == g
        ax.scatter(meas[m], p[m], s=18, alpha=0.7, color=_GROUP_COLORS.get(g, "black"), label=g)
    lo, hi = min(meas.min(), p.min()) / 2, max(meas.max(), p.max()) * 2
    x = np.array([lo, hi])
    ax.plot(x, x, "k-", lw=1)
    ax.fill_between(x, 0.75 * x, 1.25 * x, color="gray", alpha=0.2, label="+-25%")
    ax.set(xscale="log", yscale="log", xlabel="measured time per op (s)", ylabel="predicted (s)",
           title=title or f"Latency predictor on {hw.name}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
