"""Figures the chapters show. Each function takes a view's DataFrame and returns a Figure.

Figures are drawn with matplotlib's object API (no global state), so a chapter can show,
save or test them; nothing here computes a cost.
"""
from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cohw_utils.hardware import Hardware

_DOMAIN_COLORS = {"llm": "tab:blue", "diffusion": "tab:orange", "vision": "tab:green",
                  "nerf": "tab:red", "text-to-3d": "tab:purple"}


def fig_flops_vs_bytes(overview: pd.DataFrame, hw: Hardware, dtype: str = "fp16") -> Figure:
    """Each (workload, phase) as a point of FLOPs against bytes moved, log-log, with the line
    of ``hw``'s ridge point: points above it can be compute-bound, points below are
    memory-bound on that chip."""
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    for _, r in overview.iterrows():
        ax.scatter(r["bytes_moved"], r["flops"], color=_DOMAIN_COLORS.get(r["domain"], "gray"), s=40)
        ax.annotate(f"{r['workload']}:{r['phase']}", (r["bytes_moved"], r["flops"]), fontsize=7,
                    xytext=(4, 2), textcoords="offset points")
    x = np.logspace(np.log10(overview["bytes_moved"].min() / 3), np.log10(overview["bytes_moved"].max() * 3))
    ridge = hw.ridge_point(dtype)
    ax.plot(x, ridge * x, "k--", lw=1, label=f"{hw.name} {dtype} ridge: {ridge:.0f} FLOP/B")
    ax.set(xscale="log", yscale="log", xlabel="bytes moved (unfused)", ylabel="FLOPs",
           title="Proxy workloads at full scale, batch 1")
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=d) for d, c in _DOMAIN_COLORS.items()
               if d in set(overview["domain"])]
    ax.legend(handles=handles + ax.get_legend_handles_labels()[0], fontsize=8, loc="upper left")
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    return fig


def fig_priority_bars(ranked: pd.DataFrame, weights: Mapping[str, float]) -> Figure:
    """Stacked horizontal bars: each workload's score split into its weighted criteria."""
    crits = [c for c, w in weights.items() if w > 0]
    total = sum(weights[c] for c in crits)
    contrib = ranked[crits].mul(pd.Series({c: weights[c] / total for c in crits}))
    contrib = contrib.iloc[::-1]  # highest score on top
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(contrib) + 1.2))
    left = np.zeros(len(contrib))
    for c in crits:
        ax.barh(contrib.index, contrib[c], left=left, label=f"{c} (w={weights[c] / total:.2f})")
        left += contrib[c].to_numpy()
    ax.set(xlabel="weighted score", xlim=(0, 1), title="Proxy priority")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig
