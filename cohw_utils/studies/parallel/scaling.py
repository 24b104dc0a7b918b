"""Tensor-parallel scaling of a request, predicted per rank (Chapter 4.7).

:func:`tp_curve` predicts one request (``batch`` sequences, ``input_len`` prompt tokens,
``output_len`` generated) at each tensor-parallel degree: each rank's prefill and decode tables
(:func:`cohw_utils.spine.shard.per_rank_table`, decode at the request's mean context, as
:mod:`cohw_utils.views.predictor` does for one chip) are timed with
:func:`cohw_utils.views.parallel.rank_seconds` -- the calibrated (or ideal) chip for compute,
the interconnect's alpha-beta cost for the all-reduces and the logits' all-gather -- and
combined as TTFT + (output_len - 1) x TPOT. Prefill keeps the last position's logits only, as
an engine does.

:func:`fit_latency` fits one number, the link's per-step latency, on the calibration split of
published rows (the curve's compute is left as it is) and :func:`with_latency` re-times a curve
with it: the ring's ``2(n-1)`` steps at the data file's one-hop figure are an upper bound on what
NCCL's small-message protocols pay, and the fit says how much smaller the effective step is.

:func:`tp_crossover` reads the curve: the degree past which one more doubling of ``tp`` saves
less compute than its collectives cost.
"""
from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from cohw_utils.hardware import Hardware, get_hardware
from cohw_utils.spine.shard import per_rank_table
from cohw_utils.views.collectives import ring_steps
from cohw_utils.views.parallel import comm_table, rank_seconds
from cohw_utils.views.predictor import Calibration, apply_weight_format, decode_context, load_calibration

__all__ = ["tp_curve", "tp_crossover", "with_latency", "fit_latency"]


def tp_curve(workload: str, hw: Hardware | str, link, tps: Sequence[int] = (1, 2, 4, 8), *, batch: int = 1,
             input_len: int = 128, output_len: int = 128, dtype: str = "bf16", weight_fmt: str = "bf16",
             calibration: Calibration | None | str = "calibrated", overlap: bool = False) -> pd.DataFrame:
    """One row per ``tp``: per-rank compute and communication of a prefill and a decode step,
    TTFT, TPOT, tokens/s of the request and per device (module docstring). ``calibration``:
    ``"calibrated"`` (the ledger's fitted set), ``None`` (ideal) or a :class:`Calibration`."""
    hw = get_hardware(hw) if isinstance(hw, str) else hw
    cal = load_calibration() if calibration == "calibrated" else calibration
    rows = []
    for tp in tps:
        pre = apply_weight_format(per_rank_table(workload, "prefill", tp=tp, batch=batch, seq_len=input_len,
                                                 dtype=dtype, prefill_logits="last"), weight_fmt)
        dec = apply_weight_format(per_rank_table(workload, "decode", tp=tp, batch=batch,
                                                 seq_len=decode_context(input_len, output_len), dtype=dtype),
                                  weight_fmt)
        p, d = (rank_seconds(t, hw, link if tp > 1 else None, cal, overlap) for t in (pre, dec))
        steps = [_latency_steps(t) for t in (pre, dec)]
        e2e = p.total_s + (output_len - 1) * d.total_s
        rows.append({"tp": tp, "prefill compute (ms)": p.compute_s * 1e3, "prefill comm (ms)": p.comm_s * 1e3,
                     "decode compute (ms)": d.compute_s * 1e3, "decode comm (ms)": d.comm_s * 1e3,
                     "collectives per step": d.collectives, "TTFT (ms)": p.total_s * 1e3,
                     "TPOT (ms)": d.total_s * 1e3, "tokens/s": batch * output_len / e2e,
                     "tokens/s per device": batch * output_len / e2e / tp,
                     "decode comm share": d.comm_share, "prefill latency steps": steps[0],
                     "decode latency steps": steps[1]})
    out = pd.DataFrame(rows).set_index("tp")
    out.attrs.update({"workload": workload, "hardware": hw.name, "overlap": overlap,
                      "calibration": "ideal" if cal is None or cal.is_ideal else "calibrated"})
    return out


def tp_crossover(curve: pd.DataFrame) -> int:
    """The largest ``tp`` of the curve up to which every step up raised tokens/s (the best
    degree, when the curve rises and then falls)."""
    best = curve.index[0]
    for tp in curve.index[1:]:
        if curve.at[tp, "tokens/s"] <= curve.at[best, "tokens/s"]:
            break
        best = tp
    return int(best)


def _latency_steps(table: pd.DataFrame) -> int:
    """Latency steps of every collective of a per-rank table (their sum)."""
    if "comm_bytes" not in table.columns or not (table["op_class"] == "communication").any():
        return 0
    c = comm_table(table)
    return int(sum(ring_steps(k, int(n)) for k, n in zip(c["kind"], c["group_size"])))


def with_latency(curve: pd.DataFrame, old_s: float, new_s: float, batch: int = 1, output_len: int = 128) -> pd.DataFrame:
    """``curve`` re-timed with a per-step latency of ``new_s`` instead of ``old_s`` (every
    collective on the critical path, as :func:`tp_curve` without overlap)."""
    out = curve.copy()
    d = new_s - old_s
    for phase, col in (("prefill", "TTFT (ms)"), ("decode", "TPOT (ms)")):
        out[f"{phase} comm (ms)"] = out[f"{phase} comm (ms)"] + out[f"{phase} latency steps"] * d * 1e3
        out[col] = out[col] + out[f"{phase} latency steps"] * d * 1e3
    e2e = (out["TTFT (ms)"] + (output_len - 1) * out["TPOT (ms)"]) / 1e3
    out["tokens/s"] = batch * output_len / e2e
    out["tokens/s per device"] = out["tokens/s"] / out.index.to_numpy()
    out["decode comm share"] = out["decode comm (ms)"] / out["TPOT (ms)"]
    return out


def fit_latency(curves: dict[str, pd.DataFrame], published: pd.DataFrame, old_s: float, *, batch: int = 1,
                output_len: int = 128, bounds: tuple[float, float] = (0.0, 20e-6)) -> float:
    """The per-step latency (s) that minimises the squared log error of predicted against
    published tokens/s over ``published`` rows (columns ``model``, ``tp``, ``value``: give it
    the calibration split only)."""
    import numpy as np
    from scipy.optimize import minimize_scalar  # a bounded one-dimensional search: no need to write one

    def loss(alpha: float) -> float:
        err = []
        for model, tp, value in zip(published["model"], published["tp"], published["value"]):
            pred = with_latency(curves[model], old_s, alpha, batch, output_len).at[int(tp), "tokens/s"]
            err.append(np.log(pred / value))
        return float(np.sum(np.square(err)))

    return float(minimize_scalar(loss, bounds=bounds, method="bounded").x)

