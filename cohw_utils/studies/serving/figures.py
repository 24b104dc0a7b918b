"""Figures of a server under load, each from the tables of :mod:`cohw_utils.studies.serving.load`
or a :class:`~cohw_utils.views.serving.SimResult`; no figure computes anything it does not plot.

* :func:`fig_latency_vs_load`: TTFT and TPOT percentiles (p50, p90, p99) against request rate,
  with the SLO bounds, per chip.
* :func:`fig_blocks_over_time`: KV blocks in use, running and waiting requests, step by step.
* :func:`fig_allocation`: the vLLM paper's Figure 12 axes: normalized latency (s per output
  token) against request rate, one line per KV allocation policy.

Used by Chapter 4.6 (serving under load).
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cohw_utils.views.serving import SimResult

__all__ = ["fig_latency_vs_load", "fig_blocks_over_time", "fig_allocation"]

_ALLOCATION_LABEL = {"paged": "paged blocks (vLLM)", "reserve-exact": "reserve prompt + output (Orca Oracle)",
                     "reserve-max": "reserve max length (Orca Max)"}


def fig_latency_vs_load(sweep: pd.DataFrame, slo_ttft_s: float | None = None,
                        slo_tpot_s: float | None = None) -> Figure:
    """Two panels (TTFT, TPOT) of p50/p90/p99 against rate, one colour per ``hardware`` of the
    sweep; dashed: the SLO bound. Log y: latencies span orders of magnitude past saturation."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (hw, g), color in zip(sweep.groupby("hardware", sort=False), colors):
        g = g.sort_values("rate_per_s")
        for ax, metric in zip(axes, ("ttft", "tpot")):
            for q, style in ((50, "-"), (90, "--"), (99, ":")):
                ax.plot(g["rate_per_s"], g[f"{metric}_p{q}_s"] * 1e3, style, color=color, marker=".",
                        label=f"{hw} p{q}")
    for ax, metric, slo in zip(axes, ("time to first token", "time per output token"), (slo_ttft_s, slo_tpot_s)):
        if slo is not None:
            ax.axhline(slo * 1e3, color="k", lw=1, ls="-.", label=f"SLO {slo * 1e3:g} ms")
        ax.set(xlabel="request rate (requests/s, Poisson)", ylabel=f"{metric} (ms)", yscale="log", title=metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def fig_blocks_over_time(result: SimResult, title: str = "") -> Figure:
    """KV blocks in use (left axis, share of the cache) and running / waiting requests (right
    axis) at the start of every step."""
    st = result.steps
    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.fill_between(st["start_s"], 100 * st["blocks_used"] / result.config.num_blocks, step="post",
                    color="tab:green", alpha=0.4, label="KV blocks in use")
    ax.set(xlabel="time (s)", ylabel="% of KV blocks in use", ylim=(0, 105), title=title)
    ax2 = ax.twinx()
    ax2.step(st["start_s"], st["running"], where="post", color="tab:blue", lw=1, label="running")
    ax2.step(st["start_s"], st["waiting"], where="post", color="tab:red", lw=1, label="waiting")
    ax2.set_ylabel("requests")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def fig_allocation(sweep: pd.DataFrame, bound_s: float | None = None) -> Figure:
    """Normalized latency against rate per ``allocation`` (the vLLM paper's Figure 12 axes);
    ``bound_s``: the latency bound under which a rate counts as sustained (dotted)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for alloc, g in sweep.groupby("allocation", sort=False):
        g = g.sort_values("rate_per_s")
        ax.plot(g["rate_per_s"], g["normalized_latency_s"], marker="o", ms=3, label=_ALLOCATION_LABEL.get(alloc, alloc))
    if bound_s is not None:
        ax.axhline(bound_s, color="k", ls=":", lw=1, label=f"bound {bound_s:g} s/token")
    top = float(np.nanmax(sweep["normalized_latency_s"]))
    ax.set(xlabel="request rate (requests/s)", ylabel="normalized latency (s/token)", ylim=(0, min(top, 1.0) * 1.05),
           title=f"{sweep['model'].iloc[0]} on {sweep['hardware'].iloc[0]}: KV allocation under load")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
