"""Weight formats and round-to-nearest: :class:`Scheme`, :class:`QTensor`, the grid, encode/decode.

Formats (a :class:`Scheme`; every scale is stored as **fp16**, as GPTQ, AWQ and GGUF store them)
--------------------------------------------------------------------------------------------------
* **Symmetric** ``b``-bit (``int8`` by default): ``w ~ code * scale`` with signed codes in
  ``[-(2^(b-1)-1), 2^(b-1)-1]`` and ``scale = amax / (2^(b-1)-1)`` over the group. No zero point.
* **Asymmetric** ``b``-bit (``int4`` by default): ``w ~ (code - zero) * scale`` with unsigned codes
  in ``[0, 2^b-1]``, ``scale = (hi - lo) / (2^b - 1)`` where ``lo = min(min w, 0)`` and
  ``hi = max(max w, 0)`` (the range always holds 0, as in GPTQ's quantizer), and an integer zero
  point ``round(-lo / scale)`` stored in ``b`` bits.
* **Groups**: ``group_size=None`` is *per output channel* (one scale per row of the ``(out, in)``
  weight); ``group_size=g`` gives each run of ``g`` consecutive input columns of a row its own
  scale (and zero).
* **Rounding and error bound**: codes are ``round-half-to-even(w / scale)`` (plus the zero
  point), clamped to the code range. The fp16 scale is rounded *up* from the exact one, so the
  range always covers the group and no weight is clipped: every dequantized weight is within
  ``scale / 2`` of the original (``tests/test_quant.py`` pins it).
* GGUF's ``Q8_0``/``Q4_0`` blocks map exactly onto symmetric groups of 32
  (:mod:`cohw_utils.studies.quantization.gguf_blocks`), so the same :class:`QTensor` holds them.

Units: bits per weight **include the scales and zero points**:
``bits + (16 + zero_bits) / group`` where ``group`` is ``g`` or the row length, ``zero_bits`` is
``bits`` (asymmetric) or 0. E.g. int4 g128 asymmetric 4.156, int8 per-channel on a 4096-wide
row 8.004, ``Q4_0`` 4.5, ``Q8_0`` 8.5. :meth:`QTensor.nbytes` is the packed storage in bytes:
codes at ``bits`` each, scales at 2 bytes, zeros at ``zero_bits``.

Used by Chapter 4.2b (quantization), and by every other quantization module here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cohw_utils.core.errors import CohwError


# ------------------------------------------------------------------------------------ schemes
@dataclass(frozen=True)
class Scheme:
    """A weight format: ``bits``, ``group_size`` (None = per output channel), ``symmetric``;
    ``scale_bits`` 16 (fp16 scales, the default) or 32 (exact fp32 scales, for tests)."""

    bits: int
    group_size: int | None = None
    symmetric: bool = False
    scale_bits: int = 16

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise CohwError(f"bits must be an integer from 2 to 8, got {self.bits!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise CohwError(f"group_size must be a positive integer or None (per channel), got {self.group_size!r}")
        if self.scale_bits not in (16, 32):
            raise CohwError(f"scale_bits must be 16 (fp16) or 32 (fp32), got {self.scale_bits!r}")

    @property
    def zero_bits(self) -> int:
        return 0 if self.symmetric else self.bits

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1

    def group(self, in_features: int) -> int:
        g = self.group_size or in_features
        if in_features % g:
            raise CohwError(f"group size {g} does not divide the row length {in_features}; "
                            "pick a group size that divides the layer's input features")
        return g

    def bits_per_weight(self, in_features: int) -> float:
        """Storage bits per weight including scales (and zeros) for rows of ``in_features``."""
        return self.bits + (self.scale_bits + self.zero_bits) / self.group(in_features)

    @property
    def name(self) -> str:
        g = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"int{self.bits}-{g}-{'sym' if self.symmetric else 'asym'}"


def scheme(bits: int, group_size: int | None = None, symmetric: bool | None = None) -> Scheme:
    """The book's defaults: int8 symmetric, int4 (and below) asymmetric."""
    return Scheme(bits, group_size, bits == 8 if symmetric is None else symmetric)


def fp16_round_up(s: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 value >= s (so a stored fp16 scale never clips the range)."""
    h = s.to(torch.float16)
    h = torch.where(h.float() < s, torch.nextafter(h, torch.full_like(h, math.inf)), h)
    return h.to(s.dtype)


def grid(w: torch.Tensor, sch: Scheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) of each row of ``w`` (rows x columns of one group): shapes (rows,)."""
    if sch.symmetric:
        amax = w.abs().amax(dim=1)
        scale = torch.where(amax > 0, amax / sch.qmax, torch.ones_like(amax))
        return (fp16_round_up(scale) if sch.scale_bits == 16 else scale), None
    lo = w.amin(dim=1).clamp(max=0)
    hi = w.amax(dim=1).clamp(min=0)
    scale = torch.where(hi > lo, (hi - lo) / sch.qmax, torch.ones_like(hi))
    if sch.scale_bits == 16:
        scale = fp16_round_up(scale)
    zero = torch.clamp(torch.round(-lo / scale), 0, sch.qmax)
    return scale, zero


def encode(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, sch: Scheme) -> torch.Tensor:
    """Codes (as floats) of ``w`` (rows x m) on the grid ``scale``/``zero`` of shape (rows,)."""
    q = torch.round(w / scale[:, None])
    if zero is not None:
        q = q + zero[:, None]
    return q.clamp(sch.qmin, sch.qmax)


def decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """Dequantized values of ``codes`` (rows x m) on the grid ``scale``/``zero`` of shape (rows,)."""
    return ((codes - zero[:, None]) if zero is not None else codes) * scale[:, None]


# ------------------------------------------------------------------------------------ tensors
@dataclass
class QTensor:
    """A quantized ``(out, in)`` weight: integer ``codes`` (out, in), ``scale`` and ``zero``
    (None when symmetric) of shape (out, in / group), and its :class:`Scheme`."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    scheme: Scheme
    fmt: str = ""  # e.g. "Q4_0" when the tensor came from a GGUF block format

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def group(self) -> int:
        return self.scheme.group(self.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.shape
        g = self.group
        c = self.codes.to(dtype).view(n, k // g, g)
        if self.zero is not None:
            c = c - self.zero.to(dtype)[..., None]
        return (c * self.scale.to(dtype)[..., None]).view(n, k)

    def error_bound(self) -> torch.Tensor:
        """``scale / 2`` broadcast to the weight's shape: the largest possible |w - dequant(w)|."""
        n, k = self.shape
        return (self.scale / 2).repeat_interleave(self.group, dim=1).view(n, k)

    @property
    def nbytes(self) -> int:
        """Packed storage: codes at ``bits`` each, fp16 scales, zeros at ``zero_bits``."""
        n, k = self.shape
        groups = n * (k // self.group)
        bits = n * k * self.scheme.bits + groups * (self.scheme.scale_bits + self.scheme.zero_bits)
        return math.ceil(bits / 8)

    @property
    def bits_per_weight(self) -> float:
        return self.scheme.bits_per_weight(self.shape[1])


def quantize_rtn(w: torch.Tensor, sch: Scheme) -> QTensor:
    """Round-to-nearest quantization of a 2-D weight ``(out, in)`` (see the module docstring)."""
    if w.dim() != 2:
        raise CohwError(f"quantize a 2-D (out, in) weight; got shape {tuple(w.shape)}")
    n, k = w.shape
    g = sch.group(k)
    wg = w.detach().float().reshape(n * (k // g), g)
    scale, zero = grid(wg, sch)
    codes = encode(wg, scale, zero, sch)
    dtype = torch.int8 if sch.symmetric else torch.uint8
    return QTensor(codes.reshape(n, k).to(dtype), scale.view(n, k // g),
                   None if zero is None else zero.view(n, k // g), sch)
