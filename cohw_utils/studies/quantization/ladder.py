"""The GEMV kernel ladder: one decode token through the same weights in every format and kernel.

:func:`gemv_ladder` times ``x`` of shape (1, k) through ``layers`` distinct ``(n, k)`` weights
in fp32 and bf16 (``F.linear``), int8 per-channel (int8pack and dequant), int4 g``group_size``
(int4pack and dequant) and GGUF ``Q4_0`` (int4pack), with
:func:`cohw_utils.spine.measure.time_callable` (median/min/max of ``repeats`` calls after
``warmup``). Units: ``bytes`` is the packed weight storage read per token (scales included),
times in ms, ``GB/s`` = bytes / median time / 1e9. :func:`fig_ladder` plots time against bytes
with the bandwidth bound ``time = bytes / mem_bw``.

Used by Chapter 4.2b (quantization), section 4.2b.4, and ``benchmarks/bench_quant.py``.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from cohw_utils.core.errors import CohwError
from cohw_utils.spine.measure import time_callable
from cohw_utils.studies.quantization.gguf_blocks import GGUF_BLOCK, gguf_quantize
from cohw_utils.studies.quantization.kernels import INT4PACK_GROUPS, QuantLinear
from cohw_utils.studies.quantization.schemes import quantize_rtn, scheme


def gemv_ladder(n: int, k: int, layers: int = 1, repeats: int = 10, warmup: int = 2, seed: int = 0,
                group_size: int = 128) -> pd.DataFrame:
    """Time one token (``x`` of shape (1, k)) through ``layers`` distinct ``(n, k)`` weights in
    each format and kernel: fp32 and bf16 ``F.linear``, int8 per-channel (int8pack, and
    dequantize-then-matmul), int4 g``group_size`` (int4pack, and dequant), Q4_0 (int4pack).

    ``bytes`` is the packed weight storage read per token; ``GB/s`` = bytes / median time.
    Several distinct weights (``layers``) keep a small format from being served from cache."""
    for name, v in (("n", n), ("k", k), ("layers", layers), ("repeats", repeats)):
        if not isinstance(v, int) or v < 1:
            raise CohwError(f"gemv_ladder: {name} must be a positive integer, got {v!r}")
    if k % group_size or k % GGUF_BLOCK or group_size not in INT4PACK_GROUPS:
        raise CohwError(f"gemv_ladder: k={k} must be a multiple of 32 and of group_size={group_size}, "
                        f"and group_size one of {INT4PACK_GROUPS}")
    gen = torch.Generator().manual_seed(seed)
    ws = [torch.randn(n, k, generator=gen) * 0.02 for _ in range(layers)]
    x = torch.randn(1, k, generator=gen)
    rows = []

    def add(fmt, kernel, mods, nbytes, xin):
        def fn():
            for m in mods:
                m(xin)
        with torch.no_grad():
            t = time_callable(fn, repeats=repeats, warmup=warmup)
        rows.append({"format": fmt, "kernel": kernel, "bytes": nbytes, "bits_per_weight": 8 * nbytes / (n * k * layers),
                     "median_ms": t.median * 1e3, "min_ms": t.min * 1e3, "max_ms": t.max * 1e3,
                     "GB/s": nbytes / t.median / 1e9, "timing": t})

    add("fp32", "F.linear", [lambda v, w=w: F.linear(v, w) for w in ws], 4 * n * k * layers, x)
    wb = [w.bfloat16() for w in ws]
    add("bf16", "F.linear", [lambda v, w=w: F.linear(v, w) for w in wb], 2 * n * k * layers, x.bfloat16())
    del wb
    q8 = [quantize_rtn(w, scheme(8)) for w in ws]
    add("int8 per-channel", "int8pack", [QuantLinear(q, kernel="int8pack") for q in q8], sum(q.nbytes for q in q8), x)
    add("int8 per-channel", "dequant", [QuantLinear(q, kernel="dequant") for q in q8], sum(q.nbytes for q in q8), x)
    del q8
    q4 = [quantize_rtn(w, scheme(4, group_size)) for w in ws]
    add(f"int4 g{group_size}", "int4pack", [QuantLinear(q, kernel="int4pack") for q in q4], sum(q.nbytes for q in q4), x)
    add(f"int4 g{group_size}", "dequant", [QuantLinear(q, kernel="dequant") for q in q4], sum(q.nbytes for q in q4), x)
    del q4
    g4 = [gguf_quantize(w, "Q4_0")[1] for w in ws]
    add("Q4_0", "int4pack", [QuantLinear(q, kernel="int4pack") for q in g4], sum(q.nbytes for q in g4), x)
    return pd.DataFrame(rows)


def fig_ladder(ladder: pd.DataFrame, mem_bw: float | None = None):
    """Time per token against weight bytes per token for each format/kernel of
    :func:`gemv_ladder` (log time axis, min..max as error bars), with the bandwidth bound
    ``time = bytes / mem_bw`` when ``mem_bw`` is given."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.2))
    ax = fig.add_subplot()
    markers = "osD^v<>ph"
    for i, (_, r) in enumerate(ladder.iterrows()):
        ax.errorbar(r["bytes"] / 1e6, r["median_ms"], yerr=[[r["median_ms"] - r["min_ms"]], [r["max_ms"] - r["median_ms"]]],
                    fmt=markers[i % len(markers)], capsize=3, label=f"{r['format']} ({r['kernel']})")
    if mem_bw:
        xs = np.linspace(ladder["bytes"].min() * 0.8, ladder["bytes"].max() * 1.05, 50)
        ax.plot(xs / 1e6, xs / mem_bw * 1e3, "k--", lw=1, label=f"bytes / {mem_bw / 1e9:.0f} GB/s (measured bandwidth)")
    ax.set_yscale("log")
    ax.set_xlabel("weight bytes read per token (MB)")
    ax.set_ylabel("time per token (ms, log scale)")
    ax.set_title("one token through the same weights in each format", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig
