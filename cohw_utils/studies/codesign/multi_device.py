"""More chips instead of more memory: tensor parallelism beside offloading (Chapter 5.5).

A model that does not fit one chip can stream what does not fit from a slower tier (the design
model's spill, :mod:`cohw_utils.studies.codesign.placement`) or be split over ``tp`` chips:
Megatron-style tensor parallelism as the model's own TP plan applies it
(:func:`cohw_utils.spine.shard.per_rank_table`), each rank holding ``1/tp`` of the weights and of
the KV heads, with the all-reduces of its row-parallel layers on a link
(:func:`cohw_utils.views.parallel.rank_seconds`: the ring alpha-beta cost of
:mod:`cohw_utils.views.collectives`, no overlap of compute and communication).

:func:`tp_options` prices the second for one decode step at ``batch`` sequences of ``context``
tokens: per (tp, link) the per-rank compute and communication, the time per token, tokens/s in
total and per device, and what one rank holds (weights / tp + its share of the KV cache) against
its usable memory (:func:`cohw_utils.views.memory_budget.fits`, the runtime reserve kept).
``calibration=None`` is the ideal roofline, as the spill model's hand-checked rows use.

:func:`evaluate_systems` gives the design sweep its system axes, device count and link: every
design of a sweep (:func:`cohw_utils.studies.codesign.sweep.evaluate_designs`, the same memory
tiers, formats, spill, efficiency and power) is timed on one rank's compute rows of a ``tp``-way
split (the per-rank table above, its footprint the rank's share of the weights and KV cache,
:func:`_rank_phase`), and each link adds the rank's collectives (ring alpha-beta,
:func:`cohw_utils.views.parallel.comm_table`) on the critical path, no overlap: ``time_s =
compute + communication``. A system is ``devices`` copies of the design, so its silicon is
``devices x package_mm2``; per-device and per-mm2 throughput make one large chip and several
small ones comparable. The link is a system choice here, not part of the design; link energy is
not counted.

Used by Chapter 5 (the co-design loop).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import pandas as pd

from cohw_utils.core.errors import CohwError
from cohw_utils.core.opclasses import COMMUNICATION
from cohw_utils.hardware import Hardware, get_hardware
from cohw_utils.hardware.interconnects import get_interconnect
from cohw_utils.spine.analyze import Analysis, analyze
from cohw_utils.spine.shard import per_rank_table
from cohw_utils.studies.codesign.phases import prepare
from cohw_utils.studies.codesign.sweep import evaluate_designs
from cohw_utils.views.kvcache import kv_bytes_per_token, weight_bytes
from cohw_utils.views.memory_budget import fits
from cohw_utils.views.parallel import comm_table, kv_bytes_per_rank, rank_seconds
from cohw_utils.workloads import build

__all__ = ["NATIVE_LINKS", "native_link", "tp_options", "evaluate_systems"]

#: Each catalog generation's own scale-up link (a name in ``data/interconnects.csv``).
NATIVE_LINKS: dict[str, str] = {"A100": "nvlink3-a100", "H100": "nvlink4-h100", "H200": "nvlink4-h100",
                                "B200": "nvlink5-b200"}


def native_link(hw: Hardware | str) -> str:
    """The scale-up link a chip of ``hw``'s generation ships with (:data:`NATIVE_LINKS`, matched on
    the name's prefix); PCIe 5.0 x16 for a chip without one in the table."""
    name = (hw if isinstance(hw, str) else hw.name).upper()
    return next((v for k, v in NATIVE_LINKS.items() if name.startswith(k)), "pcie5-x16")


def tp_options(workload: str, hw: Hardware | str, links: Sequence[str], tps: Sequence[int] = (2, 4, 8), *,
               batch: int = 1, context: int = 2048, dtype: str = "fp16", calibration: Any = None) -> pd.DataFrame:
    """One row per (tp, link) for a decode step of ``workload`` on ``tp`` chips ``hw`` (see the
    module docstring); ``tp = 1`` gets one row without a link. Columns: ``option``, ``devices``,
    ``link``, ``compute_s``, ``comm_s``, ``time_per_token_s``, ``tokens_per_s``,
    ``tokens_per_s_per_device``, ``rank_GB`` (1e9 bytes), ``fits``."""
    hw = get_hardware(hw) if isinstance(hw, str) else hw
    if not links and any(t > 1 for t in tps):
        raise CohwError("tp_options: tp > 1 needs at least one link (see cohw_utils.hardware.load_interconnects())")
    config = build(workload, scale="full", device="meta", dtype=dtype).model.config
    kv_token, weights = kv_bytes_per_token(config, dtype), weight_bytes(workload, dtype)
    rows = []
    for tp in tps:
        table = per_rank_table(workload, "decode", tp=tp, batch=batch, seq_len=context, dtype=dtype)
        resident = weights / tp + kv_bytes_per_rank(kv_token, batch * context, tp)
        for link in (links if tp > 1 else [None]):
            r = rank_seconds(table, hw, get_interconnect(link) if link else None, calibration)
            rows.append({"option": f"{tp} x {hw.name}" + (f" TP over {link}" if link else ""), "devices": tp,
                         "link": link or "-", "compute_s": r.compute_s, "comm_s": r.comm_s,
                         "time_per_token_s": r.total_s, "tokens_per_s": batch / r.total_s,
                         "tokens_per_s_per_device": batch / r.total_s / tp, "rank_GB": resident / 1e9,
                         "fits": fits(hw, resident)})
    return pd.DataFrame(rows)


def _rank_phase(whole: Analysis, tp: int) -> tuple[Any, pd.DataFrame]:
    """``(PreparedPhase of one rank's compute rows, the rank's full table)`` for a ``tp``-way split:
    the one-chip ``whole`` analysis with its table replaced by the rank's compute rows and its
    weights and KV cache per token divided by ``tp`` (every weight and KV head split evenly: the
    replicated norms, a few kB, are not counted twice)."""
    workload, phase, batch, context = whole.workload, whole.phase, whole.batch, whole.seq_len
    rank = per_rank_table(workload, phase, tp=tp, batch=batch, seq_len=context, dtype=whole.dtype)
    compute = rank[rank["op_class"] != COMMUNICATION].drop(columns=["group_size", "comm_bytes"]).reset_index(drop=True)
    compute.attrs = {k: v for k, v in rank.attrs.items() if k != "collectives"}
    kv = whole.kv_bytes_per_token
    an = dataclasses.replace(whole, table=compute, weight_bytes=int(whole.weight_bytes / tp),
                             kv_bytes_per_token=None if kv is None else int(kv_bytes_per_rank(kv, 1, tp)))
    label = f"{workload}:{phase}" + (f" b{batch}" if batch > 1 else "") + f" ctx {context}"
    return prepare(an, label=label + (f" tp{tp}" if tp > 1 else "")), rank


def evaluate_systems(designs: Sequence[Any], workload: str, phase: str = "decode", tps: Sequence[int] = (1, 2, 4, 8),
                     links: Sequence[str] = ("nvlink4-h100",), *, batch: int = 1, context: int = 2048,
                     dtype: str = "fp16", **evaluate_kw: Any) -> pd.DataFrame:
    """Every design x device count x link (module docstring): the rows of
    :func:`~cohw_utils.studies.codesign.sweep.evaluate_designs` for one rank (its ``fits`` is the
    rank's share), plus ``devices``, ``link`` (``"-"`` for one device), ``compute_s``, ``comm_s``,
    ``time_s`` (their sum), ``tokens_per_s`` (``batch / time_s`` for a decode step, ``batch x
    context / time_s`` for a prefill), ``tokens_per_s_per_device``, ``system_mm2`` and
    ``tokens_per_s_per_mm2``. ``evaluate_kw`` goes to ``evaluate_designs`` (table, quantize,
    spill, efficiency, power, ...)."""
    if not designs:
        raise CohwError("evaluate_systems needs at least one design")
    if phase not in ("prefill", "decode"):
        raise CohwError(f"evaluate_systems times an LLM's 'prefill' or 'decode', got phase={phase!r}")
    if any(t > 1 for t in tps) and not links:
        raise CohwError("evaluate_systems: tp > 1 needs at least one link (see cohw_utils.hardware.load_interconnects())")
    tokens = batch * (context if phase == "prefill" else 1)
    whole = analyze(workload, phase, batch=batch, seq_len=context, dtype=dtype)
    frames = []
    for tp in tps:
        prepared, rank = _rank_phase(whole, tp)
        per_design = evaluate_designs(list(designs), prepared, **evaluate_kw)
        for link in (links if tp > 1 else ["-"]):
            comm_s = float(comm_table(rank, get_interconnect(link))["seconds"].sum()) if tp > 1 else 0.0
            f = per_design.copy()
            f.insert(1, "devices", tp)
            f.insert(2, "link", link)
            f["compute_s"], f["comm_s"] = f["time_s"], comm_s
            f["time_s"] = f["compute_s"] + comm_s
            f["tokens_per_s"] = tokens / f["time_s"]
            f["tokens_per_s_per_device"] = f["tokens_per_s"] / tp
            f["system_mm2"] = tp * f["package_mm2"]
            f["tokens_per_s_per_mm2"] = f["tokens_per_s"] / f["system_mm2"]
            frames.append(f)
    return pd.concat(frames, ignore_index=True)
