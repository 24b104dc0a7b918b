"""CPU kernels that compute with a quantized weight: :class:`QuantLinear`.

Kernels for the speed measurement, on this CPU:

* ``int8pack`` = ``torch._weight_int8pack_mm`` (symmetric int8, per channel; fp32 activations
  and scales);
* ``int4pack`` = ``torch.ops.aten._weight_int4pack_mm_for_cpu`` on weights packed by
  ``_convert_weight_to_int4pack_for_cpu`` (4-bit codes, groups of 32/64/128/256; asymmetric via
  a float zero ``(8 - zero) * scale``, ``Q4_0`` via zero 0);
* ``dequant``: everything else; rebuild the fp32 weight from codes and scales every call, then
  ``F.linear``.

The ``dequant`` path keeps one code per byte (it is the reference, not a fast path), and the
CPU kernels hold their scales in fp32; the *byte accounting* (bytes, bits per weight) is always
the packed format of :mod:`cohw_utils.studies.quantization.schemes`. Every kernel computes the
dequantized linear ``x @ dequant(W)^T`` up to summation order (``tests/test_quant.py``).

Used by Chapter 4.2b (quantization): decode speed of each method and the kernel ladder.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cohw_utils.core.errors import CohwError
from cohw_utils.studies.quantization.schemes import QTensor

#: Group sizes the CPU int4 kernel accepts.
INT4PACK_GROUPS = (32, 64, 128, 256)


class QuantLinear(nn.Module):
    """A linear layer computing with a quantized weight on a CPU kernel.

    ``kernel``: ``'int8pack'``, ``'int4pack'``, ``'dequant'`` or ``'auto'`` (the fastest one the
    format allows: int8 per-channel symmetric -> int8pack; 4-bit with group 32/64/128/256 ->
    int4pack; else dequant). See the module docstring for what each kernel is."""

    def __init__(self, q: QTensor, bias: torch.Tensor | None = None, kernel: str = "auto"):
        super().__init__()
        n, k = q.shape
        self.in_features, self.out_features = k, n
        ok = {"dequant": True,
              "int8pack": q.scheme.bits == 8 and q.scheme.symmetric and q.group == k,
              "int4pack": q.scheme.bits == 4 and q.group in INT4PACK_GROUPS}
        if kernel == "auto":
            kernel = "int8pack" if ok["int8pack"] else "int4pack" if ok["int4pack"] else "dequant"
        if kernel not in ok:
            raise CohwError(f"unknown kernel {kernel!r}; use auto, int8pack, int4pack or dequant")
        if not ok[kernel]:
            raise CohwError(f"kernel {kernel} cannot run {q.scheme.name} (group {q.group}); use kernel='auto'")
        self.kernel = kernel
        self.q = q
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        if kernel == "int8pack":
            self.register_buffer("w_int8", q.codes.to(torch.int8).contiguous())
            self.register_buffer("w_scale", q.scale.view(n).float().contiguous())
        elif kernel == "int4pack":
            if q.zero is None:   # symmetric codes in [-8, 7] -> unsigned with zero 8
                u, zf = q.codes.to(torch.int32) + 8, torch.zeros_like(q.scale)
            else:                 # (u - z) s = (u - 8) s + (8 - z) s
                u, zf = q.codes.to(torch.int32), (8 - q.zero) * q.scale
            self.register_buffer("w_int4", torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), 1))
            self.register_buffer("w_sz", torch.stack([q.scale.T, zf.T], dim=-1).float().contiguous())
            self.group = q.group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.kernel == "int8pack":
            y = torch._weight_int8pack_mm(x2, self.w_int8, self.w_scale)
        elif self.kernel == "int4pack":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.w_int4, self.group, self.w_sz)
        else:
            y = F.linear(x2, self.q.dequantize(x.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    @property
    def weight(self) -> torch.Tensor:  # shape/numel for accounting code that expects a Linear
        return self.q.dequantize()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.q.fmt or self.q.scheme.name}, kernel={self.kernel}"
