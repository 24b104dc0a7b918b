"""The chapter's measurements of quantized models: method table, comparisons with RTN, sensitivity.

* :func:`evaluate_methods`: each method's bits per weight, bytes, weight bytes read per decode
  token (:func:`weight_bytes_per_token`), held-out perplexity with its paired 95% interval
  against the first method, and greedy decode speed on the fastest CPU kernel.
* :func:`compare_with_rtn`: each GPTQ/AWQ model against RTN at the same bits and grouping
  (:func:`rtn_baseline`), with the paired verdict
  (:func:`cohw_utils.studies.quantization.tinylm.paired_verdict`).
* :func:`layer_errors` / :func:`output_error_table`: the output error ``tr(dW H dW^T)`` each
  method leaves in each layer, and its sum relative to RTN's, on the input moments of any text.
* :func:`weight_kurtosis`: how heavy-tailed each block linear's weights are (a Gaussian has 3).
* :func:`quant_sensitivity` / :func:`fig_sensitivity`: the perplexity change when one block
  linear at a time is quantized.
* :func:`weight_bit_floor`: the narrowest weight-only format of a method table whose perplexity
  increase stays within a tolerance at the upper end of its 95% interval (Chapter 5's LLM
  weight-bit floor, written by ``benchmarks/bench_quant.py --write-floors``).

Units: perplexity changes in percent, ``100 (exp(mean NLL difference) - 1)``; bytes as stored;
speeds in tokens/s and GB/s (1e9 bytes/s).

Used by Chapter 4.2b (quantization), sections 4.2b.3 and 4.2b.5, and (through the floors file)
Chapter 5.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
import torch
from torch import nn

from cohw_utils.core.errors import CohwError
from cohw_utils.spine.measure import time_callable
from cohw_utils.studies.quantization.blocks import LINEAR_NAMES, block_linears, output_error
from cohw_utils.studies.quantization.methods import QuantizedLM, parse_method, quantize_layers, quantize_lm
from cohw_utils.studies.quantization.schemes import Scheme
from cohw_utils.studies.quantization.tinylm import decode_tokens_per_s, paired_change, paired_verdict, window_nll


# ------------------------------------------------------------------------------------ chapter views
def weight_bytes_per_token(q: QuantizedLM) -> int:
    """Weight bytes one decode step reads (batch 1): every stored weight once, except the
    embedding table, of which a step gathers one row. KV-cache bytes are not included."""
    emb = q.model.get_input_embeddings().weight
    per = 4 if q.method.algo == "fp32" else 2
    return q.weight_bytes() - emb.numel() * per + emb.shape[1] * per


def _kernels(used: dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in used.items())


def evaluate_methods(model: nn.Module, methods: Iterable[str], windows: torch.Tensor,
                     calib: torch.Tensor | None = None, prompt: torch.Tensor | None = None,
                     new_tokens: int = 32, repeats: int = 5, batch: int = 8,
                     progress: Callable[[str], Any] | None = None) -> tuple[pd.DataFrame, dict[str, QuantizedLM]]:
    """Quantize ``model`` with each method; measure held-out perplexity and (if ``prompt`` is
    given) greedy decode speed with the fastest kernel each format allows.

    Columns: method, bits_per_weight (of the quantized linears, scales and zeros included),
    bytes (whole model as stored), bytes_per_token (weight bytes read per decode step,
    :func:`weight_bytes_per_token`), ppl, delta_ppl and
    delta_pct (vs the first method, normally fp32) with delta_pct_lo/hi, the 95% interval of
    :func:`cohw_utils.studies.quantization.tinylm.paired_change` over the windows, tokens_per_s, tok_s_min/max (from
    the slowest and fastest timed run), GB_per_s (bytes_per_token x tokens/s), kernel,
    quantize_s (seconds of one call, no warm-up; :func:`cohw_utils.spine.measure.time_callable`).
    Each :class:`QuantizedLM` keeps its per-window NLL in ``info['window_nll']``."""
    rows, done = [], {}
    ref_nll = None
    for name in methods:
        made: list[QuantizedLM] = []
        tq = time_callable(lambda: made.append(quantize_lm(model, name, calib=calib, batch=batch)),
                           repeats=1, warmup=0).median
        q = made[0]
        nll = window_nll(q.model, windows, batch=batch)
        q.info["window_nll"] = nll
        ref_nll = nll if ref_nll is None else ref_nll
        ppl = math.exp(float(nll.mean()))
        _, lo, hi = paired_change(ref_nll, nll)
        row = {"method": q.method.name, "bits_per_weight": q.linear_bits_per_weight(), "bytes": q.weight_bytes(),
               "bytes_per_token": weight_bytes_per_token(q), "ppl": ppl, "delta_pct_lo": lo, "delta_pct_hi": hi,
               "quantize_s": tq}
        if prompt is not None:
            km, used = q.kernel_model()
            rate, t = decode_tokens_per_s(km, prompt, new_tokens=new_tokens, repeats=repeats)
            row.update(tokens_per_s=rate, tok_s_min=new_tokens / t.max, tok_s_max=new_tokens / t.min,
                       GB_per_s=row["bytes_per_token"] * rate / 1e9, kernel=_kernels(used), timing=t.describe("ms"))
            del km
        rows.append(row)
        done[q.method.name] = q
        if progress is not None:
            progress(f"{q.method.name}: ppl {ppl:.3f}" + (f", {row['tokens_per_s']:.0f} tok/s" if prompt is not None else ""))
    df = pd.DataFrame(rows)
    df.insert(df.columns.get_loc("ppl") + 1, "delta_ppl", df["ppl"] - df["ppl"].iloc[0])
    df.insert(df.columns.get_loc("delta_ppl") + 1, "delta_pct", 100 * (df["ppl"] / df["ppl"].iloc[0] - 1))
    return df, done


def quant_sensitivity(model: nn.Module, windows: torch.Tensor, sch: Scheme, batch: int = 8) -> pd.DataFrame:
    """Perplexity change when *one* block linear at a time is RTN-quantized with ``sch`` and
    everything else stays fp32: one row per layer with block, linear, ppl, delta_pct and its
    95% interval (delta_lo/delta_hi, paired over the windows; :func:`cohw_utils.studies.quantization.tinylm.paired_change`)
    and ``resolved`` (the interval excludes 0: :func:`~cohw_utils.studies.quantization.tinylm.paired_verdict`
    is not "not resolved")."""
    base = window_nll(model, windows, batch=batch)
    rows = []
    for name in block_linears(model):
        nll = window_nll(quantize_layers(model, [name], sch), windows, batch=batch)
        d, lo, hi = paired_change(base, nll)
        block = int(re.search(r"layers\.(\d+)\.", name).group(1))
        rows.append({"layer": name, "block": block, "linear": name.rsplit(".", 1)[-1],
                     "ppl": math.exp(float(nll.mean())), "delta_pct": d, "delta_lo": lo, "delta_hi": hi,
                     "resolved": paired_verdict(lo, hi) != "not resolved"})
    return pd.DataFrame(rows)


def fig_sensitivity(table: pd.DataFrame, title: str = ""):
    """Heat map of ``delta_pct`` (blocks x linear layers) from :func:`quant_sensitivity`; a ``*``
    marks the changes whose 95% interval excludes 0."""
    from matplotlib.figure import Figure

    grid_ = table.pivot(index="block", columns="linear", values="delta_pct")[list(LINEAR_NAMES)]
    res = table.pivot(index="block", columns="linear", values="resolved")[list(LINEAR_NAMES)]
    fig = Figure(figsize=(7.5, 0.8 + 0.45 * len(grid_)))
    ax = fig.add_subplot()
    lim = float(np.nanmax(np.abs(grid_.to_numpy()))) or 1.0
    im = ax.imshow(grid_.to_numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(len(grid_.columns)), grid_.columns, rotation=30, ha="right")
    ax.set_yticks(range(len(grid_)), [f"block {b}" for b in grid_.index])
    for (i, j), v in np.ndenumerate(grid_.to_numpy()):
        ax.text(j, i, f"{v:+.2f}{'*' if res.iat[i, j] else ''}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="perplexity change (%)")
    ax.set_title(title or "held-out perplexity change when only this layer is quantized", fontsize=10)
    fig.tight_layout()
    return fig


def layer_errors(model: nn.Module, quantized: dict[str, QuantizedLM], H: dict[str, torch.Tensor]) -> pd.DataFrame:
    """Output error ``tr(dW H dW^T)`` of every block linear of each quantized model against
    ``model``'s weights, for the input moments ``H`` (e.g. from
    :func:`cohw_utils.studies.quantization.blocks.input_second_moments` on
    held-out text): one row per layer, one column per method."""
    ref = block_linears(model)
    rows = []
    for name, lin in ref.items():
        row = {"layer": name}
        for meth, q in quantized.items():
            w_hat = block_linears(q.model)[name].weight
            s = q.info.get("input_scale", {}).get(name)
            if s is not None:  # AWQ: the layer computes Q(W s) (x / s); its effective weight is Q(W s) / s
                w_hat = w_hat / s[None, :]
            o = q.info.get("output_scale", {}).get(name)
            if o is not None:  # ... and v/up_proj's rows were divided by the next layer's scale
                w_hat = w_hat * o[:, None]
            row[meth] = output_error(lin.weight, w_hat, H[name])
        rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------ against RTN
def rtn_baseline(method: str) -> str:
    """The round-to-nearest method with the same bits and grouping as ``method``:
    ``gptq-int4-g128`` -> ``rtn-int4-g128``, ``gptq-int4-act`` -> ``rtn-int4``. GGUF and
    unquantized methods have none (raises :class:`CohwError`)."""
    meth = parse_method(method)
    if meth.algo not in ("rtn", "gptq", "awq"):
        raise CohwError(f"{method!r} has no round-to-nearest baseline; use an rtn-/gptq-/awq- method")
    bits, g = meth.scheme.bits, meth.scheme.group_size
    return f"rtn-int{bits}" + (f"-g{g}" if g else "")


def _ppl(q: QuantizedLM) -> float:
    return math.exp(float(q.info["window_nll"].mean()))


def compare_with_rtn(quantized: dict[str, QuantizedLM]) -> pd.DataFrame:
    """Each GPTQ/AWQ model of ``quantized`` (as :func:`evaluate_methods` returns them, with
    ``info['window_nll']``) whose :func:`rtn_baseline` is also there, against that baseline on
    the same windows: method, vs, ppl, RTN ppl, change % with its 95% interval (95% lo/hi,
    :func:`~cohw_utils.studies.quantization.tinylm.paired_change`) and the verdict
    (:func:`~cohw_utils.studies.quantization.tinylm.paired_verdict`). Rows in ``quantized``'s order."""
    cols = ["method", "vs", "ppl", "RTN ppl", "change %", "95% lo", "95% hi", "verdict"]
    rows = []
    for other, q in quantized.items():
        if q.method.algo not in ("gptq", "awq") or (rtn := rtn_baseline(other)) not in quantized:
            continue
        d, lo, hi = paired_change(quantized[rtn].info["window_nll"], q.info["window_nll"])
        rows.append(dict(zip(cols, [other, rtn, _ppl(q), _ppl(quantized[rtn]), d, lo, hi, paired_verdict(lo, hi)])))
    return pd.DataFrame(rows, columns=cols)


def output_error_table(model: nn.Module, quantized: dict[str, QuantizedLM],
                       moments: dict[str, dict[str, torch.Tensor]]) -> pd.DataFrame:
    """Summed output error ``sum_layers tr(dW H dW^T)`` of each quantized model (rows) for each
    set of input moments (``{"calibration": H, "held-out": H2}``, columns; :func:`layer_errors`),
    and the same relative to the model's :func:`rtn_baseline` as ``vs RTN (<name>)`` (1 for an
    RTN model; NaN where the baseline is not in ``quantized``)."""
    rel = pd.DataFrame({name: layer_errors(model, quantized, H).set_index("layer").sum() for name, H in moments.items()})
    for name in moments:
        rel[f"vs RTN ({name})"] = [rel.loc[m, name] / rel.loc[b, name] if (b := rtn_baseline(m)) in rel.index
                                   else float("nan") for m in rel.index]
    return rel


def weight_kurtosis(model: nn.Module) -> pd.Series:
    """Kurtosis ``E[(w - mean)^4] / var^2`` (unbiased variance) of each block linear's weights,
    by layer name: 3 for Gaussian weights, far more when a few outliers dominate (dimensionless)."""
    out = {}
    for name, m in block_linears(model).items():
        w = m.weight.detach()
        out[name] = float(((w - w.mean()) ** 4).mean() / w.var() ** 2)
    return pd.Series(out, name="kurtosis")


# ------------------------------------------------------------------------------------ bit floor
def weight_bit_floor(table: pd.DataFrame, tolerance_pct: float = 1.0) -> dict[str, Any]:
    """The narrowest *weight-only* method of ``table`` (:func:`evaluate_methods`' columns, first
    row the fp32 reference) whose perplexity increase is at most ``tolerance_pct`` percent at the
    **upper end of its 95% interval** (``delta_pct_hi <= tolerance_pct``): a format that passes
    is, with 95% confidence, within the tolerance. Narrowest = fewest stored bits per weight
    (scales included). Methods that quantize activations are left out. Returns method, bits
    (the format's code bits: 16 for bf16/fp16, 32 for fp32), bits_per_weight, delta_pct,
    delta_pct_hi, tolerance_pct, the methods that passed, the narrowest method measured
    (``narrowest_tested``) and ``bounded_by_table`` (True when the floor *is* the narrowest
    method measured: the true floor may be lower, no narrower format was tried). Raises :class:`CohwError` when no
    weight-only method is in the table."""
    if not 0 <= tolerance_pct < 100:
        raise CohwError(f"tolerance_pct must be a percentage in [0, 100), got {tolerance_pct}")
    rows = []
    for r in table.itertuples(index=False):
        meth = parse_method(r.method)
        if meth.quantizes_activations:
            continue
        bits = meth.scheme.bits if meth.scheme is not None else {"fp32": 32}.get(meth.algo, 16)
        rows.append((r.bits_per_weight, r.method, bits, r.delta_pct, r.delta_pct_hi))
    if not rows:
        raise CohwError("no weight-only method in the table; evaluate e.g. fp32, rtn-int8, gptq-int4-g128 first")
    passed = sorted((r for r in rows if r[4] <= tolerance_pct), key=lambda r: (r[0], r[4]))  # ties: tighter bound
    if not passed:
        raise CohwError(f"no method's perplexity increase is within {tolerance_pct}% (upper 95% bound); "
                        "include fp32 or a wider format in the table")
    bpw, method, bits, d, hi = passed[0]
    return {"method": method, "bits": int(bits), "bits_per_weight": float(bpw), "delta_pct": float(d),
            "delta_pct_hi": float(hi), "tolerance_pct": float(tolerance_pct),
            "passed": [r[1] for r in passed], "narrowest_tested": min(rows)[1],
            "bounded_by_table": bool(bpw <= min(rows)[0])}
