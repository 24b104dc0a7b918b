"""The vectorised evaluation of the co-design loop: any number of designs on any number of
prepared phases, and the factorial design grids the sweeps run over.

:func:`evaluate_designs` computes, per (design, phase), what
:func:`cohw_utils.studies.codesign.op_times.design_op_times` computes per op (the roofline with
one roof per memory tier, bytes placed by :mod:`cohw_utils.studies.codesign.placement`), with
numpy over a (designs x distinct op rows) array: identical op rows (the same layer repeated)
are evaluated once and weighted by their count. Times are seconds, energies joules, areas mm^2
(the :class:`~cohw_utils.studies.codesign.accelerator.CostModel` package area).

Energy
------
:func:`cohw_utils.views.energy_model.workload_energy` of the same phase (with weights off-chip), with each
off-chip byte re-priced at the energy of the tier that serves it: SRAM at the table's on-chip
buffer figure, HBM at its off-chip figure, the slow tier and the host at the data file's
``dram`` row (the only commodity-DRAM figure it has; link energy is not modelled). With every
byte in HBM this equals ``workload_energy`` exactly; with resident weights it equals
``workload_energy`` with ``weights_resident=True`` (tested).

:func:`design_grid` builds a full factorial grid of designs, :func:`design_params` tabulates
their headline parameters, :func:`sweep_designs` times a whole sweep.

Used by Chapter 5 (the co-design loop).
"""
from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from cohw_utils.views import energy_model as energy
from cohw_utils.core.errors import CohwError
from cohw_utils.studies.codesign.accelerator import RESOURCES, TIERS, Accelerator, CostModel, make_accelerator
from cohw_utils.studies.codesign.op_times import efficiency_factors, matrix_utilization
from cohw_utils.studies.codesign.phases import PreparedPhase
from cohw_utils.studies.codesign.placement import placement
from cohw_utils.studies.codesign.power import PowerModel, apply_power

__all__ = ["evaluate_designs", "design_grid", "design_params", "sweep_designs"]


def _resident_act(p: PreparedPhase, variant: str, onchip: float | None) -> np.ndarray:
    """Per row, the activation bytes a fusing compiler keeps in ``onchip`` bytes of SRAM
    (:class:`~cohw_utils.views.energy_model.ReuseModel`'s ``activations_resident`` rule, at most
    the row's other-activation bytes); zeros when ``onchip`` is None."""
    r = p.rows(variant)
    if onchip is None:
        return np.zeros(len(r.act))
    roles = r.roles
    act_r, act_w = roles.act_read, roles.written
    if p.kv_in_place:
        act_r = np.where(roles.kv_append, roles.kv_new, act_r)
        act_w = np.where(roles.kv_append, roles.kv_new, act_w)
    read_on, write_on = energy._resident_activations(roles, act_r, act_w, onchip, p.kv_in_place)  # noqa: SLF001
    return np.minimum(read_on + write_on, r.act)


def _compressed(p: PreparedPhase, variant: str, shape: tuple[int, int] | None, model: Any,
                onchip: float | None = None) -> dict[str, np.ndarray]:
    """Distinct op rows of a variant with their multiplicities; with ``onchip``, each row's
    activation bytes split into off-chip (``A``) and kept on chip (``A_on``)."""
    key = ("rows", variant, tuple(shape) if shape else None, id(model), onchip)
    if key in p._cache:
        return p._cache[key]
    r = p.rows(variant)
    a_on = _resident_act(p, variant, onchip)
    util = matrix_utilization(p, shape)
    keys = sorted(set(r.key))
    kidx = np.array([keys.index(k) for k in r.key], dtype=float)
    e, b, t0 = efficiency_factors(r.group, model)
    costed = p.table["costed"].to_numpy(dtype=bool)
    mat = np.column_stack([r.flops / (util * e), r.w / b, r.kv / b, (r.act - a_on) / b, kidx, t0,
                           costed.astype(float), a_on / b])
    uniq, inv, counts = np.unique(mat, axis=0, return_inverse=True, return_counts=True)
    out = {"F": uniq[:, 0], "W": uniq[:, 1], "KV": uniq[:, 2], "A": uniq[:, 3], "A_on": uniq[:, 7],
           "key": uniq[:, 4].astype(int), "t0": uniq[:, 5] * uniq[:, 6], "n": counts.astype(float),
           "keys": keys, "ideal_flops": float(r.flops.sum())}
    p._cache[key] = out
    return out


def _energy_base(p: PreparedPhase, variant: str, table: energy.EnergyTable) -> dict[str, Any]:
    key = ("energy", variant, table.name, id(table))
    if key not in p._cache:
        m = energy.ReuseModel(onchip_bytes=0.0, weights_resident=False, kv_in_place=p.kv_in_place)
        p._cache[key] = energy.workload_energy(table, p.rows(variant).roles, m)
    return p._cache[key]


def _tier_pj(table: energy.EnergyTable) -> np.ndarray:
    """pJ/byte of each tier (sram, hbm, slow, host)."""
    dram = energy.load_energy_data()
    row = dram[(dram["kind"] == "memory") & (dram["level"] == "dram") & (dram["preferred"] == "yes")]
    slow = float(row["pj_per_byte"].iloc[0]) if len(row) else table.byte_pj["offchip"]
    return np.array([table.byte_pj["buffer"], table.byte_pj["offchip"], slow, slow])


def _design_arrays(designs: Sequence[Accelerator]) -> dict[str, np.ndarray]:
    return {
        "cap": np.array([[d.sram_bytes, d.hbm_bytes, d.slow_bytes, math.inf] for d in designs]),
        "bw": np.array([[d.sram_bw, d.hbm_bw, d.slow_bw, d.link_bw] for d in designs]),
        "main": np.array([TIERS.index(d.main_tier) for d in designs]),
    }


def evaluate_designs(designs: Accelerator | Sequence[Accelerator],
                     phases: PreparedPhase | Sequence[PreparedPhase],
                     table: energy.EnergyTable | None = None, quantize: bool = True, spill: str = "weights",
                     efficiency: Any = None, cost: CostModel | None = None,
                     power: PowerModel | None = None, resident_activations: bool = False) -> pd.DataFrame:
    """Every design on every phase: one row per (design, phase).

    Columns: ``design``, ``phase`` (label), ``workload``, ``klass``, ``variant`` (weight format
    used), ``time_s``, ``time_per_unit_s``, ``throughput`` (units/s), ``unit``, ``energy_J``,
    ``J_per_unit``, ``binding`` (the resource whose bound ops take most of the time),
    ``share_<resource>`` (time share bound by each), ``util_compute`` (ideal compute time /
    time), ``util_memory`` (main-memory transfer time / time), ``bytes_<tier>``,
    ``spilled_bytes`` (footprint outside main memory and SRAM), ``fits`` (footprint fits SRAM +
    main memory), ``resident`` (weights on chip), ``dies``, ``die_mm2``, ``package_mm2``.
    ``table`` defaults to the ``7nm-hbm2e`` energy table. With ``power`` (a
    :class:`~cohw_utils.studies.codesign.power.PowerModel`), static power and the power cap
    apply (:func:`~cohw_utils.studies.codesign.power.apply_power`: its columns are added and the
    times and energies are the capped ones); without, energy is dynamic and nothing is capped.
    ``resident_activations=True`` models a fusing compiler: every intermediate activation a later
    op reads and that fits the SRAM the design's resident weights and KV cache leave stays in
    SRAM (:class:`~cohw_utils.views.energy_model.ReuseModel`'s ``activations_resident`` rule,
    producers found by shape); by default every activation goes to main memory (unfused).
    """
    ds = [designs] if isinstance(designs, Accelerator) else list(designs)
    ps = [phases] if isinstance(phases, PreparedPhase) else list(phases)
    if not ds or not ps:
        raise CohwError("evaluate_designs needs at least one design and one phase")
    names = [d.name for d in ds]
    if len(set(names)) != len(names):
        raise CohwError("design names must be unique (they label the results)")
    et = table or energy.EnergyTable.load("7nm-hbm2e")
    pj = _tier_pj(et) * 1e-12
    arr = _design_arrays(ds)
    cm = (cost or CostModel()).calibrated()
    areas = [cm.breakdown(d) for d in ds]
    frames = []
    for p in ps:
        var = np.array([p.variant_for(d.weight_bits, quantize) for d in ds], dtype=object)
        shapes = [d.matrix_unit for d in ds]
        places = [placement(p.rows(v).weight_footprint, p.kv_bytes, d.sram_bytes, d.hbm_bytes, d.slow_bytes, spill)
                  for v, d in zip(var, ds)]
        groups: dict[tuple, list[int]] = {}
        for i, (v, s) in enumerate(zip(var, shapes)):
            room = None
            if resident_activations:  # the SRAM left beside resident weights and KV cache
                fw0, fkv0 = places[i][0][0], places[i][1][0]
                room = max(0.0, ds[i].sram_bytes - fw0 * p.rows(v).weight_footprint - fkv0 * p.kv_bytes)
            groups.setdefault((v, tuple(s) if s else None, room), []).append(i)
        res = {k: np.zeros(len(ds)) for k in ("time", "energy", "t_ideal", "t_main", *[f"b_{t}" for t in TIERS],
                                              *[f"s_{r}" for r in RESOURCES], "spilled", "fits", "resident")}
        for (v, s, room), idx in groups.items():
            idx = np.array(idx)
            c = _compressed(p, v, s, efficiency, room)
            foot_w = p.rows(v).weight_footprint
            fw = np.zeros((len(idx), 4))
            fkv = np.zeros((len(idx), 4))
            resident = np.zeros(len(idx), dtype=bool)
            for j, i in enumerate(idx):
                fw[j], fkv[j], resident[j] = places[i]
            peaks = np.array([[ds[i].peak(k) for k in c["keys"]] for i in idx])  # (D, K)
            t_c = c["F"][None, :] / peaks[:, c["key"]]
            main = arr["main"][idx]
            times = [t_c]
            tier_bytes = []
            for t in range(4):
                b = (c["W"][None, :] * fw[:, t:t + 1] + c["KV"][None, :] * fkv[:, t:t + 1]
                     + c["A"][None, :] * (main == t)[:, None] + c["A_on"][None, :] * (t == 0))
                bw = arr["bw"][idx, t][:, None]
                with np.errstate(divide="ignore", invalid="ignore"):
                    tt = np.where(b > 0, b / np.where(bw > 0, bw, 1.0), 0.0)
                tt = np.where((b > 0) & (bw <= 0), np.inf, tt)
                times.append(tt)
                tier_bytes.append(b)
            stack = np.stack(times, axis=0)               # (5, D, n)
            t_op = stack.max(axis=0) + c["t0"][None, :]
            bound = stack.argmax(axis=0)
            n = c["n"][None, :]
            res["time"][idx] = (t_op * n).sum(axis=1)
            for r_i, r in enumerate(RESOURCES):
                res[f"s_{r}"][idx] = ((bound == r_i) * t_op * n).sum(axis=1)
            res["t_ideal"][idx] = (c["F"][None, :] / peaks[:, c["key"]] * n).sum(axis=1)
            for t in range(4):
                res[f"b_{TIERS[t]}"][idx] = (tier_bytes[t] * n).sum(axis=1)
            main_bytes = np.take_along_axis(np.stack(tier_bytes, 0), main[None, :, None], 0)[0]
            res["t_main"][idx] = (main_bytes * n).sum(axis=1) / arr["bw"][idx, main]
            eb = _energy_base(p, v, et)
            off_j = eb["offchip_J"]
            res["energy"][idx] = eb["total_J"] - off_j + sum(res[f"b_{TIERS[t]}"][idx] * pj[t] for t in range(4))
            spilled = foot_w * (fw[:, 2] + fw[:, 3]) + p.kv_bytes * (fkv[:, 2] + fkv[:, 3])
            res["spilled"][idx] = spilled
            res["fits"][idx] = spilled <= 0
            res["resident"][idx] = resident
        total = res["time"]
        shares = np.stack([res[f"s_{r}"] for r in RESOURCES], axis=1)
        frame = pd.DataFrame({
            "design": names, "phase": p.label, "workload": p.workload, "klass": p.klass, "variant": var,
            "time_s": total, "time_per_unit_s": total / p.units, "throughput": p.units / total,
            "unit": p.unit_name, "energy_J": res["energy"], "J_per_unit": res["energy"] / p.units,
            "binding": np.array(RESOURCES, dtype=object)[shares.argmax(axis=1)],
        })
        for k, r in enumerate(RESOURCES):
            frame[f"share_{r}"] = shares[:, k] / total
        frame["util_compute"] = res["t_ideal"] / total
        frame["util_memory"] = res["t_main"] / total
        for t in TIERS:
            frame[f"bytes_{t}"] = res[f"b_{t}"]
        frame["spilled_bytes"] = res["spilled"]
        frame["fits"] = res["fits"].astype(bool)
        frame["resident"] = res["resident"].astype(bool)
        frame["dies"] = [a["dies"] for a in areas]
        frame["die_mm2"] = [a["die"] for a in areas]
        frame["package_mm2"] = [a["package"] for a in areas]
        frames.append(frame)
    out = pd.concat(frames, ignore_index=True)
    return out if power is None else apply_power(out, ds, power)


def design_grid(tflops16: Sequence[float], hbm_tbs: Sequence[float], hbm_gb: Sequence[float],
                sram_mb: Sequence[float], formats: Sequence[tuple[str, ...]] = (("fp8", "int8"),),
                slow: Sequence[str | None] = (None,), link_gbs: float = 63.0) -> list[Accelerator]:
    """The full factorial grid of :func:`make_accelerator` designs, each named by its values
    (``"1000T 4TB/s 80GB 64MB fp8/int8 LPDDR5X"``)."""
    out = []
    for f, b, g, s, fm, sl in itertools.product(tflops16, hbm_tbs, hbm_gb, sram_mb, formats, slow):
        name = f"{f:g}T {b:g}TB/s {g:g}GB {s:g}MB {'/'.join(fm) or 'fp16'}" + (f" {sl}" if sl else "")
        out.append(make_accelerator(name, f, g, b, s, formats=fm, slow=sl, link_gbs=link_gbs))
    return out



def design_params(designs: Sequence[Accelerator]) -> pd.DataFrame:
    """The headline parameters of each design, indexed by name."""
    return pd.DataFrame([{"design": d.name, "tflops16": d.peak16 / 1e12, "hbm_tbs": d.hbm_bw / 1e12,
                          "hbm_gb": d.hbm_bytes / 1e9, "sram_mb": d.sram_bytes / 2**20,
                          "formats": "/".join(d.formats) or "fp16", "weight_bits": d.weight_bits,
                          "slow": d.slow_kind or "none", "link_gbs": d.link_bw / 1e9} for d in designs]
                        ).set_index("design")


def sweep_designs(designs: Sequence[Accelerator], phases: Sequence[PreparedPhase],
                  **kw: Any) -> tuple[pd.DataFrame, float]:
    """:func:`evaluate_designs` every design on every phase; returns ``(results, seconds)``."""
    start = time.perf_counter()
    out = evaluate_designs(designs, phases, **kw)
    return out, time.perf_counter() - start
