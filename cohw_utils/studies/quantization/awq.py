"""AWQ: activation-aware weight scaling before round-to-nearest (Lin et al. 2024).

For each group of linears that read one input (q/k/v; o; gate/up; down), a per-input-channel
scale ``s = mean|x|^alpha`` (``alpha`` searched on a grid in ``[0, 1)``) multiplies the
weights' input columns and divides the op that produces their input (the RMSNorm weight, or the
rows of ``v_proj``/``up_proj``): the block computes the same function in exact arithmetic, and
only the rounding of the later RTN step changes. The search objective is each linear's output
error ``tr(dW H dW^T)`` on the calibration inputs
(:func:`cohw_utils.studies.quantization.blocks.output_error`); ``alpha = 0`` is plain RTN, so the
chosen scale never does worse than RTN on that objective. (AWQ's weight-clipping search is not
done.) Scales are dimensionless; weights stay fp32 until the RTN step of
:func:`cohw_utils.studies.quantization.methods.quantize_lm`.

Used by Chapter 4.2b (quantization): the ``awq-int*`` methods.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from cohw_utils.studies.quantization.blocks import submodule_path as _path
from cohw_utils.studies.quantization.blocks import (INPUT_GROUPS, InputStats, block_inputs, collect_stats,
                                                    decoder_layers, output_error, run_block)
from cohw_utils.studies.quantization.schemes import Scheme, quantize_rtn


def awq_search(weights: list[torch.Tensor], stats: InputStats, sch: Scheme, n_grid: int = 20
               ) -> tuple[torch.Tensor, float, list[float]]:
    """AWQ's scale search (Lin et al. 2024, eq. 4-5) for layers that share one input.

    For ``alpha`` in ``{0, 1/n_grid, ..., (n_grid-1)/n_grid}``: ``s = mean|x|^alpha`` (normalised
    by ``sqrt(max s * min s)`` as the reference code does), quantize ``W diag(s)`` with RTN, undo
    the scale, and measure the output error ``sum_layers tr(dW H dW^T)`` on the calibration
    inputs. Returns the best ``s`` (per input channel), its alpha and the error of every alpha;
    alpha = 0 is plain RTN, so the chosen scale never does worse than RTN on this objective."""
    x_mean = stats.absmean.float().clamp(min=1e-8)
    losses, best = [], (math.inf, 0.0, torch.ones_like(x_mean))
    for i in range(n_grid):
        alpha = i / n_grid
        s = x_mean.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        loss = 0.0
        for w in weights:
            w_hat = quantize_rtn(w * s[None, :], sch).dequantize() / s[None, :]
            loss += output_error(w, w_hat, stats.H)
        losses.append(loss)
        if loss < best[0]:
            best = (loss, alpha, s)
    return best[2], best[1], losses


@torch.no_grad()
def awq_scale_block(layer: nn.Module, stats: dict[str, InputStats], sch: Scheme, n_grid: int = 20,
                    scales: dict[str, torch.Tensor] | None = None, out_scales: dict[str, torch.Tensor] | None = None,
                    search: dict[str, dict] | None = None) -> dict[str, float]:
    """Search and fold AWQ scales into one Llama decoder block, in place.

    For each input group (q/k/v; o; gate/up; down) the scale ``s`` multiplies the layers'
    input columns and divides the op that produces their input (the RMSNorm weight, or the
    rows of ``v_proj`` / ``up_proj``), so the block computes the same function in exact
    arithmetic and only the rounding of the later RTN step changes. (AWQ's weight-clipping
    search is not done, and the error is each linear's own output error rather than the
    output of the attention or MLP module the reference code measures.) Returns the chosen
    alpha per group. If given, ``scales`` receives each linear's input scale ``s`` by module
    path, ``out_scales`` the ``s`` divided out of a linear's output rows (v_proj, up_proj), and
    ``search`` each group's alpha and calibration output error at alpha 0 (RTN) and at the best
    alpha."""
    alphas = {}
    for names, prev_name in INPUT_GROUPS:
        mods = [layer.get_submodule(_path(layer, n)) for n in names]
        st = stats[_path(layer, names[0])]
        s, alpha, losses = awq_search([m.weight.float() for m in mods], st, sch, n_grid)
        if search is not None:
            search["+".join(names)] = {"alpha": alpha, "rtn_error": losses[0], "awq_error": min(losses)}
        prev = layer.get_submodule(_path(layer, prev_name))
        if prev.weight.dim() == 1:   # RMSNorm weight
            prev.weight.div_(s)
        else:                         # a linear's output rows
            prev.weight.div_(s[:, None])
            if getattr(prev, "bias", None) is not None:
                prev.bias.div_(s)
            if out_scales is not None:
                out_scales[_path(layer, prev_name)] = s
        for n, m in zip(names, mods):
            m.weight.mul_(s[None, :])
            if scales is not None:
                scales[_path(layer, n)] = s
        alphas["+".join(names)] = alpha
    return alphas


@torch.no_grad()
def awq_lm(model: nn.Module, calib: torch.Tensor, sch: Scheme, batch: int = 8, n_grid: int = 20) -> dict[str, Any]:
    """AWQ scaling of every decoder block of ``model`` in place (weights stay fp32; quantize
    afterwards with RTN). Blocks are visited in order on the calibration inputs, each block's
    inputs being the outputs of the already-scaled blocks before it."""
    states, kwargs = block_inputs(model, calib, batch)
    alphas, scales, outs, search = {}, {}, {}, []
    prefix = next(n for n, m in model.named_modules() if m is decoder_layers(model))
    for i, layer in enumerate(decoder_layers(model)):
        stats = collect_stats(layer, states, kwargs)
        s: dict[str, torch.Tensor] = {}
        o: dict[str, torch.Tensor] = {}
        found: dict[str, dict] = {}
        alphas[i] = awq_scale_block(layer, stats, sch, n_grid, scales=s, out_scales=o, search=found)
        scales.update({f"{prefix}.{i}.{k}": v for k, v in s.items()})
        outs.update({f"{prefix}.{i}.{k}": v for k, v in o.items()})
        search += [{"block": i, "group": g, **v} for g, v in found.items()]
        states = run_block(layer, states, kwargs)
    return {"alpha": alphas, "input_scale": scales, "output_scale": outs, "search": search,
            "calibration_tokens": int(calib.numel())}
