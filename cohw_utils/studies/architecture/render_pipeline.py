"""Neural rendering as a pipeline: which stage of a NeRF each traced op belongs to.

A NeRF renders a batch of rays in stages, and the op table's module paths (nerfstudio's
submodule names, as :class:`cohw_utils.workloads.NerfactoRenderer` and
:class:`~cohw_utils.workloads.VanillaNeRFRenderer` wire them) say which stage issued each op:

============================  ==============================================================
stage                         modules (paths relative to the renderer)
============================  ==============================================================
``ray generation``            camera rays (the phase's ``make_inputs``, traced separately by
                              :func:`trace_ray_generation`) and ``collider`` (near/far bounds)
``sampling``                  ``proposal_sampler`` (+ its ``initial_sampler``/``pdf_sampler``),
                              ``sampler_uniform``, ``sampler_pdf``: where along each ray to
                              sample (uniform, then inverse-CDF resampling with searchsorted)
``proposal field query``      ``proposal_networks.N``: small hash-grid density fields queried
                              only to place samples (nerfacto)
``field query``               ``field``, ``field_coarse``, ``field_fine``: the radiance field at
                              every sample; ``component`` splits it into ``encoding`` (hash grid,
                              positional/SH encodings, scene contraction, appearance embedding)
                              and ``MLP`` (linear layers, activations, heads)
``rendering``                 ``renderer_*`` and ops of the renderer itself (``<root>``, or
                              ``nerf`` inside text-to-3D): alpha-compositing weights
                              (exp, cumsum of densities x deltas) and the weighted sums
``loss & other``              ``rgb_loss``, losses computed outside modules (``<global>``)
============================  ==============================================================

Backward ops carry the stage of the module whose forward created them (pass ``backward``).
Inside the text-to-3D step (``dreamfusion-sd``) the NeRF lives under ``nerf.`` and the
diffusion guidance adds ``VAE encoder`` and ``UNet guidance`` stages.

Render and compute as two resources
-----------------------------------
:func:`two_unit_schedule` asks what a stack that runs the stages concurrently gains (the seed's
"render and compute in parallel"): every ``MLP`` row runs on a **matrix unit**, everything else
(ray generation, sampling, encodings, compositing) on a **render unit** (texture/RT/SIMT-style
hardware), each op at its roofline time. One phase's rows, in pipeline order, become a chain of
tasks that alternate units (consecutive rows on the same unit merge); the batch of rays is split
into ``chunks`` equal chunks that flow through the chain, and :func:`list_schedule` places them
(each unit runs one task at a time; a task starts once its predecessor in the chunk has finished;
ties go to the earlier chunk). Serial time is the sum of all tasks; the overlap can at best reach
the busier unit's total. Assumptions: times scale linearly with the chunk, and each unit sees the
full memory bandwidth; since they share it, the makespan is also floored at the phase's bytes
over the memory bandwidth (``memory_floor_s``).

Used by Chapter 2 (render+compute pipelines).
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from cohw_utils import workloads
from cohw_utils.core.errors import CohwError
from cohw_utils.spine.costs import VIEW
from cohw_utils.hardware import Hardware
from cohw_utils.studies.architecture.inventory import _ridge, trace_phase
from cohw_utils.views.roofline import op_times
from cohw_utils.spine.trace import trace
from cohw_utils.spine import optable

STAGES = ("ray generation", "sampling", "proposal field query", "field query", "rendering",
          "loss & other", "VAE encoder", "UNet guidance")
_ENCODING_CLASSES = ("Encoding", "Embedding", "Contraction")


def stage_of(module: str, module_class: str = "") -> tuple[str, str]:
    """(stage, component) of one op table row, from its module path and class."""
    m = module
    for prefix in ("nerf.",):
        if m.startswith(prefix):
            m = m[len(prefix):]
    if module == "nerf" or m == "<root>":
        return "rendering", ""
    if m.startswith("vae"):
        return "VAE encoder", ""
    if m.startswith("unet"):
        return "UNet guidance", ""
    head = m.split(".", 1)[0]
    if head == "collider":
        return "ray generation", ""
    if head in ("proposal_sampler", "sampler_uniform", "sampler_pdf"):
        return "sampling", ""
    if head == "proposal_networks":
        return "proposal field query", _component(module_class)
    if head in ("field", "field_coarse", "field_fine"):
        return "field query", _component(module_class)
    if head.startswith("renderer"):
        return "rendering", ""
    return "loss & other", ""


def _component(module_class: str) -> str:
    return "encoding" if any(k in module_class for k in _ENCODING_CLASSES) else "MLP"


def trace_ray_generation(workload: str, phase: str = "render", rays: int | None = None) -> pd.DataFrame:
    """Trace the phase's ``make_inputs`` (random camera rays on a sphere: normalise, scale,
    subtract) at full scale on ``meta``; every row gets ``stage = "ray generation"``."""
    built = workloads.build(workload, scale="full", device="meta", **({"rays": rays} if rays else {}))
    ph = built.phase(phase)
    with torch.no_grad():
        table = trace(ph.make_inputs, model=built.model, phase=ph.name)
    return table.assign(stage="ray generation")


def staged(table: pd.DataFrame) -> pd.DataFrame:
    """The op table with ``stage`` and ``component`` columns added (views dropped). Rows that
    already carry a ``stage`` (see :func:`trace_ray_generation`) keep it."""
    t = table[table["op_class"] != VIEW]
    sc = [stage_of(m, c) for m, c in zip(t["module"], t["module_class"])]
    stage = pd.Series([s for s, _ in sc], index=t.index)
    comp = pd.Series([c for _, c in sc], index=t.index)
    if "stage" in t:
        given = t["stage"].notna() & (t["stage"] != "")
        stage = stage.where(~given, t["stage"])
        comp = comp.where(~given, "")
    return t.assign(stage=stage, component=comp)


def pipeline_table(tables: dict[str, pd.DataFrame], hw: Hardware, components: bool = True) -> pd.DataFrame:
    """Per (phase key, pass, stage[, component]): ops, FLOPs, bytes moved, their % of the phase,
    intensity, ridge on ``hw`` (contraction-dominated stages at their dtype's matrix peak, the
    rest at the fp32 vector peak), bound-ness and roofline time (s and % of the phase).

    ``tables`` maps a label (e.g. ``"render"``, ``"train_step"``) to an op table; rows with a
    ``stage`` column already set keep it (see :func:`trace_ray_generation`).
    """
    parts = []
    for key, table in tables.items():
        t = staged(table[table["costed"]])
        times = op_times(t, hw)
        t = t.assign(phase_key=key, bytes_moved=optable.bytes_moved(t), time_s=times["time"],
                     cflops=t["flops"].where(t["op_class"] == "contraction", 0),
                     component=t["component"] if components else "")
        parts.append(t)
    t = pd.concat(parts, ignore_index=True)
    g = t.groupby(["phase_key", "pass", "stage", "component"], sort=False).agg(
        ops=("op", "size"), flops=("flops", "sum"), bytes_moved=("bytes_moved", "sum"),
        cflops=("cflops", "sum"), time_s=("time_s", "sum"),
        dtype=("dtype", lambda s: s.value_counts().index[0]))
    tot = g.groupby(level="phase_key")[["flops", "bytes_moved", "time_s"]].transform("sum")
    g["flops_%"] = 100 * g["flops"] / tot["flops"]
    g["bytes_%"] = 100 * g["bytes_moved"] / tot["bytes_moved"]
    g["time_%"] = 100 * g["time_s"] / tot["time_s"]
    g["intensity"] = g["flops"] / g["bytes_moved"].where(g["bytes_moved"] > 0)
    mm = g["cflops"] > 0.5 * g["flops"]
    g["ridge"] = [_ridge(hw, "contraction" if m else "", d) for m, d in zip(mm, g["dtype"])]
    g["bound"] = np.where(g["intensity"].fillna(0) >= g["ridge"], "compute", "memory")
    order = {s: i for i, s in enumerate(STAGES)}
    g = g.reset_index()
    g["_o"] = g["stage"].map(order)
    g = g.sort_values(["phase_key", "pass", "_o", "component"], kind="stable",
                      key=lambda c: c.map({k: i for i, k in enumerate(tables)}) if c.name == "phase_key" else c)
    g = g.drop(columns=["_o", "cflops"]).set_index(["phase_key", "pass", "stage", "component"])
    return g[["ops", "flops", "flops_%", "bytes_moved", "bytes_%", "intensity", "ridge", "bound", "time_s", "time_%"]]


def nerf_pipeline(workload: str, hw: Hardware, rays: int = 4096, components: bool = True) -> pd.DataFrame:
    """:func:`pipeline_table` of a NeRF workload's ``render`` and ``train_step`` at full scale on
    ``meta``, each with its traced ray generation."""
    tables: dict[str, pd.DataFrame] = {}
    for ph in ("render", "train_step"):
        rg = trace_ray_generation(workload, ph, rays)
        run = trace_phase(workload, ph, rays=rays)
        tables[ph] = pd.concat([rg, run], ignore_index=True)
    return pipeline_table(tables, hw, components)


def fig_pipeline_bars(pipe: pd.DataFrame, title: str = "") -> Figure:
    """Per stage, one bar per (phase, pass) for FLOPs and for bytes moved (log scale)."""
    combos = list(dict.fromkeys(zip(pipe.index.get_level_values("phase_key"), pipe.index.get_level_values("pass"))))
    combos.sort(key=lambda c: (c[1] == "backward",))
    stages = [s for s in STAGES if s in set(pipe.index.get_level_values("stage"))]
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4))
    width = 0.8 / max(1, len(combos))
    x = np.arange(len(stages))
    for ax, col, label in zip(axes, ("flops", "bytes_moved"), ("FLOPs", "bytes moved")):
        sums = pipe.groupby(level=["phase_key", "pass", "stage"])[col].sum()
        low = sums[sums > 0].min() if (sums > 0).any() else 1
        for i, (key, p) in enumerate(combos):
            v = np.array([sums.get((key, p, s), 0.0) for s in stages], dtype=float)
            ax.bar(x + (i - (len(combos) - 1) / 2) * width, np.where(v > 0, v, np.nan), width,
                   color=f"C{i}", hatch="//" if p == "backward" else "", edgecolor="white",
                   label=f"{key} ({p})")
        ax.set_xticks(x, stages, rotation=30, ha="right", fontsize=8)
        ax.set(yscale="log", ylabel=label, ylim=(low / 3, None))
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title or "NeRF pipeline stages")
    fig.tight_layout()
    return fig


UNITS = ("render unit", "matrix unit")


def list_schedule(chain: list[tuple[str, float]], chunks: int) -> dict[str, float]:
    """Makespan of ``chunks`` copies of ``chain`` (``(unit, seconds)`` per task, for the whole
    batch; each chunk takes ``seconds / chunks``) on one unit per name, list-scheduled as the
    module docstring says. Returns ``makespan_s``, ``serial_s`` and per-unit ``busy_<unit>_s``."""
    if chunks < 1 or int(chunks) != chunks:
        raise CohwError(f"chunks must be a positive integer, got {chunks!r}")
    if not chain or any(t < 0 for _, t in chain):
        raise CohwError("chain needs at least one task, each with seconds >= 0")
    n, jobs = int(chunks), len(chain)
    free: dict[str, float] = {u: 0.0 for u, _ in chain}
    done = [[None] * jobs for _ in range(n)]          # finish time of task j of chunk k
    nxt = [0] * n                                    # next task index of each chunk
    for _ in range(n * jobs):
        best = None
        for k in range(n):
            j = nxt[k]
            if j == jobs:
                continue
            unit, t = chain[j]
            start = max(free[unit], done[k][j - 1] if j else 0.0)
            if best is None or (start, k, j) < best[:3]:
                best = (start, k, j, unit, t / n)
        start, k, j, unit, dur = best
        done[k][j] = free[unit] = start + dur
        nxt[k] += 1
    out = {"makespan_s": max(free.values()), "serial_s": sum(t for _, t in chain)}
    for u in dict.fromkeys(u for u, _ in chain):
        out[f"busy_{u}_s"] = sum(t for v, t in chain if v == u)
    return out


def unit_chain(pipe: pd.DataFrame, phase_key: str = "render") -> list[tuple[str, float]]:
    """The task chain of one phase of a :func:`pipeline_table` (with components): its rows in
    pipeline order, ``MLP`` rows on the matrix unit, the rest on the render unit, consecutive
    rows on the same unit merged."""
    rows = pipe.loc[phase_key].reset_index()
    chain: list[tuple[str, float]] = []
    for comp, t in zip(rows["component"], rows["time_s"]):
        unit = UNITS[1] if comp == "MLP" else UNITS[0]
        if chain and chain[-1][0] == unit:
            chain[-1] = (unit, chain[-1][1] + float(t))
        else:
            chain.append((unit, float(t)))
    return chain


def two_unit_schedule(pipe: pd.DataFrame, hw: Hardware, phase_key: str = "render",
                      chunks: tuple[int, ...] = (1, 2, 4, 8, 16, 64)) -> pd.DataFrame:
    """Serial vs overlapped time of one phase on a render unit + a matrix unit, per chunk count:
    ``makespan_s``, ``speedup`` (serial / overlapped, floored at the shared-memory bound),
    ``bound_s`` (the busier unit's total: the best any overlap can do) and ``memory_floor_s``
    (the phase's bytes at ``hw``'s memory bandwidth)."""
    chain = unit_chain(pipe, phase_key)
    floor = float(pipe.loc[phase_key]["bytes_moved"].sum()) / hw.mem_bw
    rows = []
    for c in chunks:
        r = list_schedule(chain, c)
        bound = max(v for k, v in r.items() if k.startswith("busy_"))
        made = max(r["makespan_s"], floor)
        rows.append({"chunks": c, "tasks": len(chain), "serial_s": r["serial_s"], "makespan_s": made,
                     "bound_s": max(bound, floor), "memory_floor_s": floor, "speedup": r["serial_s"] / made,
                     **{k: v for k, v in r.items() if k.startswith("busy_")}})
    return pd.DataFrame(rows).set_index("chunks")
