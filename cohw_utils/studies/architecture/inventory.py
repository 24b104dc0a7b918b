"""Architecture views of op tables: operator inventory, per-layer hotspots, datatypes, scaling.

Every function takes op tables from :func:`cohw_utils.spine.trace.trace` (or traces a registry
workload with :func:`trace_phase`) and returns a DataFrame or a matplotlib ``Figure``. Counting
semantics are those of :mod:`cohw_utils.spine.costs`; "bytes moved" = bytes read + written under
unfused eager execution; shares are percentages of the table's (costed) totals.

Definitions used below:

* **Op packet**: the aten op without its overload (``aten.add.Tensor`` -> ``aten.add``).
* **Layer**: a module path (the innermost module that issued the op). With ``collapse=True``
  every purely numeric path component becomes ``*``, so the 40 ``model.layers.N.mlp.down_proj``
  of Llama-2-13B are one layer *type* with ``instances = 40`` and their summed cost; ``depth``
  truncates paths first (``depth=3``: ``model.layers.N``).
* **Bound-ness** of a layer on an accelerator: its arithmetic intensity (FLOPs / bytes moved)
  against the chip's ridge point for the kind of work that dominates it: when most of its FLOPs
  are contractions, the matrix peak of their dtype (fp32 GEMMs at the fp32 peak, as
  :mod:`cohw_utils.views.roofline`); otherwise the fp32 vector peak. ``intensity >= ridge`` ->
  ``compute``, else ``memory``. ``time_s`` is the layer's summed roofline time
  (:func:`cohw_utils.views.roofline.op_times`), each op at ``max(FLOPs/peak, bytes/bandwidth)``.
* **Peak activation** of a phase (:func:`component_scaling`): the largest single tensor any op
  writes; a lower bound on the activation memory the phase needs at once.

Used by Chapter 2 (architecture analysis).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from cohw_utils import workloads
from cohw_utils.spine.costs import CONTRACTION, OP_CLASSES, VIEW
from cohw_utils.core.dtypes import BYTES, dtype_name
from cohw_utils.core.errors import CohwError
from cohw_utils.core.params import count_parameters
from cohw_utils.hardware import Hardware
from cohw_utils.views.memory_budget import fits
from cohw_utils.views.roofline import op_times, roofline_summary
from cohw_utils.spine.trace import trace
from cohw_utils.spine import optable

_CLASS_COLORS = {"contraction": "tab:blue", "normalization": "tab:orange", "element-wise": "tab:green",
                 "data movement": "tab:red", "view": "tab:gray", "other": "tab:purple"}
FOOTPRINT_DTYPES = ("fp32", "bf16", "fp16", "int8", "int4")


# ------------------------------------------------------------------------------------ tracing
def default_dtype(name: str) -> str:
    """The dtype Chapter 1 analyses a workload in (:func:`cohw_utils.studies.proxies.proxy_set.phase_dtype`:
    fp32 for the NeRF and splatting workloads, bf16 where published so, else fp16)."""
    from cohw_utils.studies.proxies.proxy_set import phase_dtype

    return phase_dtype(name)


def trace_phase(workload: str, phase: str, *, seq_len: int | None = None, batch: int = 1,
                dtype: str | torch.dtype | None = None, fused_attention: bool = True,
                scale: str = "full", device: str = "meta", **build_kw: Any) -> pd.DataFrame:
    """Build ``workload`` and trace one phase (under no_grad unless the phase has a backward).

    Like :func:`cohw_utils.spine.analyze.analyze`, plus ``fused_attention`` (``False`` records the
    math path of attention on ``meta``, with its T x T score matrix). The table's ``attrs`` carry ``workload``, ``phase``, ``parameters`` (unique elements) and ``dtype``.
    """
    wl = workloads.get_workload(workload)
    built = workloads.build(workload, scale=scale, device=device,
                            dtype=dtype if dtype is not None else default_dtype(wl.name),
                            batch=batch, seq_len=seq_len if wl.domain == "llm" else None, **build_kw)
    ph = built.phase(phase)
    args, kwargs = ph.make_inputs()
    opts = dict(model=built.model, phase=ph.name, fused_attention=fused_attention)
    if ph.backward:
        table = trace(ph.run, *args, **opts, **kwargs)
    else:
        with torch.no_grad():
            table = trace(ph.run, *args, **opts, **kwargs)
    table.attrs.update(workload=wl.name, phase=ph.name, dtype=dtype_name(built.dtype),
                       parameters=count_parameters(built.model))
    return table


def trace_all(names: Iterable[str] | None = None, seq_len: int = 2048, rays: int = 4096,
              phases: Mapping[str, Iterable[str]] | None = None) -> dict[str, pd.DataFrame]:
    """Trace every phase of ``names`` (default: the registry) at full scale on ``meta``, keyed
    ``"workload:phase"``; LLMs at ``seq_len``, NeRFs on ``rays`` rays, batch 1, default dtypes."""
    out = {}
    for name in (list(names) if names is not None else list(workloads.WORKLOADS)):
        wl = workloads.get_workload(name)
        kw = {"rays": rays} if wl.library == "nerfstudio" else {}
        for ph in (phases or {}).get(wl.name, wl.phases):
            out[f"{wl.name}:{ph}"] = trace_phase(name, ph, seq_len=seq_len, **kw)
    return out


# ------------------------------------------------------------------------------------ operator inventory
def _costed(table: pd.DataFrame) -> pd.DataFrame:
    t = table[table["costed"] & (table["op_class"] != VIEW)]
    return t.assign(bytes_moved=optable.bytes_moved(t),
                    packet=t["op"].map(lambda o: o.rsplit(".", 1)[0] if o.count(".") >= 2 else o))


def _shares(g: pd.DataFrame) -> pd.DataFrame:
    for col in ("flops", "bytes_moved"):
        total = g[col].sum()
        g[f"{col}_%"] = 100.0 * g[col] / total if total else 0.0
    return g


def op_inventory(table: pd.DataFrame) -> pd.DataFrame:
    """Unique op packets (views dropped) with class, calls, FLOPs, bytes moved and their shares,
    largest FLOPs then bytes first."""
    t = _costed(table)
    g = t.groupby(["packet", "op_class"]).agg(calls=("op", "size"), flops=("flops", "sum"),
                                              bytes_moved=("bytes_moved", "sum"))
    g = _shares(g.astype({"flops": "int64", "bytes_moved": "int64"}))
    g = g.reset_index().rename(columns={"packet": "op"})
    return g.sort_values(["flops", "bytes_moved"], ascending=False).reset_index(drop=True)


def class_shares(tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Per table (rows) and operator class: % of FLOPs and % of bytes moved, plus unique ops."""
    rows = {}
    for key, table in tables.items():
        t = _costed(table)
        g = _shares(t.groupby("op_class").agg(flops=("flops", "sum"), bytes_moved=("bytes_moved", "sum")))
        row = {("unique ops", ""): t["packet"].nunique(), ("calls", ""): len(t)}
        for cls in OP_CLASSES:
            if cls == VIEW:
                continue
            row[("FLOPs %", cls)] = float(g["flops_%"].get(cls, 0.0))
            row[("bytes %", cls)] = float(g["bytes_moved_%"].get(cls, 0.0))
        rows[key] = row
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.columns = pd.MultiIndex.from_tuples(df.columns)
    return df


# ------------------------------------------------------------------------------------ layers
def layer_name(module: str, depth: int | None = None, collapse: bool = True) -> str:
    """``model.layers.3.mlp.up_proj`` -> ``model.layers.*.mlp.up_proj`` (collapse) or, at
    ``depth=3``, ``model.layers.*``."""
    if module.startswith("<"):
        return module
    parts = module.split(".")
    if depth is not None:
        parts = parts[:depth]
    if collapse:
        parts = ["*" if p.isdigit() else p for p in parts]
    return ".".join(parts)


def _ridge(hw: Hardware, op_class: str, dtype: str) -> float:
    """Ridge point (FLOP/B) for work of ``op_class`` in ``dtype``, as :mod:`roofline` costs it."""
    if op_class == CONTRACTION and dtype:
        try:
            name = dtype_name(dtype)
        except CohwError:
            name = "fp32"
        if name not in hw.peak_flops or name in ("int64", "int32", "bool"):
            name = "fp32"
        return hw.ridge_point(name)
    return hw.ridge_point("fp32")


def layer_table(table: pd.DataFrame, hw: Hardware, depth: int | None = None, collapse: bool = True,
                efficiency: float = 1.0) -> pd.DataFrame:
    """Per layer: instances, module classes, ops, FLOPs, bytes moved (and % of the table),
    intensity, the dominant work (``contraction`` or ``vector``) and its dtype, the ridge point,
    bound-ness on ``hw``, roofline time and % of time. Sorted by FLOPs.

    With ``collapse`` (and no ``depth``), a collapsed name that covers modules of different
    classes is split and suffixed with the class: ``ff.net.* [GEGLU]``, ``ff.net.* [Linear]``."""
    t = _costed(table)
    times = op_times(table, hw, efficiency).loc[t.index]
    t = t.assign(layer=t["module"].map(lambda m: layer_name(m, depth, collapse)),
                 time_s=times["time"], cflops=t["flops"].where(t["op_class"] == CONTRACTION, 0))
    if depth is None and collapse:
        # a collapsed index of a Sequential can stand for different modules (ff.net.0 GEGLU,
        # ff.net.2 Linear): keep them apart by naming the class where a name has several
        mixed = t.groupby("layer")["module_class"].transform("nunique") > 1
        t.loc[mixed, "layer"] = t.loc[mixed, "layer"] + " [" + t.loc[mixed, "module_class"] + "]"
    g = t.groupby("layer").agg(instances=("module", "nunique"), ops=("op", "size"),
                               classes=("module_class", lambda s: ", ".join(sorted(set(s) - {""})) or "-"),
                               flops=("flops", "sum"), contraction_flops=("cflops", "sum"),
                               bytes_moved=("bytes_moved", "sum"), time_s=("time_s", "sum"))
    g = _shares(g.astype({"flops": "int64", "bytes_moved": "int64"}))
    g["intensity"] = g["flops"] / g["bytes_moved"].where(g["bytes_moved"] > 0)
    # the dtype of the layer's largest contraction (else of its largest op)
    main = t.sort_values("flops", ascending=False).drop_duplicates("layer").set_index("layer")
    cmain = (t[t["op_class"] == CONTRACTION].sort_values("flops", ascending=False)
             .drop_duplicates("layer").set_index("layer"))
    is_mm = g["contraction_flops"] > 0.5 * g["flops"]
    g["work"] = np.where(is_mm, "contraction", "vector")
    g["dtype"] = [_short(cmain["dtype"].get(layer) if mm else main["dtype"].get(layer))
                  for layer, mm in zip(g.index, is_mm)]
    g["ridge"] = [_ridge(hw, CONTRACTION if mm else "", d) for mm, d in zip(is_mm, g["dtype"])]
    g["bound"] = np.where(g["intensity"].fillna(0) >= g["ridge"], "compute", "memory")
    total_t = g["time_s"].sum()
    g["time_%"] = 100 * g["time_s"] / total_t if total_t else 0.0
    cols = ["instances", "classes", "ops", "flops", "flops_%", "bytes_moved", "bytes_moved_%", "intensity",
            "work", "dtype", "ridge", "bound", "time_s", "time_%"]
    return g[cols].sort_values(["flops", "bytes_moved"], ascending=False)


def _short(d: Any) -> str:
    try:
        return dtype_name(d) if isinstance(d, str) and d else ""
    except CohwError:
        return str(d)


def layer_hotspots(table: pd.DataFrame, hw: Hardware, n: int = 5, depth: int | None = None,
             collapse: bool = True) -> pd.DataFrame:
    """Top-``n`` layers by FLOPs and top-``n`` by bytes moved, one table: index (``by``, rank),
    with the layer name and :func:`layer_table`'s columns (intensity, ridge, bound on ``hw``)."""
    lt = layer_table(table, hw, depth, collapse)
    parts = []
    for by, col in (("FLOPs", "flops"), ("bytes", "bytes_moved")):
        top = lt.nlargest(n, col).reset_index()
        top.index = pd.MultiIndex.from_product([[by], range(1, len(top) + 1)], names=["by", "rank"])
        parts.append(top)
    return pd.concat(parts)[["layer", "instances", "flops", "flops_%", "bytes_moved", "bytes_moved_%",
                             "intensity", "ridge", "bound", "time_%"]]


def format_hotspots(h: pd.DataFrame) -> Any:
    """A pandas Styler of :func:`layer_hotspots` with readable units (GFLOP, MB)."""
    return h.style.format({"flops": lambda v: f"{v / 1e9:,.1f} G", "bytes_moved": lambda v: f"{v / 1e6:,.1f} MB",
                           "flops_%": "{:.1f}", "bytes_moved_%": "{:.1f}", "intensity": "{:.1f}",
                           "ridge": "{:.0f}", "time_%": "{:.1f}"})


# ------------------------------------------------------------------------------------ datatypes
def dtype_view(table: pd.DataFrame) -> pd.DataFrame:
    """Per (pass, dtype of the op's first input): calls, % of FLOPs and bytes, the op classes,
    and the module classes that issue most of those bytes."""
    t = _costed(table)
    t = t.assign(dt=t["dtype"].map(lambda d: _short(d) or "none"))
    rows = []
    tf, tb = t["flops"].sum(), t["bytes_moved"].sum()
    for (p, d), g in t.groupby(["pass", "dt"]):
        by_mod = g.groupby("module_class")["bytes_moved"].sum().sort_values(ascending=False)
        rows.append({"pass": p, "dtype": d, "calls": len(g),
                     "flops_%": 100 * g["flops"].sum() / tf if tf else 0.0,
                     "bytes_%": 100 * g["bytes_moved"].sum() / tb if tb else 0.0,
                     "op classes": ", ".join(sorted(set(g["op_class"]))),
                     "top module classes (by bytes)": ", ".join(m or "-" for m in by_mod.index[:3])})
    return pd.DataFrame(rows).set_index(["pass", "dtype"])


def weight_footprint(parameters: Mapping[str, int], dtypes: Iterable[str] = FOOTPRINT_DTYPES,
                     hardware: Iterable[Hardware] = ()) -> pd.DataFrame:
    """Weight GB (1e9 bytes) of each model at each dtype (int4 = 0.5 byte, no group scales),
    plus, per chip in ``hardware``, the widest (highest-precision) dtype of ``dtypes``, taken in
    their listed order (wide to narrow by default), at which the weights alone fit in its memory less the runtime
    reserve (:func:`cohw_utils.views.memory_budget.fits`; no KV cache; ``-`` when none does)."""
    dts = list(dtypes)
    df = pd.DataFrame({d: {m: n * BYTES[dtype_name(d)] / 1e9 for m, n in parameters.items()} for d in dts})
    df.insert(0, "parameters", pd.Series(parameters))
    for hw in hardware:
        widest = []
        for m in df.index:
            ok = [d for d in dts if hw.mem_bytes and fits(hw, df.loc[m, d] * 1e9)]
            widest.append(ok[0] if ok else "-")
        df[f"fits {hw.name} at"] = widest
    return df


# ------------------------------------------------------------------------------------ scaling
def component_scaling(workload: str = "sd-1.5", image_sizes: Iterable[int] = (512, 768, 1024),
                      phases: Iterable[str] = ("text_encoder", "unet_step", "vae_decode"),
                      dtype: str = "fp16", unfused: bool = True, hw: Hardware | None = None) -> pd.DataFrame:
    """Per image size and component: latent size, FLOPs, bytes moved, attention FLOPs and share,
    peak activation with a fused (flash) attention kernel and, when ``unfused``, with the math
    path of attention (which writes the T x T score matrix); with ``hw``, the roofline time
    (ms) and the share of it in memory-bound ops. Full scale on ``meta``. The text encoder does
    not depend on the image size (77 tokens); it is traced once."""
    rows, once = [], {}
    for size in image_sizes:
        for ph in phases:
            if ph == "text_encoder" and ph in once:
                rows.append({**once[ph], "image_size": size, "latent": f"{size // 8}x{size // 8}"})
                continue
            t = trace_phase(workload, ph, dtype=dtype, image_size=size)
            c = _costed(t)
            attn = int(c.loc[c["op"] == "aten.scaled_dot_product_attention", "flops"].sum())
            flops = int(c["flops"].sum())
            row = {"image_size": size, "component": ph, "latent": f"{size // 8}x{size // 8}",
                   "flops": flops, "bytes_moved": int(c["bytes_moved"].sum()),
                   "attention_flops": attn, "attention_%": 100 * attn / flops if flops else 0.0,
                   "peak_activation": int(c["bytes_written"].max())}
            if hw is not None:
                r = roofline_summary(t, hw)
                row[f"time_{hw.name}_ms"] = 1e3 * r["time_s"]
                row["memory_bound_%"] = 100 * r["memory_bound_share"]
            if unfused:
                u = trace_phase(workload, ph, dtype=dtype, image_size=size, fused_attention=False)
                row["peak_activation_unfused"] = int(u.loc[u["costed"], "bytes_written"].max())
            rows.append(row)
            if ph == "text_encoder":
                once[ph] = row
    return pd.DataFrame(rows)


def generation_totals(scaling: pd.DataFrame, steps: int = 50) -> pd.DataFrame:
    """Per image size: one image = text encoder once + ``steps`` UNet steps + VAE decoder once
    (FLOPs and bytes), with each component's % of the generation's FLOPs."""
    mult = {"text_encoder": 1, "unet_step": steps, "vae_decode": 1}
    s = scaling.assign(n=scaling["component"].map(mult).fillna(1))
    s = s.assign(gen_flops=s["flops"] * s["n"], gen_bytes=s["bytes_moved"] * s["n"])
    out = s.pivot_table(index="image_size", columns="component", values="gen_flops", aggfunc="sum")
    pct = 100 * out.div(out.sum(axis=1), axis=0)
    res = pd.DataFrame({"flops": out.sum(axis=1),
                        "bytes_moved": s.groupby("image_size")["gen_bytes"].sum()})
    for c in pct.columns:
        res[f"{c} FLOPs %"] = pct[c]
    return res


# ------------------------------------------------------------------------------------ figures
def fig_class_bars(shares: pd.DataFrame, title: str = "Operator classes") -> Figure:
    """Horizontal 100% stacked bars per row of :func:`class_shares`: FLOPs (left) and bytes
    moved (right) by operator class."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.32 * len(shares) + 1.6), sharey=True)
    classes = [c for c in OP_CLASSES if c != VIEW]
    y = np.arange(len(shares))[::-1]
    for ax, metric in zip(axes, ("FLOPs %", "bytes %")):
        left = np.zeros(len(shares))
        for cls in classes:
            v = shares[(metric, cls)].to_numpy(dtype=float)
            ax.barh(y, v, left=left, color=_CLASS_COLORS[cls], label=cls)
            left += v
        ax.set(xlim=(0, 100), xlabel=metric.replace("%", "(%)"), title=metric.split()[0])
    axes[0].set_yticks(y, list(shares.index), fontsize=7)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def fig_class_pies(table: pd.DataFrame, title: str = "") -> Figure:
    """Two pies for one op table: share of FLOPs and share of bytes moved by operator class."""
    t = _costed(table)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
    for ax, col, name in zip(axes, ("flops", "bytes_moved"), ("FLOPs", "bytes moved")):
        g = t.groupby("op_class")[col].sum()
        g = g[g > 0]
        g = g.reindex([c for c in OP_CLASSES if c in g.index]).astype(float)
        small = g / g.sum() < 0.02
        labels = [c if not s else "" for c, s in zip(g.index, small)]
        ax.pie(g, labels=labels, colors=[_CLASS_COLORS[c] for c in g.index],
               autopct=lambda p: f"{p:.0f}%" if p >= 2 else "", textprops={"fontsize": 7})
        ax.set_title(name, fontsize=9)
    fig.suptitle(title or table.attrs.get("workload", "") + ":" + table.attrs.get("phase", ""), fontsize=10)
    fig.tight_layout()
    return fig


def fig_layer_bars(table: pd.DataFrame, depth: int, title: str = "", top: int | None = None,
                   pattern: str | None = None) -> Figure:
    """Stacked bars per module prefix at ``depth`` (numbers kept: one bar per block), stacked by
    operator class, FLOPs on top and bytes moved below. ``pattern`` keeps only prefixes matching
    a regular expression; ``top`` keeps the largest by FLOPs, in model order."""
    t = _costed(table)
    t = t.assign(layer=t["module"].map(lambda m: layer_name(m, depth, collapse=False)))
    order = list(dict.fromkeys(t["layer"]))
    if pattern:
        order = [o for o in order if re.search(pattern, o)]
    if top:
        keep = set(t[t["layer"].isin(order)].groupby("layer")["flops"].sum().nlargest(top).index)
        order = [o for o in order if o in keep]
    fig, axes = plt.subplots(2, 1, figsize=(max(7, 0.28 * len(order) + 2), 6.4), sharex=True)
    x = np.arange(len(order))
    for ax, col, unit, scale in zip(axes, ("flops", "bytes_moved"), ("GFLOP", "MB"), (1e9, 1e6)):
        piv = t.pivot_table(index="layer", columns="op_class", values=col, aggfunc="sum").reindex(order).fillna(0)
        bottom = np.zeros(len(order))
        for cls in [c for c in OP_CLASSES if c in piv.columns and c != VIEW]:
            v = piv[cls].to_numpy() / scale
            ax.bar(x, v, bottom=bottom, color=_CLASS_COLORS[cls], label=cls, width=0.8)
            bottom += v
        ax.set_ylabel(f"{col.replace('_', ' ')} ({unit})")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=5, loc="upper right")
    axes[1].set_xticks(x, order, rotation=90, fontsize=6)
    axes[0].set_title(title or f"{table.attrs.get('workload', '')}:{table.attrs.get('phase', '')} per block")
    fig.tight_layout()
    return fig


def fig_scaling(scaling: pd.DataFrame) -> Figure:
    """Per component against image size (log y): FLOPs (dashed: attention FLOPs), bytes moved,
    peak activation with fused attention and, when present, with the math path."""
    metrics = [("flops", "FLOPs (dashed: attention)"), ("bytes_moved", "bytes moved"),
               ("peak_activation", "peak activation,\nfused attention (B)")]
    if "peak_activation_unfused" in scaling:
        metrics.append(("peak_activation_unfused", "peak activation,\nmath-path attention (B)"))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.1 * len(metrics), 3.5))
    for ax, (col, label) in zip(axes, metrics):
        for i, (comp, g) in enumerate(scaling.groupby("component", sort=False)):
            ax.plot(g["image_size"], g[col], "o-", color=f"C{i}", label=comp)
            if col == "flops" and (g["attention_flops"] > 0).any():
                ax.plot(g["image_size"], g["attention_flops"], "o--", color=f"C{i}", alpha=0.7)
        ax.set(yscale="log", xlabel="image size (px)")
        ax.set_title(label, fontsize=9)
        ax.set_xticks(sorted(scaling["image_size"].unique()))
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig
