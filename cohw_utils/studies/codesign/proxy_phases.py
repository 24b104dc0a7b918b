"""The proxy set as the co-design loop sees it: every phase of the registry traced once at full
scale and prepared (:class:`ProxySet`), and the weight of each phase in the weighted proxy set.

Weights (:func:`phase_weights`) come from Chapter 1's priority scores: a workload's score,
normalised to sum 1 over the workloads present, split equally between its phases and a phase's
share equally between its (batch, context) variants. :func:`phase_table` lists the phases with
their class, weight, unit of work and footprint (GB = 1e9 bytes).

Used by Chapter 5 (the co-design loop).
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pandas as pd

from cohw_utils.views import roofline
from cohw_utils import workloads
from cohw_utils.core.errors import CohwError
from cohw_utils.hardware import get_hardware
from cohw_utils.studies.codesign.phases import PreparedPhase, prepare

__all__ = ["ProxySet", "trace_proxy_set", "phase_weights", "phase_table"]


@dataclass
class ProxySet:
    """Every traced phase of the proxy set (Chapter 1's phases, plus LLM variants), with the
    Chapter 1 criteria inputs: ``overview`` (workload, phase, memory_bound_share on the
    reference chip) and each workload's ``op_sets``."""

    phases: list[PreparedPhase]
    overview: pd.DataFrame
    op_sets: dict[str, set[str]]
    seconds: float

    def by_label(self) -> dict[str, PreparedPhase]:
        return {p.label: p for p in self.phases}


def trace_proxy_set(names: Iterable[str] | None = None, seq_len: int = 2048, rays: int = 4096,
                    llm_variants: Iterable[tuple[str, int, int]] = (), reference: str = "H100-SXM",
                    kv_in_place: bool = True) -> ProxySet:
    """Trace every phase of ``names`` (default: the registry) once, at full scale on ``meta``,
    as Chapter 1 does (fp16 inference, fp32 NeRFs; LLMs at ``seq_len``, NeRFs at ``rays``), plus
    each ``(llm, batch, context)`` decode in ``llm_variants``. Returns the prepared phases and
    the inputs of :func:`cohw_utils.studies.proxies.proxy_set.criteria` (so the ranking is Chapter 1's)."""
    from cohw_utils.studies.proxies import ranking as priority
    from cohw_utils.studies.proxies import proxy_set as proxies
    from cohw_utils.spine.analyze import analyze

    start = time.perf_counter()
    chip = get_hardware(reference)
    names = list(names) if names is not None else list(workloads.WORKLOADS)
    phases, rows, op_sets = [], [], {}
    for name in names:
        wl = workloads.get_workload(name)
        kw = {"rays": rays} if wl.library == "nerfstudio" else {}
        ops: set[str] = set()
        for ph in wl.phases:
            a = analyze(name, ph, seq_len=seq_len if wl.domain == "llm" else None,
                        dtype=proxies.phase_dtype(name), **kw)
            ops |= priority.op_set(a.table)
            roof = roofline.roofline_summary(a.table, chip)
            rows.append({"workload": wl.name, "domain": wl.domain, "phase": ph,
                         f"time_{chip.name}_ms": roof["time_s"] * 1e3, "calls_per_request": wl.calls(ph),
                         "memory_bound_share": roof["memory_bound_share"]})
            phases.append(prepare(a, kv_in_place=kv_in_place))
        op_sets[wl.name] = ops
    for llm, batch, ctx in llm_variants:
        if workloads.get_workload(llm).domain != "llm":
            raise CohwError(f"llm_variants: {llm!r} is not a decoder LM; use one of the llama-2 workloads")
        a = analyze(llm, "decode", batch=int(batch), seq_len=int(ctx), dtype=proxies.phase_dtype(llm))
        p = prepare(a, kv_in_place=kv_in_place)
        if p.label not in {q.label for q in phases}:
            phases.append(p)
    return ProxySet(phases, pd.DataFrame(rows), op_sets, time.perf_counter() - start)


def phase_weights(phases: Sequence[PreparedPhase], ranked: pd.DataFrame) -> pd.Series:
    """Weight of each phase in the weighted proxy set: a workload's Chapter 1 priority score
    (normalised to sum 1 over the workloads present), split equally between its phases, and a
    phase's share equally between its (batch, context) variants."""
    scores = ranked["score"].astype(float)
    present = list(dict.fromkeys(p.workload for p in phases))
    missing = [w for w in present if w not in scores.index]
    if missing:
        raise CohwError(f"no priority score for {missing}; rank them with priority.rank first")
    s = scores.reindex(present)
    s = s / s.sum()
    out = {}
    for wl in present:
        mine = [p for p in phases if p.workload == wl]
        kinds = list(dict.fromkeys(p.phase for p in mine))
        for p in mine:
            n_var = sum(q.phase == p.phase for q in mine)
            out[p.label] = s[wl] / len(kinds) / n_var
    return pd.Series(out, name="weight").reindex([p.label for p in phases])



def phase_table(phases: Sequence[PreparedPhase], weights: pd.Series) -> pd.DataFrame:
    """One row per phase (index: its label): ``class``, ``weight`` (from ``weights``, phase label
    -> weight, e.g. :func:`phase_weights`), ``unit`` of work, ``weights_GB`` and ``kv_cache_GB``
    (its footprint, 1e9 bytes)."""
    return pd.DataFrame({"class": [p.klass for p in phases], "weight": [weights[p.label] for p in phases],
                         "unit": [p.unit_name for p in phases], "weights_GB": [p.weight_bytes / 1e9 for p in phases],
                         "kv_cache_GB": [p.kv_bytes / 1e9 for p in phases]}, index=[p.label for p in phases])
