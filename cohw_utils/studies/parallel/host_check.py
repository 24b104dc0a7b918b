"""The two-process gloo run set beside the model's prediction for this machine (Chapter 4.7).

:func:`predict_run` takes what :func:`cohw_utils.studies.parallel.gloo_run.run` measured and
predicts the same steps with the book's own pieces:

* **the link**: latency and bandwidth fitted (least squares) on the run's own all-reduce sweep
  under the ring formula (:func:`cohw_utils.views.collectives.fit_link`): gloo over shared
  memory is this machine's interconnect, and no data sheet gives its figures;
* **the collectives**: each rank's table from :func:`cohw_utils.spine.shard.per_rank_table` (TP=2:
  two all-reduces per layer and the LM head's all-gather, traced from the model's own plan), and
  for DP=2 the gradient all-reduce in DistributedDataParallel's buckets (a first bucket of 1 MiB,
  then 25 MiB each: DDP's defaults; real buckets end on parameter boundaries, so this is close,
  not exact);
* **compute**: the ideal roofline of the per-rank table on this machine's probe, each rank
  given half the machine (one core of two: half the probed GEMM rate and bandwidth), and, as a
  second estimate, the run's own measurement of the per-rank work without collectives.

So the comparison separates the two models: the communication model (predicted collectives
against measured step minus measured local work) and the compute model (ideal roofline
against the measured local work). What neither holds -- DTensor's per-op dispatch in Python,
DDP's bucketing and hooks -- is the difference left over, reported as such.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch

from cohw_utils.hardware.specs import Hardware, scaled
from cohw_utils.spine.shard import per_rank_table
from cohw_utils.spine.trace import trace
from cohw_utils.hardware.interconnects import Interconnect
from cohw_utils.views.collectives import COLLECTIVE_COSTS, collective_time
from cohw_utils.views.parallel import comm_table
from cohw_utils.views.predictor import phase_seconds
from cohw_utils.workloads import build

__all__ = ["fit_link", "host_link", "ddp_buckets", "predict_run"]

_FIRST_BUCKET = 2**20  # torch.distributed's _DEFAULT_FIRST_BUCKET_BYTES


def fit_link(kind: str, sizes: list[float], seconds: list[float], n: int, name: str) -> Interconnect:
    """The link (latency, per-direction bandwidth) whose alpha-beta cost of collective ``kind``
    over ``n`` ranks best fits measured ``seconds`` at message ``sizes``: the cost is linear in
    both unknowns, ``t = a(n) alpha + b(n) S / B``, so least squares on (alpha, 1/B), each
    coefficient read off the formula itself at unit latency and unit bandwidth. Residuals are
    relative (each row divided by its measured time), so a sweep over four decades of sizes
    fits its small messages as well as its large ones."""
    import numpy as np

    if len(sizes) < 2 or len(sizes) != len(seconds):
        raise ValueError(f"fit_link needs two or more (size, seconds) pairs, got {len(sizes)} and {len(seconds)}")
    unit = Interconnect(name="unit", kind="fit", bw_per_dir=1.0, latency_s=1.0, max_devices=None, source="", notes="")
    steps = COLLECTIVE_COSTS[kind](0.0, n, unit)                     # latency steps: cost at 0 bytes
    factor = COLLECTIVE_COSTS[kind](1.0, n, unit) - steps            # bytes on the link per message byte
    t = np.asarray(seconds, dtype=float)
    a = np.column_stack([np.full(len(sizes), steps), factor * np.asarray(sizes, dtype=float)]) / t[:, None]
    (alpha, inv_bw), *_ = np.linalg.lstsq(a, np.ones_like(t), rcond=None)
    return Interconnect(name=name, kind="host", bw_per_dir=1.0 / max(inv_bw, 1e-30), latency_s=max(alpha, 0.0),
                        max_devices=n, source="fitted on this run's all-reduce sweep",
                        notes=f"least squares over {len(sizes)} sizes, {kind}, {n} ranks")


def host_link(measured: dict[str, Any]):
    """The interconnect fitted on the run's all-reduce sweep (medians)."""
    sweep = measured["all_reduce"]
    return fit_link("all_reduce", [s["bytes"] for s in sweep], [s["median_s"] for s in sweep],
                    n=measured["world_size"], name="host-gloo (fitted)")


def ddp_buckets(grad_bytes: int, cap: int) -> list[int]:
    """Gradient bytes per DDP bucket: a first bucket of 1 MiB, then ``cap`` each."""
    first = min(_FIRST_BUCKET, grad_bytes)
    rest = grad_bytes - first
    return [first] + [min(cap, rest - k) for k in range(0, rest, cap)]


def _train_table(folder: Path, batch: int, seq: int) -> pd.DataFrame:
    b = build(str(folder / "model"), scale="full", device="meta", dtype=torch.float32, batch=batch, seq_len=seq)
    model = b.model.train()
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    def step():  # the loss written out, and a cache asked for: transformers' own loss, its padding-mask
        # check and its packed-sequence check (run with no cache) read tensor values, which meta has not;
        # the cache adds one copy of each layer's K and V, a small extra
        logits = model(input_ids=ids, use_cache=True).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()

    return trace(step, model=model, phase="train")


def predict_run(measured: dict[str, Any], folder: str | Path, host: Hardware) -> pd.DataFrame:
    """One row per parallel mode (TP=2, DP=2): measured step and local work, the predicted
    collectives and compute, and the errors (module docstring)."""
    folder = Path(folder)
    n, batch, seq = measured["world_size"], measured["batch"], measured["seq"]
    link = host_link(measured)
    rank_hw = scaled(host, bandwidth=1 / n, flops=1 / n, name=f"{host.name} (1 of {n} cores)")
    tp = per_rank_table(str(folder / "model"), "prefill", tp=n, batch=batch, seq_len=seq, dtype=torch.float32)
    is_comm = tp["op_class"] == "communication"
    tp_comm = float(comm_table(tp, link)["seconds"].sum())
    dp = _train_table(folder, batch // n, seq)
    buckets = ddp_buckets(measured["dp_grad_bytes"], measured["ddp_bucket_cap_bytes"])
    dp_comm = sum(collective_time("all_reduce", b, n, link) for b in buckets)
    rows = []
    for mode, step, local, comm, table, count in (
            ("TP=2 forward", measured["tp_step"], measured["tp_local"], tp_comm, tp[~is_comm], int(is_comm.sum())),
            ("DP=2 train step", measured["dp_step"], measured["dp_local"], dp_comm, dp, len(buckets))):
        compute = phase_seconds(table, rank_hw)
        rows.append({
            "mode": mode, "collectives": count,
            "measured step (ms)": step["median_s"] * 1e3, "measured local (ms)": local["median_s"] * 1e3,
            "measured comm (ms)": (step["median_s"] - local["median_s"]) * 1e3,
            "predicted comm (ms)": comm * 1e3, "ideal compute (ms)": compute * 1e3,
            "predicted step, local + comm (ms)": (local["median_s"] + comm) * 1e3,
            "predicted step, ideal + comm (ms)": (compute + comm) * 1e3,
        })
    out = pd.DataFrame(rows).set_index("mode")
    out["comm error"] = out["predicted comm (ms)"] / out["measured comm (ms)"] - 1
    out["step error (local + comm)"] = out["predicted step, local + comm (ms)"] / out["measured step (ms)"] - 1
    out["step error (ideal + comm)"] = out["predicted step, ideal + comm (ms)"] / out["measured step (ms)"] - 1
    out.attrs["link"] = link
    out.attrs["bus_bandwidth_GBps"] = _busbw(measured)
    return out


def _busbw(measured: dict[str, Any]) -> float:
    """NCCL-style bus bandwidth of the sweep's largest all-reduce, GB/s."""
    from cohw_utils.views.collectives import bus_bandwidth

    last = measured["all_reduce"][-1]
    return bus_bandwidth("all_reduce", last["bytes"], measured["world_size"], last["median_s"]) / 1e9

