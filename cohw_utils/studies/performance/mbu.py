"""Model bandwidth utilization (MBU): how much of a chip's memory bandwidth LLM decoding uses.

Definition (Databricks' post, which introduced the name)::

    MBU = achieved bandwidth / peak bandwidth
    achieved bandwidth = bytes per token / time per output token

**Bytes per token** of one batch-1 decode step (:func:`decode_bytes`) = the weights it reads
plus the KV cache it reads:

* weights: every parameter except the input embedding table, of which a step reads one
  row per sequence (if the output head shares the table, it is read in full and counted).
  This is gpt-fast's choice too (its model size skips ``nn.Embedding`` children).
* KV cache: ``kv_cache_bytes_per_token x context`` for the context the step attends to (the
  new token's K/V write is one token more; it is counted). Activations are ignored: at batch
  1 they are kilobytes.

**Peak**: for an accelerator, the spec-sheet bandwidth (``hardware.csv``); for this machine,
the **read-only** streaming bandwidth (the probe's ``torch.sum`` kernel,
:mod:`cohw_utils.hardware.probe`), measured *in the same session, right before the decode run*,
with :func:`bandwidth_now`, because a shared or virtualised host's bandwidth moves from run to
run; it is measured again after the decode run, and both are reported with their spread.
Decode is a read-only stream (weights and KV cache in, one token's K/V out), so a read kernel
is its denominator: the copy and add kernels mix in writes, whose cost (and whether the
destination line is first fetched, the write-allocate term) differs from a read's. The
copy/add figures, in the STREAM convention and write-allocate-aware, are kept beside it
(``Bandwidth.others``) and the MBU against the copy/add figure is reported too, labelled.

:func:`decode_bound` is the roofline bound of a decode step at batch ``B``: the step reads
the weights once and every sequence's KV cache, and does ``2 x (non-embedding parameters) x
B`` FLOPs plus attention (``4 x layers x context x heads x head_dim`` per sequence), so
``time = max(bytes / bandwidth, FLOPs / peak)`` and tokens/s = ``B / time``.

Used by Chapter 4.1-4.2 (MBU, decode rooflines).
"""
from __future__ import annotations

import contextlib
import functools
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from cohw_utils.hardware import probe
from cohw_utils import workloads
from cohw_utils.core.dtypes import bytes_per_element, dtype_name, parse_dtype
from cohw_utils.core.errors import CohwError
from cohw_utils.hardware import Hardware, get_hardware
from cohw_utils.spine.measure import Timing, time_callable
from cohw_utils.core.data import DATA_DIR, load_gpu_capture
from cohw_utils.core.params import count_parameters
from cohw_utils.views.memory_budget import fits

DATA = DATA_DIR
PUBLISHED_CSV = DATA / "published_mbu.csv"
MBU_CONFIG = workloads.CONFIG_DIR / "tinyllama-1.1b" / "config.json"


# ---------------------------------------------------------------------------- bytes per token
def weight_bytes_read(model: torch.nn.Module, bytes_per_weight: float | None = None) -> int:
    """Bytes of weights one decode step reads: all parameters except input-embedding tables
    that no other module shares (see the module docstring). ``bytes_per_weight`` overrides the
    parameters' own element size (e.g. 1 for an int8 what-if)."""
    emb = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    shared = {id(out_emb.weight)} if out_emb is not None and hasattr(out_emb, "weight") else set()
    skip = {id(w) for w in emb if id(w) not in shared}
    total = 0.0
    for p in model.parameters():
        if id(p) in skip:
            continue
        total += p.numel() * (bytes_per_weight if bytes_per_weight is not None else p.element_size())
    return int(total)


def decode_bytes(weights: float, kv_per_token: float, context: int | float, batch: int = 1) -> dict[str, float]:
    """Bytes one decode step moves: weights once, plus ``batch`` KV caches of ``context``
    tokens read and one new token's K/V written per sequence."""
    kv = batch * kv_per_token * (context + 1)
    return {"weights": float(weights), "kv_cache": float(kv), "total": float(weights + kv)}


def mbu(tokens_per_s: float, bytes_per_token: float, peak_bw: float) -> float:
    """MBU = tokens/s x bytes per token / peak bandwidth (a fraction)."""
    if peak_bw <= 0:
        raise CohwError(f"peak bandwidth must be positive, got {peak_bw}")
    return tokens_per_s * bytes_per_token / peak_bw


# ---------------------------------------------------------------------------- bandwidth now
#: Keys of ``Bandwidth.others`` that :func:`bandwidth_now` fills: the copy/add figures beside the read one.
COPY_STREAM, COPY_WRITE_ALLOCATE = "copy/add (STREAM bytes)", "copy/add (write-allocate bytes)"


@dataclass(frozen=True)
class Bandwidth:
    """A streaming-bandwidth measurement (bytes/s) of one kernel (``kind``): ``best`` (best
    call), ``median``, ``min``/``max`` over its calls, array size, when, the load average
    then, and ``others``: other kernels' best rates measured with it (for :func:`bandwidth_now`,
    the copy/add figures in the STREAM convention and write-allocate-aware), shown beside."""

    best: float
    median: float
    min: float
    max: float
    array_bytes: int
    calls: int
    when: str
    loadavg: tuple[float, float, float]
    kind: str = "read (torch.sum)"
    others: dict[str, float] = field(default_factory=dict, compare=False, hash=False)

    def describe(self) -> str:
        beside = "; ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in self.others.items())
        return (f"{self.best / 1e9:.1f} GB/s best, {self.median / 1e9:.1f} median "
                f"(min {self.min / 1e9:.1f}, max {self.max / 1e9:.1f}; {self.calls} calls of {self.kind} "
                f"on {self.array_bytes / 2**20:.0f} MiB; load average {self.loadavg[0]:.1f})"
                + (f"; beside it: {beside}" if beside else ""))


def _loadavg() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


def bandwidth_now(quick: bool = False) -> Bandwidth:
    """Read-only streaming bandwidth of this machine now (the probe's ``torch.sum`` kernel of
    :func:`cohw_utils.hardware.probe.measure_bandwidth`: arrays >= 8x the LLC and >= 256 MiB;
    quick: 4x and 64 MiB), with the copy/add figures of the same measurement in ``others``
    (:data:`COPY_STREAM`, :data:`COPY_WRITE_ALLOCATE`)."""
    llc, _ = probe.detect_llc()
    r = probe.measure_bandwidth(llc, quick=quick)
    kernels = r.get("kernels", {})
    if not r.get("read_bw") or "read" not in kernels:
        raise CohwError(f"could not measure the read bandwidth: {r.get('reason') or 'no read kernel in the probe result'}")
    read = kernels["read"]
    rates = [read["bytes_per_call"] / s for s in read["seconds"]]
    others = {}
    if r.get("mem_bw"):
        others[COPY_STREAM] = float(r["mem_bw"])
    if r.get("mem_bw_write_allocate"):
        others[COPY_WRITE_ALLOCATE] = float(r["mem_bw_write_allocate"])
    return Bandwidth(best=float(r["read_bw"]), median=float(read["bytes_per_s"]["median"]),
                     min=float(min(rates)), max=float(max(rates)), array_bytes=int(r["array_bytes"]),
                     calls=len(rates), when=time.strftime("%H:%M:%S"), loadavg=_loadavg(), others=others)


def measure_gemv_bandwidth(dtype: str | torch.dtype = "bf16", quick: bool = False, repeats: int = 10) -> Bandwidth:
    """How fast torch's own matrix-vector product streams weights from DRAM: ``F.linear`` of
    one token (1 x 2048) against a weight matrix >= 8x the LLC and >= 256 MiB (quick: 4x and
    64 MiB), counting the matrix's bytes once per call. This is the ceiling of a decode step
    built from torch's kernels, as the read probe is the ceiling of the memory system;
    the ratio of the two says how much of the MBU gap is the GEMV kernel itself."""
    torch_dtype = parse_dtype(dtype)
    llc, _ = probe.detect_llc()
    mult, min_mib = (4, 64) if quick else (8, 256)
    k = 2048
    nbytes = max(mult * llc, min_mib * 2**20)
    n = int(nbytes // (k * torch.finfo(torch_dtype).bits // 8))
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(n, k, generator=g) * 0.02).to(torch_dtype)
    x = torch.randn(1, k, generator=g).to(torch_dtype)
    t = time_callable(lambda: torch.nn.functional.linear(x, w), repeats=repeats, warmup=2)
    size = w.numel() * w.element_size()
    rates = [size / s for s in t.samples]
    return Bandwidth(best=max(rates), median=size / t.median, min=min(rates), max=max(rates),
                     array_bytes=int(size), calls=len(rates), when=time.strftime("%H:%M:%S"), loadavg=_loadavg(),
                     kind=f"{dtype_name(torch_dtype)} GEMV (F.linear, 1 x {k} token)")


# ---------------------------------------------------------------------------- the decode run
def build_random_llm(config_path: str | Path = MBU_CONFIG, dtype: str | torch.dtype = "bf16",
                     seed: int = 0, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A decoder LM from ``config_path`` on ``device`` (CPU by default) with seeded random
    weights, built fast.

    The model is constructed on ``meta`` (no memory, no init kernels), materialised with
    ``to_empty``, and every parameter is filled from a 4M-value seeded normal pool (std 0.02;
    norm weights 1): a dense kernel's speed does not depend on the values, and drawing a
    fresh random number for each of a billion weights would take longer than the
    measurement. Non-persistent buffers computed at construction (rotary frequencies) are
    rebuilt on the device.
    """
    from transformers import AutoModelForCausalLM

    cfg = workloads.load_hf_config(config_path)
    torch_dtype = parse_dtype(dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    model = model.to(torch_dtype).to_empty(device=device).eval()
    g = torch.Generator().manual_seed(seed)
    pool = (torch.randn(1 << 22, generator=g) * 0.02).to(device=device, dtype=torch_dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
                continue
            flat = p.view(-1)
            for start in range(0, flat.numel(), pool.numel()):
                n = min(pool.numel(), flat.numel() - start)
                flat[start:start + n].copy_(pool[:n])
        for mod_name, mod in list(model.named_modules()):
            if hasattr(mod, "inv_freq") and hasattr(mod, "config"):
                parent_name, _, attr = mod_name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                with torch.device(device):
                    setattr(parent, attr, type(mod)(mod.config))
    return model


@dataclass
class DecodeRun:
    """A measured batch-1 decode: per-token timing, bytes per token, achieved bandwidth, MBU."""

    model: str
    dtype: str
    parameters: int
    weight_bytes: int
    kv_bytes_per_token: int
    prompt_len: int
    new_tokens: int
    timing: Timing
    bytes_per_token: float
    bw_before: Bandwidth | None = None
    bw_after: Bandwidth | None = None
    gemv: Bandwidth | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.timing.median

    @property
    def achieved_bw(self) -> float:
        return self.bytes_per_token / self.timing.median

    def mbu(self, which: str = "before", stat: str = "best") -> float:
        """MBU against the read bandwidth measured ``which`` (``before``/``after``) the decode,
        its ``best`` or ``median``."""
        bw = {"before": self.bw_before, "after": self.bw_after}[which]
        if bw is None:
            return float("nan")
        return self.achieved_bw / getattr(bw, stat)

    def mbu_vs(self, other: str, which: str = "before") -> float:
        """MBU against one of the other figures measured with the read bandwidth (a key of
        ``Bandwidth.others``, e.g. :data:`COPY_STREAM`); NaN where it was not measured."""
        bw = {"before": self.bw_before, "after": self.bw_after}[which]
        rate = bw.others.get(other) if bw is not None else None
        return self.achieved_bw / rate if rate else float("nan")

    def summary(self) -> dict[str, Any]:
        t = self.timing
        out = {
            "model": self.model, "dtype": self.dtype, "parameters": self.parameters,
            "weight_bytes_read": self.weight_bytes, "kv_bytes_per_token": self.kv_bytes_per_token,
            "context": f"{self.prompt_len}..{self.prompt_len + self.new_tokens}",
            "bytes_per_token": self.bytes_per_token,
            "ms_per_token": 1e3 * t.median, "ms_min": 1e3 * t.min, "ms_max": 1e3 * t.max,
            "tokens_per_s": self.tokens_per_s,
            "tokens_per_s_range": (1 / t.max, 1 / t.min),
            "achieved_GBps": self.achieved_bw / 1e9,
        }
        for which in ("before", "after"):
            bw = getattr(self, f"bw_{which}")
            if bw is not None:
                out[f"read_bw_{which}_GBps"] = bw.best / 1e9
                out[f"MBU_vs_{which}_best_%"] = 100 * self.mbu(which, "best")
                out[f"MBU_vs_{which}_median_%"] = 100 * self.mbu(which, "median")
                if COPY_STREAM in bw.others:
                    out[f"copy_bw_{which}_GBps"] = bw.others[COPY_STREAM] / 1e9
                    out[f"MBU_vs_copy_{which}_%"] = 100 * self.mbu_vs(COPY_STREAM, which)
                if COPY_WRITE_ALLOCATE in bw.others:
                    out[f"MBU_vs_copy_write_allocate_{which}_%"] = 100 * self.mbu_vs(COPY_WRITE_ALLOCATE, which)
        if self.gemv is not None:
            out["gemv_GBps"] = self.gemv.best / 1e9
            out["achieved_vs_gemv_%"] = 100 * self.achieved_bw / self.gemv.best
            if self.bw_before is not None:
                out["gemv_vs_read_%"] = 100 * self.gemv.best / self.bw_before.best
        return out


def measure_decode(model: torch.nn.Module, prompt_len: int = 128, new_tokens: int = 16,
                   warmup: int = 2, name: str = "model", seed: int = 0, compiled: bool = False) -> DecodeRun:
    """Greedy batch-1 decode on the model's device: a prompt of ``prompt_len`` random tokens
    fills the KV cache (untimed), then ``warmup`` untimed and ``new_tokens`` timed decode steps, one
    :func:`cohw_utils.spine.measure.time_callable` sample per token (so the spread is over tokens).
    Each step feeds the previous step's argmax and extends the cache by one token; the tokens
    are kept in ``extra["tokens"]``.

    ``compiled``: gpt-fast's recipe on a Hugging Face model: a static KV cache sized for the
    whole run and the decode step through ``torch.compile`` (inductor, ``freezing=True`` so
    that on CPU the linears become oneDNN kernels on pre-packed weights). The first warm-up
    step compiles; its time is ``extra["compile_s"]``. A static cache's attention reads all
    of its slots at every step, so the KV bytes of this mode are counted at the cache's full
    length (``prompt_len + warmup + new_tokens``), not at the context."""
    if prompt_len < 1 or new_tokens < 1:
        raise CohwError(f"prompt_len and new_tokens must be >= 1, got {prompt_len}, {new_tokens}")
    if compiled and warmup < 1:
        raise CohwError("a compiled decode needs warmup >= 1 (the first step compiles)")
    import inspect

    cfg = model.config
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=g).to(device)
    state: dict[str, Any] = {}
    contexts: list[int] = []
    step_times: list[float] = []
    tokens: list[int] = []
    forward = model
    compile_options: Any = contextlib.nullcontext()
    kw: dict[str, Any] = {}
    total = prompt_len + warmup + new_tokens
    if compiled:
        from transformers import StaticCache

        kw[cache_kw] = StaticCache(config=cfg, max_cache_len=total)
        kw["cache_position"] = torch.arange(prompt_len, device=device)
        # a fresh compile per run: a graph frozen for one StaticCache must not serve another
        torch._dynamo.reset()
        forward = torch.compile(model.forward, dynamic=False)
        from torch._inductor import config as inductor_config

        compile_options = inductor_config.patch(freezing=True)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, **kw)
    state["cache"] = kw.get(cache_kw) or getattr(out, "cache", None) or out.past_key_values
    state["tok"] = out.logits[:, -1:].argmax(-1)
    state["ctx"] = prompt_len

    def step():
        t0 = time.perf_counter()
        extra = {"cache_position": torch.tensor([state["ctx"]], device=device)} if compiled else {}
        with torch.no_grad():
            o = forward(input_ids=state["tok"], use_cache=True, **{cache_kw: state["cache"]}, **extra)
        if not compiled:
            state["cache"] = getattr(o, "cache", None) or o.past_key_values
        state["tok"] = o.logits[:, -1:].argmax(-1)
        tokens.append(int(state["tok"].reshape(-1)[0]))
        contexts.append(state["ctx"])
        state["ctx"] += 1
        step_times.append(time.perf_counter() - t0)

    with compile_options:
        timing = time_callable(step, repeats=new_tokens, warmup=warmup, device=str(device))
    dtype = next(model.parameters()).dtype
    kv = workloads.kv_cache_bytes_per_token(cfg, int(bytes_per_element(dtype)))
    w = weight_bytes_read(model)
    timed_ctx = [total - 1] * new_tokens if compiled else contexts[warmup:]
    per_token = [decode_bytes(w, kv, c)["total"] for c in timed_ctx]
    run = DecodeRun(model=name, dtype=dtype_name(dtype), parameters=count_parameters(model),
                    weight_bytes=w, kv_bytes_per_token=kv, prompt_len=prompt_len + warmup,
                    new_tokens=new_tokens, timing=timing, bytes_per_token=statistics.mean(per_token))
    run.extra["mode"] = "compiled" if compiled else "eager"
    run.extra["tokens"] = tokens  # the greedy tokens of every step, warm-up included
    if compiled:
        run.extra["compile_s"] = step_times[0]
    return run


def mbu_benchmark(config_path: str | Path = MBU_CONFIG, dtype: str = "bf16", prompt_len: int = 128,
                  new_tokens: int = 16, quick_bandwidth: bool = False, seed: int = 0,
                  model: torch.nn.Module | None = None, threads: int | None = None,
                  gemv: bool = True, compiled: bool = False) -> DecodeRun:
    """The chapter's MBU measurement on this machine's CPU: build the random-weight LLM (or
    use ``model``, built by :func:`build_random_llm`), measure bandwidth, decode, measure
    bandwidth again, then (``gemv``) the DRAM streaming rate of torch's own GEMV in the
    model's dtype (:func:`measure_gemv_bandwidth`). MBU is against the read bandwidth measured
    right before the decode (:func:`bandwidth_now`; the copy/add figures beside it). ``compiled``: decode with :func:`measure_decode`'s compiled
    (gpt-fast-style) step instead of eager PyTorch.

    ``threads`` sets torch's intra-op threads for the bandwidth probes and the decode alike
    (restored afterwards); None keeps torch's setting. On a machine shared with other busy
    processes, one thread can be much faster for decoding: each of the few hundred small ops
    per token ends in a barrier that waits for every thread, and a thread the OS has
    descheduled holds it up."""
    if threads is not None and threads < 1:
        raise CohwError(f"threads must be a positive integer or None, got {threads!r}")
    model = model if model is not None else build_random_llm(config_path, dtype, seed)
    name = Path(config_path).parent.name if Path(config_path).name == "config.json" else Path(config_path).stem
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        before = bandwidth_now(quick_bandwidth)
        run = measure_decode(model, prompt_len, new_tokens, name=name, seed=seed, compiled=compiled)
        after = bandwidth_now(quick_bandwidth)
        if gemv:
            run.gemv = measure_gemv_bandwidth(next(model.parameters()).dtype, quick_bandwidth)
        run.extra["threads"] = torch.get_num_threads()
    finally:
        torch.set_num_threads(saved)
    run.bw_before, run.bw_after = before, after
    return run


# ---------------------------------------------------------------------------- published numbers
def load_published(path: str | Path = PUBLISHED_CSV) -> pd.DataFrame:
    """The published MBU-related numbers (``data/published_mbu.csv``): one row per figure, with
    source, table/figure, model, hardware, dtype, batch, metric, value, unit, citation key."""
    try:
        pub = pd.read_csv(path)
    except OSError as e:
        raise CohwError(f"cannot read {path}: {e}") from None
    pub["batch"] = pd.to_numeric(pub["batch"], errors="coerce")  # "-" where a figure has no batch
    return pub


@functools.lru_cache(maxsize=8)
def _llm_params(workload: str) -> tuple[torch.nn.Module, Any]:
    """The workload's model and config on ``meta`` (shapes only), built once per name."""
    built = workloads.build(workload, device="meta")
    return built.model, built.config


def bytes_per_token(workload: str, dtype: str = "fp16", context: int = 128, kv_dtype: str = "bf16") -> float:
    """Bytes one batch-1 decode step of ``workload`` reads and writes: every weight once at
    ``dtype`` (the embedding table excluded: a step gathers one row of it) plus the KV cache of
    ``context`` tokens and the new token's K/V at ``kv_dtype``."""
    model, cfg = _llm_params(workload)
    weights = weight_bytes_read(model, bytes_per_element(dtype))
    kv = workloads.kv_cache_bytes_per_token(cfg, 1) * bytes_per_element(kv_dtype)
    return decode_bytes(weights, kv, context)["total"]


def published_mbu(path: str | Path = PUBLISHED_CSV, context: int = 128) -> pd.DataFrame:
    """Our formula applied to the published tokens/s: bytes per token from the real
    architecture (weights read at the row's dtype, KV cache at ``context`` tokens in bf16)
    x tokens/s, against the chip's spec bandwidth from ``hardware.csv``; beside the source's
    own bandwidth figure and the MBU it implies. gpt-fast's prompt is 5 tokens and it
    generates up to 200: ``context`` 128 is a mid-run value (the KV term is ~1% of the bytes).
    """
    pub = load_published(path)
    rates = pub[pub["metric"] == "tokens_per_s"]
    rows = []
    for _, r in rates.iterrows():
        workload = r["model"].lower()
        bpt = bytes_per_token(workload, r["dtype"], context)
        hw = get_hardware(r["hardware"])
        theirs = pub[(pub["metric"] == "bandwidth") & (pub["model"] == r["model"]) & (pub["dtype"] == r["dtype"])
                     & (pub["source"] == r["source"])]
        their_bw = float(theirs["value"].iloc[0]) * 1e9 if len(theirs) else float("nan")
        rows.append({"source": r["source"], "model": r["model"], "dtype": r["dtype"], "hardware": hw.name,
                     "tokens_per_s": r["value"], "our_bytes_per_token_GB": bpt / 1e9,
                     "our_achieved_GBps": r["value"] * bpt / 1e9, "spec_GBps": hw.mem_bw / 1e9,
                     "our_MBU_%": 100 * mbu(r["value"], bpt, hw.mem_bw),
                     "their_GBps": their_bw / 1e9, "their_MBU_%": 100 * their_bw / hw.mem_bw,
                     "citation": r["citation"]})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- roofline bound
def decode_bound(workload: str, hw: Hardware, batch: int = 1, context: int = 2048,
                 dtype: str = "fp16") -> dict[str, float]:
    """Roofline bound of one decode step of ``batch`` sequences at ``context`` tokens on ``hw``
    (see the module docstring). ``fits`` says whether weights + KV cache fit in ``hw``'s memory
    (one chip, no parallelism, less the runtime reserve of :mod:`cohw_utils.views.memory_budget`); ``tokens_per_s`` is the bound whether or not it fits."""
    model, cfg = _llm_params(workload)
    b = bytes_per_element(dtype)
    weights = weight_bytes_read(model, b)
    params_read = weight_bytes_read(model, 1.0)
    kv = workloads.kv_cache_bytes_per_token(cfg, 1) * b
    by = decode_bytes(weights, kv, context, batch)
    layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    flops = 2.0 * params_read * batch + 4.0 * layers * heads * head_dim * (context + 1) * batch
    peak = hw.peak(dtype if dtype in hw.peak_flops else ("fp16" if "fp16" in hw.peak_flops else "fp32"))
    t_mem, t_comp = by["total"] / hw.mem_bw, flops / peak
    total_params = count_parameters(model)
    resident = total_params * b + by["kv_cache"]
    return {"workload": workload, "hardware": hw.name, "batch": batch, "context": context, "dtype": dtype,
            "bytes": by["total"], "flops": flops, "t_memory_ms": 1e3 * t_mem, "t_compute_ms": 1e3 * t_comp,
            "bound": "memory" if t_mem >= t_comp else "compute",
            "tokens_per_s": batch / max(t_mem, t_comp), "per_sequence_tokens_per_s": 1 / max(t_mem, t_comp),
            "resident_GB": resident / 1e9, "fits": fits(hw, resident)}


def decode_bound_table(workloads_=("llama-2-7b", "llama-2-13b", "llama-2-70b"), chips=None,
                       batches=(1, 8, 32, 128), context: int = 2048, dtype: str = "fp16") -> pd.DataFrame:
    """:func:`decode_bound` over LLMs x accelerators x batch sizes (default: every chip in
    ``hardware.csv``), one row each."""
    from cohw_utils.hardware import load_hardware

    chips = chips or list(load_hardware().values())
    rows = [decode_bound(w, hw, b, context, dtype) for w in workloads_ for hw in chips for b in batches]
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- GPU capture + figures
def gpu_mbu_capture(path: str | Path | None = None) -> dict[str, Any] | None:
    """The GPU MBU capture written by ``benchmarks/capture_gpu_mbu.py``, or None if absent
    (read by :func:`cohw_utils.core.data.load_gpu_capture`, which checks device and date)."""
    return load_gpu_capture("mbu", path)


def mbu_bars(runs: dict[str, DecodeRun], gpu: dict[str, Any] | None = None,
             published: pd.DataFrame | None = None, reported: pd.DataFrame | None = None) -> pd.DataFrame:
    """The rows :func:`fig_mbu` draws: this machine's decode runs (MBU against the read bandwidth
    measured right before), the GPU capture if any, gpt-fast's rows as ours and theirs
    (:func:`published_mbu`), and the MBU other sources report (rows of :func:`load_published`
    whose metric is ``mbu``). Each run gives two rows: against the read bandwidth (the MBU) and,
    labelled, against the copy/add figure measured with it. Columns: ``label``, ``mbu_pct``, ``kind``."""
    rows = []
    for mode, r in runs.items():
        rows.append({"label": f"this CPU: {r.model} {r.dtype}, {mode} (vs read bandwidth before)",
                     "mbu_pct": 100 * r.mbu(), "kind": "measured"})
        vs_copy = r.mbu_vs(COPY_STREAM)
        if vs_copy == vs_copy:  # not NaN: the copy/add figure was measured with it
            rows.append({"label": f"this CPU: {r.model} {r.dtype}, {mode} (vs copy/add, STREAM bytes)",
                         "mbu_pct": 100 * vs_copy, "kind": "measured vs copy/add"})
    if gpu:
        rows.append({"label": f"GPU capture: {gpu['device']} (vs copy)", "mbu_pct": gpu["MBU_vs_copy_%"],
                     "kind": "gpu capture"})
    if published is not None:
        rows += [{"label": f"gpt-fast {r['model']} {r['dtype']}: ours", "mbu_pct": r["our_MBU_%"],
                  "kind": "ours on published"} for _, r in published.iterrows()]
        rows += [{"label": f"gpt-fast {r['model']} {r['dtype']}: theirs", "mbu_pct": r["their_MBU_%"],
                  "kind": "published"} for _, r in published.iterrows()]
    if reported is not None:
        rows += [{"label": f"Databricks {r['model']} {r['hardware']}", "mbu_pct": r["value"], "kind": "published"}
                 for _, r in reported.iterrows()]
    return pd.DataFrame(rows, columns=["label", "mbu_pct", "kind"])


def decode_roofline_points(chips: list[Hardware], workload: str = "llama-2-7b", batches=(1, 16, 256),
                           context: int = 2048) -> dict[str, pd.DataFrame]:
    """Per chip: one roofline point per batch for a decode step of ``workload`` (intensity =
    FLOPs / bytes of :func:`decode_bound`, attainable = min(bf16 or fp16 peak, BW x intensity)),
    in the form :func:`cohw_utils.views.roofline.fig_roofline` takes as ``points``."""
    points = {}
    for hw in chips:
        rows = []
        for b in batches:
            d = decode_bound(workload, hw, b, context)
            intensity = d["flops"] / d["bytes"]
            peak = hw.peak("bf16" if "bf16" in hw.peak_flops else "fp16")
            rows.append({"intensity": intensity, "attainable": min(peak, hw.mem_bw * intensity),
                         "label": f"b={b}", "group": f"{workload} decode"})
        points[hw.name] = pd.DataFrame(rows)
    return points


def fig_mbu(bars: pd.DataFrame, target: float | None = 60.0) -> Figure:
    """Horizontal MBU bars: ``bars`` has ``label`` and ``mbu_pct`` (and optionally ``kind``:
    ``measured`` / ``published`` / ``ours on published``, which sets the colour)."""
    colors = {"measured": "tab:blue", "measured vs copy/add": "lightsteelblue", "published": "tab:orange",
              "ours on published": "tab:green", "gpu capture": "tab:purple"}
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(bars) + 1.4))
    y = np.arange(len(bars))[::-1]
    kinds = bars["kind"] if "kind" in bars else ["measured"] * len(bars)
    ax.barh(y, bars["mbu_pct"], color=[colors.get(k, "gray") for k in kinds])
    for yi, v in zip(y, bars["mbu_pct"]):
        ax.annotate(f"{v:.0f}%", (v, yi), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_yticks(y, bars["label"], fontsize=8)
    if target is not None:
        ax.axvline(target, color="k", ls="--", lw=1)
    ax.set(xlim=(0, 110), xlabel="MBU (% of bandwidth: this CPU's measured read stream; the chips' spec sheets)", title="Model bandwidth utilization, batch-1 decode")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for k, c in colors.items() if k in set(kinds)]
    ax.legend(handles, [k for k in colors if k in set(kinds)], fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def fig_decode_bound(table: pd.DataFrame, workload: str = "llama-2-7b") -> Figure:
    """Decode throughput bound (tokens/s, all sequences) against batch size for one LLM on
    every chip in ``table`` (from :func:`decode_bound_table`); hollow markers where the
    weights + KV cache do not fit on one chip."""
    t = table[table["workload"] == workload]
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    for name, g in t.groupby("hardware", sort=False):
        line, = ax.plot(g["batch"], g["tokens_per_s"], marker="o", label=name)
        nofit = g[~g["fits"]]
        ax.scatter(nofit["batch"], nofit["tokens_per_s"], s=60, facecolors="white", edgecolors=line.get_color(), zorder=3)
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="tokens/s (roofline bound)",
           title=f"{workload} decode bound, context {int(t['context'].iloc[0])}, {t['dtype'].iloc[0]} "
                 "(hollow: does not fit one chip)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig
