"""Chapter 5's figures: growth across GPU generations, Pareto fronts per workload class, what
each feature buys, and one turn of the loop.

Each function takes the frames of the other ``codesign`` modules
(:func:`~cohw_utils.studies.codesign.generations.growth_table`,
:func:`~cohw_utils.studies.codesign.pareto.class_scores`,
:func:`~cohw_utils.studies.codesign.what_if.feature_gains`,
:func:`~cohw_utils.studies.codesign.what_if.iteration`) and returns a matplotlib ``Figure``.
Times and energies are plotted relative to a reference design, areas in mm^2, all on log axes.

Used by Chapter 5 (the co-design loop).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from cohw_utils.studies.codesign.generations import GENERATIONS, growth_table
from cohw_utils.studies.codesign.pareto import weighted_gmean
from cohw_utils.studies.codesign.phases import CLASSES

__all__ = ["fig_growth", "fig_pareto", "fig_gains", "fig_iteration"]


def _plain_log(ax, which: str = "both") -> None:
    """Log axes labelled 0.5, 1, 2, 1000 rather than 5x10^-1 (minor labels off)."""
    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    for axis in ((ax.xaxis, ax.yaxis) if which == "both" else (ax.xaxis,) if which == "x" else (ax.yaxis,)):
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(fmt)
        axis.set_minor_formatter(NullFormatter())



def fig_growth(names: Sequence[str] = GENERATIONS) -> Figure:
    """Left: dense 16-bit FLOP/s, HBM bandwidth and capacity across GPU generations, relative
    to the first (log scale). Right: the FLOP-per-byte ratio each generation needs to be
    compute-bound."""
    g = growth_table(names)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(g))
    for col, lab, mk in (("tflops16_x", "dense 16-bit FLOP/s", "o"), ("hbm_tbs_x", "HBM bandwidth", "s"),
                         ("hbm_gb_x", "HBM capacity", "^")):
        ax.plot(x, g[col], marker=mk, label=f"{lab}: {g[col].iloc[-1]:.1f}x")
    ax.set(yscale="log", ylabel=f"relative to {g.index[0]}", title="Growth across NVIDIA generations")
    _plain_log(ax, "y")
    ax.set_xticks(x, [f"{n}\n({y})" for n, y in zip(g.index, g["year"])], fontsize=7)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    bars = ax2.bar(x, g["flop_per_byte"], color="tab:purple", alpha=0.8)
    for b, v in zip(bars, g["flop_per_byte"]):
        ax2.annotate(f"{v:.0f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax2.set_xticks(x, g.index, fontsize=7)
    ax2.set(ylabel="FLOP per byte of HBM (dense 16-bit)", title="FLOP/s : bandwidth ratio (ridge point)")
    ax2.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def fig_pareto(scores: pd.DataFrame, chosen: pd.DataFrame | None = None,
                  marks: Mapping[str, str] | None = None, classes: Sequence[str] | None = None,
                  ncols: int = 4) -> Figure:
    """One panel per class: every design's time relative to the reference against its package
    area (grey), the Pareto front (coloured by energy relative to the reference), the chosen
    design per class (star, named) and labelled reference points ``marks`` (design -> label)."""
    ks = list(classes or [k for k in (*CLASSES, "weighted proxy set") if k in set(scores["klass"])])
    rows = int(np.ceil(len(ks) / ncols))
    fig, axes = plt.subplots(rows, ncols, figsize=(4.2 * ncols, 3.8 * rows), squeeze=False, layout="constrained")
    sc = None
    vmin, vmax = np.log2(scores["energy_rel"]).quantile([0.02, 0.98])
    for ax, k in zip(axes.flat, ks):
        g = scores[scores["klass"] == k]
        ax.scatter(g["package_mm2"], g["time_rel"], s=4, color="0.8", rasterized=True)
        f = g[g["pareto"]].sort_values("package_mm2")
        ax.plot(f["package_mm2"], f["time_rel"], "-", color="0.3", lw=0.8)
        sc = ax.scatter(f["package_mm2"], f["time_rel"], c=np.log2(f["energy_rel"]), cmap="viridis",
                        vmin=vmin, vmax=vmax, s=18, zorder=3)
        for name, lab in (marks or {}).items():
            m = g[g["design"] == name]
            if len(m):
                ax.scatter(m["package_mm2"], m["time_rel"], marker="^", color="tab:red", s=30, zorder=4)
                ax.annotate(lab, (m["package_mm2"].iloc[0], m["time_rel"].iloc[0]), fontsize=6, xytext=(3, 3),
                            textcoords="offset points", color="tab:red")
        if chosen is not None and k in chosen.index:
            c = chosen.loc[k]
            ax.scatter([c["package_mm2"]], [c["time_rel"]], marker="*", s=160, color="tab:orange",
                       edgecolors="black", zorder=5)
            ax.annotate(c["design"], (c["package_mm2"], c["time_rel"]), fontsize=6, xytext=(-4, -11),
                        textcoords="offset points", ha="right")
        ax.set(xscale="log", yscale="log", title=k, xlabel="package area (mm$^2$, cost proxy)")
        _plain_log(ax)
        ax.grid(True, which="major", alpha=0.3)
    for ax in list(axes.flat)[len(ks):]:
        ax.set_visible(False)
    for r in range(rows):
        axes[r, 0].set_ylabel("time relative to reference")
    if sc is not None:
        cb = fig.colorbar(sc, ax=axes.ravel().tolist(), shrink=0.7)
        cb.set_label("log2 energy relative to reference")
    return fig


def fig_gains(gains: pd.DataFrame, weights: pd.Series | None = None) -> Figure:
    """Speedup of each feature per workload class (weighted geometric mean over the class's
    phases), as grouped horizontal bars."""
    g = gains.copy()
    g["w"] = g["phase"].map(weights).fillna(1.0) if weights is not None else 1.0
    piv = g.groupby(["klass", "feature"]).apply(lambda d: weighted_gmean(d["speedup"], d["w"]),
                                               include_groups=False).unstack()
    piv = piv.reindex([k for k in CLASSES if k in piv.index])
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(piv) * 1.6 + 1.5))
    n = len(piv.columns)
    y = np.arange(len(piv))
    h = 0.8 / n
    for i, f in enumerate(piv.columns):
        ax.barh(y + i * h, piv[f], height=h, label=f)
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks(y + 0.4 - h / 2, piv.index)
    ax.invert_yaxis()
    ax.set(xscale="log", xlabel="speedup over the base design (log; weighted geometric mean over the class)",
           title="What each feature buys, per workload class")
    _plain_log(ax, "x")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def fig_iteration(it: pd.DataFrame) -> Figure:
    """Time and energy ratio (after / before) per phase, green where it improved, red where it
    regressed."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 0.28 * len(it) + 1.6), sharey=True)
    y = np.arange(len(it))
    colors = it["verdict"].map({"improved": "tab:green", "regressed": "tab:red", "same": "0.6"})
    ax.barh(y, it["time_ratio"] - 1, left=1.0, color=colors)  # bars grow from 1: left = better
    e_col = np.where(it["energy_ratio"] < 0.98, "tab:green", np.where(it["energy_ratio"] > 1.02, "tab:red", "0.6"))
    ax2.barh(y, it["energy_ratio"] - 1, left=1.0, color=e_col)
    for a, t, col in ((ax, "time after / before (left of 1 = faster)", "time_ratio"),
                      (ax2, "energy after / before (left of 1 = less)", "energy_ratio")):
        a.axvline(1.0, color="black", lw=0.8)
        a.set(xscale="log", xlabel=t, xlim=(min(it[col].min(), 1.0) / 1.25, max(it[col].max(), 1.0) * 1.25))
        _plain_log(a, "x")
        a.grid(True, axis="x", which="both", alpha=0.3)
    ax.set_yticks(y, it.index, fontsize=7)
    ax.invert_yaxis()
    fig.tight_layout()
    return fig
