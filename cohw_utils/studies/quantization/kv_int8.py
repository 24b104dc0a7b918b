"""The int8 KV cache: keys and values stored as int8 with one fp16 scale per vector.

:class:`Int8KVLayer` (made by :func:`int8_kv_cache`) stores keys and values as symmetric int8
per (batch, head, token) vector over ``head_dim``, with one fp16 scale each (``amax / 127``,
rounded up to fp16 so nothing clips): ``head_dim + 2`` bytes per vector instead of
``2 * head_dim`` in fp16. Reads return the dequantized tensors, so attention sees the keys and
values as the cache stores them.

:func:`kv_format_bytes_per_token` is the bytes one token adds to the cache in each storage
format; the element bytes come from the package's one KV-cache function,
:func:`cohw_utils.workloads.kv_cache_bytes_per_token` (``2 * layers * kv_heads * head_dim``
elements), and int8 adds its 2-byte scale per vector; the int4 and fp8 formats of
:mod:`cohw_utils.studies.quantization.kv_quant` count their packed codes and metadata per vector.

Used by Chapter 4.2b (quantization): the KV-cache section and the scale-up table.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from cohw_utils.core.errors import CohwError
from cohw_utils.studies.quantization.schemes import fp16_round_up


def _dynamic_layer():
    from transformers.cache_utils import DynamicLayer

    return DynamicLayer


def _make_int8_layer_class():
    DynamicLayer = _dynamic_layer()

    class Int8KVLayer(DynamicLayer):
        """A KV-cache layer that stores keys and values as int8 with one fp16 scale per
        (batch, head, token) vector; reads return the dequantized tensors."""

        def lazy_initialization(self, key_states, value_states):
            super().lazy_initialization(key_states, value_states)
            self.dtype = key_states.dtype
            self.qk = self.qv = self.sk = self.sv = None

        @staticmethod
        def _q(t):
            amax = t.abs().amax(dim=-1, keepdim=True)
            s = fp16_round_up(torch.where(amax > 0, amax / 127, torch.ones_like(amax)).float())
            return torch.round(t.float() / s).clamp(-127, 127).to(torch.int8), s.half()

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            qk, sk = self._q(key_states)
            qv, sv = self._q(value_states)
            if self.qk is None:
                self.qk, self.sk, self.qv, self.sv = qk, sk, qv, sv
            else:
                self.qk = torch.cat([self.qk, qk], dim=-2)
                self.sk = torch.cat([self.sk, sk], dim=-2)
                self.qv = torch.cat([self.qv, qv], dim=-2)
                self.sv = torch.cat([self.sv, sv], dim=-2)
            self.keys = (self.qk.float() * self.sk.float()).to(self.dtype)
            self.values = (self.qv.float() * self.sv.float()).to(self.dtype)
            return self.keys, self.values

        def stored_bytes(self) -> int:
            if self.qk is None:
                return 0
            return sum(t.numel() * t.element_size() for t in (self.qk, self.sk, self.qv, self.sv))

    return Int8KVLayer


_INT8_LAYER = None


def int8_kv_cache(config) -> Any:
    """A transformers ``Cache`` whose layers store K and V in int8 (see :class:`Int8KVLayer`)."""
    global _INT8_LAYER
    from transformers.cache_utils import Cache

    if _INT8_LAYER is None:
        _INT8_LAYER = _make_int8_layer_class()
    return Cache(layers=[_INT8_LAYER() for _ in range(config.num_hidden_layers)])

#: Bytes per stored K or V element of each KV-cache format, and whether it adds a fp16 scale per vector.
KV_FORMATS = {"fp32": (4, False), "fp16": (2, False), "bf16": (2, False), "int8": (1, True)}


def kv_format_bytes_per_token(config, kv: str = "fp16") -> int:
    """KV-cache bytes one token adds in format ``kv``: ``2 * layers * kv_heads * (head_dim * b + s)``
    where ``fp32``: b=4, s=0; ``fp16``/``bf16``: b=2, s=0; ``int8``: b=1 plus a 2-byte fp16 scale
    per vector. The element bytes are :func:`cohw_utils.workloads.kv_cache_bytes_per_token`'s.
    ``int4``, ``int4-g32``, ``fp8-e4m3``: ``2 * layers * kv_heads * bytes_per_vector`` of
    :class:`cohw_utils.studies.quantization.kv_quant.KVFormat` (int4: ``head_dim / 2`` + 4 bytes per group)."""
    from cohw_utils.studies.quantization.kv_quant import KV_QUANT_FORMATS
    from cohw_utils.workloads import attention_geometry, kv_cache_bytes_per_token

    if kv in KV_QUANT_FORMATS and kv not in KV_FORMATS:
        layers, _, kv_heads, head_dim = attention_geometry(config)
        return math.ceil(2 * layers * kv_heads * KV_QUANT_FORMATS[kv].bytes_per_vector(head_dim))
    if kv not in KV_FORMATS:
        raise CohwError(f"unknown KV-cache format {kv!r}; use fp32, fp16, bf16, int8, "
                        f"{', '.join(k for k in KV_QUANT_FORMATS if k not in KV_FORMATS)}")
    b, scaled = KV_FORMATS[kv]
    out = kv_cache_bytes_per_token(config, b)
    if scaled:
        layers, _, kv_heads, _ = attention_geometry(config)
        out += 2 * layers * kv_heads * 2   # one fp16 scale per K and per V vector
    return out
