"""Matrix-unit throughput per dtype: achieved GEMM rate against shape, and utilization.

One GEMM ``(M x K) @ (K x N)`` counts ``2*M*K*N`` operations (FLOPs, or integer ops for
int8). Per dtype the call is:

* ``fp32``, ``bf16``, ``fp16``: ``torch.matmul(a, b, out=c)`` in that dtype (on CPU, bf16 uses
  the AVX512-BF16 dot-product instructions where the CPU has them; fp16 has no native
  arithmetic on most x86 CPUs and is converted).
* ``tf32`` (CUDA only): fp32 inputs with ``torch.backends.cuda.matmul.allow_tf32 = True``.
* ``int8``: ``torch._int_mm(a, b)`` (int8 x int8 -> int32), where this torch has it.
* ``fp8`` (CUDA only, where ``torch._scaled_mm`` accepts ``float8_e4m3fn``): unit scales.

Each (dtype, shape) is timed with :func:`cohw_utils.spine.measure.time_callable` (CUDA-synchronised
on a GPU); ``rate`` is the best call, ``rate_median`` the median. **Utilization** = rate /
peak, with the peak of the same dtype: on this CPU the probe's measured peaks (fp32, bf16;
:mod:`cohw_utils.hardware.probe`), on a GPU the dense spec-sheet peak of the matching row of
``hardware.csv``. A dtype with no peak gets NaN, never a borrowed figure. A dtype the device
cannot run is reported with the reason (column ``skipped``), not dropped.

Shapes (:func:`default_shapes`) are squares and the GEMMs of an LLM layer: M = 1 (decode,
batch 1: a matrix-vector product, bandwidth-bound), M = 16, and M = 512 (prefill) against a
4096 x 4096 weight. :func:`gpu_matmul_capture` reads what ``benchmarks/capture_gpu_matmul.py``
recorded on a CUDA machine (``data/gpu/matmul.json``), or returns None when there is none.

Used by Chapter 4.3 (specialized hardware: matrix units).
"""
from __future__ import annotations

import datetime as dt
import json
import platform
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cohw_utils.core.errors import CohwError
from cohw_utils.spine.measure import time_callable
from cohw_utils.core.data import DATA_DIR, load_gpu_capture

DATA = DATA_DIR
DTYPES = ("fp32", "tf32", "bf16", "fp16", "int8", "fp8")


def default_shapes(smoke: bool = False) -> list[tuple[str, int, int, int]]:
    """(label, M, K, N): squares, then LLM-layer GEMMs against a 4096 x 4096 weight."""
    squares = (256, 512, 1024) if smoke else (256, 512, 1024, 2048, 4096)
    llm = (1, 16, 512) if smoke else (1, 16, 128, 512, 2048)
    return ([(f"square {n}", n, n, n) for n in squares]
            + [(f"LLM M={m}", m, 4096, 4096) for m in llm])


def _call(dtype: str, M: int, K: int, N: int, device: torch.device):
    """A zero-argument callable doing one GEMM in ``dtype``, or raise RuntimeError why not."""
    g = torch.Generator(device="cpu").manual_seed(0)
    if dtype in ("fp32", "tf32", "bf16", "fp16"):
        if dtype == "tf32" and device.type != "cuda":
            raise RuntimeError("TF32 is a tensor-core format of NVIDIA GPUs; this device has none")
        tdt = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        a = torch.randn(M, K, generator=g).to(device=device, dtype=tdt)
        b = torch.randn(K, N, generator=g).to(device=device, dtype=tdt)
        c = torch.empty(M, N, device=device, dtype=tdt)
        if device.type == "cuda":
            allow = dtype == "tf32"

            def run():
                torch.backends.cuda.matmul.allow_tf32 = allow
                torch.matmul(a, b, out=c)
            return run
        return lambda: torch.matmul(a, b, out=c)
    if dtype == "int8":
        if not hasattr(torch, "_int_mm"):
            raise RuntimeError("this torch has no torch._int_mm")
        a = torch.randint(-128, 128, (M, K), generator=g, dtype=torch.int8).to(device)
        b = torch.randint(-128, 128, (K, N), generator=g, dtype=torch.int8).to(device)
        torch._int_mm(a, b)  # raises if the shape or device is unsupported
        return lambda: torch._int_mm(a, b)
    if dtype == "fp8":
        if device.type != "cuda" or not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
            raise RuntimeError("fp8 GEMM needs CUDA and torch._scaled_mm with float8_e4m3fn")
        a = torch.randn(M, K, generator=g).to(device).to(torch.float8_e4m3fn)
        b = torch.randn(N, K, generator=g).to(device).to(torch.float8_e4m3fn).t()
        one = torch.tensor(1.0, device=device)
        torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        return lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    raise CohwError(f"unknown dtype '{dtype}'; use one of: {', '.join(DTYPES)}")


def sweep_dtypes(dtypes=("fp32", "bf16", "fp16", "int8"), shapes=None, peaks: dict[str, float] | None = None,
          device: str | torch.device = "cpu", repeats: int = 5, warmup: int = 2,
          max_seconds_per_call: float = 5.0) -> pd.DataFrame:
    """Time every (dtype, shape); one row each: dtype, shape, M, K, N, ops, best_s, median_s,
    rate (best, op/s), rate_median, peak, utilization, skipped (reason or empty).

    ``peaks`` maps dtype to peak op/s (missing -> NaN utilization). Time budget: a shape
    whose estimated call time (its ops at the rate this dtype reached on the shape measured
    just before it) exceeds ``max_seconds_per_call`` is skipped, saying so (fp16 GEMMs on a CPU
    without fp16 arithmetic run at about 1 GFLOP/s); one whose first call took longer than
    that is timed once."""
    import time

    dev = torch.device(device)
    peaks = peaks or {}
    shapes = shapes or default_shapes()
    for d in dtypes:
        if d not in DTYPES:
            raise CohwError(f"unknown dtype '{d}'; use one of: {', '.join(DTYPES)}")
    rows = []
    for d in dtypes:
        last_rate = 0.0
        for label, M, K, N in shapes:
            row = {"dtype": d, "shape": label, "M": M, "K": K, "N": N, "ops": 2.0 * M * K * N,
                   "best_s": np.nan, "median_s": np.nan, "rate": np.nan, "rate_median": np.nan,
                   "peak": peaks.get(d, np.nan), "utilization": np.nan, "skipped": ""}
            if last_rate and row["ops"] / last_rate > max_seconds_per_call:
                row["skipped"] = (f"estimated {row['ops'] / last_rate:.0f} s per call at the {d} rate of the "
                                  f"previous shape ({last_rate / 1e9:.2g} G/s) exceeds the {max_seconds_per_call:g} s budget")
                rows.append(row)
                continue
            try:
                call = _call(d, M, K, N, dev)
                t0 = time.perf_counter()
                call()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                slow = time.perf_counter() - t0 > max_seconds_per_call
                t = time_callable(call, repeats=1 if slow else repeats, warmup=0 if slow else warmup,
                                  device=str(dev))
            except (RuntimeError, TypeError, NotImplementedError) as err:
                row["skipped"] = str(err).splitlines()[0][:160]
                rows.append(row)
                continue
            row.update(best_s=t.min, median_s=t.median, rate=row["ops"] / t.min,
                       rate_median=row["ops"] / t.median)
            last_rate = row["rate"]
            row["utilization"] = row["rate"] / row["peak"] if row["peak"] == row["peak"] else np.nan
            rows.append(row)
    df = pd.DataFrame(rows)
    df.attrs["device"] = device_name(dev)
    df.attrs["method"] = (f"best and median of {repeats} calls after {warmup} warm-up "
                          "(cohw_utils.spine.measure.time_callable); ops = 2*M*K*N")
    return df


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from cohw_utils.hardware.probe import cpu_model

    return f"{cpu_model()} ({torch.get_num_threads()} torch threads)"


def capture_record(df: pd.DataFrame, device: torch.device) -> dict:
    """The JSON record ``benchmarks/capture_gpu_matmul.py`` writes: device, versions, date,
    method and the rows."""
    rec = {"device": device_name(device), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "python": platform.python_version(),
           "cuda": torch.version.cuda if device.type == "cuda" else None,
           "method": df.attrs.get("method", ""),
           "rows": json.loads(df.to_json(orient="records"))}
    if device.type == "cuda":
        rec["driver_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return rec


def gpu_matmul_capture(path: str | Path | None = None) -> pd.DataFrame | None:
    """The GPU capture of ``benchmarks/capture_gpu_matmul.py`` as a DataFrame (``attrs``: device,
    date, versions), or None if it has not been captured (read by
    :func:`cohw_utils.core.data.load_gpu_capture`)."""
    rec = load_gpu_capture("matmul", path)
    if rec is None:
        return None
    if "rows" not in rec:
        raise CohwError("matmul.json has no 'rows'; re-run benchmarks/capture_gpu_matmul.py")
    df = pd.DataFrame(rec["rows"])
    df.attrs.update({k: v for k, v in rec.items() if k != "rows"})
    return df


def pivot(df: pd.DataFrame, value: str = "rate") -> pd.DataFrame:
    """Shapes x dtypes table of ``value`` (rate in op/s, or utilization)."""
    order = list(dict.fromkeys(df["shape"]))
    t = df.pivot_table(index="shape", columns="dtype", values=value, aggfunc="first")
    return t.reindex(order)[[d for d in DTYPES if d in t.columns]]


def fig_matmul_dtypes(df: pd.DataFrame, gpu: pd.DataFrame | None = None):
    """Achieved TFLOP/s (TOPS for int8) per shape and dtype; the GPU capture beside it if given."""
    import matplotlib.pyplot as plt

    panels = [(df, df.attrs.get("device", "this machine"))] + ([(gpu, gpu.attrs.get("device", "GPU"))] if gpu is not None else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4), squeeze=False)
    for ax, (d, title) in zip(axes[0], panels):
        t = pivot(d, "rate") / 1e12
        x = np.arange(len(t.index))
        w = 0.8 / max(1, len(t.columns))
        for i, col in enumerate(t.columns):
            ax.bar(x + i * w, t[col], w, label=col)
        ax.set_xticks(x + 0.4 - w / 2, t.index, rotation=35, ha="right", fontsize=8)
        ax.set(yscale="log", ylabel="TFLOP/s (TOPS for int8), best call")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return fig
