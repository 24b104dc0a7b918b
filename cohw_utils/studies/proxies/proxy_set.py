"""The proxy set at a glance: full-scale cost of every workload phase, and the ranking inputs.

:func:`overview` traces every phase of the chosen workloads at full scale on ``meta`` and
returns one row per (workload, phase) with parameters, weight bytes, FLOPs, bytes moved,
intensity, FLOPs per unit of work, and the roofline time and memory-bound share on a reference
accelerator (:mod:`cohw_utils.views.roofline`). :func:`criteria` turns that into the four ranking
criteria of :mod:`cohw_utils.studies.proxies.ranking`.

Assumptions: inference phases in half precision (fp16, or bf16 for the models published in
bf16: DeepSeek-V2-Lite, FLUX.1-dev) and the NeRF and Gaussian-splatting workloads in fp32
(their nerfstudio / gsplat torch implementations); batch 1; LLM phases with a context of ``seq_len`` tokens; NeRF phases on
``rays`` rays. A workload's memory-bound share is that of its time per *request*: each phase's
roofline time times the calls one request makes of it (``Workload.calls_per_request``: one LLM
answer is one prefill and as many decode steps as output tokens; one Stable Diffusion image is two
text encodes, 50 denoising steps and one VAE decode), so a VAE decode weighs one fiftieth of the
denoising loop, not as much as it.

Used by Chapters 1 and 5 (the proxy set).
"""
from __future__ import annotations

from collections.abc import Iterable

import pandas as pd
import torch

from cohw_utils.studies.proxies import ranking as priority
from cohw_utils import workloads
from cohw_utils.spine.analyze import analyze
from cohw_utils.core.errors import CohwError
from cohw_utils.hardware import Hardware, get_hardware
from cohw_utils.views.roofline import roofline_summary
from cohw_utils.spine.optable import totals


def phase_dtype(name: str) -> str:
    """Dtype a workload is analysed in: fp32 for the NeRF and Gaussian-splatting workloads (their
    torch implementations), bf16 where the model is published in bf16 (DeepSeek, FLUX), else fp16."""
    wl = workloads.get_workload(name)
    if wl.library in ("nerfstudio", "gsplat"):
        return "fp32"
    return "bf16" if wl.default_dtype == torch.bfloat16 else "fp16"


def overview(names: Iterable[str] | None = None, hw: str | Hardware = "H100-SXM",
             seq_len: int = 2048, rays: int = 4096) -> tuple[pd.DataFrame, dict[str, set[str]]]:
    """Trace every phase of ``names`` (default: the whole registry) at full scale on ``meta``.

    Returns ``(table, op_sets)``: one row per (workload, phase), and each workload's set of
    distinct ops across its phases (for :func:`cohw_utils.studies.proxies.ranking.novelty`).
    """
    chip = get_hardware(hw) if isinstance(hw, str) else hw
    names = list(names) if names is not None else list(workloads.WORKLOADS)
    rows, op_sets = [], {}
    for name in names:
        wl = workloads.get_workload(name)
        kw = {"rays": rays} if wl.library == "nerfstudio" else {}
        ops: set[str] = set()
        for phase in wl.phases:
            a = analyze(name, phase, seq_len=seq_len if wl.domain == "llm" else None,
                        dtype=phase_dtype(name), **kw)
            t = totals(a.table)
            roof = roofline_summary(a.table, chip)
            ops |= priority.op_set(a.table)
            rows.append({
                "workload": wl.name, "domain": wl.domain, "phase": phase, "dtype": a.dtype,
                "parameters": a.parameters, "weight_bytes": a.weight_bytes,
                "flops": t["flops"], "bytes_moved": t["bytes_moved"], "intensity": t["intensity"],
                "units": a.units, "unit": a.unit_name, "flops_per_unit": t["flops"] / a.units,
                "uncosted_ops": t["uncosted_ops"], "calls_per_request": wl.calls(phase),
                f"time_{chip.name}_ms": roof["time_s"] * 1e3,
                "memory_bound_share": roof["memory_bound_share"],
            })
        op_sets[wl.name] = ops
    return pd.DataFrame(rows), op_sets


def criteria(table: pd.DataFrame, op_sets: dict[str, set[str]],
             judgements: pd.DataFrame | None = None) -> pd.DataFrame:
    """The ranking features per workload: trend and demand (judgements, 1..5), novelty and
    memory_bound (computed, 0..1), plus the judgements' rationale columns."""
    j = judgements if judgements is not None else priority.load_judgements()
    names = list(dict.fromkeys(table["workload"]))
    missing = [n for n in names if n not in j.index]
    if missing:
        raise CohwError(
            f"no trend/demand judgement for {missing}; add rows to data/proxy_criteria.csv")
    f = j.loc[names, ["trend", "demand"]].copy()
    f["novelty"] = priority.novelty(op_sets).reindex(names)
    f["memory_bound"] = request_memory_bound_share(table).reindex(names)
    return f


def request_memory_bound_share(table: pd.DataFrame) -> pd.Series:
    """Per workload, the memory-bound share of the roofline time of one request:
    ``sum(calls x time x share) / sum(calls x time)`` over its phases (see the module docstring).

    ``table`` is :func:`overview`'s; a table without ``calls_per_request`` counts each phase once.
    """
    time_cols = [c for c in table.columns if c.startswith("time_") and c.endswith("_ms")]
    if len(time_cols) != 1:
        raise CohwError(f"expected one time_<chip>_ms column in the overview table, found {time_cols}")
    calls = table["calls_per_request"] if "calls_per_request" in table else 1
    t = table[time_cols[0]] * calls
    weighted = (t * table["memory_bound_share"]).groupby(table["workload"]).sum()
    return (weighted / t.groupby(table["workload"]).sum()).rename("memory_bound")
