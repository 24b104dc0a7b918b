"""KV-cache formats beyond int8 (int4, fp8), and an attention path that reads the int8 cache directly.

**Formats** (:data:`KV_QUANT_FORMATS`, :class:`KVFormat`; caches made by :func:`quant_kv_cache`):

* ``int4`` / ``int4-g32``: **asymmetric** 4-bit codes per (batch, head, token) vector, over the
  whole ``head_dim`` (``int4``) or over groups of 32 of its elements (``int4-g32``); each group
  stores a fp16 minimum ``lo`` (rounded *down* to fp16) and a fp16 scale ``(max - lo) / 15``
  (rounded *up*), codes ``round((x - lo) / scale)`` in [0, 15], so nothing clips and every
  element reads back within ``scale / 2``. Bytes: ``head_dim / 2`` (codes packed two per byte;
  held one per byte in memory here) + 4 per group.
* ``fp8-e4m3``: each vector rounded through ``torch.float8_e4m3fn`` after dividing by a fp16
  scale ``amax / 448`` (one per vector, rounded up): ``head_dim + 2`` bytes, like int8.
  (Serving engines often keep one scale per tensor instead; per vector avoids overflow without
  a calibration pass.)
* ``int8`` is :mod:`cohw_utils.studies.quantization.kv_int8`'s, listed here for the byte table.

Every layer quantizes on write (``update``) and returns the *dequantized* cache, so attention
sees keys and values as the cache stores them (the perplexity measurement; no speed claim).

**The fused int8 path** (:func:`int8_attention`): decode attention that consumes the int8 K/V
codes and their per-token scales without materialising a full-precision cache: for each tile
of ``tile`` tokens, ``scores = (q @ K_int8^T) * k_scale`` (the tile's codes converted to fp32 in
a tile-sized buffer: torch has no int8 x fp32 matmul on the CPU), then one softmax over all
scores, then ``out = sum_tiles (p * v_scale) @ V_int8``. :func:`int8_attention_int_mm` is the
integer variant: ``q`` quantized per row to int8 and ``q_int8 @ K_int8^T`` in int32 by
``torch._int_mm`` (per head; values as in the float path). Both equal the dequantized
reference (:func:`dequant_attention`) up to rounding (``tests/test_kv_quant.py``).
:func:`time_kv_attention` times the three, with an fp32 cache beside them, per context length.

Used by Chapter 4.2b (quantization): the KV-cache section.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import pandas as pd
import torch

from cohw_utils.core.errors import CohwError
from cohw_utils.core.timing import time_callable
from cohw_utils.studies.quantization.schemes import fp16_round_up


@dataclass(frozen=True)
class KVFormat:
    """A KV-cache storage format: ``kind`` (``int`` or ``fp8``), code ``bits``, ``group``
    (elements per scale; None = the whole vector), ``symmetric``, metadata bytes per group."""

    name: str
    kind: str
    bits: int
    group: int | None
    symmetric: bool
    meta_bytes: int   # fp16 scale (+ fp16 minimum when asymmetric) per group

    def groups(self, head_dim: int) -> int:
        g = self.group or head_dim
        if head_dim % g:
            raise CohwError(f"KV format {self.name}: group {g} does not divide head_dim {head_dim}")
        return head_dim // g

    def bytes_per_vector(self, head_dim: int) -> float:
        """Stored bytes of one (token, head) K or V vector: packed codes plus metadata."""
        return head_dim * self.bits / 8 + self.groups(head_dim) * self.meta_bytes

    # ------------------------------------------------------------------ quantize / dequantize
    def quantize(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Codes and metadata of ``t`` (..., head_dim), grouped along the last dimension."""
        *lead, d = t.shape
        x = t.float().reshape(*lead, self.groups(d), d // self.groups(d))
        if self.kind == "fp8":
            amax = x.abs().amax(dim=-1, keepdim=True)
            s = fp16_round_up(torch.where(amax > 0, amax / 448.0, torch.ones_like(amax)))
            return (x / s).to(torch.float8_e4m3fn), s.half()
        if self.symmetric:
            qmax = 2 ** (self.bits - 1) - 1
            amax = x.abs().amax(dim=-1, keepdim=True)
            s = fp16_round_up(torch.where(amax > 0, amax / qmax, torch.ones_like(amax)))
            return torch.round(x / s).clamp(-qmax, qmax).to(torch.int8), s.half()
        qmax = 2 ** self.bits - 1
        lo = -fp16_round_up(-x.amin(dim=-1, keepdim=True))          # fp16 value <= the minimum
        span = x.amax(dim=-1, keepdim=True) - lo
        s = fp16_round_up(torch.where(span > 0, span / qmax, torch.ones_like(span)))
        return torch.round((x - lo) / s).clamp(0, qmax).to(torch.uint8), s.half(), lo.half()

    def dequantize(self, parts: tuple[torch.Tensor, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes, s = parts[0], parts[1].float()
        x = codes.float() * s
        if len(parts) > 2:
            x = x + parts[2].float()
        return x.reshape(*codes.shape[:-2], -1).to(dtype)

    def stored_bytes(self, parts: tuple[torch.Tensor, ...]) -> int:
        """Bytes the format stores for ``parts`` (codes at ``bits`` each, metadata as held)."""
        codes = parts[0]
        return math.ceil(codes.numel() * self.bits / 8) + sum(p.numel() * p.element_size() for p in parts[1:])


#: The quantized KV-cache formats by name (see the module docstring).
KV_QUANT_FORMATS: dict[str, KVFormat] = {
    "int8": KVFormat("int8", "int", 8, None, True, 2),
    "int4": KVFormat("int4", "int", 4, None, False, 4),
    "int4-g32": KVFormat("int4-g32", "int", 4, 32, False, 4),
    "fp8-e4m3": KVFormat("fp8-e4m3", "fp8", 8, None, True, 2),
}


def kv_quant_format(name: str) -> KVFormat:
    if name not in KV_QUANT_FORMATS:
        raise CohwError(f"unknown quantized KV format {name!r}; use one of {', '.join(KV_QUANT_FORMATS)}")
    return KV_QUANT_FORMATS[name]


def _make_layer_class():
    from transformers.cache_utils import DynamicLayer

    class QuantKVLayer(DynamicLayer):
        """A KV-cache layer that stores K and V in a :class:`KVFormat` (set as ``fmt``);
        reads return the dequantized tensors."""

        fmt: KVFormat

        def lazy_initialization(self, key_states, value_states):
            super().lazy_initialization(key_states, value_states)
            self.dtype = key_states.dtype
            self.pk = self.pv = None

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            pk, pv = self.fmt.quantize(key_states), self.fmt.quantize(value_states)
            if self.pk is None:
                self.pk, self.pv = pk, pv
            else:   # tokens are dim -3 of (batch, heads, tokens, groups, group)
                self.pk = tuple(torch.cat([a, b], dim=-3) for a, b in zip(self.pk, pk))
                self.pv = tuple(torch.cat([a, b], dim=-3) for a, b in zip(self.pv, pv))
            self.keys = self.fmt.dequantize(self.pk, self.dtype)
            self.values = self.fmt.dequantize(self.pv, self.dtype)
            return self.keys, self.values

        def stored_bytes(self) -> int:
            if self.pk is None:
                return 0
            return self.fmt.stored_bytes(self.pk) + self.fmt.stored_bytes(self.pv)

    return QuantKVLayer


_LAYER = None


def quant_kv_cache(config, fmt: str) -> Any:
    """A transformers ``Cache`` whose layers store K and V in ``fmt`` (a :data:`KV_QUANT_FORMATS` name)."""
    global _LAYER
    from transformers.cache_utils import Cache

    f = kv_quant_format(fmt)
    if _LAYER is None:
        _LAYER = _make_layer_class()
    layers = []
    for _ in range(config.num_hidden_layers):
        layer = _LAYER()
        layer.fmt = f
        layers.append(layer)
    return Cache(layers=layers)


# ------------------------------------------------------------------------------------ int8 attention
def quantize_int8_vectors(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per vector (last dim) with a fp16 scale ``amax / 127`` rounded up: what
    :class:`~cohw_utils.studies.quantization.kv_int8.int8_kv_cache` stores. (codes, scale (..., 1))."""
    amax = t.abs().amax(dim=-1, keepdim=True)
    s = fp16_round_up(torch.where(amax > 0, amax / 127, torch.ones_like(amax)).float())
    return torch.round(t.float() / s).clamp(-127, 127).to(torch.int8), s.half()


def dequant_attention(q, qk, sk, qv, sv) -> torch.Tensor:
    """The reference: dequantize the whole cache to fp32, then ``softmax(q K^T / sqrt(d)) V``.
    ``q`` (B, H, Tq, D) fp32; ``qk``/``qv`` (B, H, T, D) int8; ``sk``/``sv`` (B, H, T, 1) fp16.
    No causal mask: every query sees the whole cache (decode)."""
    k = qk.float() * sk.float()
    v = qv.float() * sv.float()
    return fp32_attention(q, k, v)


def fp32_attention(q, k, v) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` on an fp32 cache, written as the other paths are (two matmuls)."""
    p = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]), dim=-1)
    return p @ v


def int8_attention(q, qk, sk, qv, sv, tile: int = 256) -> torch.Tensor:
    """Attention on the int8 cache without a full-precision copy (see the module docstring):
    per tile of ``tile`` tokens, ``(q @ K_tile^T) * k_scale`` and later ``(p * v_scale) @ V_tile``,
    each tile's codes converted to fp32 in a tile-sized buffer. Same shapes as :func:`dequant_attention`."""
    if tile < 1:
        raise CohwError(f"tile must be a positive number of tokens, got {tile}")
    T = qk.shape[-2]
    inv = 1.0 / math.sqrt(q.shape[-1])
    skf, svf = sk.float().transpose(-1, -2), sv.float().transpose(-1, -2)   # (B, H, 1, T)
    scores = torch.empty(*q.shape[:-1], T, dtype=torch.float32)
    for a in range(0, T, tile):
        b = min(T, a + tile)
        torch.matmul(q, qk[..., a:b, :].float().transpose(-1, -2), out=scores[..., a:b])
    scores.mul_(skf).mul_(inv)
    p = torch.softmax(scores, dim=-1).mul_(svf)
    out = torch.zeros(*q.shape, dtype=torch.float32)
    for a in range(0, T, tile):
        b = min(T, a + tile)
        out.add_(p[..., a:b] @ qv[..., a:b, :].float())
    return out


def int8_attention_int_mm(q, qk, sk, qv, sv, tile: int = 256) -> torch.Tensor:
    """As :func:`int8_attention`, but the scores in integer arithmetic: each query row quantized
    to int8 (scale ``amax / 127``), ``q_int8 @ K_int8^T`` accumulated in int32 by ``torch._int_mm``
    (one call per batch and head; the K codes read through a transposed view), then scaled by
    ``q_scale * k_scale``; the value product as in :func:`int8_attention`. Exact up to the
    rounding of ``q`` to int8."""
    B, H, Tq, D = q.shape
    qq, sq = quantize_int8_vectors(q)
    scores = torch.empty(B, H, Tq, qk.shape[-2], dtype=torch.float32)
    for b in range(B):
        for h in range(H):
            scores[b, h] = torch._int_mm(qq[b, h], qk[b, h].t()).float()
    scores.mul_(sq.float()).mul_(sk.float().transpose(-1, -2)).mul_(1.0 / math.sqrt(D))
    p = torch.softmax(scores, dim=-1).mul_(sv.float().transpose(-1, -2))
    out = torch.zeros(B, H, Tq, D, dtype=torch.float32)
    T = qk.shape[-2]
    for a in range(0, T, tile):
        e = min(T, a + tile)
        out.add_(p[..., a:e] @ qv[..., a:e, :].float())
    return out


def time_kv_attention(contexts: Iterable[int], heads: int = 32, head_dim: int = 128, batch: int = 1,
                      repeats: int = 7, warmup: int = 2, tile: int = 256, seed: int = 0,
                      threads: int | None = 1) -> pd.DataFrame:
    """Decode attention (one query token) of one layer against a cache of each context length,
    four ways: ``fp32 cache``, ``int8, dequantize all`` (:func:`dequant_attention`, what the int8
    cache layer does), ``int8, fused tiles`` (:func:`int8_attention`) and ``int8, int_mm scores``
    (:func:`int8_attention_int_mm`). Random N(0, 1) keys, values and query, seeded. ``threads``:
    torch's intra-op threads while timing (restored afterwards; None = leave as is). One thread
    by default: one layer's decode attention is small, and on a shared machine a descheduled
    worker thread stalls every parallel op, which punishes the paths made of many small ops. Columns:
    context, path, cache_MB (bytes of K and V as stored, 1e6), median_ms, min_ms, max_ms,
    vs_fp32 (median / the fp32 path's median), max_abs_err (against the dequantized reference),
    threads, timing (:meth:`~cohw_utils.core.timing.Timing.describe`)."""
    old_threads = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise CohwError(f"threads must be a positive count or None, got {threads}")
        torch.set_num_threads(threads)
    try:
        return _time_paths(list(contexts), heads, head_dim, batch, repeats, warmup, tile, seed)
    finally:
        torch.set_num_threads(old_threads)


def _time_paths(contexts, heads, head_dim, batch, repeats, warmup, tile, seed) -> pd.DataFrame:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for T in contexts:
        if T < 1:
            raise CohwError(f"context lengths must be positive token counts, got {T}")
        k = torch.randn(batch, heads, T, head_dim, generator=g)
        v = torch.randn(batch, heads, T, head_dim, generator=g)
        q = torch.randn(batch, heads, 1, head_dim, generator=g)
        qk, sk = quantize_int8_vectors(k)
        qv, sv = quantize_int8_vectors(v)
        ref = dequant_attention(q, qk, sk, qv, sv)
        int8_mb = (qk.numel() + qv.numel() + 2 * (sk.numel() + sv.numel())) / 1e6
        paths = [("fp32 cache", lambda: fp32_attention(q, k, v), 8 * k.numel() / 1e6),
                 ("int8, dequantize all", lambda: dequant_attention(q, qk, sk, qv, sv), int8_mb),
                 ("int8, fused tiles", lambda: int8_attention(q, qk, sk, qv, sv, tile), int8_mb),
                 ("int8, int_mm scores", lambda: int8_attention_int_mm(q, qk, sk, qv, sv, tile), int8_mb)]
        base = None
        for name, fn, mb in paths:
            err = float((fn() - ref).abs().max())
            t = time_callable(fn, repeats=repeats, warmup=warmup)
            base = t.median if base is None else base
            rows.append({"context": T, "path": name, "cache_MB": mb, "median_ms": 1e3 * t.median,
                         "min_ms": 1e3 * t.min, "max_ms": 1e3 * t.max, "vs_fp32": t.median / base,
                         "max_abs_err": err, "threads": torch.get_num_threads(), "timing": t.describe("ms")})
    return pd.DataFrame(rows)
