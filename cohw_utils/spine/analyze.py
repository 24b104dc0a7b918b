"""Analyse one workload phase: build it, trace it, and total what it costs.

:func:`analyze` is what ``python -m cohw_utils analyze`` prints and what Chapters 1 and 2 tabulate.
Parameters are counted once per unique tensor (tied embeddings count once). Weight bytes =
parameters x bytes of the build dtype. ``active_parameters``: those one token uses (a
mixture-of-experts model's k of E routed experts, :mod:`cohw_utils.workloads.moe`; = parameters
for a dense model).

The cache is measured, not assumed: when the traced phase returns a cache (a prefill, a decode
step), ``Analysis.cache`` is the :class:`~cohw_utils.workloads.caches.CacheReport` of that very
cache object (per layer type: full attention, sliding window, recurrent state, cross attention;
framework and serving bytes). ``kv_bytes_per_token`` is the number the analyses use: the report's
serving bytes per token (sliding layers counted until their window fills; MLA: the latent; 0 for
a pure state-space model, whose state is in ``cache``), or, for a decoder LM whose phase returned
no cache, :func:`cohw_utils.workloads.kv_cache_bytes_per_token` of its config; None otherwise.
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
from cohw_utils.workloads.moe import moe_parameters
from cohw_utils.workloads.caches import CacheReport, cache_report


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
    cache: CacheReport | None = field(default=None, repr=False)
    active_parameters: int | None = None
    family: str | None = None

    def header(self) -> dict[str, Any]:
        """The fields of :meth:`totals` that do not come from the op table."""
        return {
            "workload": self.workload, "phase": self.phase, "scale": self.scale,
            "device": self.device, "dtype": self.dtype, "batch": self.batch,
            "seq_len": self.seq_len, "family": self.family, "parameters": self.parameters,
            "active_parameters": self.active_parameters,
            "weight_bytes": self.weight_bytes, "kv_cache_bytes_per_token": self.kv_bytes_per_token,
            "kv_cache_bytes_at_context": (self.cache.summary()["serving_bytes_at_context"]
                                          if self.cache is not None else None),
            "cache": self.cache.summary() if self.cache is not None else None,
            "units": self.units, "unit": self.unit_name,
        }

    def totals(self) -> dict[str, Any]:
        """Flat dict of everything the CLI prints (JSON-serialisable):
        :func:`~cohw_utils.spine.optable.analysis_totals` of :meth:`header` and the table."""
        return optable.analysis_totals(self.header(), self.table)


def _kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int | None:
    """KV-cache bytes per token of a decoder-LM config (the closed form), else None."""
    try:
        return workloads.kv_cache_bytes_per_token(config, int(bytes_per_element(dtype)))
    except (AttributeError, TypeError, CohwError):
        return None


def _measured_cache(built: Any, phase: str, out: Any, kwargs: dict) -> CacheReport | None:
    """The report of the cache the traced phase returned; None when it returned none."""
    ids = kwargs.get("input_ids")
    hint = int(ids.shape[-1]) if isinstance(ids, torch.Tensor) and phase == "prefill" else None
    try:
        return cache_report(built, phase, out, hint)
    except CohwError:  # no cache in the output (a vision forward, a denoising step...)
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
    returned: dict[str, Any] = {}

    def run(*a: Any, **kw: Any) -> Any:  # keeps the phase's output: its cache is measured below
        returned["out"] = ph.run(*a, **kw)
        return returned["out"]

    if ph.backward:
        table = trace(run, *args, model=built.model, phase=ph.name, strict=strict, **kwargs)
    else:
        with torch.no_grad():
            table = trace(run, *args, model=built.model, phase=ph.name, strict=strict, **kwargs)
    cache = _measured_cache(built, ph.name, returned.get("out"), kwargs)
    if cache is not None:
        kv = cache.kv_bytes_per_token
    else:
        kv = _kv_bytes_per_token(built.config, torch_dtype) if wl.domain == "llm" else None
    params = count_parameters(built.model)
    active = moe_parameters(built.model, built.config).active if isinstance(built.model, torch.nn.Module) else params
    return Analysis(
        workload=wl.name, phase=ph.name, scale=scale, device=str(built.device),
        dtype=dtype_name(torch_dtype), batch=batch, seq_len=seq_len, parameters=params,
        weight_bytes=int(sum(p.numel() * p.element_size() for p in built.model.parameters())),
        kv_bytes_per_token=kv, units=ph.units, unit_name=ph.unit_name, table=table, cache=cache,
        active_parameters=active, family=wl.domain)
