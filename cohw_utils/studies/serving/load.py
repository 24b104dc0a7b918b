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
* :func:`sharegpt_lengths`: prompt and output lengths drawn as the paging study of Chapter 4.2
  draws them (lognormal around the vLLM paper's ShareGPT means; our assumption, stated there).
* :func:`slo_rate`: the highest request rate at which a share of requests (90%) meets a TTFT
  and a TPOT bound, by bisection; :func:`goodput_table` / :func:`what_if`: that rate for each
  chip, or for each variant of one chip (doubled bandwidth, capacity or FLOP/s: :func:`scaled`;
  a weight or KV format).

Assumptions: 16-bit weights and KV cache unless a weight format says otherwise (its bits scale
the weight bytes, group scales included, and an 8-bit-KV format halves the bytes per cached
token); one chip, no parallelism; requests independent (no prefix sharing); the calibration's
efficiencies and fixed per-step overhead (Chapter 4.5).

Used by Chapter 4.6 (serving under load).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from cohw_utils.core.dtypes import bytes_per_element
from cohw_utils.core.errors import CohwError
from cohw_utils.hardware import Hardware, get_hardware
from cohw_utils.hardware.specs import scaled  # noqa: F401  (the chapter's what-ifs call load.scaled)
from cohw_utils.spine.phase_costs import load_cached, phase_cost_function, resolve_model
from cohw_utils.views.kvcache import weight_bytes
from cohw_utils.views.predictor import load_calibration, weight_format
from cohw_utils.views.serving import CostFunctionIteration, SchedulerConfig, kv_blocks, poisson_requests, simulate

__all__ = ["server", "load_sweep", "max_rate_at_slo", "allocation_sweep", "sustained_rate", "sharegpt_lengths",
           "slo_rate", "goodput_table", "what_if", "scaled", "resident_bytes"]


def resident_bytes(weight_bytes: float, kv_bytes_per_token: float, weight_fmt: str | None,
                   traced_bytes: float = 2.0) -> tuple[float, float]:
    """(weight bytes, KV bytes per token) of figures traced at ``traced_bytes`` per element, stored in ``weight_fmt``: weights
    at ``weight_bits`` plus ``scale_bytes`` per ``group_size`` weights (per-channel scales, group 0,
    are ignored: under 0.1% of a 4096-wide row), the KV cache at ``kv_bits`` where the format sets it.
    Every weight is counted at the format's width (embeddings too: a saving overstated by their share)."""
    if weight_fmt is None:
        return weight_bytes, kv_bytes_per_token
    f = weight_format(weight_fmt)
    per_weight = f.weight_bits / 8 + (f.scale_bytes / f.group_size if f.group_size else 0.0)
    kv = kv_bytes_per_token * f.kv_bits / 8 / traced_bytes if f.kv_bits else kv_bytes_per_token
    return weight_bytes / traced_bytes * per_weight, kv


def server(model: str, hw: str | Hardware, dtype: str = "fp16", block_size: int = 16, calibration=None,
           weight_fmt: str | None = None, **scheduler) -> tuple[CostFunctionIteration, SchedulerConfig]:
    """The iteration model and scheduler config of ``model`` served on ``hw`` (module docstring);
    ``weight_fmt`` a :data:`~cohw_utils.views.predictor.WEIGHT_FORMATS` name for the step times and
    the bytes; ``scheduler`` overrides :class:`SchedulerConfig` fields (``max_batched_tokens``,
    ``allocation``...)."""
    chip = hw if isinstance(hw, Hardware) else get_hardware(hw)
    if not chip.mem_bytes:
        raise CohwError(f"{chip.name} has no memory capacity in hardware.csv: cannot size its KV cache")

    def blocks_for(weight_bytes: float, kv_per_token: float) -> int:
        weights, kv = resident_bytes(weight_bytes, kv_per_token, weight_fmt, bytes_per_element(dtype))
        try:
            return kv_blocks(chip.mem_bytes, weights, kv, block_size)
        except CohwError as err:
            raise CohwError(f"{model} on {chip.name}: {err}") from None

    if load_cached(model, "decode", dtype) is None:  # before minutes of tracing: do the weights fit at all?
        blocks_for(weight_bytes(resolve_model(model), dtype), 1.0)
    dec = phase_cost_function(model, "decode", dtype)
    blocks = blocks_for(dec.meta["weight_bytes"], dec.meta["kv_bytes_per_token"])
    pre = phase_cost_function(model, "prefill", dtype, prefill_logits="last")
    cal = calibration if calibration is not None else load_calibration()
    cfg = SchedulerConfig(num_blocks=blocks, block_size=block_size, **scheduler)
    return CostFunctionIteration(pre, dec, chip, cal, weight_fmt), cfg


def sharegpt_lengths(n: int, max_len: int = 2048, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(prompt lengths, output lengths) of ``n`` ShareGPT-like requests (module docstring)."""
    from cohw_utils.studies.performance.paging import sample_requests

    r = sample_requests(n, "sharegpt", max_len=max_len, seed=seed)
    return r["prompt"].to_numpy(), r["output"].to_numpy()


def _check_slo(it: CostFunctionIteration, slo_ttft_s: float | None, slo_tpot_s: float | None, shortest: int) -> None:
    """One clear error for an SLO no load can meet: below one lone decode step or one prefill of
    the shortest prompt on this chip."""
    if slo_tpot_s is not None and slo_tpot_s < (floor := it.step_seconds([], [1])):
        raise CohwError(f"a TPOT SLO of {slo_tpot_s * 1e3:.2f} ms is below one decode step of a single "
                        f"sequence on {it.hw.name} ({floor * 1e3:.2f} ms): no load can meet it")
    if slo_ttft_s is not None and slo_ttft_s < (floor := it.step_seconds([(shortest, 0)], [])):
        raise CohwError(f"a TTFT SLO of {slo_ttft_s * 1e3:.2f} ms is below one prefill of the shortest prompt "
                        f"({shortest} tokens) on {it.hw.name} ({floor * 1e3:.2f} ms): no load can meet it")


def _load(rate: float, n: int, prompt_len, output_len, dataset: str | None, horizon_s: float | None, seed: int):
    """The requests of one rate: ``n`` of them, or enough to arrive over ``horizon_s`` seconds when
    that is more; lengths from ``dataset`` (``"sharegpt"``) or the given specs."""
    if horizon_s is not None:
        n = max(n, math.ceil(rate * horizon_s))
    if dataset == "sharegpt":
        prompt_len, output_len = sharegpt_lengths(n, seed=seed)
    elif dataset is not None:
        raise CohwError(f"unknown dataset {dataset!r}: use 'sharegpt' or give prompt_len/output_len")
    return poisson_requests(rate, n, prompt_len, output_len, seed=seed)


def _row(it, cfg, rate, reqs, slo_ttft_s, slo_tpot_s) -> dict:
    res = simulate(reqs, it, cfg)
    s = res.summary(slo_ttft_s, slo_tpot_s)
    r = res.requests
    s["normalized_latency_s"] = float((r["e2e_s"] / r["output_len"]).mean())
    return {"hardware": it.hw.name, "allocation": cfg.allocation, "rate_per_s": rate, "num_blocks": cfg.num_blocks, **s}


def load_sweep(model: str, hw: str | Hardware, rates: Sequence[float], n: int = 300, prompt_len=(64, 512),
               output_len=(64, 512), slo_ttft_s: float | None = None, slo_tpot_s: float | None = None,
               seed: int = 0, weight_fmt: str | None = None, dataset: str | None = None,
               horizon_s: float | None = None, **scheduler) -> pd.DataFrame:
    """One row per rate: :meth:`~cohw_utils.views.serving.SimResult.summary` (under the SLO when
    given) and ``normalized_latency_s`` (s per output token, the vLLM paper's y axis). Lengths as
    :func:`~cohw_utils.views.serving.poisson_requests` takes them (an int, a range or n lengths),
    or ``dataset="sharegpt"``; ``horizon_s`` raises ``n`` to ``rate x horizon_s`` (a longer run at
    a higher rate, so the server reaches its steady state before the arrivals stop)."""
    it, cfg = server(model, hw, weight_fmt=weight_fmt, **scheduler)
    rows = []
    for rate in rates:
        reqs = _load(rate, n, prompt_len, output_len, dataset, horizon_s, seed)
        _check_slo(it, slo_ttft_s, slo_tpot_s, min(r.prompt_len for r in reqs))
        rows.append({"model": model, "format": weight_fmt or "fp16",
                     **_row(it, cfg, rate, reqs, slo_ttft_s, slo_tpot_s)})
    return pd.DataFrame(rows)


def slo_rate(model: str, hw: str | Hardware, slo_ttft_s: float, slo_tpot_s: float, attainment_pct: float = 90.0,
             rate_lo: float = 0.25, rel_tol: float = 0.04, n: int = 200, horizon_s: float = 60.0,
             weight_fmt: str | None = None, seed: int = 0, prompt_len=(64, 512), output_len=(64, 512),
             dataset: str | None = None, **scheduler) -> dict:
    """The SLO capacity of ``model`` on ``hw``: the highest Poisson rate at which ``attainment_pct``
    of requests meet both bounds (DistServe's definition of goodput), found by doubling from
    ``rate_lo`` and then bisecting to ``rel_tol``; each rate simulated with at least
    ``rate x horizon_s`` requests (same seed, so attainment falls with rate up to sampling noise).
    Returns the rate (NaN when even ``rate_lo`` fails), the lowest rate found to fail
    (``failed_rate_per_s``), the rates tried, and at the best rate: SLO attainment, output
    tokens/s, p90 TTFT and TPOT, KV blocks."""
    it, cfg = server(model, hw, weight_fmt=weight_fmt, **scheduler)
    tried: dict[float, dict] = {}

    def run(rate: float) -> bool:
        reqs = _load(rate, n, prompt_len, output_len, dataset, horizon_s, seed)
        if not tried:
            _check_slo(it, slo_ttft_s, slo_tpot_s, min(r.prompt_len for r in reqs))
        tried[rate] = _row(it, cfg, rate, reqs, slo_ttft_s, slo_tpot_s)
        return tried[rate]["slo_met_%"] >= attainment_pct

    if not run(rate_lo):
        good, bad = float("nan"), rate_lo
    else:
        good, bad = rate_lo, rate_lo * 2
        while run(bad):
            good, bad = bad, bad * 2
            if bad > 1e6:
                raise CohwError("the SLO is met at every rate up to 1e6 requests/s: check the SLO and the model")
        while (bad - good) > rel_tol * good:
            mid = (good + bad) / 2
            good, bad = (mid, bad) if run(mid) else (good, mid)
    at = tried.get(good, {})
    return {"hardware": it.hw.name, "format": weight_fmt or "fp16", "max_rate_per_s": good,
            "failed_rate_per_s": bad, "slo_met_%": at.get("slo_met_%", float("nan")),
            "output_tokens_per_s": at.get("output_tokens_per_s", float("nan")),
            "ttft_p90_s": at.get("ttft_p90_s", float("nan")), "tpot_p90_s": at.get("tpot_p90_s", float("nan")),
            "num_blocks": cfg.num_blocks, "rates_tried": len(tried)}


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


def goodput_table(model: str, chips: Sequence[str | Hardware], slo_ttft_s: float, slo_tpot_s: float,
                  **kw) -> pd.DataFrame:
    """One row per chip: :func:`slo_rate` (``kw`` goes to it: lengths, ``dataset``, ``weight_fmt``...)."""
    return pd.DataFrame([slo_rate(model, hw, slo_ttft_s, slo_tpot_s, **kw) for hw in chips]).set_index("hardware")


def what_if(model: str, hw: str | Hardware, variants: Mapping[str, Callable[[Hardware], Hardware] | str | None],
            slo_ttft_s: float, slo_tpot_s: float, **kw) -> pd.DataFrame:
    """:func:`slo_rate` of ``hw`` and of each variant: a function of the chip (``lambda h:
    scaled(h, bandwidth=2)``) or a weight-format name (``"fp8-kv8"``), ``None`` the chip as it is;
    one row per variant, with ``rate_gain`` over the first."""
    chip = hw if isinstance(hw, Hardware) else get_hardware(hw)
    rows = []
    for label, change in variants.items():
        fmt = change if isinstance(change, str) else None
        target = change(chip) if callable(change) else chip
        rows.append({"variant": label, **slo_rate(model, target, slo_ttft_s, slo_tpot_s, weight_fmt=fmt, **kw)})
    out = pd.DataFrame(rows).set_index("variant")
    out["rate_gain"] = out["max_rate_per_s"] / out["max_rate_per_s"].iloc[0]
    return out
