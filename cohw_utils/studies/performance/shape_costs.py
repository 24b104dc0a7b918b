"""Chapter 4.1's costs as functions of shape: one decoder layer's prefill FLOPs as a formula in the
batch ``B`` and the prompt length ``T``, and how fast a cost function answers a sweep.

:func:`layer_formulas` builds the prefill cost function of a one-layer slice of a registry LLM
(:func:`~cohw_utils.studies.performance.opclasses.slice_config`: the real architecture, full
width, one decoder layer, on ``meta``) with :func:`~cohw_utils.spine.phase_costs.phase_cost_function`,
and reads the layer's rows (module ``model.layers.0.*``) as sympy polynomials
(:meth:`~cohw_utils.spine.costfn.CostFunction.formula`): every costed row, the contractions alone,
and the contractions' effective FLOPs (causal attention as a flash kernel computes it).

:func:`contraction_flops_by_hand` is the textbook count the formula is checked against, for a
Llama-style layer (grouped-query attention, gated MLP) under this package's rules (FLOPs = 2 x
MACs; attention scores and the weighted sum counted full, torch's convention):

``2 B T (2 d^2 + 2 d d_kv + 3 d f) + 4 B T^2 d``

with ``d`` the hidden size, ``d_kv`` = KV heads x head dim, ``f`` the MLP's intermediate size.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from cohw_utils.spine.costfn import CostFunction
from cohw_utils.spine.phase_costs import phase_cost_function
from cohw_utils.studies.performance.opclasses import slice_config

__all__ = ["LayerFormulas", "layer_formulas", "contraction_flops_by_hand", "sweep_rate"]

LAYER = "model.layers.0."


@dataclass
class LayerFormulas:
    """One layer's prefill costs as polynomials in ``B`` and ``T`` (sympy expressions)."""

    base: str
    config: dict[str, Any]
    cost_function: CostFunction
    flops: Any             # every costed row of the layer
    contraction: Any       # its GEMMs and attention (torch convention)
    contraction_effective: Any  # the same with causal attention as a flash kernel computes it
    other: Any             # normalization, element-wise and data-movement rows: flops - contraction
    bytes_moved: Any       # bytes read + written by the layer's rows (unfused)
    build_s: float

    @property
    def hand(self) -> Any:
        """:func:`contraction_flops_by_hand` of this config, as a sympy expression."""
        import sympy
        B, T = sympy.symbols("B T", positive=True, integer=True)
        return sympy.expand(contraction_flops_by_hand(B, T, **self.config))


def contraction_flops_by_hand(B, T, hidden: int, kv_dim: int, intermediate: int):
    """The textbook contraction FLOPs of one Llama-style layer's prefill (module docstring);
    ``B`` and ``T`` numbers or sympy symbols."""
    d, dkv, f = hidden, kv_dim, intermediate
    return 2 * B * T * (2 * d * d + 2 * d * dkv + 3 * d * f) + 4 * B * T ** 2 * d


def layer_formulas(base: str = "llama-2-7b", dtype: str = "fp16") -> LayerFormulas:
    """Build (or read from the disk cache) the prefill cost function of a one-layer slice of
    ``base`` and read its layer's formulas (module docstring)."""
    from cohw_utils import workloads

    path = slice_config(base)
    t0 = time.perf_counter()
    cf = phase_cost_function(str(path), "prefill", dtype)
    build_s = time.perf_counter() - t0
    cfg = workloads.load_hf_config(str(path))
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    config = {"hidden": cfg.hidden_size, "kv_dim": kv * head_dim, "intermediate": cfg.intermediate_size}

    def layer(t):
        return t["module"].str.startswith(LAYER)

    def contraction(t):
        return layer(t) & (t["op_class"] == "contraction")

    point = (1, 512)  # the general box (T >= 2; T = 1 takes another path through the mask code)
    flops = cf.formula("flops", point, rows=layer)
    con = cf.formula("flops", point, rows=contraction)
    moved = cf.formula("bytes_read", point, rows=layer) + cf.formula("bytes_written", point, rows=layer)
    return LayerFormulas(base, config, cf, flops, con, cf.formula("flops_effective", point, rows=contraction),
                         flops - con, moved, build_s)


def sweep_rate(cf: CostFunction, n: int = 10_000, repeats: int = 5, seed: int = 0) -> dict[str, float]:
    """Points per second of ``cf.totals`` over ``n`` random (batch, length) points inside its range
    (best of ``repeats``), beside the points it was built from."""
    rng = np.random.default_rng(seed)
    top = cf.variables[1].hi or 4096
    pts = np.column_stack([rng.integers(1, 65, n), rng.integers(2, top + 1, n)])
    best = min(_timed(lambda: cf.totals(pts)) for _ in range(repeats))
    return {"points": n, "best_s": best, "points_per_s": n / best, "traces": cf.meta.get("traces", 0),
            "repeats": repeats}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
