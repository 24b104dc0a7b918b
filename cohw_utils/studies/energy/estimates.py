"""Chapter 4.4's energy estimates for the proxy workloads: per phase, per what-if, per decode batch.

Each function traces registry phases at full scale on ``meta``
(:func:`cohw_utils.spine.analyze.analyze`; tracing is what the view
:mod:`cohw_utils.views.energy_model` may not do), splits them into
:class:`~cohw_utils.views.energy_model.OpRoles` and evaluates them with
:func:`~cohw_utils.views.energy_model.evaluate_energy`: dynamic joules by arithmetic dtype and
memory level, plus the roofline time of the same what-if on a ``Hardware``. The semantics of
the energy data, the reuse model and the op roles are the view's (read its docstring); units
are joules, seconds and bytes, ``*_per_unit`` per the phase's unit (a token, an image, a ray
batch). "Fits in memory" is the one rule of :func:`cohw_utils.views.memory_budget.fits`
(weights + KV cache within the chip's capacity less the 10% runtime reserve).

Used by Chapter 4.4 (power and energy) and its exercises.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from cohw_utils import workloads
from cohw_utils.hardware import Hardware
from cohw_utils.spine.analyze import analyze
from cohw_utils.studies.proxies import proxy_set as proxies
from cohw_utils.views.energy_model import EnergyTable, OpRoles, ReuseModel, evaluate_energy, op_roles
from cohw_utils.views.memory_budget import fits

__all__ = ["phase_roles", "phase_energy", "energy_overview", "decode_batch_sweep", "whatifs", "compare_measured"]


def phase_roles(workload: str, phase: str, *, seq_len: int = 2048, rays: int = 4096,
                **analyze_kw: Any) -> OpRoles:
    """:class:`~cohw_utils.views.energy_model.OpRoles` of one registry phase, traced at full scale
    on meta in the dtype the proxy set serves it in (:func:`cohw_utils.studies.proxies.proxy_set.phase_dtype`).

    An LLM is traced at context ``seq_len``, a nerfstudio NeRF on ``rays`` rays (each ignored
    for other workloads); ``analyze_kw`` (``batch``, ``image_size``...) go to
    :func:`cohw_utils.spine.analyze.analyze`. The roles' label is ``"workload:phase"``.
    """
    wl = workloads.get_workload(workload)
    kw = dict(analyze_kw)
    if wl.domain == "llm":
        kw["seq_len"] = seq_len
    if wl.library == "nerfstudio":
        kw["rays"] = rays
    return op_roles(analyze(workload, phase, dtype=proxies.phase_dtype(workload), **kw))


def phase_energy(workload: str, phase: str, table: EnergyTable, model: ReuseModel | None = None,
                 hw: Hardware | None = None, **analyze_kw: Any) -> dict[str, Any]:
    """Trace ``workload:phase`` at full scale on meta (:func:`cohw_utils.spine.analyze.analyze`) and
    :func:`~cohw_utils.views.energy_model.evaluate_energy` it; ``analyze_kw`` go to ``analyze``
    (batch, seq_len, dtype, rays...)."""
    a = analyze(workload, phase, **analyze_kw)
    out = evaluate_energy(table, op_roles(a), model, hw)
    return {"workload": a.workload, "phase": a.phase, "dtype": a.dtype, "batch": a.batch, **out}


def energy_overview(phases: Sequence[tuple[str, str]] | Sequence[OpRoles], table: EnergyTable,
                    model: ReuseModel | None = None, hw: Hardware | None = None,
                    **analyze_kw: Any) -> pd.DataFrame:
    """One row per phase: :func:`~cohw_utils.views.energy_model.evaluate_energy` of each
    ``(workload, phase)`` (traced with ``analyze_kw``; LLMs get ``seq_len``, NeRFs ``rays`` when
    given) or of each :class:`~cohw_utils.views.energy_model.OpRoles`."""
    rows = []
    for item in phases:
        if isinstance(item, OpRoles):
            r = evaluate_energy(table, item, model, hw)
            wl, ph = (item.label.split(":", 1) + [""])[:2]
            rows.append({"workload": wl, "phase": ph, **r})
            continue
        wl_name, ph = item
        wl = workloads.get_workload(wl_name)
        kw = {"dtype": proxies.phase_dtype(wl_name)}
        if wl.domain == "llm" and "seq_len" in analyze_kw:
            kw["seq_len"] = analyze_kw["seq_len"]
        if wl.library == "nerfstudio" and "rays" in analyze_kw:
            kw["rays"] = analyze_kw["rays"]
        if "batch" in analyze_kw:
            kw["batch"] = analyze_kw["batch"]
        rows.append(phase_energy(wl_name, ph, table, model, hw, **kw))
    return pd.DataFrame(rows)


def decode_batch_sweep(workload: str, batches: Sequence[int], table: EnergyTable,
                       model: ReuseModel | None = None, hw: Hardware | None = None,
                       seq_len: int = 2048, dtype: str = "fp16") -> pd.DataFrame:
    """Energy and roofline time per generated token of one decode step at each batch size
    (weights are read once per batch, KV cache and activations once per sequence), with
    whether weights + KV cache fit ``hw``'s memory (``fits_memory``: the one rule,
    :func:`cohw_utils.views.memory_budget.fits`, which holds back the runtime reserve; always
    true without ``hw`` or for a chip with no capacity in the data)."""
    rows = []
    for b in batches:
        a = analyze(workload, "decode", batch=int(b), seq_len=seq_len, dtype=dtype)
        r = evaluate_energy(table, op_roles(a), model, hw)
        need = a.weight_bytes + (a.kv_bytes_per_token or 0) * (seq_len + 1) * b
        rows.append({"batch": int(b), "J_per_token": r["total_J_per_unit"],
                     "compute_J_per_token": r["compute_J_per_unit"],
                     "offchip_J_per_token": r["offchip_J"] / b,
                     "other_memory_J_per_token": (r["memory_J"] - r["offchip_J"]) / b,
                     "time_per_token_s": r["time_s_per_unit"], "step_time_s": r["time_s"],
                     "memory_share": r["memory_share"], "memory_needed_bytes": need,
                     "fits_memory": bool(hw is None or fits(hw, need))})
    return pd.DataFrame(rows)


def whatifs(base: OpRoles, table: EnergyTable, hw: Hardware, model: ReuseModel | None = None,
            batch_roles: OpRoles | None = None, batch: int | None = None) -> pd.DataFrame:
    """The what-if table for one phase: energy and roofline time per unit against the baseline
    for int8 / int4 weight-only quantization, W8A8, a larger batch (``batch_roles`` traced at
    ``batch``), fusion (element-wise epilogues), cache-resident activations (every intermediate
    that fits the on-chip buffer, ``ReuseModel(activations_resident=True)``), and processing in
    memory (at the model's ``pim_bw_x``). Each case changes one field of ``model``; a ``model``
    with ``activations_resident=True`` makes every case a compiled one."""
    m = model or ReuseModel()
    cases: list[tuple[str, OpRoles, ReuseModel]] = [
        ("baseline", base, m),
        ("int8 weights (W8A16)", base.quantized("int8"), m),
        ("int4 weights (W4A16, g128)", base.quantized("int4"), m),
        ("int8 weights and activations (W8A8)", base.quantized("int8", activations="int8"), m),
    ]
    if batch_roles is not None:
        cases.append((f"batch {batch}", batch_roles, m))
    cases += [("fusion (intermediates on chip)", base, dataclasses.replace(m, fusion=True)),
              ("cache-resident activations (fusing compiler)", base,
               dataclasses.replace(m, activations_resident=True)),
              ("processing in memory (weights)", base, dataclasses.replace(m, pim=True))]
    rows = []
    for name, roles, mm in cases:
        r = evaluate_energy(table, roles, mm, hw)
        n = r.get("units") or 1  # an op table without phase units: per run
        rows.append({"what-if": name, "J_per_unit": r["total_J"] / n,
                     "compute_J_per_unit": r["compute_J"] / n, "memory_J_per_unit": r["memory_J"] / n,
                     "offchip_MB_per_unit": r["offchip_bytes"] / n / 1e6,
                     "time_per_unit_s": r["time_s"] / n, "unit": r.get("unit") or "run"})
    df = pd.DataFrame(rows).set_index("what-if")
    df["energy_vs_baseline"] = df["J_per_unit"] / df.loc["baseline", "J_per_unit"]
    df["time_vs_baseline"] = df["time_per_unit_s"] / df.loc["baseline", "time_per_unit_s"]
    return df


def compare_measured(measured: Mapping[str, Any] | None, table: EnergyTable, hw: Hardware,
                     model: ReuseModel | None = None,
                     plan: Sequence[Mapping[str, Any]] | None = None) -> pd.DataFrame:
    """The model's joules per unit for each GPU measurement in ``measured`` (the record
    :func:`cohw_utils.hardware.power_meters.load_gpu_energy` returns), beside the measured gross and
    net-of-idle figures. With ``measured=None``, the model's estimate for each configuration in
    ``plan`` (dicts with workload, phase, batch, seq_len) and empty measured columns."""
    items = list(measured["measurements"]) if measured else list(plan or [])
    rows = []
    for m in items:
        dtype = m.get("dtype") or (measured or {}).get("dtype") or "fp16"
        kw: dict[str, Any] = {"batch": int(m.get("batch", 1)), "dtype": dtype}
        if m.get("seq_len"):
            kw["seq_len"] = int(m["seq_len"])
        if m.get("image_size"):
            kw["image_size"] = int(m["image_size"])
        a = analyze(m["workload"], m["phase"], **kw)
        r = evaluate_energy(table, op_roles(a), model, hw)
        rows.append({"workload": m["workload"], "phase": m["phase"], "batch": kw["batch"],
                     "seq_len": m.get("seq_len"), "unit": a.unit_name,
                     "model_J_per_unit": r["total_J_per_unit"],
                     "model_time_per_call_ms": r["time_s"] * 1e3,
                     "measured_J_per_unit": m.get("joules_per_unit") if measured else None,
                     "measured_net_idle_J_per_unit": m.get("joules_per_unit_net_idle") if measured else None,
                     "measured_time_per_call_ms": m["seconds_per_call"] * 1e3
                     if measured and "seconds_per_call" in m else None})
    df = pd.DataFrame(rows)
    if measured and len(df):
        df["measured_over_model"] = df["measured_net_idle_J_per_unit"] / df["model_J_per_unit"]
    return df
