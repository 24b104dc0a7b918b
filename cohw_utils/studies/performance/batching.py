"""Latency and throughput against batch size: measured here, predicted for accelerators.

**Measured** (:func:`measure`): a workload phase from the registry
(:func:`cohw_utils.workloads.build`) or a one-layer Llama slice (:func:`cohw_utils.studies.performance.opclasses.llama_slice`)
is built once per batch size on this machine's CPU and timed with
:func:`cohw_utils.spine.measure.time_callable`. **Latency** = median wall time of one call (a
prefill, one decode step, one UNet denoising step, one render of a ray batch);
**throughput** = units per call / latency (tokens/s, images/s, rays/s). Inputs are made once
per batch size (untimed); a decode step extends its KV cache by one token per call, so over
the warm-up and the repeats the cache grows by a few tokens (stated in ``attrs``). A NeRF
render gets fresh rays before every call (the renderer writes into its ray bundle).

**Predicted** (:func:`predict`): the same phase traced at full scale on ``meta`` in the
workload's published dtype (fp16 for Llama-2 and Stable Diffusion, fp32 for NeRF), at each
batch size, and timed per op with :func:`cohw_utils.views.roofline.predict_times` on each
accelerator of ``hardware.csv``. With :meth:`cohw_utils.views.roofline.EfficiencyModel.ideal` that
is the roofline (every op at max(FLOPs / peak, bytes / bandwidth), ops one after another,
unfused, no launch overhead): an estimate that assumes unfused traffic to DRAM at 100% of the spec
sheet, not a lower bound (fused kernels keep intermediates on chip and can beat it). With the
ledger's ``calibration`` (Chapter 4.5) it is the calibrated prediction, the chapter's default.
For a decoder LM's prefill and decode the tables come from the phase's cost function in batch at
the given length (:func:`batch_cost_function`: a few traces, then exact at every batch), so
:func:`curve` can draw the prediction at every batch size from 1 to 256, not at a few.

Used by Chapter 4.3 (latency and throughput).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd
import torch

from cohw_utils.core.errors import CohwError
from cohw_utils.spine.measure import time_callable


def _timed(make: Callable[[int], tuple], batches, repeats: int, warmup: int,
           fresh_inputs: bool) -> list[dict]:
    rows = []
    for b in batches:
        if not isinstance(b, int) or b < 1:
            raise CohwError(f"batch sizes must be positive integers, got {b!r}")
        run, make_inputs, units, unit = make(b)
        box = {"io": make_inputs()}

        def call():
            args, kwargs = box["io"]
            return run(*args, **kwargs)

        setup = (lambda: box.__setitem__("io", make_inputs())) if fresh_inputs else None
        t = time_callable(call, repeats=repeats, warmup=warmup, setup=setup)
        rows.append({"batch": b, "units": units, "unit": unit, "latency_ms": 1e3 * t.median,
                     "latency_min_ms": 1e3 * t.min, "latency_max_ms": 1e3 * t.max,
                     "iqr_ms": 1e3 * t.iqr, "throughput": units / t.median, "method": t.method})
    return rows


def measure(workload: str, phase: str, batches=(1, 2, 4, 8), scale: str = "tiny",
            repeats: int = 3, warmup: int = 1, **build_options) -> pd.DataFrame:
    """Latency and throughput of one registry phase per batch size on the CPU (module
    docstring). ``batch`` is the registry's ``batch`` argument, except for the NeRF
    workloads, where it is the number of rays (``rays`` option). ``workload`` may also be
    ``"llama-slice"`` (one Llama-2-7B decoder layer, :func:`cohw_utils.studies.performance.opclasses.llama_slice`;
    options ``width`` and ``seq_len``)."""
    from cohw_utils import workloads
    from cohw_utils.studies.performance.opclasses import llama_slice

    nerf = workload in ("nerfacto", "vanilla-nerf")

    def make(b: int):
        if workload == "llama-slice":
            blk = llama_slice(phase, batch=b, **build_options)
            units = b * (build_options.get("seq_len", 512) if phase == "prefill" else 1)
            return blk.run, blk.make_inputs, units, "token"
        opts = dict(build_options)
        if nerf:
            built = workloads.build(workload, scale=scale, device="cpu", rays=b, **opts)
        else:
            built = workloads.build(workload, scale=scale, device="cpu", batch=b, **opts)
        ph = built.phase(phase)
        return ph.run, ph.make_inputs, ph.units, ph.unit_name

    torch.manual_seed(0)
    # decode: every timed call is one step at the same context, against a cache freshly filled by
    # an untimed prefill (the static cache holds seq_len + 1 positions: one step's worth)
    rows = _timed(make, batches, repeats, warmup, fresh_inputs=nerf or phase == "decode")
    df = pd.DataFrame(rows)
    df.insert(0, "phase", phase)
    df.insert(0, "workload", workload)
    df.attrs["method"] = rows[0]["method"] if rows else ""
    if phase == "decode":
        df.attrs["note"] = (f"decode: each of the {warmup + repeats} calls per batch size is one step at the same "
                            "context, against a KV cache freshly filled by an untimed prefill")
    return df.drop(columns=["method"])


def trace_full_scale(workload: str, phase: str, batch: int, dtype: str | None = None,
                     seq_len: int | None = None, **options) -> pd.DataFrame:
    """Op table of one phase at full scale on ``meta`` (published dtype unless given); for
    the NeRF workloads ``batch`` is the number of rays."""
    from cohw_utils import workloads
    from cohw_utils.spine.trace import trace

    if workload in ("nerfacto", "vanilla-nerf"):
        built = workloads.build(workload, scale="full", device="meta", rays=batch, **options)
    else:
        built = workloads.build(workload, scale="full", device="meta", dtype=dtype, batch=batch,
                                seq_len=seq_len, **options)
    ph = built.phase(phase)
    args, kwargs = ph.make_inputs()
    table = trace(ph.run, *args, model=built.model, phase=phase, **kwargs)
    table.attrs["units"] = ph.units
    table.attrs["unit"] = ph.unit_name
    return table


_LLM_PHASES = ("prefill", "decode")


def batch_cost_function(workload: str, phase: str, seq_len: int, max_batch: int = 256, dtype: str | None = None):
    """The cost function of an LLM ``phase`` in batch alone, at one ``seq_len`` (prompt for a
    prefill, context for a decode step), in the workload's published dtype unless given: its
    batch variable keeps the breakpoints of :func:`~cohw_utils.spine.phase_costs.phase_variables`
    (experts touched) and is checked up to ``max_batch``. Cached on disk."""
    from dataclasses import replace

    from cohw_utils import workloads
    from cohw_utils.core.dtypes import dtype_name
    from cohw_utils.spine.costfn import Variable
    from cohw_utils.spine.phase_costs import phase_cost_function, phase_variables

    wl = workloads.get_workload(workload)
    batch = phase_variables(workload, phase)[0]
    var = (replace(batch, check_hi=max(batch.check_hi, int(max_batch))),
           Variable("seq_len", lo=int(seq_len), hi=int(seq_len), degree=0))
    return phase_cost_function(workload, phase, dtype or dtype_name(wl.default_dtype), variables=var)


def _table_at(cf, batch: int, seq_len: int) -> pd.DataFrame:
    """The cost function's exact table at (batch, seq_len), with the ``units`` and ``unit`` the
    traced phase reported (fitted scalars)."""
    table = cf.table_at((batch, seq_len))
    sc = table.attrs.get("scalars", {})
    table.attrs["units"], table.attrs["unit"] = sc['["units"]'], sc['["unit"]']
    return table


def curve(workload: str, phase: str, hardware: list, seq_len: int, batches=range(1, 257),
          calibration=None) -> pd.DataFrame:
    """Predicted latency and throughput of an LLM phase at every batch in ``batches`` on each chip,
    vectorized over the cost function (:func:`batch_cost_function`;
    :func:`~cohw_utils.views.predictor.sweep_seconds` under ``calibration``, default the ideal
    roofline). Columns workload, phase, hardware, batch, units, unit, latency_ms, throughput."""
    from cohw_utils.hardware import get_hardware
    from cohw_utils.views.predictor import sweep_seconds

    batches = [int(b) for b in batches]
    cf = batch_cost_function(workload, phase, seq_len, max(batches))
    pts = np.array([[b, seq_len] for b in batches])
    units = np.array([cf.boxes[i].scalars_at(tuple(p))['["units"]'] for i, p in zip(cf.box_index(pts), pts)], dtype=float)
    unit = cf.boxes[0].scalars_at(tuple(pts[0]))['["unit"]']
    rows = []
    for hw in (h if hasattr(h, "mem_bw") else get_hardware(h) for h in hardware):
        s = sweep_seconds(cf, pts, hw, calibration)
        rows.append(pd.DataFrame({"workload": workload, "phase": phase, "hardware": hw.name, "batch": batches,
                                  "units": units, "unit": unit, "latency_ms": 1e3 * s, "throughput": units / s}))
    return pd.concat(rows, ignore_index=True)


def latency_doubling_batch(curve_df: pd.DataFrame) -> pd.Series:
    """Per chip of a :func:`curve`: the smallest batch whose step takes at least twice as long as
    batch 1 (where batching stops being nearly free); NaN if none in the curve."""
    out = {}
    for hw, g in curve_df.groupby("hardware", sort=False):
        g = g.sort_values("batch")
        slow = g[g["latency_ms"] >= 2 * g["latency_ms"].iloc[0]]
        out[hw] = int(slow["batch"].iloc[0]) if len(slow) else np.nan
    return pd.Series(out, name="latency_x2_batch")


def predict(workload: str, phase: str, batches, hardware: list, model=None,
            seq_len: int | None = None, tables: dict | None = None, calibration=None,
            **options) -> pd.DataFrame:
    """Predicted latency and throughput per (accelerator, batch): one row each, columns
    workload, phase, hardware, batch, units, unit, latency_ms, throughput,
    memory_bound_share (of the predicted op time, the fixed per-step overhead of a calibration
    excluded), overhead_ms (that overhead; 0 for an efficiency model). ``hardware``: names in ``hardware.csv`` or
    :class:`~cohw_utils.hardware.Hardware` objects (e.g. this machine's, from the probe). ``model``: an
    :class:`~cohw_utils.views.roofline.EfficiencyModel` (default: the ideal roofline), or
    ``calibration``, a :class:`~cohw_utils.views.predictor.Calibration` (the ledger's fit, Chapter
    4.5): each chip then gets its vendor's efficiencies and per-step overhead. ``tables``, if
    given, caches the traced op tables by (workload, phase, batch). A decoder LM's prefill or
    decode with a ``seq_len`` and no ``options`` reads its tables from
    :func:`batch_cost_function` (exact, the same numbers as a trace) instead of tracing each batch."""
    from cohw_utils.hardware import get_hardware
    from cohw_utils.views.roofline import EfficiencyModel, predict_times

    model = model or EfficiencyModel.ideal()
    hws = [h if hasattr(h, "mem_bw") else get_hardware(h) for h in hardware]
    cache = tables if tables is not None else {}
    rows = []
    cf = None
    if phase in _LLM_PHASES and seq_len is not None and not options:
        cf = batch_cost_function(workload, phase, seq_len, max(batches))
    for b in batches:
        key = (workload, phase, b)
        if key not in cache:
            cache[key] = (_table_at(cf, b, seq_len) if cf is not None
                          else trace_full_scale(workload, phase, b, seq_len=seq_len, **options))
        table = cache[key]
        for hw in hws:
            m, overhead = calibration.efficiency_model(hw) if calibration is not None else (model, 0.0)
            t = predict_times(table, hw, m)
            ops = float(t["time"].sum())
            total = ops + overhead
            mem = float(t.loc[t["bound"] == "memory", "time"].sum())
            rows.append({"workload": workload, "phase": phase, "hardware": hw.name, "batch": b,
                         "units": table.attrs["units"], "unit": table.attrs["unit"],
                         "latency_ms": 1e3 * total, "throughput": table.attrs["units"] / total,
                         "memory_bound_share": mem / ops if ops else np.nan,
                         "overhead_ms": 1e3 * overhead})
    df = pd.DataFrame(rows)
    df.attrs["model"] = calibration.source if calibration is not None else model.source
    return df


def _batch_axis(ax, values, label: str) -> None:
    from matplotlib.ticker import NullFormatter, NullLocator

    ax.set_xscale("log", base=2)
    values = sorted(values)
    if len(values) > 12:  # a dense curve: tick the powers of two
        values = [2 ** k for k in range(int(np.log2(values[-1])) + 1) if 2 ** k >= values[0]]
    ax.set_xticks(list(values), [f"{v:,}" for v in values], fontsize=7)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(label)
    ax.yaxis.set_minor_formatter(NullFormatter())


def fig_batching(measured: dict[str, pd.DataFrame], predicted: dict[str, pd.DataFrame] | None = None):
    """Top row, one panel per measured workload phase on this CPU: latency (red, left axis,
    median with min..max bars) and throughput (blue, right axis) against batch. Bottom row,
    when given: predicted throughput of the full-scale phases on each accelerator (a line
    through every batch for a :func:`curve`, dashed with markers at the traced batches otherwise)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    n = max(len(measured), len(predicted or {}))
    nrows = 2 if predicted else 1
    fig, axes = plt.subplots(nrows, n, figsize=(3.7 * n, 3.3 * nrows), squeeze=False)
    for ax, (name, d) in zip(axes[0], measured.items()):
        ax.errorbar(d["batch"], d["latency_ms"], yerr=[d["latency_ms"] - d["latency_min_ms"],
                                                        d["latency_max_ms"] - d["latency_ms"]],
                    marker="o", color="tab:red", capsize=2, label="latency (ms)")
        ax.set(yscale="log", ylabel="latency (ms)")
        _batch_axis(ax, d["batch"], "rays" if d["unit"].iloc[0] == "ray" else "batch")
        ax.set_title(f"{name} (this CPU)", fontsize=9)
        ax2 = ax.twinx()
        ax2.plot(d["batch"], d["throughput"], marker="s", color="tab:blue", label=f"{d['unit'].iloc[0]}s / s")
        ax2.set(yscale="log")
        ax2.set_ylabel(f"{d['unit'].iloc[0]}s / s", color="tab:blue")
        ax2.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(handles=[plt.Line2D([], [], color="tab:red", marker="o", label="latency (left axis)"),
                               plt.Line2D([], [], color="tab:blue", marker="s", label="throughput (right axis)")],
                      fontsize=7, loc="upper left")
    for ax in axes[0][len(measured):]:
        ax.set_visible(False)
    if predicted:
        for ax, (name, p) in zip(axes[1], predicted.items()):
            for hw, g in p.groupby("hardware", sort=False):
                dense = len(g) > 12  # a cost-function curve: every batch, no markers
                ax.plot(g["batch"], g["throughput"], marker=None if dense else ".", ls="-" if dense else "--", label=hw)
            ax.set(yscale="log", ylabel=f"{p['unit'].iloc[0]}s / s (roofline)")
            _batch_axis(ax, sorted(set(p["batch"])), "rays" if p["unit"].iloc[0] == "ray" else "batch")
            ax.set_title(f"{name}, full scale, predicted", fontsize=9)
            ax.grid(True, alpha=0.3)
        axes[1][0].legend(fontsize=7)
        for ax in axes[1][len(predicted):]:
            ax.set_visible(False)
    fig.tight_layout()
    return fig
