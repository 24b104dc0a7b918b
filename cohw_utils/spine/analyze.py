"""Analyse one workload phase: build it, trace it, and total what it costs.

:func:`analyze` is what ``python -m cohw_utils analyze`` prints and what Chapter 1 tabulates.
Parameters are counted once per unique tensor (tied embeddings count once). Weight bytes =
parameters x bytes of the build dtype. ``kv_bytes_per_token`` is the KV cache one token adds,
for decoder LMs, at the build dtype (see :func:`cohw_utils.workloads.kv_cache_bytes_per_token`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from cohw_utils.spine import optable
from cohw_utils import workloads
from cohw_utils.core.params import count_parameters  # noqa: F401  (re-exported)
from cohw_utils.core.dtypes import bytes_per_element, dtype_name, parse_dtype
from cohw_utils.core.errors import CohwError
from cohw_utils.spine.trace import trace


@dataclass
class Analysis:
    """One traced phase of one workload, with the totals the CLI prints."""

    workload: str
    phase: str
    scale: str
    device: str
    dtype: str
    batch: int
    seq_len: int | None
    parameters: int
    weight_bytes: int
    kv_bytes_per_token: int | None
    units: int
    unit_name: str
    table: pd.DataFrame = field(repr=False)

    def totals(self) -> dict[str, Any]:
        """Flat dict of everything the CLI prints (JSON-serialisable)."""
        t = optable.totals(self.table)
        out: dict[str, Any] = {
            "workload": self.workload, "phase": self.phase, "scale": self.scale,
            "device": self.device, "dtype": self.dtype, "batch": self.batch,
            "seq_len": self.seq_len, "parameters": self.parameters,
            "weight_bytes": self.weight_bytes, "kv_cache_bytes_per_token": self.kv_bytes_per_token,
            "units": self.units, "unit": self.unit_name, **t,
            "flops_per_unit": t["flops"] / self.units if self.units else None,
            "uncosted": dict(self.table.attrs.get("uncosted", {})),
            "by_class": {
                cls: {"flops": int(r.flops), "bytes_moved": int(r.bytes_moved),
                      "flops_%": round(float(r["flops_%"]), 3),
                      "bytes_moved_%": round(float(r["bytes_moved_%"]), 3)}
                for cls, r in optable.by_class(self.table).iterrows()
            },
        }
        return out


def _kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int | None:
    """KV-cache bytes per token for decoder-LM configs, else None."""
    try:
        return workloads.kv_cache_bytes_per_token(config, int(bytes_per_element(dtype)))
    except (AttributeError, TypeError, CohwError):
        return None


def analyze(workload: str, phase: str | None = None, *, batch: int = 1, seq_len: int | None = None,
            dtype: str | torch.dtype | None = None, scale: str = "full", device: str = "meta",
            strict: bool = False, **build_kw: Any) -> Analysis:
    """Build ``workload`` (a registry name or a path to a config.json), trace one phase.

    ``phase`` defaults to the workload's first phase. ``dtype`` defaults to the workload's.
    Bad input (unknown workload, phase or dtype, non-positive batch) raises a
    :class:`~cohw_utils.core.errors.CohwError` whose message names the fix.
    """
    if batch < 1:
        raise CohwError(f"batch must be a positive integer, got {batch}")
    if seq_len is not None and seq_len < 1:
        raise CohwError(f"seq_len must be a positive integer, got {seq_len}")
    wl = workloads.get_workload(workload)
    torch_dtype = parse_dtype(dtype) if dtype is not None else wl.default_dtype
    built = workloads.build(workload, scale=scale, device=device, dtype=torch_dtype,
                            batch=batch, seq_len=seq_len, **build_kw)
    ph = built.phase(phase or wl.phases[0])
    args, kwargs = ph.make_inputs()
    if ph.backward:
        table = trace(ph.run, *args, model=built.model, phase=ph.name, strict=strict, **kwargs)
    else:
        with torch.no_grad():
            table = trace(ph.run, *args, model=built.model, phase=ph.name, strict=strict, **kwargs)
    params = count_parameters(built.model)
    return Analysis(
        workload=wl.name, phase=ph.name, scale=scale, device=str(built.device),
        dtype=dtype_name(torch_dtype), batch=batch, seq_len=seq_len, parameters=params,
        weight_bytes=int(sum(p.numel() * p.element_size() for p in built.model.parameters())),
        kv_bytes_per_token=_kv_bytes_per_token(built.config, torch_dtype),
        units=ph.units, unit_name=ph.unit_name, table=table)
