"""Per-rank time and memory of a sharded model: compute against communication (Chapter 4.7).

Inputs are per-rank op tables (:func:`cohw_utils.spine.shard.per_rank_table`: the local work of
one rank plus every collective as a ``communication`` row with ``group_size`` and
``comm_bytes``); this view never traces.

Time of one rank's step (:func:`rank_seconds`):

* **compute** = the predictor's time of the non-communication rows on the chip
  (:func:`cohw_utils.views.predictor.phase_seconds`: ideal, or calibrated with its efficiency and
  per-step overhead);
* **communication** = the sum over collective rows of the alpha-beta cost on the link
  (:func:`cohw_utils.views.collectives.collective_time`: ring algorithms, the link's per-direction
  bandwidth and latency);
* **overlap** is an assumption, stated and switchable: ``overlap=False`` (default) puts every
  collective on the critical path, as tensor parallelism's all-reduce is (the next layer needs
  its result); ``overlap=True`` takes the step as ``max(compute, communication)``, the bound a
  perfectly overlapped schedule (FSDP's prefetched all-gathers, DP's bucketed gradient
  all-reduce) can reach.

Pipeline parallelism (:func:`pipeline_bubble`): with ``p`` stages and ``m`` microbatches a
GPipe / 1F1B schedule idles a fraction ``(p - 1) / (m + p - 1)`` of its time (Huang et al. 2019;
Narayanan et al. 2021, Sec. 2.2).

FSDP2's collectives (:func:`fsdp_comm`), per training step with every decoder layer a unit and
the root a unit of the rest: an all-gather of each unit's parameters before its forward and, for
the units resharded after forward (all but the root, FSDP2's default), again before its
backward; a reduce-scatter of each unit's gradients. The message is the unit's gathered bytes
(each parameter's dim 0 padded to a multiple of ``dp``); a ring sends ``(dp - 1) / dp`` of it per
rank. :func:`cohw_utils.spine.shard_train.fsdp_step_table` traces the same collectives from
``fully_shard`` itself, on a small model.

A plan of ``tp x pp x ep`` devices per replica and ``dp`` replicas (:func:`validate_plan`,
:func:`pipeline_step_seconds`; the ``predict`` command):

* **data parallelism** at inference is ``dp`` independent replicas, each serving ``batch / dp``
  sequences (no communication); ``dp`` must divide the batch;
* **pipeline**: a replica's batch is split into ``m`` microbatches; under GPipe's schedule a step
  takes ``(m + p - 1)`` ticks of the slowest stage (each tick one microbatch through one stage),
  the bubble ``(p - 1) / (m + p - 1)`` of it idle;
* **expert parallelism** (mixture-of-experts models): the ``ep`` ranks of a replica split its
  sequences for attention and the dense layers (``batch / (dp ep)`` each, "data-parallel
  attention") and hold ``E / ep`` routed experts each. The rank's table is traced with the
  model's own expert plan applied (:func:`cohw_utils.spine.shard.apply_ep`: under balanced
  routing each rank's grouped GEMMs get as many token-expert rows as its own tokens make, spread
  over its ``E / ep`` experts, and each MoE layer all-to-alls the counts, the ``tokens x k x
  hidden`` dispatched rows and their outputs). Tensor and expert parallelism together are not
  modelled.

Memory per rank:

* **Training state** (:func:`training_state_bytes`), mixed-precision Adam as in ZeRO
  (Rajbhandari et al. 2020, Sec. 3.1): 2 bytes of 16-bit weights, 2 of 16-bit gradients and
  ``K = 12`` of fp32 master weights, momentum and variance per parameter; data parallelism over
  ``dp`` ranks divides the optimizer state (ZeRO-1), and the gradients (ZeRO-2), and the
  weights too (ZeRO-3, which is what FSDP's full sharding does).
* **Activations** (:func:`activation_bytes`), per transformer layer, 16-bit, as Korthikanti et
  al. 2022 count them (Sec. 4, Table 2): ``s b h (34 + 5 a s / h)`` unsharded;
  ``s b h (10 + 24/t + 5 a s / (h t))`` under tensor parallelism ``t``; ``s b h / t (34 + 5 a s / h)``
  with sequence parallelism added; ``34 s b h / t`` with selective recomputation (attention's
  ``5 a s / h`` term recomputed) and sequence parallelism; ``2 s b h`` (the layer's input only)
  under full recomputation. ``s`` sequence length, ``b`` microbatch, ``h`` hidden, ``a`` heads.
  The formulas assume dropout masks are stored (1 byte per element) and a non-fused attention.
* **KV cache per rank** (:func:`kv_bytes_per_rank`): the model's per-token cache divided by
  ``tp`` (each rank holds its KV heads) and by ``pp`` (each stage its layers).

Used by Chapter 4.7 and the ``predict`` command's ``--tp``/``--pp``/``--dp``/``--ep``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from cohw_utils.core.errors import CohwError
from cohw_utils.core.opclasses import COMMUNICATION
from cohw_utils.hardware import Hardware
from cohw_utils.views.collectives import COLLECTIVE_OF_OP, collective_time
from cohw_utils.views.predictor import Calibration, phase_seconds

__all__ = ["RankTime", "comm_table", "rank_seconds", "pipeline_bubble", "training_state_bytes",
           "activation_bytes", "kv_bytes_per_rank", "ACTIVATION_MODES", "fsdp_comm", "validate_plan",
           "pipeline_step_seconds", "moe_geometry", "fsdp_whole_model"]


def _packet(op: str) -> str:
    """``_c10d_functional.all_reduce.default`` -> ``_c10d_functional.all_reduce``."""
    parts = op.split(".")
    return ".".join(parts[:2]) if len(parts) >= 2 else op


def comm_table(table: pd.DataFrame, link=None) -> pd.DataFrame:
    """The collective rows of a per-rank table: ``op``, ``module``, ``kind`` (all_reduce,
    all_gather...), ``group_size``, ``comm_bytes`` and, given a ``link`` (an
    :class:`~cohw_utils.hardware.interconnects.Interconnect` or its name), ``seconds``."""
    if "comm_bytes" not in table.columns:
        raise CohwError("comm_table needs a per-rank table (cohw_utils.spine.shard.per_rank_table), "
                        "whose collective rows carry group_size and comm_bytes")
    rows = table[table["op_class"] == COMMUNICATION]
    out = rows[["op", "module", "group_size", "comm_bytes"]].copy()
    kinds = []
    for op in out["op"]:
        kind = COLLECTIVE_OF_OP.get(_packet(op))
        if kind is None:
            raise CohwError(f"collective {op} has no cost formula: add it to "
                            "cohw_utils.views.collectives.COLLECTIVE_OF_OP")
        kinds.append(kind)
    out.insert(2, "kind", kinds)
    out["group_size"] = out["group_size"].astype(int)
    if link is not None:
        out["seconds"] = [collective_time(k, b, int(n), link)
                          for k, b, n in zip(out["kind"], out["comm_bytes"], out["group_size"])]
    return out.reset_index(drop=True)


@dataclass(frozen=True)
class RankTime:
    """One rank's step: ``compute_s`` on the chip, ``comm_s`` on the link, ``total_s`` under the
    overlap assumption, and the collective count and bytes behind ``comm_s``."""

    compute_s: float
    comm_s: float
    total_s: float
    overlap: bool
    collectives: int
    comm_bytes: float

    @property
    def comm_share(self) -> float:
        """Communication's share of the step (its exposed time over the total)."""
        exposed = self.total_s - self.compute_s if self.overlap else self.comm_s
        return exposed / self.total_s if self.total_s else 0.0


def rank_seconds(table: pd.DataFrame, hw: Hardware, link=None, calibration: Calibration | None = None,
                 overlap: bool = False) -> RankTime:
    """Predicted time of one rank's step (module docstring): its compute rows on ``hw`` plus
    its collectives on ``link`` (required when the table has any)."""
    is_comm = (table["op_class"] == COMMUNICATION).to_numpy()
    compute = phase_seconds(table[~is_comm], hw, calibration)
    if not is_comm.any():
        return RankTime(compute, 0.0, compute, overlap, 0, 0.0)
    if link is None:
        raise CohwError("this per-rank table has collectives: pass link= (an interconnect name such as "
                        "'nvlink4-h100', see cohw_utils.hardware.load_interconnects())")
    comms = comm_table(table, link)
    comm = float(comms["seconds"].sum())
    total = max(compute, comm) if overlap else compute + comm
    return RankTime(compute, comm, total, overlap, len(comms), float(comms["comm_bytes"].sum()))


def pipeline_bubble(stages: int, microbatches: int) -> float:
    """Idle fraction of a GPipe / 1F1B pipeline: ``(p - 1) / (m + p - 1)``."""
    if stages < 1 or microbatches < 1:
        raise CohwError(f"pipeline_bubble(stages={stages}, microbatches={microbatches}): both must be >= 1")
    return (stages - 1) / (microbatches + stages - 1)


def training_state_bytes(params: float, dp: int = 1, zero: int = 0, *, weight_bytes: int = 2,
                         grad_bytes: int = 2, optimizer_bytes: int = 12) -> dict[str, float]:
    """Bytes per rank of weights, gradients and optimizer state for ``params`` parameters held
    by this rank (after tensor/pipeline sharding), data-parallel over ``dp`` ranks with ZeRO
    stage ``zero`` (0 = plain replication, 1 optimizer, 2 + gradients, 3 + weights = FSDP)."""
    if zero not in (0, 1, 2, 3):
        raise CohwError(f"zero={zero!r}: ZeRO stages are 0 (none), 1, 2 or 3 (3 = FSDP full sharding)")
    if dp < 1 or params < 0:
        raise CohwError(f"training_state_bytes(params={params}, dp={dp}): need params >= 0 and dp >= 1")
    w, g, o = params * weight_bytes, params * grad_bytes, params * optimizer_bytes
    out = {"weights": w / dp if zero >= 3 else w, "gradients": g / dp if zero >= 2 else g,
           "optimizer": o / dp if zero >= 1 else o}
    out["total"] = out["weights"] + out["gradients"] + out["optimizer"]
    return out


#: Activation-memory modes of :func:`activation_bytes` (Korthikanti et al. 2022, Table 2).
ACTIVATION_MODES = ("none", "tp", "tp+sp", "selective+sp", "full")


def activation_bytes(seq: int, batch: int, hidden: int, heads: int, layers: int = 1, tp: int = 1,
                     mode: str = "tp") -> float:
    """Activation bytes a rank keeps for the backward pass of ``layers`` transformer layers
    (16-bit; module docstring). ``mode``: ``"none"`` (no parallelism: ``tp`` must be 1),
    ``"tp"``, ``"tp+sp"``, ``"selective+sp"`` or ``"full"`` recomputation."""
    s, b, h, a, t = seq, batch, hidden, heads, tp
    per = {"none": s * b * h * (34 + 5 * a * s / h) if t == 1 else math.nan,
           "tp": s * b * h * (10 + 24 / t + 5 * a * s / (h * t)),
           "tp+sp": s * b * h / t * (34 + 5 * a * s / h),
           "selective+sp": 34 * s * b * h / t,
           "full": 2 * s * b * h}
    if mode not in per:
        raise CohwError(f"activation mode {mode!r}: choose one of {', '.join(ACTIVATION_MODES)}")
    if math.isnan(per[mode]):
        raise CohwError("activation mode 'none' means no tensor parallelism: pass tp=1, or mode='tp'")
    return per[mode] * layers


def kv_bytes_per_rank(kv_bytes_per_token: float, tokens: int, tp: int = 1, pp: int = 1) -> float:
    """KV cache bytes one rank holds for ``tokens`` cached tokens (all sequences): the model's
    per-token cache split over ``tp`` (KV heads) and ``pp`` (layers)."""
    if tp < 1 or pp < 1:
        raise CohwError(f"kv_bytes_per_rank(tp={tp}, pp={pp}): both must be >= 1")
    return float(kv_bytes_per_token) * tokens / (tp * pp)



def fsdp_comm(unit_bytes: dict[str, float], dp: int, *, root: str = "<root>", reshard_after_forward: bool = True,
              grad_bytes_ratio: float = 1.0) -> pd.DataFrame:
    """FSDP2's collectives of one training step (module docstring): one row per unit, pass and
    kind with ``comm_bytes`` (the message) and ``bus_bytes`` (sent per rank by a ring).
    ``unit_bytes``: each unit's gathered parameter bytes; ``grad_bytes_ratio``: gradient bytes
    per parameter byte (2.0 for fp32 gradients reduced from bf16 parameters)."""
    if isinstance(dp, bool) or not isinstance(dp, int) or dp < 1:
        raise CohwError(f"fsdp_comm(dp={dp!r}): dp must be a whole number of ranks >= 1")
    rows = []
    for unit, b in unit_bytes.items():
        rows.append((unit, "forward", "all_gather", b))
        if reshard_after_forward and unit != root:
            rows.append((unit, "backward", "all_gather", b))
        rows.append((unit, "backward", "reduce_scatter", b * grad_bytes_ratio))
    out = pd.DataFrame(rows, columns=["unit", "pass", "kind", "comm_bytes"])
    out["bus_bytes"] = out["comm_bytes"] * (dp - 1) / dp
    return out


def fsdp_whole_model(table: pd.DataFrame) -> pd.DataFrame:
    """FSDP2's collectives of the whole model's training step, from a step traced with only its
    first layers (:func:`cohw_utils.spine.shard_train.fsdp_step_table` with ``layers``): every
    decoder layer is the same unit, so a collective whose message is one layer unit's bytes
    stands for ``full_layers / layers`` of them and the root's count once. By message, not by
    module, because FSDP2 issues backward collectives from hooks whose module attribution is
    approximate. One row per (pass, kind): ``count``, ``comm_bytes`` (all of them)."""
    f = table.attrs.get("fsdp")
    if f is None or "full_layers" not in f:
        raise CohwError("fsdp_whole_model needs a table from cohw_utils.spine.shard_train.fsdp_step_table")
    layer_bytes = {b for u, b in f["units"].items() if u != "<root>"}
    if len(layer_bytes) != 1 or f["units"].get("<root>") in layer_bytes:
        raise CohwError("fsdp_whole_model: the decoder layers must be identical units, and the root's bytes "
                        f"different from theirs (units: {f['units']})")
    comm = comm_table(table)
    comm["pass"] = table.loc[table["op_class"] == COMMUNICATION, "pass"].to_numpy()
    scale = f["full_layers"] / f["layers"]
    comm["count"] = [scale if b in layer_bytes else 1.0 for b in comm["comm_bytes"]]
    comm["comm_bytes"] = comm["comm_bytes"] * comm["count"]
    return comm.groupby(["pass", "kind"], as_index=False)[["count", "comm_bytes"]].sum()


def moe_geometry(config) -> tuple[int | None, int | None]:
    """``(routed experts, experts per token)`` a config names (None, None for a dense model)."""
    def first(*names):
        for name in names:
            v = getattr(config, name, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        return None
    experts = first("num_local_experts", "num_experts", "n_routed_experts")
    return (experts, first("num_experts_per_tok", "moe_topk", "top_k")) if experts and experts > 1 else (None, None)


def validate_plan(config, *, tp: int = 1, pp: int = 1, dp: int = 1, ep: int = 1, batch: int = 1,
                  microbatches: int = 1) -> None:
    """Raise :class:`CohwError` naming the problem and the fix when a plan cannot be built for
    ``config`` (a model config) at this ``batch`` (module docstring's plan)."""
    for name, v in (("tp", tp), ("pp", pp), ("dp", dp), ("ep", ep), ("microbatches", microbatches), ("batch", batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise CohwError(f"{name}={v!r}: must be a whole number >= 1")
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    for what, n in (("attention heads", heads), ("KV heads", kv)):
        if tp > 1 and n and n % tp:
            raise CohwError(f"tp={tp} does not divide the model's {n} {what}; pick tp among the divisors of {n}")
    layers = getattr(config, "num_hidden_layers", None)
    if layers and pp > layers:
        raise CohwError(f"pp={pp} is more pipeline stages than the model's {layers} layers")
    if batch % dp:
        raise CohwError(f"dp={dp} replicas cannot share a batch of {batch} sequences evenly: give --batch a "
                        f"multiple of {dp} (each replica serves batch / dp; a batch-1 decode cannot be data-parallel)")
    experts, _ = moe_geometry(config)
    if ep > 1:
        if experts is None:
            raise CohwError(f"ep={ep}: expert parallelism needs a mixture-of-experts model; this one has no routed experts")
        if experts % ep:
            raise CohwError(f"ep={ep} does not divide the model's {experts} routed experts; pick ep among its divisors")
        if tp > 1:
            raise CohwError("tp and ep together are not modelled: give an MoE model --ep (with --pp/--dp), or --tp alone "
                            "for a dense one")
        if (batch // dp) % ep:
            raise CohwError(f"ep={ep} ranks split a replica's {batch // dp} sequences for attention: give --batch a "
                            f"multiple of dp x ep = {dp * ep}")
    per_rank = batch // (dp * ep)
    if per_rank % microbatches:
        raise CohwError(f"microbatches={microbatches} must divide the {per_rank} sequences a pipeline carries "
                        "(batch / (dp x ep))")
    if microbatches > 1 and pp == 1:
        raise CohwError(f"microbatches={microbatches} without a pipeline: give --pp > 1, or leave microbatches at 1")


def pipeline_step_seconds(stage_seconds: list[float], microbatches: int = 1) -> tuple[float, float]:
    """``(step seconds, bubble fraction)`` of a GPipe step: ``(m + p - 1)`` ticks of the slowest
    stage's time per microbatch (module docstring)."""
    if not stage_seconds:
        raise CohwError("pipeline_step_seconds needs one time per stage")
    p = len(stage_seconds)
    return (microbatches + p - 1) * max(stage_seconds), pipeline_bubble(p, microbatches)
