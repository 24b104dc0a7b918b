"""Chapter 4.4's figures: what an operation costs against moving its operand, where each phase's
joules go, and energy and time per token against decode batch.

Each function takes the energy data file's rows (:func:`cohw_utils.views.energy_model.load_energy_data`)
or a frame of :mod:`cohw_utils.studies.energy.estimates` and returns a matplotlib ``Figure``
(object API, nothing shown). Energies are picojoules per operation or per 32-bit access (the
chart) and joules (the phase and batch figures); times are roofline milliseconds.

Used by Chapter 4.4 (power and energy).
"""
from __future__ import annotations

import functools
from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from cohw_utils.views.energy_model import LEVEL_LABELS, LEVELS, MEMORY_LEVELS, load_energy_data

__all__ = ["fig_energy", "fig_stacked_energy", "fig_energy_vs_batch"]


def _word_pj(row: pd.Series) -> float:
    """Energy of one 32-bit access for a memory row (pJ)."""
    return float(row["pj_per_byte"]) * 4


def fig_energy(data: pd.DataFrame | None = None) -> Figure:
    """The seed's chart, from the data file: energy of arithmetic operations against 32-bit
    memory accesses, log scale. Bars: 45 nm (Horowitz/Han); dots: 7 nm arithmetic (Jouppi et
    al.) and newer DRAM; hatched bars are derived rows. Memory rows are per 32 bits (64-bit
    figures halved, per-bit figures times 32)."""
    d = load_energy_data() if data is None else data
    pref = d[d["preferred"] == "yes"]
    a45 = pref[(pref["kind"] == "arith") & (pref["node"] == "45 nm")]
    a7 = pref[(pref["kind"] == "arith") & (pref["node"] == "7 nm")]
    order = ["int8", "int32", "fp16", "bf16", "fp32"]
    labels, vals, colors, hatches, dots = [], [], [], [], []
    for op in ("add", "mult"):
        for dt in order:
            r = a45[(a45["op"] == op) & (a45["dtype"] == dt)]
            if r.empty:
                continue
            labels.append(f"{dt} {op}")
            vals.append(float(r["energy_pj"].iloc[0]))
            colors.append("tab:blue")
            hatches.append("//" if r["derived"].iloc[0] == "yes" else "")
            r7 = a7[(a7["op"] == op) & (a7["dtype"] == dt)]
            dots.append(float(r7["energy_pj"].iloc[0]) if len(r7) else np.nan)
    mem = pref[pref["kind"] == "memory"]
    names = {"register": "register file", "sram_8kb": "SRAM 8 KB", "sram_32kb": "SRAM 32 KB",
             "sram_1mb": "SRAM 1 MB", "dram": "DRAM (45 nm)", "hbm2": "HBM2", "hbm2e": "HBM2E",
             "gddr6": "GDDR6", "gddr6x": "GDDR6X"}
    for level in MEMORY_LEVELS:
        r = mem[mem["level"] == level]
        if r.empty:
            continue
        is45 = r["node"].iloc[0] == "45 nm"
        labels.append(f"{names[level]} 32-bit read")
        vals.append(_word_pj(r.iloc[0]) if is45 else np.nan)
        colors.append("tab:red")
        hatches.append("")
        dots.append(np.nan if is45 else _word_pj(r.iloc[0]))
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(labels) + 1.6))
    y = np.arange(len(labels))[::-1]
    bars = ax.barh(y, np.nan_to_num(vals, nan=0.0), color=colors, alpha=0.8)
    for bar, h in zip(bars, hatches):
        bar.set_hatch(h)
    is_mem = np.array([c == "tab:red" for c in colors])
    dots = np.array(dots, dtype=float)
    ax.scatter(dots[~is_mem], y[~is_mem], color="black", marker="o", zorder=3, s=22)
    ax.scatter(dots[is_mem], y[is_mem], color="tab:red", edgecolors="black", marker="D", zorder=3, s=30)
    base = float(a45[(a45["op"] == "add") & (a45["dtype"] == "int32")]["energy_pj"].iloc[0])
    for yi, v, dv in zip(y, vals, dots):
        v_show = v if np.isfinite(v) else dv
        if np.isfinite(v_show):
            rel = v_show / base
            ax.annotate(f"{v_show:.3g} pJ ({rel:,.0f}x)" if rel >= 10 else f"{v_show:.3g} pJ ({rel:.2g}x)",
                        (v_show, yi), xytext=(5, -3), textcoords="offset points", fontsize=7)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(3e-3, 2e4)
    ax.set(xlabel="energy per operation or per 32-bit access (pJ, log scale)",
           title="What an operation costs vs what moving its operand costs")
    box = functools.partial(plt.Rectangle, (0, 0), 1, 1)
    handles = [box(color="tab:blue", alpha=0.8, label="arithmetic, 45 nm (Horowitz 2014)"),
               box(color="tab:red", alpha=0.8, label="memory access, 45 nm (Han 2015 / Horowitz)"),
               box(facecolor="white", edgecolor="tab:blue", hatch="//", label="derived (rule in data file)"),
               plt.Line2D([], [], color="black", marker="o", ls="", label="7 nm arithmetic (Jouppi 2021)"),
               plt.Line2D([], [], color="tab:red", markeredgecolor="black", marker="D", ls="",
                          label="HBM2 (O'Connor 2017), HBM2E/GDDR6(X) (Micron)")]
    ax.legend(handles=handles, fontsize=7, loc="upper right", title="relative to a 32-bit int add",
              title_fontsize=7)
    ax.grid(True, axis="x", which="major", alpha=0.3)
    fig.tight_layout()
    return fig


_LEVEL_COLORS = {"compute": "tab:blue", "register": "tab:cyan", "local": "tab:olive",
                 "buffer": "tab:orange", "offchip": "tab:red", "pim": "tab:purple"}


def fig_stacked_energy(frame: pd.DataFrame, per: str = "run") -> Figure:
    """Stacked horizontal bars, one per row of an :func:`~cohw_utils.studies.energy.estimates.energy_overview`
    frame: the share of each
    phase's energy in arithmetic and in each memory level, with joules per run and per unit
    written at the end of each bar."""
    parts = ["compute"] + [lv for lv in LEVELS if frame.get(f"{lv}_J", pd.Series([0])).sum() > 0]
    cols = {p: (frame["compute_J"] if p == "compute" else frame[f"{p}_J"]) for p in parts}
    total = frame["total_J"].replace(0, np.nan)
    labels = [f"{w}:{p}" for w, p in zip(frame["workload"], frame["phase"])]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(frame) + 2.2))
    y = np.arange(len(frame))[::-1]
    left = np.zeros(len(frame))
    for p in parts:
        share = (cols[p] / total).fillna(0).to_numpy()
        ax.barh(y, share, left=left, color=_LEVEL_COLORS[p],
                label="arithmetic" if p == "compute" else LEVEL_LABELS[p])
        left += share
    for yi, (_, r) in zip(y, frame.iterrows()):
        txt = f"{r['total_J']:.3g} J/run"
        if r.get("units"):
            txt += f", {r['total_J_per_unit']:.3g} J/{r['unit']}"
        ax.annotate(txt, (1.01, yi), va="center", fontsize=7, annotation_clip=False)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set(xlim=(0, 1), xlabel="share of the phase's modelled energy",
           title="Where the joules go, per workload phase")
    handles, names = ax.get_legend_handles_labels()
    fig.legend(handles, names, fontsize=7, loc="lower center", ncol=3, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def fig_energy_vs_batch(sweeps: Mapping[str, pd.DataFrame]) -> Figure:
    """Energy per token (left) and roofline time per token (right) against decode batch size,
    one line per labelled :func:`~cohw_utils.studies.energy.estimates.decode_batch_sweep` frame;
    hollow markers where weights + KV cache do not fit the chip's memory (its ``fits_memory``)."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (label, df) in enumerate(sweeps.items()):
        c = f"C{i}"
        ax.plot(df["batch"], df["J_per_token"], "-o", color=c, label=f"{label}: total")
        ax.plot(df["batch"], df["offchip_J_per_token"], "--", color=c, alpha=0.7, label=f"{label}: off-chip part")
        ax.plot(df["batch"], df["compute_J_per_token"], ":", color=c, alpha=0.7, label=f"{label}: arithmetic part")
        ax2.plot(df["batch"], df["time_per_token_s"] * 1e3, "-o", color=c, label=label)
        over = df[~df["fits_memory"]]
        for a, col in ((ax, "J_per_token"), (ax2, "time_per_token_s")):
            yv = over[col] * (1e3 if col == "time_per_token_s" else 1)
            a.scatter(over["batch"], yv, s=70, facecolors="white", edgecolors=c, zorder=3)
    ax.set(xscale="log", yscale="log", xlabel="decode batch (sequences)", ylabel="J per generated token",
           title="Energy per token vs batch")
    ax2.set(xscale="log", yscale="log", xlabel="decode batch (sequences)", ylabel="roofline ms per token",
            title="Time per token vs batch")
    ax.legend(fontsize=6)
    ax2.legend(fontsize=7)
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    batches = sorted({int(b) for df in sweeps.values() for b in df["batch"]})
    for a in (ax, ax2):
        a.grid(True, which="major", alpha=0.3)
        a.set_xticks(batches)
        a.xaxis.set_major_formatter(plain)
        a.xaxis.set_minor_formatter(NullFormatter())
        a.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        a.yaxis.set_major_formatter(plain)
        a.yaxis.set_minor_formatter(NullFormatter())
    fig.tight_layout()
    return fig
