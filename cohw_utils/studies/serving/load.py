"""Serving an LLM on an accelerator under load: the simulator of :mod:`cohw_utils.views.serving`
with step times from the calibrated predictor, and the questions an architect is asked.

* :func:`server`: the iteration model and the scheduler of one (model, chip): step times from the
  model's prefill and decode cost functions on the chip under the ledger's calibration
  (:class:`~cohw_utils.views.serving.CostFunctionIteration`); KV blocks from the memory the weights
  leave, with the 10% runtime reserve (:func:`~cohw_utils.views.serving.kv_blocks`).
* :func:`load_sweep`: one simulation per request rate (Poisson arrivals, lengths as given): the
  summary at each rate, with the vLLM paper's *normalized latency* (the mean over requests of
  end-to-end latency / output tokens) and the share of requests that met an SLO.
* :func:`max_rate_at_slo`: the highest rate of a sweep at which a given share of requests met it.
* :func:`allocation_sweep` / :func:`sustained_rate`: the vLLM paper's experiment -- the same load
  under paged blocks and under per-request reservations, and the highest rate each sustains
  before its normalized latency passes a bound.

Assumptions: fp16 weights and KV cache; one chip, no parallelism; requests independent (no prefix
sharing); the calibration's efficiencies and fixed per-step overhead (Chapter 4.5).

Written for Chapter 4.2's serving section (not yet in the book).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from cohw_utils.core.errors import CohwError
from cohw_utils.hardware import Hardware, get_hardware
from cohw_utils.spine.phase_costs import phase_cost_function
from cohw_utils.views.predictor import load_calibration
from cohw_utils.views.serving import CostFunctionIteration, SchedulerConfig, kv_blocks, poisson_requests, simulate

__all__ = ["server", "load_sweep", "max_rate_at_slo", "allocation_sweep", "sustained_rate"]


def server(model: str, hw: str | Hardware, dtype: str = "fp16", block_size: int = 16, calibration=None,
           **scheduler) -> tuple[CostFunctionIteration, SchedulerConfig]:
    """The iteration model and scheduler config of ``model`` served on ``hw`` (module docstring);
    ``scheduler`` overrides :class:`SchedulerConfig` fields (``max_batched_tokens``, ``allocation``...)."""
    chip = hw if isinstance(hw, Hardware) else get_hardware(hw)
    pre = phase_cost_function(model, "prefill", dtype, prefill_logits="last")
    dec = phase_cost_function(model, "decode", dtype)
    if not chip.mem_bytes:
        raise CohwError(f"{chip.name} has no memory capacity in hardware.csv: cannot size its KV cache")
    blocks = kv_blocks(chip.mem_bytes, dec.meta["weight_bytes"], dec.meta["kv_bytes_per_token"], block_size)
    cal = calibration if calibration is not None else load_calibration()
    cfg = SchedulerConfig(num_blocks=blocks, block_size=block_size, **scheduler)
    return CostFunctionIteration(pre, dec, chip, cal), cfg


def load_sweep(model: str, hw: str | Hardware, rates: Sequence[float], n: int = 300, prompt_len=(64, 512),
               output_len=(64, 512), slo_ttft_s: float | None = None, slo_tpot_s: float | None = None,
               seed: int = 0, **scheduler) -> pd.DataFrame:
    """One row per rate: :meth:`~cohw_utils.views.serving.SimResult.summary` (under the SLO when
    given) and ``normalized_latency_s`` (s per output token, the vLLM paper's y axis)."""
    it, cfg = server(model, hw, **scheduler)
    if slo_tpot_s is not None:
        floor = it.step_seconds([], [1])
        if slo_tpot_s < floor:
            raise CohwError(f"a TPOT SLO of {slo_tpot_s * 1e3:.2f} ms is below one decode step of a single "
                            f"sequence on {it.hw.name} ({floor * 1e3:.2f} ms): no load can meet it")
    rows = []
    for rate in rates:
        res = simulate(poisson_requests(rate, n, prompt_len, output_len, seed=seed), it, cfg)
        s = res.summary(slo_ttft_s, slo_tpot_s)
        r = res.requests
        s["normalized_latency_s"] = float((r["e2e_s"] / r["output_len"]).mean())
        rows.append({"model": model, "hardware": it.hw.name, "allocation": cfg.allocation, "rate_per_s": rate,
                     "num_blocks": cfg.num_blocks, **s})
    return pd.DataFrame(rows)


def max_rate_at_slo(sweep: pd.DataFrame, attainment_pct: float = 90.0) -> float:
    """The highest rate of a :func:`load_sweep` (with an SLO) at which at least ``attainment_pct``
    of requests met it, every lower rate meeting it too; NaN if even the lowest did not."""
    if "slo_met_%" not in sweep.columns:
        raise CohwError("the sweep has no SLO column: run load_sweep with slo_ttft_s and/or slo_tpot_s")
    ok = sweep.sort_values("rate_per_s")["slo_met_%"].to_numpy() >= attainment_pct
    if not ok[0]:
        return float("nan")
    last = int(np.argmin(ok)) - 1 if not ok.all() else len(ok) - 1
    return float(sweep.sort_values("rate_per_s")["rate_per_s"].iloc[last])


def allocation_sweep(model: str, hw: str | Hardware, rates: Sequence[float],
                     allocations: Sequence[str] = ("paged", "reserve-exact", "reserve-max"), **kw) -> pd.DataFrame:
    """:func:`load_sweep` once per KV allocation policy (same requests, same step times)."""
    return pd.concat([load_sweep(model, hw, rates, allocation=a, **kw) for a in allocations], ignore_index=True)


def sustained_rate(sweep: pd.DataFrame, max_normalized_latency_s: float) -> pd.Series:
    """Per allocation: the highest rate whose normalized latency (s per output token) stays at or
    under the bound at that rate and every lower one; NaN where even the lowest rate exceeds it."""
    out = {}
    for alloc, g in sweep.groupby("allocation", sort=False):
        ok = g.sort_values("rate_per_s")["normalized_latency_s"].to_numpy() <= max_normalized_latency_s
        rates = g.sort_values("rate_per_s")["rate_per_s"].to_numpy()
        out[alloc] = float(rates[:int(np.argmin(ok)) if not ok.all() else len(ok)][-1]) if ok[0] else float("nan")
    return pd.Series(out, name="sustained_rate_per_s")
