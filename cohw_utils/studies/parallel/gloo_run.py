"""A real two-process run on this machine: gloo collectives, TP=2 and DP=2, measured (Chapter 4.7).

``run()`` launches ``torchrun --standalone --nproc-per-node 2`` on this module; each rank uses one
CPU thread (so two ranks share a 2-core machine without oversubscribing it). Rank 0 writes what
was measured to a JSON file, which ``run()`` returns as a dict:

* **collective sweep**: ``dist.all_reduce`` of fp32 buffers from 4 KiB up to ``max_bytes``, each
  timed ``repeats`` times between barriers (median and min/max kept);
* **TP=2**: the model's forward over ``batch x seq`` tokens with its own tensor-parallel plan
  applied by ``parallelize_module`` (:func:`cohw_utils.spine.shard.apply_tp`) on real weights,
  then the same per-rank work with no collectives (each rank runs a model whose heads and MLP
  width are its share: what a rank computes, alone);
* **DP=2**: a training step (forward, backward, SGD) of a ``DistributedDataParallel`` model on
  ``batch / 2`` sequences per rank, then the same step under ``no_sync()`` (no gradient
  all-reduce).

Every step is timed ``repeats`` times after a warm-up, between barriers; a step's time is the
slower rank's (each rank's median is gathered). The model is a small Llama built from a config
written next to the output (:data:`SMALL_LLAMA`), so that the predictor
(:mod:`cohw_utils.studies.parallel.predict_gloo`) traces the very same architecture on ``meta``.

Run ``python -m cohw_utils.studies.parallel.gloo_run --help`` for the worker's options.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from cohw_utils.core.errors import CohwError

__all__ = ["SMALL_LLAMA", "write_config", "run"]

#: The run's model: a 4-layer Llama (hidden 512, 8 heads, MLP 1408, vocab 2048), small enough
#: to time on two CPU cores, large enough that its GEMMs dominate a step.
SMALL_LLAMA: dict[str, Any] = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 512,
    "intermediate_size": 1408, "num_hidden_layers": 4, "num_attention_heads": 8,
    "num_key_value_heads": 8, "vocab_size": 2048, "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float32",
}


def write_config(folder: str | Path, overrides: dict[str, Any] | None = None) -> Path:
    """Write :data:`SMALL_LLAMA` (with ``overrides``) as ``folder/config.json``; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**SMALL_LLAMA, **(overrides or {})}, indent=1))
    return folder


def _local_overrides(tp: int) -> dict[str, Any]:
    """The config of one rank's share of SMALL_LLAMA under tensor parallelism ``tp``."""
    c = SMALL_LLAMA
    return {"num_attention_heads": c["num_attention_heads"] // tp,
            "num_key_value_heads": c["num_key_value_heads"] // tp,
            "intermediate_size": c["intermediate_size"] // tp,
            "head_dim": c["hidden_size"] // c["num_attention_heads"]}


def run(folder: str | Path | None = None, *, batch: int = 4, seq: int = 128, repeats: int = 5,
        max_bytes: int = 1 << 24, timeout_s: float = 600.0) -> dict[str, Any]:
    """Launch the two-process run (module docstring) and return rank 0's measurements."""
    folder = Path(folder or tempfile.mkdtemp(prefix="cohw-gloo-"))
    write_config(folder / "model")
    write_config(folder / "local-tp2", _local_overrides(2))
    out = folder / "measured.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "cohw_utils.studies.parallel.gloo_run", "--folder", str(folder), "--batch", str(batch),
           "--seq", str(seq), "--repeats", str(repeats), "--max-bytes", str(max_bytes)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise CohwError(f"the two-process gloo run took over {timeout_s:.0f} s; lower repeats or max_bytes") from None
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise CohwError(f"torchrun exited with {proc.returncode}; its last lines:\n{tail}")
    return {**json.loads(out.read_text()), "folder": str(folder)}


# ------------------------------------------------------------------------------ the worker
def _timed(fn, repeats: int) -> dict[str, float]:
    """Median/min/max seconds of ``fn`` over ``repeats`` calls between barriers; the slower rank's."""
    import torch
    import torch.distributed as dist

    from cohw_utils.core.timing import time_callable

    t = time_callable(fn, repeats=repeats, warmup=2, setup=dist.barrier)
    mine = torch.tensor([t.median, t.min, t.max], dtype=torch.float64)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    worst = max(every, key=lambda x: float(x[0]))
    return {"median_s": float(worst[0]), "min_s": float(worst[1]), "max_s": float(worst[2]), "repeats": repeats}


def _worker(folder: Path, batch: int, seq: int, repeats: int, max_bytes: int) -> None:
    import torch
    import torch.distributed as dist

    from cohw_utils.spine.shard import apply_tp
    from cohw_utils.workloads import build

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result: dict[str, Any] = {"world_size": world, "batch": batch, "seq": seq, "threads_per_rank": 1,
                              "backend": "gloo", "torch": torch.__version__}

    sweep = []
    size = 4096
    while size <= max_bytes:
        buf = torch.zeros(size // 4, dtype=torch.float32)
        sweep.append({"bytes": size, **_timed(lambda: dist.all_reduce(buf), repeats)})
        size *= 4
    result["all_reduce"] = sweep

    def model_from(sub: str):
        b = build(str(folder / sub), scale="full", device="cpu", dtype=torch.float32, batch=batch, seq_len=seq)
        return b.model.eval()

    ids = torch.randint(0, SMALL_LLAMA["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    tp_model = apply_tp(model_from("model"), world)
    with torch.no_grad():
        result["tp_step"] = _timed(lambda: tp_model(input_ids=ids, use_cache=False), repeats)
    local = model_from(f"local-tp{world}")
    with torch.no_grad():
        result["tp_local"] = _timed(lambda: local(input_ids=ids, use_cache=False), repeats)

    model = model_from("model").train()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)
    mine = ids[rank * batch // world:(rank + 1) * batch // world]

    def step():
        opt.zero_grad(set_to_none=True)
        ddp(input_ids=mine, labels=mine, use_cache=False).loss.backward()
        opt.step()

    result["dp_step"] = _timed(step, repeats)

    def local_step():
        with ddp.no_sync():
            step()

    result["dp_local"] = _timed(local_step, repeats)
    result["dp_grad_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    result["ddp_bucket_cap_bytes"] = 25 * 2**20
    if rank == 0:
        (folder / "measured.json").write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def _main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="one rank of the two-process gloo run (launch with torchrun)")
    p.add_argument("--folder", required=True, type=Path)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-bytes", type=int, default=1 << 24)
    a = p.parse_args(argv)
    _worker(a.folder, a.batch, a.seq, a.repeats, a.max_bytes)


if __name__ == "__main__":
    _main()
