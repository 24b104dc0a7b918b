"""Activation quantization, emulated: W8A8, SmoothQuant and FP8 (e4m3 / e5m2) on a causal LM.

Weight-only formats (the rest of this package) keep activations in floating point; a chip that
multiplies in int8 or fp8 needs the *activations* in that format too. This module emulates that
with **fake quantization**: every decoder-block linear (:data:`~cohw_utils.studies.quantization.blocks.LINEAR_NAMES`)
becomes an :class:`ActQuantLinear` whose input is rounded to the format and back (to fp32)
before an fp32 ``F.linear`` with the already-rounded weight. So the arithmetic is fp32 on values
that the format can represent: the same function an int8/fp8 GEMM computes up to the
accumulator's rounding (int32 accumulation is exact; fp8 GEMMs accumulate in fp32). No int8 or
fp8 kernel runs, and no speed is measured.

Formats (method names as :func:`cohw_utils.studies.quantization.methods.parse_method` reads them):

* ``w8a8``: weights symmetric int8 **per output channel** (RTN,
  :func:`cohw_utils.studies.quantization.schemes.quantize_rtn`), activations symmetric int8
  **per token, dynamic**: each token's input vector ``x`` gets the scale ``max|x| / 127``
  (fp32, computed at run time), codes ``round(x / scale)`` clamped to [-127, 127].
* ``smoothquant-w8a8``: SmoothQuant (Xiao et al. 2023): per input channel ``j`` of the linears
  that read one RMSNorm's output (q/k/v after ``input_layernorm``, gate/up after
  ``post_attention_layernorm``; the groups the reference code smooths for Llama), the scale
  ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` with ``alpha = 0.5``, ``max|X_j|`` over the
  calibration tokens (:func:`activation_maxima`, on the unquantized model) and ``max|W_j|`` over
  the rows of every linear of the group. ``W[:, j] *= s_j`` and the norm's weight ``/= s_j``: the
  same function in exact arithmetic, with activation outliers migrated into the weights; then
  ``w8a8``. o_proj and down_proj inputs are not smoothed (as in the reference code).
* ``fp8-e4m3`` / ``fp8-e5m2``: weights and activations rounded through ``torch.float8_e4m3fn``
  / ``torch.float8_e5m2`` with **one fp32 scale per tensor**, ``amax / fmax`` (448 and 57344),
  so the tensor's largest magnitude maps to the format's largest finite value; weights get a
  static scale per weight matrix, activations a dynamic one per call (per input tensor of the
  batch). Round-to-nearest-even, saturating (torch's cast).

Bytes (for the method table): int8 weights at 1 byte plus an fp16 scale per row; fp8 weights at
1 byte plus one fp32 scale per matrix (:class:`FP8Weight`). Activation scales are not stored.

:func:`activation_outliers` measures what SmoothQuant exists for: per linear input, the ratio of
the largest channel maximum to the median channel maximum. LLMs above about 6.7B parameters
develop a few channels with magnitudes far above the rest (Dettmers et al. 2022, LLM.int8());
a model without them gives per-token int8 little to lose and SmoothQuant little to recover.

Used by Chapter 4.2b (quantization), section on activation quantization.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from cohw_utils.core.errors import CohwError
from cohw_utils.studies.quantization.blocks import (INPUT_GROUPS, block_linears, decoder_layers, feed_windows,
                                                    submodule_path as _short_path)

#: torch's fp8 dtypes by format name, with their largest finite magnitude.
FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
#: Input groups SmoothQuant smooths in a Llama block: (linears, the RMSNorm whose weight absorbs 1/s).
SMOOTH_GROUPS = ((("q_proj", "k_proj", "v_proj"), "input_layernorm"),
                 (("gate_proj", "up_proj"), "post_attention_layernorm"))


def _fp8_dtype(fmt: str) -> torch.dtype:
    if fmt not in FP8_DTYPES:
        raise CohwError(f"unknown fp8 format {fmt!r}; use one of {', '.join(FP8_DTYPES)}")
    return FP8_DTYPES[fmt]


def fp8_max(fmt: str) -> float:
    """Largest finite value of an fp8 format: 448 (e4m3, ``float8_e4m3fn``), 57344 (e5m2)."""
    return float(torch.finfo(_fp8_dtype(fmt)).max)


def fp8_per_tensor(t: torch.Tensor, fmt: str) -> tuple[torch.Tensor, float]:
    """``t`` as fp8 codes with one fp32 scale ``amax / fmax``: (codes in the fp8 dtype, scale)."""
    amax = float(t.detach().abs().max()) if t.numel() else 0.0
    scale = amax / fp8_max(fmt) if amax > 0 else 1.0
    return (t.float() / scale).to(_fp8_dtype(fmt)), scale


def fake_fp8(t: torch.Tensor, fmt: str) -> torch.Tensor:
    """Round ``t`` through fp8 ``fmt`` with a per-tensor scale and back to ``t``'s dtype."""
    codes, scale = fp8_per_tensor(t, fmt)
    return (codes.float() * scale).to(t.dtype)


def fake_int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """Round each token (last dimension) of ``x`` to symmetric int8 with a dynamic scale
    ``max|x| / 127`` and back: the values a per-token int8 GEMM input can hold."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return (torch.round(x / scale).clamp(-127, 127) * scale).to(x.dtype)


#: Activation quantizers by name (see :class:`ActQuantLinear`).
ACT_QUANTIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "int8-token": fake_int8_per_token,
    "fp8-e4m3": lambda x: fake_fp8(x, "e4m3"),
    "fp8-e5m2": lambda x: fake_fp8(x, "e5m2"),
}


class ActQuantLinear(nn.Linear):
    """A linear layer whose input is fake-quantized (``act``: a key of :data:`ACT_QUANTIZERS`)
    before an fp32 ``F.linear`` with its (already rounded) weight. Stays an ``nn.Linear``, so
    :func:`~cohw_utils.studies.quantization.blocks.block_linears` still finds it."""

    def __init__(self, lin: nn.Linear, act: str):
        if act not in ACT_QUANTIZERS:
            raise CohwError(f"unknown activation format {act!r}; use one of {', '.join(ACT_QUANTIZERS)}")
        super().__init__(lin.in_features, lin.out_features, bias=lin.bias is not None,
                         device=lin.weight.device, dtype=lin.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(lin.weight)
            if lin.bias is not None:
                self.bias.copy_(lin.bias)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(ACT_QUANTIZERS[self.act](x), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act={self.act}"


@dataclass
class FP8Weight:
    """An ``(out, in)`` weight in fp8 with one fp32 scale: ``codes`` (fp8 dtype), ``scale``, ``fmt``."""

    codes: torch.Tensor
    scale: float
    fmt: str

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.codes.float() * self.scale).to(dtype)

    @property
    def nbytes(self) -> int:
        """One byte per weight and a 4-byte fp32 scale for the matrix."""
        return self.codes.numel() + 4

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.codes.numel()


# ------------------------------------------------------------------------------------ calibration
@torch.no_grad()
def activation_maxima(model: nn.Module, windows: torch.Tensor, batch: int = 8) -> dict[str, torch.Tensor]:
    """``max |x_j|`` over every token of ``windows``, per input channel ``j`` of each block
    linear's input: ``{layer name: tensor (in_features,)}`` (one forward pass, fp32)."""
    lins = block_linears(model)
    out: dict[str, torch.Tensor] = {n: torch.zeros(m.in_features) for n, m in lins.items()}

    def hook(name):
        def grab(mod, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            torch.maximum(out[name], x.abs().amax(dim=0), out=out[name])
        return grab

    feed_windows(model, windows, batch, [m.register_forward_pre_hook(hook(n)) for n, m in lins.items()])
    return out


def activation_outliers(act_max: dict[str, torch.Tensor]) -> pd.DataFrame:
    """Per block-linear input (layers reading the same input, q/k/v and gate/up, listed once,
    by their first layer): the largest and the median channel maximum ``max_t |x_tj|`` and their ratio
    (dimensionless). LLM.int8() (Dettmers et al. 2022) finds a few systematic hidden dimensions
    with magnitudes far above the rest in models from about 6.7B parameters on; this ratio is
    how a model without them shows it."""
    first = {g[0] for g, _ in INPUT_GROUPS}
    rows = []
    for name, m in act_max.items():
        if name.rsplit(".", 1)[-1] not in first:
            continue
        med = float(m.median())
        rows.append({"input of": name, "channels": m.numel(), "max": float(m.max()), "median": med,
                     "max/median": float(m.max()) / med if med > 0 else math.inf})
    return pd.DataFrame(rows)


@torch.no_grad()
def smooth_lm(model: nn.Module, act_max: dict[str, torch.Tensor], alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """SmoothQuant's scale migration in place (see the module docstring): returns ``s`` per
    smoothed linear. ``act_max`` from :func:`activation_maxima` on the unquantized model."""
    if not 0 <= alpha <= 1:
        raise CohwError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    prefix = next(n for n, m in model.named_modules() if m is decoder_layers(model))
    scales: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(decoder_layers(model)):
        for names, norm_name in SMOOTH_GROUPS:
            mods = {n: layer.get_submodule(_short_path(layer, n)) for n in names}
            paths = {n: f"{prefix}.{i}.{_short_path(layer, n)}" for n in names}
            x_max = act_max[paths[names[0]]].float().clamp(min=1e-5)
            w_max = torch.stack([m.weight.abs().amax(dim=0) for m in mods.values()]).amax(dim=0).float().clamp(min=1e-5)
            s = (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)
            layer.get_submodule(_short_path(layer, norm_name)).weight.div_(s)
            for n, m in mods.items():
                m.weight.mul_(s[None, :])
                scales[paths[n]] = s
    return scales


def swap_in_act_quant(model: nn.Module, act: str) -> None:
    """Replace every block linear of ``model`` (in place) by an :class:`ActQuantLinear` with ``act``."""
    for name, lin in block_linears(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, ActQuantLinear(lin, act))


__all__ = ["FP8_DTYPES", "SMOOTH_GROUPS", "ACT_QUANTIZERS", "ActQuantLinear", "FP8Weight", "fp8_max",
           "fp8_per_tensor", "fake_fp8", "fake_int8_per_token", "activation_maxima", "activation_outliers",
           "smooth_lm", "swap_in_act_quant"]
