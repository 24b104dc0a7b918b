"""Megatron-LM's weak-scaling runs (Narayanan et al. 2021, Table 1) predicted per rank, beside the published figures (Chapter 4.7).

``data/megatron2021_table1.csv`` holds the ten rows of Table 1 as printed (GPT models 1.7B to 1T
on A100-80GB GPUs, tensor-parallel ``t``, pipeline ``p``, GPUs ``n``, global batch ``B``, achieved
teraFLOP/s per GPU). The published metric is ``F / (n x step time)`` with the paper's Eq. (3),
``F = 96 B s l h^2 (1 + s / 6h + V / 16 l h)``: the GEMM FLOPs of a step *with* the recomputed
forward pass (4 passes' worth of forward FLOPs), full (non-causal) attention, no embedding.
:func:`megatron_model_flops` drops the recomputed pass (3 instead of 4 forward passes' worth),
which turns the paper's figures into model FLOPs utilization.

The prediction (:func:`predict_row`) times one training step of one rank from the package's own
parts, with these assumptions, each stated because the paper does not state it or the package
does not model it:

* **Architecture**: a GPT of the row's ``h``, heads and ``l`` with ``V = 51200``, ``s = 2048``,
  built as transformers' Starcoder2 (LayerNorm, biased GeLU MLP of width ``4h``, tied embeddings,
  rotary positions instead of GPT's learned ones: the same GEMMs), whose own tensor-parallel plan
  is applied per rank (:func:`cohw_utils.spine.shard.per_rank_table`) at fp16.
* **Compute**: the first and the last pipeline stage's forward tables (the middle stages hold the
  first stage's layers without the embedding lookup) timed by the calibrated predictor
  (:func:`cohw_utils.views.predictor.phase_seconds`, NVIDIA's fitted compute, bandwidth and fusion)
  *without* its per-step overhead (fitted on serving engines: scheduling, sampling). A microbatch
  costs 4 forward passes (forward, recomputed forward, backward = 2 x forward, as the paper's
  appendix counts it); the LM head, not recomputed, 3.
* **Tensor-parallel all-reduces**: the traced forward's all-reduces on NVLink 3
  (``nvlink3-a100``), three times per microbatch (forward, recomputed forward, backward); none of
  them overlapped. The LM head's logits all-gather of transformers' plan is dropped: Megatron's
  vocabulary-parallel cross entropy exchanges per-token scalars only.
* **Pipeline**: microbatch size ``b = 1`` (Table 2's PTD rows use 1; Table 1 does not say),
  ``m = B / (d b)`` microbatches per step, ``d = n / (t p)``; the non-interleaved 1F1B bubble
  (:func:`cohw_utils.views.parallel.pipeline_bubble`), an upper bound on the interleaved schedule
  the runs used (its bubble is ``1/v`` of that, ``v`` not stated); per microbatch a stage sends its
  activation forward and its gradient back, ``b s h x 2 / t`` bytes each with the scatter/gather
  optimization (Sec. 4.1), over the node's InfiniBand (:data:`SELENE_IB`).
* **Data parallelism**: one ring all-reduce of the rank's fp16 gradients (``2 P / (t p)`` bytes,
  ``P`` from Eq. 2) over ``d`` ranks on :data:`SELENE_IB`, after the pipeline flush, not overlapped.
* **Optimizer**: mixed-precision Adam streams 28 bytes per parameter of the rank (fp32 master
  weight, momentum, variance read and written, fp16 gradient read, fp16 weight written) at the
  calibrated bandwidth.

Predicted teraFLOP/s per GPU = ``F / (n x predicted step)``, the paper's own numerator, so the
error is the step time's.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import pandas as pd

from cohw_utils.core.data import read_table
from cohw_utils.core.errors import CohwError
from cohw_utils.core.opclasses import COMMUNICATION
from cohw_utils.hardware import get_hardware
from cohw_utils.hardware.interconnects import Interconnect, get_interconnect
from cohw_utils.spine.shard import per_rank_table
from cohw_utils.views.collectives import collective_time
from cohw_utils.views.parallel import comm_table, pipeline_bubble
from cohw_utils.views.predictor import Calibration, load_calibration, phase_seconds

__all__ = ["TABLE_FILE", "SELENE_IB", "OPTIMIZER_BYTES_PER_PARAM", "load_table1", "megatron_params",
           "megatron_flops", "megatron_model_flops", "gpt_config_dir", "predict_row", "compare_table1",
           "fig_table1"]

TABLE_FILE = "megatron2021_table1.csv"
_COLUMNS = ("source", "table_figure", "model", "params_b", "heads", "hidden", "layers", "vocab", "seq_len", "tp",
            "pp", "gpus", "batch", "hardware", "dtype", "tflops_per_gpu", "pct_of_peak", "aggregate_pflops",
            "citation", "note", "evidence")
#: Selene's per-GPU network: "eight NVIDIA Mellanox 200Gbps HDR Infiniband HCAs" per 8-GPU node
#: (Narayanan et al. 2021, Sec. 5): 200 Gb/s = 25 GB/s per direction per GPU. The 5 us step
#: latency is the data file's InfiniBand NDR figure (an assumption there too).
SELENE_IB = Interconnect(
    "ib-hdr-selene", "scale-out", 25e9, get_interconnect("ib-ndr").latency_s, None,
    "Narayanan et al. 2021, Sec. 5: eight 200 Gb/s HDR InfiniBand HCAs per DGX A100 node (one per GPU)",
    "latency taken from the ib-ndr row of interconnects.csv")
#: Mixed-precision Adam's bytes per parameter per step (module docstring).
OPTIMIZER_BYTES_PER_PARAM = 28


def load_table1() -> pd.DataFrame:
    """Table 1 as the data file holds it (the file's rows validated by :func:`read_table`)."""
    return read_table(TABLE_FILE, _COLUMNS, numeric=("params_b", "heads", "hidden", "layers", "vocab", "seq_len",
                                                     "tp", "pp", "gpus", "batch", "tflops_per_gpu"))


def megatron_params(layers: int, hidden: int, vocab: int, seq_len: int) -> float:
    """The paper's Eq. (2): ``P = 12 l h^2 (1 + 13 / 12h + (V + s) / 12 l h)``."""
    l, h = layers, hidden
    return 12.0 * l * h * h * (1 + 13 / (12 * h) + (vocab + seq_len) / (12 * l * h))


def megatron_flops(batch: int, seq_len: int, layers: int, hidden: int, vocab: int) -> float:
    """The paper's Eq. (3), FLOPs of one step with activation recomputation."""
    B, s, l, h, V = batch, seq_len, layers, hidden, vocab
    return 96.0 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))


def megatron_model_flops(batch: int, seq_len: int, layers: int, hidden: int, vocab: int) -> float:
    """Eq. (3) without the recomputed forward pass: ``3 x (24 B s h^2 + 4 B s^2 h)`` per layer
    plus ``6 B s h V`` for the logits (the paper's appendix terms) -- the MFU numerator."""
    B, s, l, h, V = batch, seq_len, layers, hidden, vocab
    return 3.0 * l * (24.0 * B * s * h * h + 4.0 * B * s * s * h) + 6.0 * B * s * h * V


def gpt_config_dir(row, root: str | Path | None = None) -> Path:
    """A folder holding the row's GPT as a Starcoder2 ``config.json`` (module docstring), named
    by its content under ``root`` (a temporary folder by default)."""
    cfg = {"model_type": "starcoder2", "architectures": ["Starcoder2ForCausalLM"], "hidden_size": int(row["hidden"]),
           "intermediate_size": 4 * int(row["hidden"]), "num_hidden_layers": int(row["layers"]),
           "num_attention_heads": int(row["heads"]), "num_key_value_heads": int(row["heads"]),
           "vocab_size": int(row["vocab"]), "max_position_embeddings": int(row["seq_len"]),
           "tie_word_embeddings": True, "use_bias": True, "hidden_act": "gelu_pytorch_tanh",
           "sliding_window": None, "torch_dtype": "float16"}
    text = json.dumps(cfg, sort_keys=True, indent=1)
    folder = Path(root or _ROOT) / f"megatron-gpt-{hashlib.sha1(text.encode()).hexdigest()[:10]}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(text)
    return folder


_ROOT = Path(tempfile.gettempdir()) / "cohw-megatron-configs"


def _no_overhead(cal: Calibration, vendor: str) -> Calibration:
    p = cal.for_vendor(vendor)
    p["step_overhead_s"] = 0.0
    return Calibration({"*": p}, source=f"{cal.source}; per-step overhead left out (a training microbatch)")


def predict_row(row, calibration: Calibration | None | str = "calibrated", *, microbatch: int = 1,
                tp_link: str | Interconnect = "nvlink3-a100", dp_link: Interconnect = SELENE_IB) -> dict[str, float]:
    """One Table 1 row's predicted step on one rank (module docstring): its parts in seconds,
    the bubble share, the predicted teraFLOP/s per GPU, and the traced FLOPs beside Eq. (3)."""
    t, p, n, B = int(row["tp"]), int(row["pp"]), int(row["gpus"]), int(row["batch"])
    s, h, l, V = int(row["seq_len"]), int(row["hidden"]), int(row["layers"]), int(row["vocab"])
    if n % (t * p) or B % ((n // (t * p)) * microbatch):
        raise CohwError(f"{row['model']}: {n} GPUs over t={t} x p={p}, batch {B} in microbatches of {microbatch} "
                        "do not divide evenly; give a microbatch size that divides B / d")
    d = n // (t * p)
    m = B // (d * microbatch)
    hw = get_hardware(row["hardware"])
    cal = load_calibration() if calibration == "calibrated" else (calibration or Calibration.ideal())
    cal = _no_overhead(cal, hw.vendor)
    link = get_interconnect(tp_link)
    folder = gpt_config_dir(row)
    stages = sorted({0, p - 1})
    per_stage, fwd_flops = {}, {}
    for stage in stages:
        table = per_rank_table(str(folder), "prefill", tp=t, pp=p, stage=stage, batch=microbatch, seq_len=s,
                               dtype=row["dtype"])
        is_comm = (table["op_class"] == COMMUNICATION).to_numpy()
        head = table["module"].astype(str).str.startswith("lm_head").to_numpy() & ~is_comm
        compute = (4 * phase_seconds(table[~is_comm & ~head], hw, cal)  # forward, recomputed, backward (2x)
                   + 3 * (phase_seconds(table[head], hw, cal) if head.any() else 0.0))  # the head: not recomputed
        gemm = (table["op_class"] == "contraction").to_numpy()
        fwd_flops[stage] = 4 * float(table.loc[gemm & ~head, "flops"].sum()) + 3 * float(table.loc[gemm & head, "flops"].sum())
        ar = 0.0
        if t > 1:
            comms = comm_table(table, link)
            ar = float(comms.loc[comms["kind"] == "all_reduce", "seconds"].sum())
        per_stage[stage] = (compute, ar)
    p2p = 2 * collective_time("send_recv", microbatch * s * h * 2 / t, 2, dp_link) if p > 1 else 0.0
    micro = {k: c + 3 * a + p2p for k, (c, a) in per_stage.items()}
    slow = max(micro, key=micro.get)
    pipeline_s = (m + p - 1) * micro[slow]
    params_rank = megatron_params(l, h, V, s) / (t * p)
    dp_s = collective_time("all_reduce", 2 * params_rank, d, dp_link) if d > 1 else 0.0
    opt_s = OPTIMIZER_BYTES_PER_PARAM * params_rank / (hw.mem_bw * cal.for_vendor(hw.vendor)["bandwidth"])
    step = pipeline_s + dp_s + opt_s
    F = megatron_flops(B, s, l, h, V)
    # traced GEMM FLOPs of one microbatch over the whole pipeline, counted as Eq. (3) counts them
    # (4 forward passes' worth for the layers, 3 for the logits; middle stages = stage 0's layers)
    traced = t * (fwd_flops[0] * (p - 1) + fwd_flops[p - 1]) if p > 1 else t * fwd_flops[0]
    compute_s, ar_s = per_stage[slow]
    return {"d": d, "microbatches": m, "compute (s)": compute_s * (m + p - 1), "tp comm (s)": 3 * ar_s * (m + p - 1),
            "p2p (s)": p2p * (m + p - 1), "dp all-reduce (s)": dp_s, "optimizer (s)": opt_s, "step (s)": step,
            "bubble": pipeline_bubble(p, m), "predicted TFLOP/s per GPU": F / n / step / 1e12,
            "traced / Eq. 3 FLOPs": traced / megatron_flops(microbatch, s, l, h, V)}


def compare_table1(rows: pd.DataFrame | None = None, calibration: Calibration | None | str = "calibrated",
                   **kwargs) -> pd.DataFrame:
    """Predicted beside published for ``rows`` of Table 1 (default all): teraFLOP/s per GPU, the
    error, and both as model FLOPs utilization (the recomputed pass taken out)."""
    rows = load_table1() if rows is None else rows
    out = []
    for _, r in rows.iterrows():
        pred = predict_row(r, calibration, **kwargs)
        peak = get_hardware(r["hardware"]).peak(r["dtype"])
        args = (int(r["batch"]), int(r["seq_len"]), int(r["layers"]), int(r["hidden"]), int(r["vocab"]))
        to_model = megatron_model_flops(*args) / megatron_flops(*args)
        published = float(r["tflops_per_gpu"])
        out.append({"model": r["model"], "t": int(r["tp"]), "p": int(r["pp"]), "d": pred["d"], "GPUs": int(r["gpus"]),
                    "batch": int(r["batch"]), "published TFLOP/s per GPU": published,
                    "predicted TFLOP/s per GPU": pred["predicted TFLOP/s per GPU"],
                    "error": pred["predicted TFLOP/s per GPU"] / published - 1,
                    "published MFU": published * 1e12 * to_model / peak,
                    "predicted MFU": pred["predicted TFLOP/s per GPU"] * 1e12 * to_model / peak,
                    **{k: v for k, v in pred.items() if k not in ("d", "predicted TFLOP/s per GPU")},
                    "table": r["table_figure"]})
    return pd.DataFrame(out).set_index("model")


def fig_table1(comparison: pd.DataFrame):
    """Published against predicted teraFLOP/s per GPU over Table 1's models (a
    :func:`compare_table1` result), with the predicted step's bubble share on a second axis."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.8, 3.8))
    x = range(len(comparison))
    ax.plot(x, comparison["published TFLOP/s per GPU"], "o-", label="published (Table 1)")
    ax.plot(x, comparison["predicted TFLOP/s per GPU"], "s--", label="predicted per rank")
    ax.set_xticks(list(x), [m.replace("GPT ", "") for m in comparison.index], rotation=45, ha="right")
    ax.set_xlabel("model (t x p x d from Table 1)")
    ax.set_ylabel("teraFLOP/s per GPU (Eq. 3)")
    ax.set_ylim(0, 312)
    ax.axhline(312, color="0.6", lw=0.8)
    ax2 = ax.twinx()
    ax2.bar(list(x), comparison["bubble"], alpha=0.2, color="C2", label="predicted 1F1B bubble")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("bubble share of the step")
    lines = ax.get_legend_handles_labels()
    bars = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + bars[0], lines[1] + bars[1], fontsize=8, loc="lower left")
    ax.set_title("Megatron-LM weak scaling on A100-80GB: published vs predicted")
    fig.tight_layout()
    return fig
