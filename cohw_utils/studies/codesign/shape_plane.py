"""Chapter 5's decode plane: at which batch a decode step could become compute-bound, at every
context, on each catalog chip, and whether that many sequences fit -- read from the phase's cost
function, not from a formula written for it.

A decode step's totals are exactly linear in the batch ``b`` inside a box of its cost function
(:func:`~cohw_utils.spine.phase_costs.phase_cost_function`: degree 1 in batch), at each context
``c``:

* FLOPs ``F(b) = a(c) + b f(c)`` and bytes ``M(b) = w(c) + b k(c)``: ``a`` and ``w`` what the step
  costs once (the weights read, the final norm), ``f`` and ``k`` what each sequence adds (its
  projections, its attention, its KV cache read). :func:`decode_lines` reads them from the exact
  totals in the box of large batches (from the last batch breakpoint on, at least batch 2: a
  mixture of experts touches every expert from ``ceil(E / k)`` sequences, batch 1 may take its own
  path). Linear exactly for a dense model; a mixture of experts' routing sort adds ``n log2 n``
  comparisons, a few FLOPs per sequence off the line (checked to 1e-6).
* **Per-sequence intensity** ``f / k``: the FLOPs per byte each added sequence brings. The step's
  intensity ``F / M`` tends to it as the batch grows. If it is below the chip's ridge point
  (peak FLOP/s / bandwidth), **no batch makes the step compute-bound**: every sequence brings its
  own KV bytes.
* **Crossover batch** (:func:`decode_plane`): otherwise, the smallest ``b`` with ``F(b) / P >=
  M(b) / B`` (peak ``P`` at the traced dtype, bandwidth ``B``; below the large-batch box by a scan
  of the exact totals, in it from the line): the whole step's FLOP time against
  its byte time, the ideal roofline of the step as one op (per-op rooflines bind earlier for the
  GEMMs and never for attention).
* **Fits**: the largest batch whose weights plus KV caches (``kv_bytes_at``: the cache the phase
  measured, sliding layers capped) fit the chip's memory, with no runtime reserve.

Used by Chapter 5 (section 5.4).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from cohw_utils.core.errors import CohwError
from cohw_utils.hardware import Hardware, get_hardware
from cohw_utils.spine.costfn import CostFunction
from cohw_utils.spine.phase_costs import kv_bytes_at, phase_cost_function

__all__ = ["decode_lines", "decode_plane"]


def decode_lines(cf: CostFunction, contexts: Iterable[int]) -> pd.DataFrame:
    """Per context: ``flops_fixed`` ``a``, ``flops_per_seq`` ``f``, ``bytes_fixed`` ``w``,
    ``bytes_per_seq`` ``k`` (exact integers), ``intensity_per_seq`` = f / k, and the KV cache of
    one sequence (module docstring). Raises if the cost function is not linear and exact there."""
    if cf.names != ("batch", "seq_len"):
        raise CohwError(f"decode_lines needs a (batch, seq_len) cost function, got {cf.names}")
    b0 = max((2, *cf.variables[0].breakpoints))  # the box of large batches starts here
    rows = []
    for c in contexts:
        pts = [(b0, int(c)), (b0 + 1, int(c)), (b0 + 5, int(c))]
        if not cf.exact_at(pts).all() or len(set(cf.box_index(pts))) != 1:
            raise CohwError(f"the cost function is not one exact box at batch {b0}..{b0 + 5}, context {c}: rebuild it")
        (f0, m0), (f1, m1), (f5, m5) = ((t["flops"], t["bytes_read"] + t["bytes_written"])
                                        for t in (cf.totals_exact(p) for p in pts))
        f, k = f1 - f0, m1 - m0
        a, w = f0 - b0 * f, m0 - b0 * k
        # exact for dense models; a mixture of experts' routing sort (n log2 n comparisons) puts
        # its FLOPs a few comparisons off the line
        if abs(f5 - (a + (b0 + 5) * f)) > 1e-6 * f5 or m5 != w + (b0 + 5) * k:
            raise CohwError(f"the step's totals are not linear in batch at context {c}")
        rows.append({"context": int(c), "from_batch": b0, "flops_fixed": int(a), "flops_per_seq": int(f),
                     "bytes_fixed": int(w), "bytes_per_seq": int(k), "intensity_per_seq": f / k,
                     "kv_bytes_per_seq": kv_bytes_at(cf, int(c) + 1) or 0})
    return pd.DataFrame(rows)


def decode_plane(models: Sequence[str], chips: Sequence[str | Hardware], contexts: Sequence[int],
                 dtype: str = "fp16") -> pd.DataFrame:
    """One row per (model, context, chip): the lines of :func:`decode_lines`, the chip's
    ``ridge`` (FLOP/byte at ``dtype``), ``crossover_batch`` (NaN: never compute-bound) and
    ``max_batch_fits`` (module docstring)."""
    hws = [h if isinstance(h, Hardware) else get_hardware(h) for h in chips]
    out = []
    for m in models:
        cf = phase_cost_function(m, "decode", dtype)
        lines = decode_lines(cf, contexts)
        weights = int(cf.meta["weight_bytes"])
        for hw in hws:
            peak, bw = hw.peak(dtype), hw.mem_bw
            for r in lines.itertuples(index=False):
                small = np.array([[b, r.context] for b in range(1, r.from_batch)], dtype=np.int64).reshape(-1, 2)
                tot = cf.totals(small, ("flops", "bytes_read", "bytes_written")) if len(small) else np.zeros((0, 3))
                early = np.flatnonzero(tot[:, 0] / peak >= (tot[:, 1] + tot[:, 2]) / bw)
                gain = r.flops_per_seq / peak - r.bytes_per_seq / bw  # seconds per added sequence
                need = r.bytes_fixed / bw - r.flops_fixed / peak
                if len(early):
                    cross = int(early[0]) + 1
                else:
                    cross = max(r.from_batch, math.ceil(need / gain)) if gain > 0 else np.nan
                fits = (math.floor((hw.mem_bytes - weights) / r.kv_bytes_per_seq)
                        if hw.mem_bytes and r.kv_bytes_per_seq and hw.mem_bytes > weights else 0)
                out.append({"model": m, **r._asdict(), "hardware": hw.name, "ridge": peak / bw,
                            "crossover_batch": cross, "max_batch_fits": fits,
                            "compute_bound_fits": bool(cross == cross and cross <= fits)})
    return pd.DataFrame(out)
