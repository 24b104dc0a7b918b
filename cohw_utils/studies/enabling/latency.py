"""Latency of a converted phase: eager PyTorch vs ``torch.compile`` vs onnxruntime, and its tables.

:func:`latency` times one :class:`~cohw_utils.studies.enabling.export.Conversion` on each backend
through :func:`cohw_utils.spine.measure.time_callable`, with fresh inputs before every call
(untimed). Compilation is timed separately as the first call's wall time (``prepare_s``), with a
fresh inductor cache and ``torch._dynamo.reset()`` so that nothing carries over from an earlier
run; for onnxruntime ``prepare_s`` is export + conversion + session creation. Times are in
milliseconds (``*_ms``), one-off costs in seconds (``prepare_s``).

:func:`latency_frame` and :func:`latency_pivot` turn the rows into the chapter's tables: one row
per call, then one row per phase with a column per backend and statistic.

Used by Chapter 3 (SW enabling), section "latency", and ``benchmarks/capture_gpu_enabling.py``.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Iterable

import pandas as pd
import torch

from cohw_utils.core.errors import CohwError
from cohw_utils.spine.measure import Timing, time_callable
from cohw_utils.studies.enabling.export import Conversion, _feeds, _quiet
from cohw_utils.studies.enabling.failures import Failure, classify_failure
from cohw_utils.studies.enabling.flatten import _interface, flatten

__all__ = ["BACKENDS", "latency", "latency_table", "latency_frame", "latency_pivot"]

#: The backends :func:`latency` knows, in the order tables list them.
BACKENDS = ("eager", "compile", "onnxruntime")


@contextlib.contextmanager
def _cold_compile():
    """Compile from scratch: reset dynamo and point inductor at an empty cache for the duration,
    so that a second run of the chapter (CI runs it twice) does not reuse compiled code."""
    from torch._inductor.utils import fresh_cache

    torch._dynamo.reset()
    try:
        with _quiet(), fresh_cache():
            yield
    finally:
        torch._dynamo.reset()


def latency(conv: Conversion, backends: Iterable[str] = ("eager", "compile", "onnxruntime"),
            repeats: int = 10, warmup: int = 2, device: str = "cpu") -> list[dict]:
    """Time one converted phase on each backend (rows for :func:`latency_table`).

    Inputs are made afresh before every call, untimed (``setup``). ``prepare_s`` is the one-off
    cost before the first timed call: for ``compile`` the first call's wall time (dynamo capture
    + inductor codegen + C++ build + one run), for ``onnxruntime`` export + conversion + session
    creation. A backend that fails records its failure class and key line instead of a time.
    """
    if conv.phase_obj is None:
        raise CohwError(f"{conv.workload}:{conv.phase} was not built ({conv.status}); convert it first")
    ph = conv.phase_obj
    rows = []
    state: dict[str, Any] = {}

    def torch_setup():
        state["in"] = ph.make_inputs()

    def row(backend, timing: Timing | None, prepare: float, failure: Failure | None = None) -> dict:
        r = {"workload": conv.workload, "phase": conv.phase, "dtype": conv.dtype, "fix": conv.fix, "backend": backend,
             "device": device, "median_ms": math.nan, "min_ms": math.nan, "max_ms": math.nan,
             "iqr_ms": math.nan, "repeats": 0, "prepare_s": prepare, "method": "", "error": ""}
        if timing is not None:
            r.update(median_ms=timing.median * 1e3, min_ms=timing.min * 1e3, max_ms=timing.max * 1e3,
                     iqr_ms=timing.iqr * 1e3, repeats=timing.repeats, method=timing.method)
        if failure is not None:
            r["error"] = f"{failure.klass}: {failure.key_line}"
        return r

    for backend in backends:
        if backend == "eager":
            fn = ph.run
            t = time_callable(lambda: fn(*state["in"][0], **state["in"][1]), repeats, warmup, device, torch_setup)
            rows.append(row("eager", t, 0.0))
        elif backend == "compile":
            try:
                with _cold_compile():
                    cfn = torch.compile(ph.run)
                    torch_setup()
                    t0 = time.perf_counter()
                    cfn(*state["in"][0], **state["in"][1])
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    first = time.perf_counter() - t0
                    t = time_callable(lambda: cfn(*state["in"][0], **state["in"][1]), repeats, warmup,
                                      device, torch_setup)
                rows.append(row("compile", t, first))
            except Exception as e:  # noqa: BLE001
                rows.append(row("compile", None, math.nan, classify_failure(e, "torch.compile")))
        elif backend == "onnxruntime":
            if conv.session is None:
                rows.append(row("onnxruntime", None, math.nan, conv.failure))
                continue
            sess = conv.session

            def ort_setup():
                args, kwargs = ph.make_inputs()
                state["feeds"] = _feeds(sess, _interface(flatten((args, kwargs))[0]))

            t = time_callable(lambda: sess.run(None, state["feeds"]), repeats, warmup, "cpu", ort_setup)
            rows.append(row("onnxruntime", t, conv.export_s + conv.onnx_s + conv.session_s))
        else:
            raise CohwError(f"unknown backend '{backend}'; use eager, compile or onnxruntime")
    return rows


def latency_table(convs: Iterable[Conversion], backends: Iterable[str] = ("eager", "compile", "onnxruntime"),
                  repeats: int = 10, warmup: int = 2, device: str = "cpu") -> pd.DataFrame:
    """:func:`latency` for every conversion that ran, with ``vs_eager`` = eager median / median."""
    rows = []
    for c in convs:
        if c.phase_obj is not None and c.status in ("ok", "mismatch"):
            rows += latency(c, backends, repeats, warmup, device)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    eager = df[df.backend == "eager"].set_index(["workload", "phase", "dtype"])["median_ms"]
    key = list(zip(df.workload, df.phase, df.dtype))
    df["vs_eager"] = [eager.get(k, math.nan) / m if m == m and m > 0 else math.nan
                      for k, m in zip(key, df.median_ms)]
    return df


def latency_frame(rows: Iterable[dict]) -> pd.DataFrame:
    """:func:`latency` rows as a DataFrame, one row per (conversion, backend), with the phase of a
    conversion fixed by decomposition (its ``fix`` starts with ``"decompose"``) labelled
    ``"<phase> (decomposed)"`` so that it stands apart from the unfixed phase."""
    lat = pd.DataFrame(list(rows))
    lat["phase"] = lat["phase"].where(~lat["fix"].str.startswith("decompose"), lat["phase"] + " (decomposed)")
    return lat


def latency_pivot(lat: pd.DataFrame) -> pd.DataFrame:
    """One row per (workload, phase) of a :func:`latency_frame`, in its order, and a column per
    backend and statistic: ``"<backend> median ms"``, ``"<backend> iqr ms"``,
    ``"<backend> prepare s"``, backends in the order eager, compile, onnxruntime (NaN where a
    phase was not timed on a backend)."""
    wide = lat.pivot_table(index=["workload", "phase"], columns="backend",
                           values=["median_ms", "iqr_ms", "prepare_s"], sort=False)
    wide.columns = [f"{b} {v.removesuffix('_ms').removesuffix('_s')}" + (" ms" if v.endswith("_ms") else " s")
                    for v, b in wide.columns]
    order = [c for b in BACKENDS for c in wide.columns if c.startswith(b)]
    return wide[order]
