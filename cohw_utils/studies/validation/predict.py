"""Predict one LLM request on one accelerator from the model's own code (Chapter 4.5, ``predict``).

:func:`predict_request` traces the model at full scale on ``meta`` at the request's shapes -- a
prefill of (batch, input_len) with last-position logits, and one decode step at the mean context
(:func:`~cohw_utils.views.predictor.decode_context`) -- and times the two tables with
:func:`~cohw_utils.views.predictor.request_prediction`, ideal or calibrated (the calibration fitted
on the ledger, :func:`~cohw_utils.views.predictor.load_calibration`). Traces are cached in memory
per (model, phase, batch, length, dtype), so a ledger of rows that share shapes traces each once.
With ``cost_function=True`` (the ``predict`` command) the two tables come instead from the
phases' cost functions (:mod:`cohw_utils.spine.phase_costs`: traced once per model, phase and
dtype, cached on disk, then exact at any shape); a shape in a box the build could not verify as
exact is traced directly.

Refused, each with one line naming the fix: an unknown model or hardware name, a model that is not
a decoder LM, non-positive shapes, a context beyond the model's positions, and a request whose
weights plus KV cache (at input_len + output_len) do not fit the chip's memory.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import pandas as pd

from cohw_utils.core.errors import CohwError
from cohw_utils.hardware import Hardware, get_hardware
from cohw_utils.spine.costfn import CostFunction
from cohw_utils.spine.phase_costs import kv_bytes_at, load_cached, phase_cost_function, resolve_model
from cohw_utils.views.predictor import (Calibration, RequestPrediction, apply_weight_format, decode_context,
                                        load_calibration, request_prediction, weight_format)

if TYPE_CHECKING:
    from cohw_utils.spine.analyze import Analysis

__all__ = ["resolve_model", "phase_analysis", "phase_function", "predict_request", "fits_in_memory"]


def _options(phase: str) -> dict[str, str]:
    return {"prefill_logits": "last"} if phase == "prefill" else {}


@functools.lru_cache(maxsize=512)
def phase_analysis(model: str, phase: str, batch: int, seq_len: int, dtype: str) -> "Analysis":
    """The traced ``phase`` of ``model`` at (batch, seq_len) in ``dtype``, full scale on meta
    (prefill with last-position logits, decode on a static cache); cached in memory."""
    from cohw_utils.spine.analyze import analyze  # torch: only where a trace is taken
    return analyze(resolve_model(model), phase, batch=batch, seq_len=seq_len, dtype=dtype, **_options(phase))


@functools.lru_cache(maxsize=64)
def phase_function(model: str, phase: str, dtype: str) -> CostFunction:
    """The cost function of ``phase`` (prefill with last-position logits), from the disk cache
    when it is there (torch-free), else built and cached."""
    return phase_cost_function(model, phase, dtype, **_options(phase))


def _table(model: str, phase: str, batch: int, seq_len: int, dtype: str, cost_function: bool) -> pd.DataFrame:
    if cost_function:
        cf = phase_function(model, phase, dtype)
        if cf.exact_at([(batch, seq_len)])[0]:
            return cf.table_at((batch, seq_len))
    return phase_analysis(model, phase, batch, seq_len, dtype).table


@functools.lru_cache(maxsize=64)
def _max_positions(model: str) -> int | None:
    """The config's ``max_position_embeddings`` (the text config's for a VLM), None if unknown."""
    from cohw_utils import workloads
    path = getattr(workloads.get_workload(resolve_model(model)).builder, "bound", {}).get("config_path")
    if path is None:
        return None
    cfg = workloads.load_hf_config(path)
    cfg = getattr(cfg, "text_config", None) or cfg
    return getattr(cfg, "max_position_embeddings", None)


def fits_in_memory(decode: "Analysis | CostFunction", hw: Hardware, batch: int, context: int,
                   weight_fmt: str) -> tuple[float, float]:
    """(bytes needed, bytes the chip has): weights in ``weight_fmt`` plus the KV cache of
    ``batch`` sequences at ``context`` tokens, from a decode analysis or its cost function.
    Activations and workspace are not counted."""
    fmt = weight_format(weight_fmt)
    if isinstance(decode, CostFunction):
        params, wbytes, kv = decode.meta["parameters"], decode.meta["weight_bytes"], kv_bytes_at(decode, context, batch)
    else:
        params, wbytes = decode.parameters, decode.weight_bytes
        kv = decode.cache.bytes_at(context, batch) if decode.cache is not None else 0
    weights = wbytes * (fmt.weight_bits / 8) / (wbytes / max(params, 1))
    return float(weights + (kv or 0)), float(hw.mem_bytes or float("inf"))


def predict_request(model: str, hardware: str | Hardware, *, batch: int = 1, input_len: int = 128,
                    output_len: int = 128, dtype: str = "fp16", weight_fmt: str | None = None,
                    calibrated: bool = True, calibration: Calibration | None = None,
                    check_memory: bool = True, cost_function: bool = False) -> RequestPrediction:
    """TTFT, TPOT, end-to-end latency and output tokens/s of ``batch`` requests on one device.

    ``dtype`` is the traced (activation) dtype; ``weight_fmt`` the weight format (default: the
    same 16-bit dtype; see :data:`~cohw_utils.views.predictor.WEIGHT_FORMATS`). ``calibrated``
    uses ``calibration`` or the ledger's fitted one; ``False`` gives the ideal roofline.
    ``cost_function`` takes the tables from the phases' cached cost functions (module docstring)
    instead of two fresh traces; the numbers are the same where the function is exact.
    """
    for name, v in (("batch", batch), ("input_len", input_len), ("output_len", output_len)):
        if not isinstance(v, int) or v < 1:
            raise CohwError(f"{name} must be a positive integer, got {v!r}")
    hw = hardware if isinstance(hardware, Hardware) else get_hardware(hardware)
    fmt = weight_fmt or dtype
    weight_format(fmt)
    cached = load_cached(model, "decode", dtype) if cost_function else None
    if cached is None:  # the registry says what the model is (a warm cost function already did)
        from cohw_utils import workloads
        wl = workloads.get_workload(resolve_model(model))
        if "prefill" not in wl.phases or "decode" not in wl.phases:
            raise CohwError(f"'{model}' is a {wl.domain} workload with phases {', '.join(wl.phases)}; predict "
                            "times decoder LMs (prefill + decode)")
        limit = _max_positions(model)
    else:
        top = cached.variables[1].hi
        limit = top + 1 if top is not None else None
    if limit is not None and input_len + output_len > limit:
        raise CohwError(f"input_len + output_len = {input_len + output_len} exceeds {model}'s "
                        f"max_position_embeddings ({limit}); use shorter lengths")
    prefill = _table(model, "prefill", batch, input_len, dtype, cost_function)
    context = decode_context(input_len, output_len)
    decode = _table(model, "decode", batch, context, dtype, cost_function) if output_len > 1 else None
    if check_memory and decode is not None:
        src = phase_function(model, "decode", dtype) if cost_function else phase_analysis(model, "decode", batch, context, dtype)
        need, have = fits_in_memory(src, hw, batch, input_len + output_len, fmt)
        if need > have:
            raise CohwError(f"{model} does not fit one {hw.name}: weights ({fmt}) + KV cache for batch {batch} "
                            f"at {input_len + output_len} tokens = {need / 1e9:,.1f} GB > {have / 1e9:,.1f} GB; "
                            "use a smaller batch, a lower-bit weight format, or more devices (not modelled yet)")
    cal = (calibration or load_calibration()) if calibrated else Calibration.ideal()
    return request_prediction(prefill, decode, hw, batch=batch,
                              input_len=input_len, output_len=output_len, calibration=cal, weight_fmt=fmt)


def step_tables(model: str, batch: int, input_len: int, output_len: int, dtype: str,
                weight_fmt: str) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The (prefill, decode) op tables :func:`predict_request` times, weight format applied."""
    prefill = apply_weight_format(phase_analysis(model, "prefill", batch, input_len, dtype).table, weight_fmt)
    if output_len == 1:
        return prefill, None
    dec = phase_analysis(model, "decode", batch, decode_context(input_len, output_len), dtype).table
    return prefill, apply_weight_format(dec, weight_fmt)
