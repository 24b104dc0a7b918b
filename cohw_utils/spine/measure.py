"""Measured time: a timing harness with stated method and spread, and per-op times joined to
the op table.

Every measurement in the book goes through :func:`time_callable` (defined in
:mod:`cohw_utils.core.timing`, so that the hardware probe below this layer uses it too, and
re-exported here), which returns a :class:`Timing` carrying its method, repeats and spread.

:func:`profile_ops` runs the *traced* callable (:func:`cohw_utils.spine.trace.trace`) under
``torch.profiler`` (CPU, and CUDA when present), so the profiler records exactly the aten ops
the op table has, in the same order, and each row gets the measured time of its own event
next to its FLOPs and bytes. The join walks both sequences in execution order and matches a
row to the next event of the same aten name; composite ops that the dispatcher decomposed
(``aten::linear``) are parents of the matched events and have no row. A matched event's time
is its total time including children (the kernels that implement it). The tracer's own Python
work happens between events and is not counted. Caveat: a traced run executes the ops the
dispatcher hands to Python (e.g. ``mm`` + ``add`` where plain eager may call one ``addmm``);
``attrs['wall_s']`` and an untraced :func:`time_callable` let a chapter show the difference.
Rows with no matching event keep NaN (``attrs['unmatched']``); view rows do no work and get 0.
The profiler adds a few microseconds per event, so ops shorter than ~50 us read long: measure
models large enough that the ops of interest take longer than that.
"""
from __future__ import annotations

import statistics
import time
import warnings
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from cohw_utils.core.timing import Timing, synchronize, time_callable  # noqa: F401  (re-exported)
from cohw_utils.spine.trace import trace
from cohw_utils.spine import optable


def _profiler_name(op: str) -> str:
    """``aten.mm.default`` -> ``aten::mm``."""
    parts = op.split(".")
    return f"{parts[0]}::{parts[1]}" if len(parts) >= 2 else op


def _event_seconds(ev: Any, use_cuda: bool) -> float:
    if use_cuda:
        dev_us = getattr(ev, "device_time_total", 0.0) or 0.0
        if dev_us:
            return dev_us * 1e-6
    return ev.cpu_time_total * 1e-6


_LOOKAHEAD = 256  # events scanned for a row's match before the row is left unmatched


def _join(rows: list[str], events: list[Any], use_cuda: bool) -> list[float]:
    """Greedy in-order match of op-table rows to profiler events of the same aten name.

    ``events`` are sorted by start time; after a match, the events nested inside the matched
    one (the kernels and helper ops that implement it) are skipped, so they cannot be matched
    to later rows.
    """
    out = [np.nan] * len(rows)
    j = 0
    for i, op in enumerate(rows):
        name = _profiler_name(op)
        stop = min(len(events), j + _LOOKAHEAD)
        k = next((k for k in range(j, stop) if events[k].name == name), None)
        if k is None:
            continue
        out[i] = _event_seconds(events[k], use_cuda)
        end = events[k].time_range.end
        j = k + 1
        while j < len(events) and events[j].time_range.start < end:
            j += 1
    return out


def profile_ops(fn: Callable[..., Any], *args: Any, model: torch.nn.Module | None = None,
                phase: str = "forward", repeats: int = 3, warmup: int = 1,
                trace_file: str | None = None, **kwargs: Any) -> pd.DataFrame:
    """Op table of ``fn(*args, **kwargs)`` with measured per-op time (see the module docstring).

    Adds columns ``time_s`` (median over ``repeats`` profiled runs), ``time_min_s``,
    ``time_max_s``, ``achieved_flops`` (FLOP/s) and ``achieved_bw`` (bytes/s), and
    ``attrs['wall_s']``, the median wall time of the same runs. ``trace_file`` writes the last
    run's Chrome/Perfetto trace (JSON). ``fn`` must execute the same ops on every call.
    """
    from torch.profiler import ProfilerActivity, profile

    use_cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if use_cuda else [])
    for _ in range(warmup):
        trace(fn, *args, model=model, phase=phase, **kwargs)
    table, runs, walls = None, [], []
    for r in range(repeats):
        with profile(activities=activities, record_shapes=False) as prof:
            t0 = time.perf_counter()
            table = trace(fn, *args, model=model, phase=phase, **kwargs)
            synchronize("cuda" if use_cuda else "cpu")
            walls.append(time.perf_counter() - t0)
        work = table["op_class"] != "view"
        rows = table.loc[work, "op"].tolist()
        names = {_profiler_name(op) for op in rows}
        events = sorted((e for e in prof.events() if e.name in names), key=lambda e: e.time_range.start)
        runs.append(_join(rows, events, use_cuda))
        if trace_file and r == repeats - 1:
            prof.export_chrome_trace(trace_file)
    times = np.array(runs, dtype=float)  # repeats x (rows that do work)
    with warnings.catch_warnings():  # rows never matched are all-NaN: keep NaN, no warning
        warnings.simplefilter("ignore", RuntimeWarning)
        for col, reduce in (("time_s", np.nanmedian), ("time_min_s", np.nanmin), ("time_max_s", np.nanmax)):
            table[col] = 0.0
            table.loc[work, col] = reduce(times, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        table["achieved_flops"] = table["flops"] / table["time_s"]
        table["achieved_bw"] = optable.bytes_moved(table) / table["time_s"]
    table.attrs["unmatched"] = int(table["time_s"].isna().sum())
    table.attrs["wall_s"] = statistics.median(walls)
    table.attrs["method"] = (
        f"torch.profiler around the traced run, median of {repeats} runs after {warmup} warm-up; "
        "per-op time = the op's profiler event (kernel time incl. children), so tracer overhead "
        "between ops is excluded")
    return table
