"""A request predicted under a whole parallel plan: tensor x pipeline x expert x data (Chapter 4.7).

:func:`predict_plan` is what ``python -m cohw_utils predict --tp --pp --dp --ep`` prints. One
request (``batch`` sequences of ``input_len`` prompt tokens, ``output_len`` generated) on
``dp`` replicas of ``tp x pp x ep`` chips each, the plan of :mod:`cohw_utils.views.parallel`:

* each replica serves ``batch / dp`` sequences; its ``ep`` expert-parallel ranks take
  ``batch / (dp ep)`` each for attention; a pipeline carries them in ``microbatches``
  microbatches;
* every stage's per-rank tables (:func:`cohw_utils.spine.shard.per_rank_table`: the model's own
  TP plan, the stage's layers and its send/receive of hidden states; a prefill keeping the last
  position's logits, a decode step at the request's mean context, as the one-chip predictor
  does) at one microbatch, expert parallelism applied from the model's own expert plan
  (:func:`~cohw_utils.spine.shard.apply_ep`, balanced routing), weight format applied, are timed by
  :func:`~cohw_utils.views.parallel.rank_seconds` (the calibrated or ideal chip, the ring
  alpha-beta cost of every collective on the link, no overlap unless asked);
* a prefill step and a decode step each take GPipe's ``(m + p - 1)`` ticks of the slowest stage
  (:func:`~cohw_utils.views.parallel.pipeline_step_seconds`; the bubble is reported); TTFT is
  the prefill step, TPOT the decode step, and the request's tokens/s is
  ``batch x output_len / (TTFT + (output_len - 1) TPOT)`` over all replicas, per device divided
  by ``tp x pp x ep x dp``.

With ``pp = ep = dp = microbatches = 1`` this is :func:`cohw_utils.studies.parallel.scaling.tp_curve`'s
row for ``tp`` (a test holds the two equal).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from cohw_utils.core.errors import CohwError
from cohw_utils.hardware import Hardware, get_hardware
from cohw_utils.hardware.interconnects import Interconnect, get_interconnect, load_interconnects
from cohw_utils.spine.shard import per_rank_table
from cohw_utils.views.parallel import (comm_table, moe_geometry, pipeline_step_seconds,
                                       rank_seconds, validate_plan)
from cohw_utils.views.predictor import apply_weight_format, decode_context, load_calibration
from cohw_utils.workloads import build

__all__ = ["PlanPrediction", "predict_plan"]


@dataclass
class PlanPrediction:
    """A request under a plan: ``stages`` (per stage and phase: compute, comm, total seconds of
    one microbatch on one rank), ``collectives`` (per phase, stage and kind: count, bytes,
    seconds), the pipeline ``bubble``, TTFT, TPOT and tokens/s."""

    plan: dict[str, int]
    hardware: str
    link: str | None
    mode: str
    stages: pd.DataFrame
    collectives: pd.DataFrame
    bubble: float
    ttft_s: float
    tpot_s: float
    tokens_per_s: float
    devices: int
    assumptions: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The JSON ``predict`` prints (the one-rank keys of ``--tp`` kept: the slowest stage's)."""
        slow = {ph: self.stages[self.stages["phase"] == ph].sort_values("total (ms)").iloc[-1]
                for ph in ("prefill", "decode")}
        return {**self.plan, "link": self.link, "mode": self.mode, "hardware": self.hardware, "devices": self.devices,
                "prefill compute (ms)": float(slow["prefill"]["compute (ms)"]),
                "prefill comm (ms)": float(slow["prefill"]["comm (ms)"]),
                "decode compute (ms)": float(slow["decode"]["compute (ms)"]),
                "decode comm (ms)": float(slow["decode"]["comm (ms)"]),
                "pipeline bubble": self.bubble, "TTFT (ms)": self.ttft_s * 1e3, "TPOT (ms)": self.tpot_s * 1e3,
                "tokens/s": self.tokens_per_s, "tokens/s per device": self.tokens_per_s / self.devices,
                "stages": self.stages.to_dict(orient="records"),
                "collectives": self.collectives.to_dict(orient="records"), "assumptions": self.assumptions}


def predict_plan(workload: str, hw: Hardware | str, link: Interconnect | str | None = None, *, tp: int = 1,
                 pp: int = 1, dp: int = 1, ep: int = 1, microbatches: int = 1, batch: int = 1, input_len: int = 128,
                 output_len: int = 128, dtype: str = "bf16", weight_fmt: str | None = None,
                 calibration: Any = "calibrated", overlap: bool = False) -> PlanPrediction:
    """Predict one request under the plan (module docstring). ``link`` is required when the plan
    has collectives (``tp``, ``pp`` or ``ep`` > 1); ``calibration``: ``"calibrated"``, ``None``
    (ideal) or a :class:`~cohw_utils.views.predictor.Calibration`."""
    hw = get_hardware(hw) if isinstance(hw, str) else hw
    config = build(workload, scale="full", device="meta", dtype=dtype).model.config
    validate_plan(config, tp=tp, pp=pp, dp=dp, ep=ep, batch=batch, microbatches=microbatches)
    if max(tp, pp, ep) > 1 and link is None:
        raise CohwError(f"tp={tp}, pp={pp}, ep={ep}: a plan with collectives needs --link, the interconnect between "
                        f"the chips: one of {', '.join(sorted(load_interconnects()))}")
    link = get_interconnect(link) if isinstance(link, str) else link
    cal = load_calibration() if calibration == "calibrated" else calibration
    experts, _ = moe_geometry(config)
    mb = batch // (dp * ep) // microbatches
    stage_rows, comms = [], []
    for phase, seq in (("prefill", input_len), ("decode", decode_context(input_len, output_len))):
        opts = {"prefill_logits": "last"} if phase == "prefill" else {}
        for s in range(pp):
            t = per_rank_table(workload, phase, tp=tp, pp=pp, stage=s, ep=ep, batch=mb * ep, seq_len=seq, dtype=dtype,
                               **opts)
            t = apply_weight_format(t, weight_fmt or dtype)
            r = rank_seconds(t, hw, link, cal, overlap)
            stage_rows.append({"phase": phase, "stage": s, "layers": t.attrs["parallel"]["layers"],
                               "compute (ms)": r.compute_s * 1e3, "comm (ms)": r.comm_s * 1e3,
                               "total (ms)": r.total_s * 1e3})
            if r.collectives:
                c = comm_table(t, link)
                for kind, g in c.groupby("kind", sort=False):
                    comms.append({"phase": phase, "stage": s, "kind": kind, "count": len(g),
                                  "group size": int(g["group_size"].max()), "bytes each (largest)": int(g["comm_bytes"].max()),
                                  "bytes in all": int(g["comm_bytes"].sum()), "ms in all": float(g["seconds"].sum()) * 1e3})
    stages = pd.DataFrame(stage_rows)
    steps = {ph: pipeline_step_seconds(list(stages.loc[stages["phase"] == ph, "total (ms)"] / 1e3), microbatches)
             for ph in ("prefill", "decode")}
    ttft, tpot, bubble = steps["prefill"][0], steps["decode"][0], steps["decode"][1]
    e2e = ttft + (output_len - 1) * tpot
    devices = tp * pp * dp * ep
    mode = "ideal" if cal is None or cal.is_ideal else "calibrated"
    assumptions = [
        "every collective on the critical path (no overlap)" if not overlap else "compute and collectives overlap fully",
        "ring algorithms, alpha-beta cost on the link (cohw_utils.views.collectives)",
        "per-rank tables from the model's own TP plan and an even split of layers over stages (cohw_utils.spine.shard)",
        f"GPipe schedule: ({microbatches} + {pp} - 1) ticks of the slowest stage per step" if pp > 1 else "no pipeline",
        f"{dp} independent replicas, {batch // dp} sequences each" if dp > 1 else "one replica",
    ]
    if ep > 1:
        assumptions.append(f"expert parallelism: attention data-parallel over {ep} ranks, {experts // ep} experts per "
                           "rank, balanced routing, transformers' all-to-all dispatch (counts, tokens, outputs) per MoE layer")
    return PlanPrediction({"tp": tp, "pp": pp, "dp": dp, "ep": ep, "microbatches": microbatches}, hw.name,
                          None if link is None else link.name, mode, stages,
                          pd.DataFrame(comms, columns=["phase", "stage", "kind", "count", "group size",
                                                       "bytes each (largest)", "bytes in all", "ms in all"]),
                          bubble, ttft, tpot, batch * output_len / e2e, devices, assumptions)
