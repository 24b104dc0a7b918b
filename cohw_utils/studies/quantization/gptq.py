"""GPTQ: post-training quantization with second-order error compensation (Frantar et al. 2023).

Written here because no library runs GPTQ on a CPU in this environment (AutoGPTQ/GPTQModel
need CUDA kernels; torchao is not installed). The algorithm follows the paper's Algorithm 1
and the authors' reference code (github.com/IST-DASLab/gptq, ``gptq.py``):

* **Objective**: for a linear layer ``W`` (out x in) and calibration inputs ``X``, find
  quantized ``Q`` minimising ``E_x ||(W - Q) x||^2 = tr((W-Q) H (W-Q)^T)``, ``H = E[x x^T]``
  (:class:`cohw_utils.studies.quantization.blocks.InputStats`; the paper's ``2 X X^T`` differs by a constant, which
  changes nothing below). Rows are independent and share ``H``.
* **OBQ step**: quantize one column ``i`` of every row at once, then move the rounding error onto
  the columns not yet quantized, ``W[:, j] -= (w_i - q_i) / [H^-1]_ii * [H^-1]_ij`` for
  ``j > i`` (the Optimal Brain Surgeon update), and drop column ``i`` from the inverse Hessian.
  GPTQ quantizes columns in a fixed order, so every row shares the same sequence of inverses,
  and the rows ``[H^-1]_{i, i:}`` of all these successive inverses are the rows of the upper
  Cholesky factor of ``H^-1`` (scaled): one Cholesky factorisation replaces K rank-1 updates.
* **Lazy batch updates**: columns are processed in blocks of ``blocksize`` (128); inside a
  block the updates are applied column by column to the block only, and the accumulated error
  is applied to the rest of the matrix once per block (``W[:, i2:] -= Err @ Hinv[i1:i2, i2:]``),
  which makes the work matrix-matrix rather than rank-1.
* **Damping**: ``H += percdamp * mean(diag H) * I`` (percdamp 0.01) before inverting, for
  numerical stability; inputs channels that are always zero get ``H_ii = 1`` and weight 0.
* **Grid**: the quantization grid (scale/zero, :func:`cohw_utils.studies.quantization.schemes.grid`) is fixed per row
  before the sweep (per-channel), or per group of ``g`` columns when the sweep reaches the
  group's first column, from the *error-updated* weights, as the reference code does.
* **act_order** (the reference code's ``--act-order``, "GPTQ-R" in the AWQ paper): quantize the
  columns in order of decreasing ``H_ii``. Supported per channel only here (with groups it
  needs an index of each column's group, which the formats in this book do not carry).

:func:`gptq_lm` applies it to a causal LM block by block, each block's calibration inputs
being the outputs of the already-quantized blocks before it (the paper's sequential scheme).
Errors are in squared units of a layer's output, averaged over the calibration tokens. This
module imports only the primitive modules (``schemes``, ``blocks``); the method dispatcher
(:func:`cohw_utils.studies.quantization.methods.quantize_lm`) imports it, never the reverse.

Used by Chapter 4.2b (quantization): the ``gptq-int*`` methods.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cohw_utils.core.errors import CohwError
from cohw_utils.studies.quantization.blocks import block_inputs, collect_stats, decoder_layers, output_error, run_block
from cohw_utils.studies.quantization.schemes import QTensor, Scheme, decode, encode, grid, quantize_rtn


@dataclass
class GPTQResult:
    """Quantized weight, its dequantized value, and the layer output errors (mean over the
    calibration tokens of ``||dW x||^2``) of GPTQ and of RTN on the same grid family."""

    qtensor: QTensor
    dequantized: torch.Tensor
    error: float
    rtn_error: float


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, sch: Scheme, blocksize: int = 128,
                  percdamp: float = 0.01, act_order: bool = False) -> GPTQResult:
    """GPTQ-quantize one weight ``w`` (out, in) given ``H = E[x x^T]`` (in, in).

    Computes in float64 if ``w`` is float64, else float32 (as the reference code does)."""
    if w.dim() != 2 or H.shape != (w.shape[1], w.shape[1]):
        raise CohwError(f"need w (out, in) and H (in, in); got {tuple(w.shape)} and {tuple(H.shape)}")
    if blocksize < 1 or percdamp < 0:
        raise CohwError(f"blocksize must be >= 1 and percdamp >= 0, got {blocksize}, {percdamp}")
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    W = w.detach().clone().to(dtype)
    Hd = H.detach().clone().to(dtype)
    n, k = W.shape
    g = sch.group(k)
    grouped = g < k
    if grouped and act_order:
        raise CohwError("act_order is supported per channel only (group_size=None) in this implementation")
    if grouped and blocksize % g:
        blocksize = max(g, blocksize // g * g)  # a group never straddles two blocks

    dead = torch.diag(Hd) == 0
    Hd[dead, dead] = 1
    W[:, dead] = 0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(Hd), descending=True)
        W, Hd = W[:, perm], Hd[perm][:, perm]
    damp = percdamp * torch.mean(torch.diag(Hd))
    Hd += damp * torch.eye(k, dtype=dtype)
    try:
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
    except RuntimeError:
        raise CohwError("H + damping is not positive definite; raise percdamp or use more calibration data") from None

    codes = torch.zeros_like(W)
    scale = torch.zeros(n, k // g, dtype=dtype)
    zero = None if sch.symmetric else torch.zeros(n, k // g, dtype=dtype)
    if not grouped:
        s, z = grid(W, sch)
        scale[:, 0] = s
        if zero is not None:
            zero[:, 0] = z
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            gi = col // g
            if grouped and col % g == 0:
                s, z = grid(W1[:, i:i + g], sch)
                scale[:, gi] = s
                if zero is not None:
                    zero[:, gi] = z
            zs = None if zero is None else zero[:, gi]
            wcol = W1[:, i:i + 1]
            q = encode(wcol, scale[:, gi], zs, sch)
            codes[:, col] = q[:, 0]
            err = (wcol[:, 0] - decode(q, scale[:, gi], zs)[:, 0]) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
    qt = QTensor(codes.to(torch.int8 if sch.symmetric else torch.uint8), scale.float(),
                 None if zero is None else zero.float(), sch)
    deq = qt.dequantize(dtype)
    w0 = w.detach().to(dtype)
    rtn = quantize_rtn(w0, sch).dequantize(dtype)
    return GPTQResult(qt, deq, output_error(w0, deq, H.to(torch.float64)), output_error(w0, rtn, H.to(torch.float64)))


def obq_reference(w: torch.Tensor, H: torch.Tensor, sch: Scheme, percdamp: float = 0.0) -> torch.Tensor:
    """The same fixed-order OBQ sweep done the slow, obvious way (explicit inverse, rank-1
    removal of each quantized column), per-channel grids only; returns dequantized weights.
    Used by the tests as the reference :func:`gptq_quantize` must reproduce."""
    W = w.detach().clone().double()
    Hd = H.detach().clone().double()
    k = W.shape[1]
    Hd += percdamp * torch.mean(torch.diag(Hd)) * torch.eye(k, dtype=torch.float64)
    Hinv = torch.linalg.inv(Hd)
    s, z = grid(W, sch)
    for i in range(k):
        q = decode(encode(W[:, i:i + 1], s, z, sch), s, z)[:, 0]
        err = (W[:, i] - q) / Hinv[i, i]
        W[:, i:] -= err[:, None] * Hinv[i, i:][None, :]
        W[:, i] = q
        Hinv = Hinv - torch.outer(Hinv[:, i], Hinv[i, :]) / Hinv[i, i]
    return W


@torch.no_grad()
def gptq_lm(model: nn.Module, calib: torch.Tensor, sch: Scheme, batch: int = 8, blocksize: int = 128,
            percdamp: float = 0.01, act_order: bool = False) -> tuple[dict[str, QTensor], dict[str, Any]]:
    """GPTQ every decoder-block linear of ``model`` in place (its weights become the
    dequantized values). Returns the quantized tensors by module name and per-layer errors
    (GPTQ vs RTN output error on the calibration inputs)."""
    states, kwargs = block_inputs(model, calib, batch)
    weights: dict[str, QTensor] = {}
    errors = []
    prefix = _layers_prefix(model)
    for li, layer in enumerate(decoder_layers(model)):
        stats = collect_stats(layer, states, kwargs)
        for name, st in stats.items():
            lin = layer.get_submodule(name)
            r = gptq_quantize(lin.weight, st.H, sch, blocksize=blocksize, percdamp=percdamp, act_order=act_order)
            lin.weight.copy_(r.dequantized.to(lin.weight.dtype))
            full = f"{prefix}.{li}.{name}"
            weights[full] = r.qtensor
            errors.append({"layer": full, "block": li, "linear": name.rsplit(".", 1)[-1],
                           "gptq_error": r.error, "rtn_error": r.rtn_error})
        states = run_block(layer, states, kwargs)
    return weights, {"layer_errors": errors, "calibration_tokens": int(calib.numel())}


def _layers_prefix(model: nn.Module) -> str:
    layers = decoder_layers(model)
    for name, m in model.named_modules():
        if m is layers:
            return name
    raise CohwError("cannot find the decoder layers' module path")
