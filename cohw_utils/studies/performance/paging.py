"""KV-cache management simulated: contiguous per-request reservation against paged blocks
(PagedAttention, Kwon et al. 2023), for an LLM served on one accelerator.

The question: with the same GPU memory, how many requests' KV caches fit at once, how much
of that memory holds real token states, and what does that do to throughput?

Workload (:func:`sample_requests`). Prompt and output lengths are drawn from lognormal
distributions whose means are the vLLM paper's Figure 11 means for ShareGPT (161.31 prompt,
337.99 output tokens) or Alpaca (19.31, 58.45). The paper gives means and histograms, not
distribution parameters: the lognormal shape and its sigma (1.0 for ShareGPT's long tail,
0.8 for Alpaca) are *our assumption*. Lengths are clipped so prompt + output <= the maximum
sequence length (2048). All requests arrive at time 0 (an offline batch: the queue never
runs dry), so the simulation measures the memory-limited throughput bound, not latency.

Schedulers (iteration-level, as Orca and vLLM): every iteration admits waiting requests in
arrival order while they fit (head-of-line: the first that does not fit stops admission),
then every running request produces one token (the admission iteration runs the prompt and
produces the first token); a request leaves when it has produced its output.

* ``contiguous-max`` (Orca (Max), FasterTransformer): each request reserves a contiguous
  region for ``max_len`` tokens (2048) at admission.
* ``contiguous-pow2`` (Orca (Pow2)): reserves the next power of two >= prompt + output
  (the length is known to within 2x).
* ``contiguous-oracle`` (Orca (Oracle)): reserves exactly prompt + output.
* ``paged`` (vLLM): fixed blocks of ``block_size`` tokens (16), allocated when a sequence
  fills its last block; admission needs blocks for the prompt + 1 token; when a growing
  sequence finds no free block, the most recently admitted running request is preempted
  (its blocks freed; it re-enters the queue at the front and its prompt + generated tokens
  are recomputed on readmission), as vLLM's recompute mode does.

Contiguous regions live in one address range of ``capacity`` token slots managed first-fit
(free regions merge on release), so external fragmentation happens as it would with a real
contiguous allocator.

Accounting, per iteration, as shares of the KV memory (``capacity`` slots): ``token_states``
(slots holding a token's K/V), ``reserved`` (reserved for tokens the request will still
produce), ``internal_frag`` (reserved but never to be used: the reservation beyond prompt +
output; for paged, the empty tail of last blocks), ``external_free`` (not reserved by anyone:
holes too small or blocked behind the queue head, and memory left when the queue is empty).
Reported as averages over the iterations during which requests are waiting (the
memory-limited steady state), the quantity of the paper's Figure 2.

Throughput bound. Each iteration costs the roofline time of the whole batch on the chip:
``max(bytes / bandwidth, FLOPs / peak)`` with bytes = the weights once + every running
sequence's KV cache (read) + the new tokens' K/V (written), FLOPs = 2 x non-embedding
parameters x tokens processed (decode tokens + admitted prompt tokens) + attention. Tokens/s
= generated tokens / summed iteration time over the steady state: an upper bound (real kernels reach a fraction
of the roofline: see MBU) that is the same for every scheduler, so the ratio between schemes
isolates what memory management buys.

Used by Chapter 4.1-4.2 (KV-cache paging against the vLLM paper).
"""
from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cohw_utils import workloads
from cohw_utils.core.dtypes import bytes_per_element
from cohw_utils.core.errors import CohwError
from cohw_utils.hardware import Hardware
from cohw_utils.core.data import DATA_DIR
from cohw_utils.core.params import count_parameters
from cohw_utils.views.memory_budget import RESERVE_FRACTION, usable_bytes

DATA = DATA_DIR
VLLM_CSV = DATA / "vllm_paging.csv"
SCHEMES = ("contiguous-max", "contiguous-pow2", "contiguous-oracle", "paged")
PAPER_SYSTEM = {"contiguous-max": "Orca (Max)", "contiguous-pow2": "Orca (Pow2)",
                "contiguous-oracle": "Orca (Oracle)", "paged": "vLLM"}
#: (mean prompt, mean output) from the vLLM paper's Figure 11, and our lognormal sigma.
DATASETS = {"sharegpt": (161.31, 337.99, 1.0), "alpaca": (19.31, 58.45, 0.8)}


# ---------------------------------------------------------------------------- the workload
def sample_requests(n: int, dataset: str = "sharegpt", max_len: int = 2048, seed: int = 0) -> pd.DataFrame:
    """``n`` requests with prompt and output lengths (see the module docstring)."""
    if dataset not in DATASETS:
        raise CohwError(f"unknown dataset '{dataset}'; use one of: {', '.join(DATASETS)}")
    if n < 1 or max_len < 2:
        raise CohwError(f"need n >= 1 and max_len >= 2, got n={n}, max_len={max_len}")
    mp, mo, sigma = DATASETS[dataset]
    rng = np.random.default_rng(seed)

    def draw(mean: float) -> np.ndarray:
        return rng.lognormal(math.log(mean) - sigma**2 / 2, sigma, n)

    prompt = np.clip(np.rint(draw(mp)), 1, max_len - 1).astype(int)
    output = np.clip(np.rint(draw(mo)), 1, None).astype(int)
    output = np.minimum(output, max_len - prompt)
    return pd.DataFrame({"prompt": prompt, "output": output})


# ---------------------------------------------------------------------------- allocators
class _FirstFit:
    """Contiguous first-fit allocator over ``capacity`` slots; free regions merge."""

    def __init__(self, capacity: int):
        self.starts = [0]          # sorted starts of free regions
        self.sizes = {0: capacity}

    def alloc(self, size: int) -> int | None:
        for s in self.starts:
            if self.sizes[s] >= size:
                rest = self.sizes.pop(s) - size
                self.starts.remove(s)
                if rest:
                    bisect.insort(self.starts, s + size)
                    self.sizes[s + size] = rest
                return s
        return None

    def free(self, start: int, size: int) -> None:
        i = bisect.bisect_left(self.starts, start)
        # merge with the next region
        if i < len(self.starts) and self.starts[i] == start + size:
            size += self.sizes.pop(self.starts.pop(i))
        # merge with the previous region
        if i > 0 and self.starts[i - 1] + self.sizes[self.starts[i - 1]] == start:
            prev = self.starts[i - 1]
            self.sizes[prev] += size
            return
        bisect.insort(self.starts, start)
        self.sizes[start] = size


@dataclass
class ServingModel:
    """What the simulation needs of a model and a chip: KV bytes per token, weights, the
    capacity in token slots and the per-iteration cost terms."""

    workload: str
    hardware: str
    kv_bytes_per_token: int
    weight_bytes: float
    params_read: float
    attn_flops_per_token_ctx: float  # 4 x layers x heads x head_dim
    kv_budget_bytes: float
    capacity_tokens: int
    mem_bw: float
    peak_flops: float


def serving_model(workload: str, hw: Hardware, dtype: str = "fp16",
                  reserve_fraction: float = RESERVE_FRACTION) -> ServingModel:
    """The KV budget on ``hw``: capacity less the runtime reserve (the package's one rule,
    :mod:`cohw_utils.views.memory_budget`: 10% by default, vLLM's ``gpu_memory_utilization=0.9``)
    less the weights. (The vLLM paper's Figure 1 draws weights ~65%, KV ~30% and ~5% other on
    an A100-40GB for a 13B model.)"""
    from cohw_utils.studies.performance.mbu import weight_bytes_read

    built = workloads.build(workload, device="meta")
    model, cfg = built.model, built.config
    b = bytes_per_element(dtype)
    params = count_parameters(model)
    weights = params * b
    if hw.mem_bytes is None:
        raise CohwError(f"{hw.name} has no memory capacity figure; cannot size its KV cache")
    budget = usable_bytes(hw, reserve_fraction) - weights
    if budget <= 0:
        raise CohwError(f"{workload} in {dtype} ({weights / 1e9:.1f} GB) does not fit on {hw.name} "
                        f"({hw.mem_bytes / 1e9:.0f} GB); pick a larger chip or a smaller model")
    kv = int(workloads.kv_cache_bytes_per_token(cfg, 1) * b)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    peak = hw.peak(dtype if dtype in hw.peak_flops else "fp16")
    return ServingModel(workload, hw.name, kv, weights, weight_bytes_read(model, 1.0),
                        4.0 * cfg.num_hidden_layers * heads * head_dim, budget,
                        int(budget // kv), hw.mem_bw, peak)


# ---------------------------------------------------------------------------- the simulation
def _next_pow2(x: int) -> int:
    return 1 << (int(x) - 1).bit_length()


def simulate_serving(requests: pd.DataFrame, sm: ServingModel, scheme: str, max_len: int = 2048,
             block_size: int = 16, max_batch: int = 256, watermark: float = 0.01) -> dict[str, Any]:
    """Serve ``requests`` under ``scheme`` (see the module docstring); returns the averages
    (shares in %), batch statistics, throughput bound and counts.

    Shares, batch sizes and tokens/s are taken over the *saturated* iterations, those with
    requests still waiting: once the queue is empty the last requests drain and memory empties,
    an artefact of serving a finite batch (``drain_tokens_per_s`` reports that phase).
    ``max_batch`` caps running requests (vLLM's default ``max_num_seqs`` is 256); paged
    admission keeps ``watermark`` of the blocks free (vLLM's default 1%), which limits
    preemptions."""
    if scheme not in SCHEMES:
        raise CohwError(f"unknown scheme '{scheme}'; use one of: {', '.join(SCHEMES)}")
    prompt = requests["prompt"].to_numpy().astype(int).copy()
    output = requests["output"].to_numpy().astype(int)
    n = len(prompt)
    cap = sm.capacity_tokens
    total_len = prompt + output
    paged = scheme == "paged"
    if scheme == "contiguous-max":
        reserve = np.full(n, max_len)
    elif scheme == "contiguous-pow2":
        reserve = np.minimum(np.array([_next_pow2(x) for x in total_len]), max_len)
    else:
        reserve = total_len.copy()
    if not paged and reserve.max() > cap:
        raise CohwError(f"a request needs {reserve.max()} contiguous slots but the KV cache holds {cap}")
    n_blocks = cap // block_size
    alloc = _FirstFit(cap)
    queue: deque[int] = deque(range(n))
    length = np.zeros(n, dtype=np.int64)    # tokens whose K/V are stored
    produced = np.zeros(n, dtype=np.int64)
    start = np.full(n, -1, dtype=np.int64)
    blocks = np.zeros(n, dtype=np.int64)
    running: list[int] = []
    free_blocks = n_blocks
    t = 0.0
    iters = 0
    sums = dict(token_states=0.0, reserved=0.0, internal_frag=0.0, external_free=0.0, batch=0.0)
    max_running = 0
    preemptions = recomputed = 0
    generated = sat_generated = 0
    sat_iters, sat_time = 0, 0.0
    while queue or running:
        prefill = 0
        while queue and len(running) < max_batch:
            r = queue[0]
            need_tokens = prompt[r] + produced[r]  # recompute after preemption
            if paged:
                need = -(-(need_tokens + 1) // block_size)
                if need > free_blocks - watermark * n_blocks:
                    break
                free_blocks -= need
                blocks[r] = need
            else:
                s = alloc.alloc(int(reserve[r]))
                if s is None:
                    break
                start[r] = s
            queue.popleft()
            running.append(r)
            length[r] = need_tokens
            prefill += need_tokens
            recomputed += int(produced[r])
        if not running:
            raise CohwError("no request fits in the KV cache at all; give the model more memory")
        # every running request produces one token (its K/V is stored)
        kv_read = float(length[running].sum())
        for r in list(running):
            if r not in running:  # preempted earlier in this iteration
                continue
            if paged and length[r] + 1 > blocks[r] * block_size:
                while free_blocks == 0:  # preempt the most recently admitted (possibly r itself)
                    victim = running.pop()
                    free_blocks += blocks[victim]
                    blocks[victim] = 0
                    length[victim] = 0
                    queue.appendleft(victim)
                    preemptions += 1
                    if victim == r:
                        break
                if r not in running:
                    continue
                free_blocks -= 1
                blocks[r] += 1
            length[r] += 1
            produced[r] += 1
        batch = len(running)
        generated += batch
        max_running = max(max_running, batch)
        # iteration time: roofline of the whole batch
        bytes_ = sm.weight_bytes + (kv_read + batch) * sm.kv_bytes_per_token
        tokens = batch + prefill
        flops = 2.0 * sm.params_read * tokens + sm.attn_flops_per_token_ctx * (kv_read + batch)
        dt = max(bytes_ / sm.mem_bw, flops / sm.peak_flops)
        t += dt
        iters += 1
        if queue:  # saturated: requests are waiting for memory
            sat_iters += 1
            sat_time += dt
            sat_generated += batch
            lengths = length[running]
            stored = float(lengths.sum())
            if paged:
                allocated = float(blocks[running].sum() * block_size)
                sums["token_states"] += stored / cap
                sums["internal_frag"] += (allocated - stored) / cap
                sums["external_free"] += (cap - allocated) / cap
            else:
                res = reserve[running].astype(float)
                final = total_len[running].astype(float)
                sums["token_states"] += stored / cap
                sums["reserved"] += float((final - lengths).sum()) / cap
                sums["internal_frag"] += float((res - final).sum()) / cap
                sums["external_free"] += (cap - float(res.sum())) / cap
            sums["batch"] += batch
        # finished requests leave
        done = [r for r in running if produced[r] >= output[r]]
        for r in done:
            running.remove(r)
            if paged:
                free_blocks += blocks[r]
                blocks[r] = 0
            else:
                alloc.free(int(start[r]), int(reserve[r]))
    if not sat_iters:
        raise CohwError(f"the queue never waited: all {n} requests fit at once; simulate more requests")
    shares = {k: 100.0 * v / sat_iters for k, v in sums.items() if k != "batch"}
    return {"scheme": scheme, "paper_system": PAPER_SYSTEM[scheme], "requests": n,
            "token_states_%": shares["token_states"], "reserved_%": shares["reserved"],
            "internal_frag_%": shares["internal_frag"], "external_free_%": shares["external_free"],
            "mean_batch": sums["batch"] / sat_iters, "max_batch": max_running,
            "iterations": iters, "saturated_iterations": sat_iters, "time_s": t,
            "tokens_per_s": sat_generated / sat_time,
            "drain_tokens_per_s": (generated - sat_generated) / (t - sat_time) if t > sat_time else float("nan"),
            "preemptions": preemptions, "recomputed_tokens": recomputed}


def compare_schemes(workload: str = "llama-2-13b", hw: Hardware | None = None, n: int = 1000,
                    dataset: str = "sharegpt", dtype: str = "fp16", max_len: int = 2048,
                    block_size: int = 16, seed: int = 0) -> pd.DataFrame:
    """Every scheme on the same requests; ``x_vs_max`` is throughput relative to
    ``contiguous-max``. ``attrs``: the serving model and the realised mean lengths."""
    from cohw_utils.hardware import get_hardware

    hw = hw or get_hardware("A100-40GB")
    sm = serving_model(workload, hw, dtype)
    req = sample_requests(n, dataset, max_len, seed)
    rows = [simulate_serving(req, sm, s, max_len, block_size) for s in SCHEMES]
    out = pd.DataFrame(rows).set_index("scheme")
    out["x_vs_max"] = out["tokens_per_s"] / out.loc["contiguous-max", "tokens_per_s"]
    out.attrs.update(serving_model=sm, mean_prompt=float(req["prompt"].mean()),
                     mean_output=float(req["output"].mean()), dataset=dataset, n=n)
    return out


def load_vllm(path: str | Path = VLLM_CSV) -> pd.DataFrame:
    """The vLLM paper's numbers (``data/vllm_paging.csv``)."""
    try:
        return pd.read_csv(path)
    except OSError as e:
        raise CohwError(f"cannot read {path}: {e}") from None


def beside_paper(ours: pd.DataFrame, paper: pd.DataFrame | None = None) -> pd.DataFrame:
    """Our token-state share and throughput gain beside the paper's Figure 2 share and its
    throughput claims, one row per scheme."""
    paper = load_vllm() if paper is None else paper
    share = paper[paper["metric"] == "token_states_share"].set_index("system")["value"]
    gains = paper.set_index(["system", "metric"])["value"]
    rows = []
    for scheme, r in ours.iterrows():
        system = PAPER_SYSTEM[scheme]
        row = {"scheme": scheme, "paper system": system,
               "token states, ours %": r["token_states_%"],
               "token states, paper %": share.get(system, np.nan),
               "max batch, ours": r["max_batch"], "mean batch, ours": r["mean_batch"],
               "throughput bound, ours tok/s": r["tokens_per_s"],
               "paged gain, ours x": ours.loc["paged", "tokens_per_s"] / r["tokens_per_s"]}
        key = (f"vLLM vs {system}", "request_rate_gain_min")
        row["vLLM gain, paper x"] = (f"{gains[key]:g}-{gains[(key[0], 'request_rate_gain_max')]:g}"
                                     if key in gains.index else ("1" if scheme == "paged" else ""))
        rows.append(row)
    return pd.DataFrame(rows).set_index("scheme")


def fig_paging(ours: pd.DataFrame, paper: pd.DataFrame | None = None) -> Figure:
    """Stacked bars of KV memory use per scheme (ours), with the paper's token-state share
    for the matching system as a black tick."""
    paper = load_vllm() if paper is None else paper
    share = paper[paper["metric"] == "token_states_share"].set_index("system")["value"]
    parts = [("token_states_%", "token states", "tab:green"), ("reserved_%", "reserved (future tokens)", "gold"),
             ("internal_frag_%", "internal fragmentation", "tab:red"),
             ("external_free_%", "external fragmentation & free", "tab:gray")]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    x = np.arange(len(ours))
    bottom = np.zeros(len(ours))
    for col, label, color in parts:
        ax.bar(x, ours[col], bottom=bottom, color=color, label=label, width=0.6)
        bottom += ours[col].to_numpy()
    for xi, scheme in zip(x, ours.index):
        v = share.get(PAPER_SYSTEM[scheme])
        if v is not None and np.isfinite(v):
            ax.plot([xi - 0.35, xi + 0.35], [v, v], "k-", lw=2.5)
            ax.annotate(f"paper {v:.1f}%", (xi + 0.36, v), fontsize=7, va="center")
    ax.set_xticks(x, [f"{s}\n({PAPER_SYSTEM[s]})" for s in ours.index], fontsize=8)
    ax.set(ylabel="% of KV-cache memory (average over iterations)", ylim=(0, 105),
           title="KV-cache memory use by scheduler\n(bars: our simulation; black: token states in the vLLM paper's Fig. 2)")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig
