"""The ledger's multi-device rows, predicted by the parallelism model (Chapter 4.5).

Which rows (:func:`plan_of`, :func:`plan_coverage`): an inference row on ``devices > 1`` chips is
covered when its ``parallelism`` column states the split as the source does -- ``tp=N``,
``tp=N (1 replica)`` or ``tp=N x M replicas`` (``dp = M``) -- with ``tp x dp = devices``, its
``link`` column names an interconnect of ``data/interconnects.csv``, and it passes the one-chip
checks of :func:`~cohw_utils.studies.validation.ledger.row_coverage` (metric, config, hardware
spec, format, batch and lengths). A row whose source does not state the split (``degrees not
stated``, ``exact split not stated``, ``multi-GPU mode not stated``) stays uncovered with that
reason: we do not assume ``tp = devices``. The ``link`` of a row is read in its source; where
the source names no interconnect the row's note says which system default was taken.

How (:func:`plan_prediction`): exactly :func:`cohw_utils.studies.parallel.plans.predict_plan`
with ``pp = ep = microbatches = 1`` -- each of the ``dp`` replicas serves ``batch / dp``
sequences; one rank's prefill table (last-position logits) and decode table at the request's
mean context (:func:`cohw_utils.spine.shard.per_rank_table`, the model's own TP plan, weight
format applied) are timed by :func:`cohw_utils.views.parallel.rank_seconds` (the chip, ideal or
calibrated, plus the ring alpha-beta cost of every collective on the link, no overlap); TTFT is
the prefill step, TPOT the decode step, tokens/s ``batch x output_len / (TTFT + (output_len - 1)
TPOT)`` over all replicas, per device divided by ``tp x dp``. The per-rank tables are cached per
(workload, phase, tp, batch, sequence length, dtype, format) for the process, so the ideal and
the calibrated prediction of a row, and rows that share shapes, trace once.

Held-out discipline: the calibration is fitted on one-chip calibration rows only
(:func:`~cohw_utils.studies.validation.ledger.calibration_rows`); every multi-device row, of
either split, is predicted with that fit and its error is reported apart from the one-chip error
(:func:`multi_device_errors`).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import pandas as pd

from cohw_utils.hardware import Hardware, load_hardware
from cohw_utils.hardware.interconnects import Interconnect, load_interconnects
from cohw_utils.views.predictor import Calibration, apply_weight_format, decode_context

__all__ = ["plan_of", "plan_coverage", "link_coverage", "PlanValue", "plan_prediction", "multi_device_errors"]

_PLAN = re.compile(r"^tp=(\d+)(?: \(1 replica\)| x (\d+) replicas)?$")


def plan_of(parallelism: str) -> tuple[int, int] | None:
    """``(tp, dp)`` of a ledger ``parallelism`` cell that states the split, else None."""
    m = _PLAN.match(str(parallelism).strip())
    return None if m is None else (int(m.group(1)), int(m.group(2) or 1))


def plan_coverage(row) -> str | None:
    """The parallelism part of a multi-device row's coverage: None when its split and link are
    usable, else the reason (one phrase, prefixed with the device count and the split)."""
    n, par = int(row.devices), str(row.parallelism)
    head = f"{n} devices ({par})"
    plan = plan_of(par)
    if plan is None:
        if "not stated" in par:
            return f"{head}: parallel split not stated in the source"
        return f"{head}: plan not modelled (only tp=N and tp=N x M replicas)"
    tp, dp = plan
    if tp * dp != n:
        return f"{head}: tp x dp = {tp * dp} is not the row's {n} devices"
    return None


def link_coverage(row, interconnects: dict[str, Interconnect] | None = None) -> str | None:
    """None when a multi-device row's ``link`` names a known interconnect, else the reason."""
    interconnects = interconnects if interconnects is not None else load_interconnects()
    head = f"{int(row.devices)} devices ({row.parallelism})"
    if not row.link:
        return f"{head}: interconnect not stated (link column empty)"
    if row.link not in interconnects:
        return f"{head}: link {row.link!r} is not in interconnects.csv"
    return None


@functools.lru_cache(maxsize=256)
def _rank_table(config: str, phase: str, tp: int, batch: int, seq: int, dtype: str, fmt: str) -> pd.DataFrame:
    from cohw_utils.spine.shard import per_rank_table  # torch: only where a table is traced

    opts = {"prefill_logits": "last"} if phase == "prefill" else {}
    t = per_rank_table(config, phase, tp=tp, batch=batch, seq_len=seq, dtype=dtype, **opts)
    return apply_weight_format(t, fmt)


@dataclass(frozen=True)
class PlanValue:
    """A multi-device row predicted: TTFT and TPOT (s), the request's tokens/s over all replicas,
    the row's metric in its unit, and the decode step's communication share."""

    ttft_s: float
    tpot_s: float
    tokens_per_s: float
    value: float
    comm_share: float


def plan_prediction(row: pd.Series, hw: Hardware, link: Interconnect, calibration: Calibration | None,
                    dtype: str | None = None) -> PlanValue:
    """Predict a covered multi-device ``row`` (module docstring); ``calibration=None`` is ideal."""
    from cohw_utils.views.parallel import pipeline_step_seconds, rank_seconds

    tp, dp = plan_of(row["parallelism"])
    b, i = int(row["batch"]), int(row["input_len"])
    o = 1 if row["metric"] == "ttft_ms" else int(row["output_len"])
    # the traced dtype, as the one-chip rows: fp16 and bf16 cost the same on every chip in hardware.csv
    dtype = dtype or ("bf16" if row["format"] == "bf16" else "fp16")
    mb = b // dp
    pre = rank_seconds(_rank_table(row["config"], "prefill", tp, mb, i, dtype, row["format"]), hw, link,
                       calibration, False)
    ttft = pipeline_step_seconds([pre.total_s * 1e3 / 1e3], 1)[0]  # predict_plan's arithmetic, to the bit
    tpot, share = 0.0, 0.0
    if o > 1:
        dec = rank_seconds(_rank_table(row["config"], "decode", tp, mb, decode_context(i, o), dtype, row["format"]),
                           hw, link, calibration, False)
        tpot, share = pipeline_step_seconds([dec.total_s * 1e3 / 1e3], 1)[0], dec.comm_share
    e2e = ttft + (o - 1) * tpot
    tps = b * o / e2e
    value = {"tokens_per_s": tps, "tokens_per_s_per_device": tps / (tp * dp), "tpot_ms": tpot * 1e3,
             "ttft_ms": ttft * 1e3, "latency_ms": e2e * 1e3}[row["metric"]]
    return PlanValue(ttft, tpot, tps, value, share)


def multi_device_errors(ledger: pd.DataFrame, calibration: Calibration, ids: list[str] | None = None) -> pd.DataFrame:
    """One row per covered multi-device ledger row (or of ``ids``): its plan and link, measured,
    ideal and calibrated predictions and their ratios to the measurement, the regime, and the
    calibrated decode step's communication share. Columns as
    :func:`~cohw_utils.studies.validation.ledger.ledger_errors` plus ``devices``, ``tp``, ``dp``,
    ``link`` and ``decode comm share``."""
    hardware, links = load_hardware(), load_interconnects()
    rows = ledger[ledger["covered"] & (ledger["devices"] > 1)]
    if ids is not None:
        rows = rows[rows["id"].isin(ids)]
    out = []
    for _, row in rows.iterrows():
        hw, link = hardware[row["hardware"]], links[row["link"]]
        tp, dp = plan_of(row["parallelism"])
        ideal = plan_prediction(row, hw, link, None)
        cal = plan_prediction(row, hw, link, calibration)
        o = 1 if row["metric"] == "ttft_ms" else int(row["output_len"])
        reg = ("prefill" if row["metric"] == "ttft_ms" else "decode" if row["metric"] == "tpot_ms" else
               "prefill" if ideal.ttft_s >= (o - 1) * ideal.tpot_s else "decode")
        m = float(row["value"])
        out.append({"id": row["id"], "split": row["split"], "source": row["source"], "model": row["model"],
                    "hardware": row["hardware"], "metric": row["metric"], "regime": reg, "measured": m,
                    "ideal": ideal.value, "calibrated": cal.value, "ideal_ratio": ideal.value / m,
                    "calibrated_ratio": cal.value / m, "devices": int(row["devices"]), "tp": tp, "dp": dp,
                    "link": row["link"], "decode comm share": cal.comm_share})
    cols = ["id", "split", "source", "model", "hardware", "metric", "regime", "measured", "ideal", "calibrated",
            "ideal_ratio", "calibrated_ratio", "devices", "tp", "dp", "link", "decode comm share"]
    return pd.DataFrame(out, columns=cols)
