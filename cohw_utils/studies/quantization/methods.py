"""Quantization methods applied to a whole causal LM: parse a method name, quantize, count bytes.

Methods (:func:`quantize_lm`, names as :func:`parse_method` reads them): ``fp32``, ``bf16`` (the
whole model cast to bf16, computing in bf16: this CPU's fast 16-bit path), ``fp16`` (every
weight rounded to fp16, computing in fp32), ``rtn-int8[-gG]`` and ``rtn-int4[-gG]``
(round-to-nearest, per channel or group ``G``), ``gptq-int4[-gG]``
(:mod:`cohw_utils.studies.quantization.gptq`; ``gptq-int4-act`` quantizes columns in decreasing
``H_ii`` order, the "act-order" variant), ``awq-int4[-gG]`` (activation-aware scaling, then
RTN; :mod:`cohw_utils.studies.quantization.awq`), ``gguf-q8_0`` and ``gguf-q4_0``
(:mod:`cohw_utils.studies.quantization.gguf_blocks`). Any bit width from 2 to 8 parses
(``rtn-int3-g128``). Weight *and activation* formats, emulated by fake quantization
(:mod:`cohw_utils.studies.quantization.activation`): ``w8a8`` (int8 per-channel weights, int8
per-token dynamic activations), ``smoothquant-w8a8`` (SmoothQuant's scale migration with
``alpha`` 0.5, then W8A8; needs calibration), ``fp8-e4m3`` and ``fp8-e5m2`` (weights and
activations in fp8 with per-tensor scales).

What is quantized: the seven linears of every decoder block
(:data:`cohw_utils.studies.quantization.blocks.LINEAR_NAMES`). Embedding, LM head and norms are
*kept* at 16 bits (rounded to fp16) in every quantized variant and counted at 2 bytes each.
Accuracy is evaluated in fp32 on the *dequantized* weights (so any kernel computes the same
function up to summation order); :meth:`QuantizedLM.kernel_model` swaps in the CPU kernels of
:mod:`cohw_utils.studies.quantization.kernels` for speed. Units: bytes as stored (packed codes,
fp16 scales and zeros), bits per weight of the quantized linears, scales included.

This module dispatches to GPTQ and AWQ; they import only the primitive modules (schemes,
blocks), so there is no import cycle.

Used by Chapter 4.2b (quantization).
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from cohw_utils.core.errors import CohwError
from cohw_utils.spine.analyze import count_parameters
from cohw_utils.studies.quantization.activation import (FP8Weight, activation_maxima, fp8_per_tensor, smooth_lm,
                                                        swap_in_act_quant)
from cohw_utils.studies.quantization.awq import awq_lm
from cohw_utils.studies.quantization.blocks import block_linears
from cohw_utils.studies.quantization.gguf_blocks import GGUF_BLOCK, gguf_quantize
from cohw_utils.studies.quantization.gptq import gptq_lm
from cohw_utils.studies.quantization.kernels import QuantLinear
from cohw_utils.studies.quantization.schemes import QTensor, Scheme, quantize_rtn, scheme


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _round_rest_to_fp16(model: nn.Module, skip: set[str]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in skip:
                p.copy_(p.half().float())


# ------------------------------------------------------------------------------------ methods
@dataclass(frozen=True)
class Method:
    """A parsed method name (see :func:`parse_method`)."""

    name: str
    algo: str               # fp32, fp16, bf16, rtn, gptq, awq, gguf, w8a8, smoothquant, fp8
    scheme: Scheme | None   # None for fp32/fp16/bf16
    gguf_type: str | None = None
    act_order: bool = False
    fp8: str | None = None      # e4m3 or e5m2 for the fp8 methods

    @property
    def needs_calibration(self) -> bool:
        return self.algo in ("gptq", "awq", "smoothquant")

    @property
    def quantizes_activations(self) -> bool:
        return self.algo in ACT_ALGOS


#: Methods that quantize activations too (fake-quant emulation), with the activation format of each.
ACT_ALGOS = {"w8a8": "int8-token", "smoothquant": "int8-token", "fp8": None}
ACT_METHODS = ("w8a8", "smoothquant-w8a8", "fp8-e4m3", "fp8-e5m2")
_METHOD_RE = re.compile(r"(rtn|gptq|awq)-int(\d)(?:-g(\d+))?(-act)?")
METHOD_EXAMPLES = ("fp32", "bf16", "fp16", "rtn-int8", "rtn-int4-g128", "gptq-int4-g128", "awq-int4-g128",
                   "gguf-q8_0", "gguf-q4_0", *ACT_METHODS)


def parse_method(name: str) -> Method:
    """``'rtn-int4-g128'`` -> Method; a bad name raises :class:`CohwError` with examples."""
    key = str(name).strip().lower()
    if key in ("fp32", "fp16", "bf16"):
        return Method(key, key, None)
    if key in ("w8a8", "smoothquant-w8a8"):
        return Method(key, key.split("-")[0], scheme(8))
    if key in ("fp8-e4m3", "fp8-e5m2"):
        return Method(key, "fp8", None, fp8=key.split("-")[1])
    if key in ("gguf-q8_0", "gguf-q4_0"):
        t = key.split("-")[1].upper()
        return Method(key, "gguf", Scheme(8 if t == "Q8_0" else 4, GGUF_BLOCK, True), t)
    m = _METHOD_RE.fullmatch(key)
    if m is None:
        raise CohwError(f"unknown quantization method {name!r}; use names like {', '.join(METHOD_EXAMPLES)}")
    algo, bits, g, act = m.group(1), int(m.group(2)), m.group(3), bool(m.group(4))
    if act and (algo != "gptq" or g):
        raise CohwError(f"{name!r}: '-act' (GPTQ's act-order) applies to per-channel gptq only, e.g. gptq-int4-act")
    return Method(key, algo, scheme(bits, int(g) if g else None), act_order=act)


@dataclass
class QuantizedLM:
    """A quantized copy of a causal LM.

    ``model`` computes in fp32 with the dequantized weights (for perplexity); ``weights`` holds
    the quantized block linears; ``method``/``info`` say how they were made. Bytes: the
    quantized linears at their packed size, every other parameter at 2 bytes (fp32: 4)."""

    method: Method
    model: nn.Module
    weights: dict[str, QTensor | FP8Weight]
    info: dict[str, Any] = field(default_factory=dict)

    def linear_params(self) -> int:
        return sum(m.weight.numel() for m in block_linears(self.model).values())

    def other_params(self) -> int:
        return count_parameters(self.model) - self.linear_params()

    def linear_bytes(self) -> int:
        if not self.weights:
            return self.linear_params() * (4 if self.method.algo == "fp32" else 2)
        return sum(q.nbytes for q in self.weights.values())

    def weight_bytes(self) -> int:
        """Bytes of the whole model as stored (see the class docstring)."""
        return self.linear_bytes() + self.other_params() * (4 if self.method.algo == "fp32" else 2)

    def linear_bits_per_weight(self) -> float:
        return 8 * self.linear_bytes() / self.linear_params()

    def kernel_model(self, kernel: str = "auto") -> tuple[nn.Module, dict[str, int]]:
        """A copy whose block linears run a quantized kernel (:class:`QuantLinear`); returns the
        model and how many layers each kernel got. Unquantized methods return a plain copy
        (fp16 runs in fp32 on this CPU, with fp16-valued weights)."""
        m = copy.deepcopy(self.model)
        if self.method.quantizes_activations:
            return m, {f"fake-quant {self.method.name} (fp32 compute, emulation)": len(block_linears(m))}
        if not self.weights:
            how = "bf16 compute" if self.method.algo == "bf16" else "fp32 compute"
            return m, {f"F.linear ({self.method.algo} weights, {how})": len(block_linears(m))}
        used: dict[str, int] = {}
        for name, lin in block_linears(m).items():
            ql = QuantLinear(self.weights[name], lin.bias, kernel=kernel)
            used[ql.kernel] = used.get(ql.kernel, 0) + 1
            _set_module(m, name, ql)
        return m, used


def quantize_lm(model: nn.Module, method: str | Method, calib: torch.Tensor | None = None,
                batch: int = 8, **options: Any) -> QuantizedLM:
    """Quantize ``model``'s decoder-block linears with ``method`` (see the module docstring).

    ``calib``: LongTensor (n, seq) of token windows, required by ``gptq-*`` and ``awq-*``;
    ``options`` go to the algorithm (GPTQ: ``blocksize``, ``percdamp``, ``act_order``; AWQ:
    ``n_grid``; SmoothQuant: ``alpha``, default 0.5). The input model is not modified."""
    meth = parse_method(method) if isinstance(method, str) else method
    if meth.needs_calibration and calib is None:
        raise CohwError(f"method {meth.name} needs calibration data: pass calib=(n, seq) token ids")
    m = copy.deepcopy(model).float().eval()
    if meth.algo == "fp32":
        return QuantizedLM(meth, m, {})
    lin_names = block_linears(m)
    if meth.algo == "fp16":
        _round_rest_to_fp16(m, set())
        return QuantizedLM(meth, m, {})
    if meth.algo == "bf16":
        return QuantizedLM(meth, m.to(torch.bfloat16), {})
    weights: dict[str, Any] = {}
    info: dict[str, Any] = {}
    if meth.quantizes_activations:
        return _quantize_activations(m, meth, calib, batch, **options)
    if meth.algo == "awq":  # fold the scales first, so the kept tensors are rounded after folding
        info = awq_lm(m, calib, meth.scheme, batch=batch, **options)
    _round_rest_to_fp16(m, {f"{n}.weight" for n in lin_names})
    if meth.algo in ("rtn", "gguf"):
        for name, lin in lin_names.items():
            if meth.algo == "rtn":
                q = quantize_rtn(lin.weight, meth.scheme)
            else:
                q = gguf_quantize(lin.weight, meth.gguf_type)[1]
            weights[name] = q
            with torch.no_grad():
                lin.weight.copy_(q.dequantize())
    elif meth.algo == "gptq":
        options.setdefault("act_order", meth.act_order)
        weights, info = gptq_lm(m, calib, meth.scheme, batch=batch, **options)
    elif meth.algo == "awq":
        for name, lin in lin_names.items():
            q = quantize_rtn(lin.weight, meth.scheme)
            weights[name] = q
            with torch.no_grad():
                lin.weight.copy_(q.dequantize())
    return QuantizedLM(meth, m, weights, info)


def _quantize_activations(m: nn.Module, meth: Method, calib: torch.Tensor | None, batch: int,
                          alpha: float = 0.5) -> QuantizedLM:
    """W8A8 / SmoothQuant / FP8 on the fp32 copy ``m`` (see :mod:`~cohw_utils.studies.quantization.activation`)."""
    info: dict[str, Any] = {}
    if meth.algo == "smoothquant":   # maxima of the unquantized model, then fold s before any rounding
        info["act_max"] = activation_maxima(m, calib, batch=batch)
        info["smooth_scale"] = smooth_lm(m, info["act_max"], alpha)
        info["alpha"] = alpha
    lins = block_linears(m)
    _round_rest_to_fp16(m, {f"{n}.weight" for n in lins})
    weights: dict[str, Any] = {}
    for name, lin in lins.items():
        if meth.algo == "fp8":
            codes, s = fp8_per_tensor(lin.weight.detach(), meth.fp8)
            weights[name] = FP8Weight(codes, s, meth.fp8)
        else:
            weights[name] = quantize_rtn(lin.weight, meth.scheme)
        with torch.no_grad():
            lin.weight.copy_(weights[name].dequantize())
    swap_in_act_quant(m, ACT_ALGOS[meth.algo] or f"fp8-{meth.fp8}")
    return QuantizedLM(meth, m, weights, info)


def quantize_layers(model: nn.Module, names: Iterable[str], sch: Scheme) -> nn.Module:
    """A copy of ``model`` with only the named block linears RTN-quantized (fake-quant, fp32)."""
    m = copy.deepcopy(model).float().eval()
    lins = block_linears(m)
    for name in names:
        if name not in lins:
            raise CohwError(f"no block linear called {name!r}; known: {', '.join(list(lins)[:7])} ...")
        with torch.no_grad():
            lins[name].weight.copy_(quantize_rtn(lins[name].weight, sch).dequantize())
    return m

