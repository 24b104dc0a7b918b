"""Kernel fusion on this machine: bandwidth-bound chains, eager vs ``torch.compile``.

A *chain* is a short sequence of element-wise and normalization ops as the libraries write
them (:data:`CHAINS`): bias + GELU (BERT's intermediate layer after a bias-free GEMM),
residual add + layer norm (BERT's ``BertSelfOutput``), a lone layer norm (already one kernel
in eager PyTorch), the scaled, masked softmax of eager attention, two residual adds, Llama's
``LlamaRMSNorm`` (transformers' own module: cast, pow, mean, add, rsqrt, mul, mul), and
SwiGLU's ``silu(gate) * up``.

For each chain, at sizes of a BERT-large / Llama-2-7B layer (:func:`chain_sizes`):

* **time**: eager PyTorch and ``torch.compile`` (inductor, CPU C++ backend), each timed with
  :func:`cohw_utils.spine.measure.time_callable` after compilation and warm-up; speedup = eager
  median / compiled median.
* **bytes before** = the op table's bytes (:func:`cohw_utils.spine.trace.trace` of the eager
  chain): every op reads its inputs from memory and writes its output (the unfused semantics
  of :mod:`cohw_utils.spine.costs`).
* **bytes after** = what the compiled graph moves: its inputs read once, every buffer its
  generated wrapper allocates (``empty_strided_cpu`` in inductor's output code, obtained with
  ``torch._inductor.utils.run_and_get_code``) written once, and those that are not outputs
  read back once. When inductor fuses the chain into one loop nest, that is inputs + outputs
  (plus tiny per-row statistics); ``kernels`` counts the fused kernels it generated.

**The allocator.** An eager chain allocates a fresh output per op. glibc's malloc serves
large blocks with ``mmap`` and returns them with ``munmap`` on free, so every op of a large
eager chain page-faults its output in again (zero-filled by the kernel, on this VM about a
microsecond or more per 4 KiB page): the eager timing then measures the allocator, and a
fused kernel looks faster partly because it allocates less. :func:`set_allocator` controls
this: ``"retain"`` calls glibc's ``mallopt(M_MMAP_MAX, 0)`` (no mmap: large blocks come from
the heap) and ``mallopt(M_TRIM_THRESHOLD, 2**31 - 1)`` (freed memory stays in the heap), so a
freed output is reused without page faults, as a GPU framework's caching allocator does.
The same settings can be given to a fresh process through the environment
(``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``, :data:`RETAIN_ENV`);
:func:`run_in_subprocess` runs a function of this package in a fresh interpreter with either
allocator, which is how the chapter shows the effect side by side.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import pickle
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from cohw_utils.spine.costs import VIEW, tensor_bytes, tensors
from cohw_utils.core.errors import CohwError
from cohw_utils.spine.measure import time_callable
from cohw_utils.spine.trace import trace
from cohw_utils.spine import optable

# ------------------------------------------------------------------------------ allocator
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
RETAIN_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}
_state = {"mode": "default"}


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018 - glibc has it, musl does not
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        return libc
    except (OSError, AttributeError):
        return None


def set_allocator(mode: str) -> str:
    """``"retain"``: glibc keeps freed memory for reuse (no mmap/munmap per large tensor);
    ``"default"``: glibc's defaults again (mmap for large blocks, trim at 128 KiB). Returns a
    sentence saying what was done (on a non-glibc system: nothing, and it says so)."""
    if mode not in ("retain", "default"):
        raise CohwError(f"allocator mode must be 'retain' or 'default', got {mode!r}")
    libc = _libc()
    if libc is None:
        return "allocator left as is: not Linux with glibc, so mallopt is unavailable"
    if mode == "retain":
        ok = libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
        what = ("glibc malloc set to retain freed memory: mallopt(M_MMAP_MAX, 0), "
                "mallopt(M_TRIM_THRESHOLD, 2**31-1); a freed tensor's pages are reused, not unmapped")
    else:
        ok = libc.mallopt(_M_MMAP_MAX, 65536) and libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)
        what = "glibc malloc back to its defaults (mmap for large blocks, trim threshold 128 KiB)"
    if not ok:
        raise CohwError(f"mallopt refused the '{mode}' settings; run without allocator control")
    _state["mode"] = mode
    return what


def allocator_mode() -> str:
    """The mode last set by :func:`set_allocator` in this process (or read from the
    environment of a process started with :data:`RETAIN_ENV`)."""
    if _state["mode"] == "default" and os.environ.get("MALLOC_MMAP_MAX_") == "0":
        return "retain"
    return _state["mode"]


def release_memory() -> None:
    """Give the heap's free memory back to the OS (``malloc_trim(0)``); a no-op off glibc."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _is_package_module(module: str) -> bool:
    try:
        return importlib.util.find_spec(f"cohw_utils.{module}") is not None
    except ModuleNotFoundError:
        return False


def run_in_subprocess(func: str | list[tuple[str, dict]], kwargs: dict | None = None,
                      allocator: str = "default", timeout: float = 900.0) -> Any:
    """Run ``cohw_utils.<module>.<function>(**kwargs)`` in a fresh Python with the given
    allocator (``"default"``, or ``"retain"`` through :data:`RETAIN_ENV`) and return its
    (picklable) result. ``func`` is ``"module.function"`` with the module's path inside
    cohw_utils, e.g. ``"studies.performance.fusion.eager_times"``; or a
    list of ``("module.function", kwargs)`` pairs, run one after another in the same process
    (one interpreter start-up for all), returning the list of results."""
    if allocator not in ("default", "retain"):
        raise CohwError(f"allocator must be 'default' or 'retain', got {allocator!r}")
    calls = [(func, kwargs or {})] if isinstance(func, str) else list(func)
    for name, _ in calls:
        if not isinstance(name, str) or not re.fullmatch(r"[a-z_]+(\.[a-z_]+)*\.[A-Za-z_]\w*", name) \
                or not _is_package_module(name.rpartition(".")[0]):
            raise CohwError(f"func must be 'module.function' inside cohw_utils "
                            f"(e.g. 'studies.performance.fusion.eager_times'), got {name!r}")
    env = {k: v for k, v in os.environ.items() if k not in RETAIN_ENV}
    if allocator == "retain":
        env.update(RETAIN_ENV)
    with tempfile.TemporaryDirectory() as tmp:
        args_path, out_path = os.path.join(tmp, "args.pkl"), os.path.join(tmp, "out.pkl")
        with open(args_path, "wb") as f:
            pickle.dump(calls, f)
        code = ("import pickle, importlib\n"
                f"calls = pickle.load(open({args_path!r}, 'rb'))\n"
                "out = []\n"
                "for name, kw in calls:\n"
                "    module, _, fn = name.rpartition('.')\n"
                "    out.append(getattr(importlib.import_module('cohw_utils.' + module), fn)(**kw))\n"
                f"pickle.dump(out, open({out_path!r}, 'wb'))\n")
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
            raise CohwError(f"subprocess running {', '.join(n for n, _ in calls)} failed: {tail[0]}")
        with open(out_path, "rb") as f:
            results = pickle.load(f)
    return results[0] if isinstance(func, str) else results


# ------------------------------------------------------------------------------ the chains
def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.gelu(x + bias)


def residual_layernorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x + residual, weight.shape, weight, bias, 1e-12)


def layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, weight.shape, weight, bias, 1e-12)


def scaled_masked_softmax(scores: torch.Tensor, mask: torch.Tensor, scale: float = 0.125) -> torch.Tensor:
    return torch.softmax(scores * scale + mask, dim=-1)


def residual_adds(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (x + a) + b


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _rmsnorm_module(hidden: int):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(hidden, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.02, generator=torch.Generator().manual_seed(3))
    return norm


@dataclass(frozen=True)
class Chain:
    name: str
    make: Callable[[dict], tuple[Callable, tuple]]  # sizes -> (fn, inputs)
    description: str


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


CHAINS: tuple[Chain, ...] = (
    Chain("bias + GELU", lambda s: (bias_gelu, (_rand(s["tokens"], s["ffn"]), _rand(s["ffn"], seed=1))),
          "F.gelu(x + b) on the FFN activation (tokens x ffn)"),
    Chain("residual add + layer norm",
          lambda s: (residual_layernorm, (_rand(s["tokens"], s["hidden"]), _rand(s["tokens"], s["hidden"], seed=1),
                                          _rand(s["hidden"], seed=2), _rand(s["hidden"], seed=3))),
          "F.layer_norm(x + residual) (tokens x hidden)"),
    Chain("layer norm alone",
          lambda s: (layernorm, (_rand(s["tokens"], s["hidden"]), _rand(s["hidden"], seed=2), _rand(s["hidden"], seed=3))),
          "F.layer_norm(x): already one kernel in eager PyTorch"),
    Chain("scaled masked softmax",
          lambda s: (scaled_masked_softmax, (_rand(s["batch"], s["heads"], s["seq"], s["seq"]),
                                             torch.zeros(s["batch"], 1, 1, s["seq"]))),
          "softmax(scores * scale + mask) (batch x heads x seq x seq)"),
    Chain("two residual adds",
          lambda s: (residual_adds, (_rand(s["tokens"], s["hidden"]), _rand(s["tokens"], s["hidden"], seed=1),
                                     _rand(s["tokens"], s["hidden"], seed=2))),
          "(x + a) + b (tokens x hidden)"),
    Chain("RMSNorm (LlamaRMSNorm)",
          lambda s: (_rmsnorm_module(s["llama_hidden"]), (_rand(s["tokens"], s["llama_hidden"]),)),
          "transformers' LlamaRMSNorm (tokens x 4096): pow, mean, add, rsqrt, mul, mul"),
    Chain("SwiGLU silu(gate) * up",
          lambda s: (swiglu, (_rand(s["tokens"], s["llama_ffn"]), _rand(s["tokens"], s["llama_ffn"], seed=1))),
          "F.silu(gate) * up (tokens x 11008)"),
)
_BY_NAME = {c.name: c for c in CHAINS}


def chain_sizes(smoke: bool = False) -> dict[str, int]:
    """BERT-large layer activations at batch 8 x 512 tokens (full) or 1 x 512 (smoke); the
    softmax at batch 2 x 16 heads x 512^2 (full; 128 MiB per tensor at batch 8 would be
    slow to time) or 1 x 16 x 256^2 (smoke); Llama-2-7B widths for RMSNorm and SwiGLU."""
    if smoke:
        return {"tokens": 512, "hidden": 1024, "ffn": 4096, "batch": 1, "heads": 16, "seq": 256,
                "llama_hidden": 4096, "llama_ffn": 11008}
    return {"tokens": 4096, "hidden": 1024, "ffn": 4096, "batch": 2, "heads": 16, "seq": 512,
            "llama_hidden": 4096, "llama_ffn": 11008}


# ------------------------------------------------------------------------------ bytes
def _module_params(fn) -> list[torch.Tensor]:
    return list(fn.parameters()) if isinstance(fn, torch.nn.Module) else []


_ALLOC = re.compile(r"empty_strided_cpu\(\(([\d, ]*)\), \(([\d, ]*)\), torch\.(\w+)\)")


def _alloc_bytes(code: str) -> list[int]:
    out = []
    for shape, _, dtype in _ALLOC.findall(code):
        dims = [int(d) for d in shape.replace(" ", "").split(",") if d]
        out.append(int(np.prod(dims)) * torch.empty(0, dtype=getattr(torch, dtype)).element_size())
    return out


def bytes_before(fn: Callable, inputs: tuple) -> tuple[int, int]:
    """(bytes moved, kernels) of the eager chain from its op table (views dropped)."""
    with torch.no_grad():
        table = trace(fn, *inputs, model=fn if isinstance(fn, torch.nn.Module) else None)
    work = table[table["op_class"] != VIEW]
    return int(optable.bytes_moved(work).sum()), int(len(work))


def compile_chain(fn: Callable, inputs: tuple) -> tuple[Callable, dict]:
    """``torch.compile(fn)`` (inductor), compiled by one call; returns (compiled fn, info)
    with ``bytes_after``, ``kernels`` and ``compile_s`` (see the module docstring)."""
    import time

    from torch._inductor.utils import run_and_get_code

    compiled = torch.compile(fn)
    t0 = time.perf_counter()
    with torch.no_grad():
        out, codes = run_and_get_code(compiled, *inputs)
    compile_s = time.perf_counter() - t0
    code = "\n".join(codes)
    kernels = len(set(re.findall(r"\b(cpp_fused_\w+)\(", code)))
    extern = len(re.findall(r"extern_kernels\.\w+\(", code))
    allocs = _alloc_bytes(code)
    in_bytes = sum(tensor_bytes(t) for t in tensors(inputs)) + sum(tensor_bytes(p) for p in _module_params(fn))
    out_bytes = sum(tensor_bytes(t) for t in tensors(out))
    after = in_bytes + sum(allocs) + max(0, sum(allocs) - out_bytes)
    return compiled, {"bytes_after": int(after), "kernels": kernels + extern, "compile_s": compile_s,
                      "io_bytes": in_bytes + out_bytes}


def benchmark(names: list[str] | None = None, smoke: bool = False, repeats: int = 10,
              warmup: int = 2, compiled: bool = True) -> pd.DataFrame:
    """Eager vs compiled time and bytes for each chain (module docstring). One row per chain:
    chain, shape, eager_ms (median), eager_min_ms, eager_max_ms, kernels_eager, bytes_before,
    and with ``compiled``: compiled_ms, compiled_min_ms, compiled_max_ms, kernels_compiled,
    bytes_after, io_bytes, compile_s, speedup (of the medians), speedup_best (of the fastest
    calls: less sensitive to other processes on the cores), bytes_saved_%, max_abs_diff. ``attrs``: the
    allocator mode, the timing method, torch's thread count."""
    sizes = chain_sizes(smoke)
    rows = []
    for name in names or [c.name for c in CHAINS]:
        chain = _BY_NAME.get(name)
        if chain is None:
            raise CohwError(f"unknown chain '{name}'; known: {', '.join(_BY_NAME)}")
        fn, inputs = chain.make(sizes)
        before, k_eager = bytes_before(fn, inputs)
        with torch.no_grad():
            t_e = time_callable(lambda: fn(*inputs), repeats=repeats, warmup=warmup)
            ref = fn(*inputs)
        row = {"chain": name, "shape": "x".join(map(str, tensors(inputs)[0].shape)),
               "eager_ms": 1e3 * t_e.median, "eager_min_ms": 1e3 * t_e.min, "eager_max_ms": 1e3 * t_e.max,
               "kernels_eager": k_eager, "bytes_before": before}
        if compiled:
            cfn, info = compile_chain(fn, inputs)
            with torch.no_grad():
                t_c = time_callable(lambda: cfn(*inputs), repeats=repeats, warmup=warmup)
                diff = float((cfn(*inputs) - ref).abs().max())
            row.update({"compiled_ms": 1e3 * t_c.median, "compiled_min_ms": 1e3 * t_c.min,
                        "compiled_max_ms": 1e3 * t_c.max, "kernels_compiled": info["kernels"],
                        "bytes_after": info["bytes_after"], "io_bytes": info["io_bytes"],
                        "compile_s": info["compile_s"], "speedup": t_e.median / t_c.median,
                        "speedup_best": t_e.min / t_c.min,
                        "bytes_saved_%": 100.0 * (1 - info["bytes_after"] / before),
                        "max_abs_diff": diff})
        rows.append(row)
    df = pd.DataFrame(rows).set_index("chain")
    df.attrs.update({"allocator": allocator_mode(), "method": t_e.method,
                     "threads": torch.get_num_threads()})
    return df


def eager_times(smoke: bool = False, repeats: int = 10, warmup: int = 2) -> pd.DataFrame:
    """Eager timings only (no compile): what :func:`run_in_subprocess` runs under each allocator."""
    return benchmark(smoke=smoke, repeats=repeats, warmup=warmup, compiled=False)


# ------------------------------------------------------------------------------ ReLU attention
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str = "softmax") -> torch.Tensor:
    """Eager attention as BERT writes it: ``normalize(q k^T / sqrt(d)) v`` with normalize =
    ``softmax`` or ``relu`` divided by the key length (Wortsman et al. 2023's ReLU attention).
    Since relu(x) / L = relu(x / L), the 1/L folds into the score scaling: ReLU attention
    makes exactly as many passes over the score matrix as softmax attention."""
    d, length = q.shape[-1], k.shape[-2]
    scores = torch.matmul(q, k.transpose(-1, -2))
    if kind == "softmax":
        probs = torch.softmax(scores / d ** 0.5, dim=-1)
    elif kind == "relu":
        probs = torch.relu(scores / (d ** 0.5 * length))
    else:
        raise CohwError(f"attention kind must be 'softmax' or 'relu', got {kind!r}")
    return torch.matmul(probs, v)


def relu_attention_study(batch: int = 8, heads: int = 16, seq: int = 512, head_dim: int = 64,
                         repeats: int = 5, warmup: int = 1, seed: int = 0) -> pd.DataFrame:
    """Softmax vs ReLU attention, eager, at BERT-large's attention shape: time of the whole
    attention (:func:`attention`) and of the normalization op alone (``softmax`` vs ``relu``
    of the same scaled scores, one op each), and how much the output changes (relative L2
    difference and cosine similarity to the softmax output, random q, k, v)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, seq, head_dim, generator=g) for _ in range(3))
    scores = torch.matmul(q, k.transpose(-1, -2)) / head_dim ** 0.5
    rows = []
    with torch.no_grad():
        ref = attention(q, k, v, "softmax")
        for kind, norm in (("softmax", lambda: torch.softmax(scores, dim=-1)),
                           ("relu", lambda: torch.relu(scores))):  # the 1/L is in the scaling
            t_all = time_callable(lambda: attention(q, k, v, kind), repeats=repeats, warmup=warmup)
            t_norm = time_callable(norm, repeats=repeats, warmup=warmup)
            out = attention(q, k, v, kind)
            rel = float((out - ref).norm() / ref.norm())
            cos = float(F.cosine_similarity(out.flatten(), ref.flatten(), dim=0))
            rows.append({"attention": kind, "attention_ms": 1e3 * t_all.median,
                         "attention_min_ms": 1e3 * t_all.min, "normalize_ms": 1e3 * t_norm.median,
                         "normalize_min_ms": 1e3 * t_norm.min, "rel_l2_change": rel, "cosine_to_softmax": cos,
                         "out_std": float(out.std())})
    df = pd.DataFrame(rows).set_index("attention")
    df.attrs["method"] = t_all.method
    df.attrs["shape"] = f"batch {batch} x {heads} heads x {seq} tokens x head dim {head_dim}"
    return df


def fig_fusion(bench: pd.DataFrame, default_eager: pd.DataFrame | None = None):
    """Per chain: eager (default malloc, if given), eager and compiled times (left, ms, log)
    and bytes before/after (right, MiB)."""
    import matplotlib.pyplot as plt

    names = list(bench.index)
    y = np.arange(len(names))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 0.45 * len(names) + 1.6), sharey=True)
    h = 0.27
    if default_eager is not None:
        a.barh(y - h, default_eager.reindex(names)["eager_ms"], h, color="tab:red", label="eager, default malloc")
    a.barh(y, bench["eager_ms"], h, color="tab:orange", label=f"eager, malloc {bench.attrs.get('allocator', '?')}")
    if "compiled_ms" in bench:
        a.barh(y + h, bench["compiled_ms"], h, color="tab:blue", label="torch.compile")
    a.set(xscale="log", xlabel="ms (median)")
    a.set_yticks(y, names, fontsize=8)
    a.invert_yaxis()
    a.legend(fontsize=7)
    b.barh(y - h / 2, bench["bytes_before"] / 2**20, h, color="tab:orange", label="before (eager op table)")
    if "bytes_after" in bench:
        b.barh(y + h / 2, bench["bytes_after"] / 2**20, h, color="tab:blue", label="after (fused graph)")
    b.set(xlabel="MiB moved")
    b.legend(fontsize=7)
    fig.tight_layout()
    return fig


def reference_bytes(smoke: bool = False) -> pd.DataFrame:
    """Bytes each chain moves, without compiling: ``before`` (eager op table) and ``io`` (its
    inputs and outputs once: what one fused kernel must move), with the eager kernel count,
    at :func:`chain_sizes` (full sizes by default). Deterministic: no timing."""
    rows = []
    for chain in CHAINS:
        fn, inputs = chain.make(chain_sizes(smoke))
        before, kernels = bytes_before(fn, inputs)
        with torch.no_grad():
            out = fn(*inputs)
        io = (sum(tensor_bytes(t) for t in tensors(inputs)) + sum(tensor_bytes(p) for p in _module_params(fn))
              + sum(tensor_bytes(t) for t in tensors(out)))
        rows.append({"chain": chain.name, "shape": "x".join(map(str, tensors(inputs)[0].shape)),
                     "eager kernels": kernels, "bytes before": before, "fused I/O bytes": io,
                     "saved %": 100.0 * (1 - io / before)})
    return pd.DataFrame(rows).set_index("chain")
