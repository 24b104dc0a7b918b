"""Memory footprint: weights by dtype, peak live activations from a trace, KV cache, training
state, and what accelerate's ``estimate-memory`` says about the same models.

Units: bytes (SI prefixes when printed: 1 GB = 1e9 bytes).

Liveness analysis (:func:`liveness`)
------------------------------------
A run is executed under a ``TorchDispatchMode`` (on ``meta`` for full-scale models: shapes
only, no memory) that records, for every aten op in order, which tensors it reads and which
it writes.

* **Identity.** A tensor is identified by its *storage* (``untyped_storage()``, keyed by the
  storage object's C++ pointer ``_cdata``), not by the Python tensor: views (transpose,
  slice, reshape) share their base's storage and so are the same memory; an in-place op
  (``add_``, ``copy_``) writes into an existing storage and creates nothing. Every storage
  seen is kept referenced until the analysis ends, so an address can never be reused by a
  later allocation and two tensors can never share a key by accident. Size = the storage's
  ``nbytes()``: a slice of a big buffer (a KV-cache slot) holds the whole buffer.
* **Lifetime.** A storage is live from the op that first writes it to the last op that
  reads (or writes) it, both inclusive: the ideal "free after the last reader" schedule, i.e.
  the least memory an eager program with perfect freeing needs. Real eager PyTorch frees when
  the last Python reference dies, which can be later. Storages that exist before the run
  are live throughout, as are storages still reachable afterwards from the return value or
  from the arguments (a KV cache the call extended) or from parameters' ``.grad``.
* **Kinds.** ``weight`` (the model's parameters and buffers), ``input`` (reachable from the
  arguments before the call, or otherwise pre-existing), ``output`` (created, still
  reachable after the call: logits, a new KV cache), ``gradient`` (a parameter's ``.grad``
  after the call) and ``activation`` (created and dead by the end: the temporaries).
  "Peak activations" below = max over ops of live ``activation`` + ``output`` bytes (what the
  run allocates beyond weights and inputs); gradients are reported separately.
* **Attention.** On ``meta``, torch would run scaled-dot-product attention's *math* path and
  materialise the T x T score matrix. A GPU (or CPU) run uses a fused flash kernel, which
  never stores it, so by default each ``F.scaled_dot_product_attention`` call on ``meta`` runs
  ``aten._scaled_dot_product_flash_attention_for_cpu`` (the CPU flash kernel, which has meta
  and autograd support): output plus a per-row log-sum-exp, and for training the same
  saved tensors a flash kernel keeps. ``fused_attention=False`` shows the math path.

Training state (:func:`training_state`): mixed-precision Adam keeps, per trainable
parameter, bf16/fp16 weights (2 B) and gradients (2 B), an fp32 master copy (4 B) and two
fp32 moments (8 B): 16 bytes, as in the ZeRO paper (Rajbhandari et al. 2020); fp32 training
keeps 4 + 4 + 8 = 16 bytes too. Activations come on top and depend on batch and sequence.

Used by Chapter 4.1-4.2 (memory footprint and serving memory).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable
from unittest import mock

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from cohw_utils import workloads
from cohw_utils.core.dtypes import bytes_per_element, parse_dtype
from cohw_utils.core.errors import CohwError
from cohw_utils.core.params import count_parameters
from cohw_utils.views.memory_budget import RESERVE_FRACTION, usable_bytes
from cohw_utils.hardware import Hardware

KINDS = ("weight", "input", "activation", "output", "gradient")
WEIGHT_DTYPES = ("fp32", "bf16", "fp8", "int8", "int4")

# Metadata queries that are not computation (as in the tracer and FlopCounterMode).
_SKIP = {getattr(torch.ops.aten, n).default for n in (
    "is_contiguous", "size", "sym_size", "stride", "sym_stride", "storage_offset",
    "sym_storage_offset", "numel", "sym_numel", "dim", "is_strides_like_format",
    "is_non_overlapping_and_dense", "sym_is_contiguous") if hasattr(torch.ops.aten, n)}


# ---------------------------------------------------------------------------- identity
def _tensors(tree: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    return [x for x in tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _storage(t: torch.Tensor):
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse / nested tensors
        return None


def _reachable(obj: Any, depth: int = 6, seen: set | None = None) -> list[torch.Tensor]:
    """Tensors reachable from ``obj`` through containers and plain objects' attributes (a
    transformers Cache holds its tensors in ``.layers[i].keys``...). nn.Modules are not
    entered (their tensors are weights)."""
    seen = set() if seen is None else seen
    if depth < 0 or id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, torch.nn.Module) or isinstance(obj, (str, bytes, int, float, bool, type(None))):
        return []
    out: list[torch.Tensor] = []
    if isinstance(obj, Mapping):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        items = list(vars(obj).values())
    else:
        items = []
    for item in items:
        out.extend(_reachable(item, depth - 1, seen))
    return out


class _Storages:
    """Storage -> small integer id, keeping every storage referenced (so a C++ address is
    never reused while the analysis runs) and recording each one's size."""

    def __init__(self):
        self.ids: dict[int, int] = {}
        self.keep: list[Any] = []
        self.nbytes: list[int] = []

    def key(self, t: torch.Tensor) -> int | None:
        s = _storage(t)
        if s is None:
            return None
        ptr = s._cdata
        k = self.ids.get(ptr)
        if k is None:
            k = self.ids[ptr] = len(self.keep)
            self.keep.append(s)
            self.nbytes.append(int(s.nbytes()))
        return k

    def keys(self, tree: Any) -> list[int]:
        return [k for k in (self.key(t) for t in _tensors(tree)) if k is not None]


# ---------------------------------------------------------------------------- recording
class _Recorder(TorchDispatchMode):
    def __init__(self, storages: _Storages, tracker):
        super().__init__()
        self.storages, self.tracker = storages, tracker
        self.ops: list[str] = []
        self.modules: list[str] = []
        self.reads: list[list[int]] = []
        self.writes: list[list[int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _SKIP:
            return out
        self.ops.append(str(func))
        self.modules.append(self.tracker.innermost() if self.tracker is not None else "")
        self.reads.append(self.storages.keys((args, kwargs)))
        self.writes.append(self.storages.keys(out))
        return out


class _FlashOnMeta(TorchFunctionMode):
    """Runs F.scaled_dot_product_attention on meta tensors as the fused CPU flash kernel (see
    the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and args and args[0].device.type == "meta":
            q, k, v = args[:3]
            mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
            dropout = args[4] if len(args) > 4 else kwargs.get("dropout_p", 0.0)
            causal = args[5] if len(args) > 5 else kwargs.get("is_causal", False)
            scale = kwargs.get("scale")
            if k.shape[-3] != q.shape[-3]:  # GQA: a fused kernel reads the shared K/V heads
                rep = q.shape[-3] // k.shape[-3]
                k = k.repeat_interleave(rep, dim=-3)
                v = v.repeat_interleave(rep, dim=-3)
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, dropout, causal, attn_mask=mask, scale=scale)[0]
        return func(*args, **kwargs)


@dataclass
class Liveness:
    """The result of :func:`liveness`: per-op live bytes by kind, and per-storage lifetimes."""

    timeline: pd.DataFrame   # index = op number; columns op, module, then live bytes per kind
    tensors: pd.DataFrame    # one row per storage: kind, bytes, born, dies

    def peak(self, kinds=("activation", "output")) -> dict[str, Any]:
        """The op at which live bytes of ``kinds`` peak: bytes, op number, op, module, and the
        live bytes of every kind at that moment."""
        if not len(self.timeline):
            return {"bytes": 0, "index": None, "op": None, "module": None}
        live = self.timeline[list(kinds)].sum(axis=1)
        i = int(live.idxmax())
        row = self.timeline.loc[i]
        return {"bytes": int(live.loc[i]), "index": i, "op": row["op"], "module": row["module"],
                **{f"{k}_bytes": int(row[k]) for k in KINDS}}


def liveness(fn: Callable[..., Any], *args: Any, model: torch.nn.Module | None = None,
             fused_attention: bool = True, **kwargs: Any) -> Liveness:
    """Run ``fn(*args, **kwargs)`` and return its liveness analysis (see the module docstring).

    ``model``: its parameters and buffers are the ``weight`` kind, and its
    ``named_modules()`` paths name the ``module`` column. Use ``meta`` tensors for
    full-scale models (nothing is allocated); on real tensors the analysis keeps every
    storage alive until it returns, so the run needs the *sum* of its allocations in RAM.
    """
    storages = _Storages()
    weights = set(storages.keys(list(model.parameters()) + list(model.buffers()))) if model is not None else set()
    inputs = set(storages.keys(_reachable((args, kwargs)))) - weights
    tracker = None
    if model is not None:
        # The tracer's module tracker names modules by their path under the model (and copes
        # with tensors that require grad but have no autograd node); reused, not duplicated.
        from cohw_utils.spine.trace import PathTracker

        tracker = PathTracker(model)
    rec = _Recorder(storages, tracker)
    ctx = [tracker] if tracker is not None else []
    if fused_attention:
        ctx.append(_FlashOnMeta())
    ctx.append(rec)
    from contextlib import ExitStack

    with ExitStack() as stack:
        for c in ctx:
            stack.enter_context(c)
        out = fn(*args, **kwargs)
    outputs = set(storages.keys(_reachable(out))) | set(storages.keys(_reachable((args, kwargs))))
    grads = set()
    if model is not None:
        grads = set(storages.keys([p.grad for p in model.parameters() if p.grad is not None]))
    n = len(rec.ops)
    nkeys = len(storages.keep)
    born = np.full(nkeys, -1, dtype=np.int64)
    last = np.full(nkeys, -1, dtype=np.int64)
    for i, (r, w) in enumerate(zip(rec.reads, rec.writes)):
        for k in w:
            if born[k] < 0 and k not in weights and k not in inputs:
                born[k] = i
            last[k] = i
        for k in r:
            last[k] = i
    kind = np.empty(nkeys, dtype=object)
    for k in range(nkeys):
        if k in weights:
            kind[k] = "weight"
        elif k in inputs or born[k] < 0:
            kind[k] = "input"
        elif k in grads:
            kind[k] = "gradient"
        elif k in outputs:
            kind[k] = "output"
        else:
            kind[k] = "activation"
    start = np.where(born < 0, 0, born)
    end = np.where(np.isin(kind, ["weight", "input", "output", "gradient"]), max(n - 1, 0), last)
    end = np.maximum(end, start)
    nbytes = np.array(storages.nbytes, dtype=np.int64)
    timeline = pd.DataFrame({"op": rec.ops, "module": rec.modules})
    for kd in KINDS:
        delta = np.zeros(n + 1, dtype=np.int64)
        m = kind == kd
        np.add.at(delta, start[m], nbytes[m])
        np.add.at(delta, end[m] + 1, -nbytes[m])
        timeline[kd] = np.cumsum(delta)[:n]
    tensors = pd.DataFrame({"kind": kind, "bytes": nbytes, "born": start, "dies": end})
    return Liveness(timeline, tensors)


# ---------------------------------------------------------------------------- per proxy
def weight_bytes_by_dtype(parameters: int, dtypes=WEIGHT_DTYPES) -> dict[str, float]:
    """Bytes of ``parameters`` weights stored in each dtype (int4: half a byte; per-group
    scales of quantized formats are not included)."""
    return {d: parameters * bytes_per_element(d) for d in dtypes}


def training_state(trainable: int, mixed_precision: bool = True) -> dict[str, int]:
    """Bytes of Adam training state for ``trainable`` parameters (see the module docstring):
    weights, gradients, fp32 master weights (mixed precision only) and the two fp32 moments."""
    w = 2 if mixed_precision else 4
    out = {"weights": w * trainable, "gradients": w * trainable,
           "master_weights": 4 * trainable if mixed_precision else 0, "adam_moments": 8 * trainable}
    out["total"] = sum(out.values())
    return out


def accelerate_estimate(model: torch.nn.Module, name: str = "model",
                        dtypes=("float32", "float16", "int8", "int4")) -> pd.DataFrame:
    """What ``accelerate estimate-memory`` prints for ``model``, computed by accelerate's own
    code: its ``gather_data`` with ``create_empty_model`` replaced by a function returning
    ``model`` (so nothing is downloaded). Build ``model`` in float32 on ``meta``: like the
    CLI, accelerate takes the float32 size as its base and divides it per dtype.

    Columns (bytes): ``largest_layer``, ``total_size`` and ``training_adam`` (accelerate's
    "Training using Adam", the *largest* of its model / gradients / optimizer / step figures).
    """
    from accelerate.commands import estimate

    args = SimpleNamespace(model_name=name, library_name="transformers", trust_remote_code=False,
                           dtypes=list(dtypes))
    with mock.patch.object(estimate, "create_empty_model", return_value=model):
        data = estimate.gather_data(args)
    rows = []
    for dtype, largest, total, training in data:
        usage = max(training.values())
        rows.append({"dtype": dtype, "largest_layer": float(largest), "total_size": float(total),
                     "training_adam": float(usage) if usage != -1 else float("nan")})
    return pd.DataFrame(rows).set_index("dtype")


def accelerate_comparison(names: tuple[str, ...] = ("llama-2-7b", "llama-2-13b", "llama-2-70b",
                                                   "vit-b-16", "resnet-50")) -> pd.DataFrame:
    """accelerate's ``estimate-memory`` figures beside ours, one row per workload (GB = 1e9 B).

    Each model is built in float32 on ``meta`` (accelerate's base). Ours: bf16 weights
    (:func:`weight_bytes_by_dtype`) and the Adam training state (:func:`training_state`);
    accelerate's: fp16 total and training, fp32 training, and its training bytes per parameter.
    """
    rows = []
    for name in names:
        model = workloads.build(name, device="meta", dtype=torch.float32).model
        est = accelerate_estimate(model, name)
        n = count_parameters(model)
        rows.append({"model": name, "parameters": n,
                     "accelerate fp16 total GB": est.loc["float16", "total_size"] / 1e9,
                     "ours bf16 weights GB": weight_bytes_by_dtype(n)["bf16"] / 1e9,
                     "accelerate fp16 training GB": est.loc["float16", "training_adam"] / 1e9,
                     "accelerate fp32 training GB": est.loc["float32", "training_adam"] / 1e9,
                     "ours Adam state GB": training_state(n)["total"] / 1e9,
                     "accelerate fp16 B/param": est.loc["float16", "training_adam"] / n})
    return pd.DataFrame(rows).set_index("model")


def _trainable(model: torch.nn.Module) -> int:
    return count_parameters(model, trainable=True)


def _llm_train_step(built: workloads.Built) -> tuple[Callable, tuple, dict]:
    """A language-model training step on the prefill inputs: logits -> cross-entropy against
    the inputs shifted by one (the labels= path of transformers) -> backward."""
    model = built.model
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    _, kw = built.phase("prefill").make_inputs()
    ids = kw["input_ids"]

    def step(input_ids):
        # use_cache=True only because, without a cache, transformers inspects position_ids for
        # packed sequences with a data-dependent .all(), which meta tensors cannot answer. The
        # cache holds the K/V tensors attention saves for backward anyway (no extra storage).
        loss = model(input_ids=input_ids, labels=input_ids, use_cache=True).loss
        loss.backward()
        return loss.detach()

    return step, (ids,), {}


def _forward_train_step(built: workloads.Built, phase: str,
                        trainable: torch.nn.Module | None = None) -> tuple[Callable, tuple, dict]:
    """A training step for a forward-only phase: the phase's model call with grad, then
    ``output.float().mean().backward()``. Only ``trainable`` (default: the whole model)
    requires grad."""
    model = built.model
    model.train()
    for p in model.parameters():
        p.requires_grad_(trainable is None)
    for p in (trainable.parameters() if trainable is not None else []):
        p.requires_grad_(True)
    ph = built.phase(phase)
    args, kw = ph.make_inputs()
    inner = getattr(ph.run, "__wrapped__", ph.run)  # the phases run under no_grad: unwrap

    def step(*a, **k):
        out = inner(*a, **k)
        out = out.sample if hasattr(out, "sample") else out
        loss = out.float().mean()
        loss.backward()
        return loss.detach()

    return step, args, kw


@dataclass(frozen=True)
class ProxySpec:
    """Which phase of a workload the footprint table traces, and how its training step is
    built (``llm`` / ``forward`` / a native backward phase / None for no training step)."""

    workload: str
    phase: str
    train: str | None
    note: str = ""


PROXIES = (
    ProxySpec("llama-2-7b", "prefill", "llm"),
    ProxySpec("llama-2-13b", "prefill", "llm"),
    ProxySpec("llama-2-70b", "prefill", "llm"),
    ProxySpec("sd-1.5", "unet_step", "forward", "UNet only (fine-tuning the UNet)"),
    ProxySpec("vit-b-16", "forward", "forward"),
    ProxySpec("resnet-50", "forward", "forward"),
    ProxySpec("nerfacto", "render", "train_step"),
    ProxySpec("vanilla-nerf", "render", "train_step"),
    ProxySpec("dreamfusion-sd", "sds_step", "sds_step", "SD frozen: only the NeRF trains"),
)


def footprint(spec: ProxySpec, seq_len: int = 2048, batch: int = 1, dtype: str = "bf16",
              train: bool = True) -> dict[str, Any]:
    """One proxy's memory footprint at full scale on ``meta`` (see the module docstring).

    Returns parameters and trainable parameters; weight bytes per dtype; ``infer_peak`` (peak
    live activation + output bytes of the inference phase, at ``dtype`` for the LLM / SD /
    vision models, fp32 for the NeRFs); ``kv_cache`` (LLMs: bytes at ``seq_len`` tokens x
    ``batch``); ``train_state`` (mixed-precision Adam on the trainable parameters) and
    ``train_peak`` (peak live activation + output bytes of a training step, gradients
    excluded), when ``train``.
    """
    wl = workloads.get_workload(spec.workload)
    torch_dtype = torch.float32 if wl.domain == "nerf" else parse_dtype(dtype)
    sl = seq_len if wl.domain == "llm" else None
    built = workloads.build(spec.workload, device="meta", dtype=torch_dtype, batch=batch, seq_len=sl)
    params = count_parameters(built.model)
    row: dict[str, Any] = {"workload": spec.workload, "phase": spec.phase, "dtype": str(torch_dtype).split(".")[-1],
                           "parameters": params}
    row.update({f"weights_{d}": b for d, b in weight_bytes_by_dtype(params).items()})
    ph = built.phase(spec.phase)
    args, kw = ph.make_inputs()
    if ph.backward:
        row["infer_peak"] = float("nan")
    else:
        with torch.no_grad():
            row["infer_peak"] = liveness(ph.run, *args, model=built.model, **kw).peak()["bytes"]
    row["kv_cache"] = (workloads.kv_cache_bytes_per_token(built.config, int(bytes_per_element(torch_dtype)))
                       * seq_len * batch if wl.domain == "llm" else 0)
    trainable = _trainable(built.model)
    row["trainable"] = trainable
    row["train_state"] = training_state(trainable)["total"]
    row["train_peak"] = float("nan")
    if train and spec.train:
        built = workloads.build(spec.workload, device="meta", dtype=torch_dtype, batch=batch, seq_len=sl)
        if spec.train == "llm":
            step, a, k = _llm_train_step(built)
        elif spec.train == "forward":
            target = built.model["unet"] if spec.workload == "sd-1.5" else None
            step, a, k = _forward_train_step(built, spec.phase, target)
            row["trainable"] = trainable = _trainable(built.model)
            row["train_state"] = training_state(trainable)["total"]
        else:
            ph = built.phase(spec.train)
            a, k = ph.make_inputs()
            step = ph.run
        live = liveness(step, *a, model=built.model, **k)
        row["train_peak"] = live.peak()["bytes"]
    row["note"] = spec.note
    return row


def footprint_table(specs=PROXIES, seq_len: int = 2048, batch: int = 1, dtype: str = "bf16",
                    train: bool = True) -> pd.DataFrame:
    """:func:`footprint` for several proxies, one row each, indexed by workload."""
    return pd.DataFrame([footprint(s, seq_len, batch, dtype, train) for s in specs]).set_index("workload")


# ---------------------------------------------------------------------------- vs batch
@functools.lru_cache(maxsize=16)
def _llm_sizes(workload: str) -> tuple[int, int]:
    """(parameters, KV-cache elements per token) of a decoder LM, from its meta build."""
    built = workloads.build(workload, device="meta")
    return (count_parameters(built.model),
            workloads.kv_cache_bytes_per_token(built.config, 1))


def serving_memory(workload: str, batch: int | np.ndarray, context: int, dtype: str = "fp16",
                   reserve_fraction: float = RESERVE_FRACTION, hw: Hardware | None = None) -> pd.DataFrame:
    """Memory of serving an LLM: weights + KV cache of ``batch`` sequences of ``context``
    tokens + the runtime reserve, per batch size (bytes). The reserve is the package's one rule
    (:mod:`cohw_utils.views.memory_budget`: ``reserve_fraction`` of the chip's capacity, 10% by
    default, vLLM's ``gpu_memory_utilization=0.9``) when ``hw`` is given, else 0.
    """
    if np.any(np.asarray(batch) < 0) or context < 0:
        raise CohwError(f"batch and context must be >= 0, got batch={batch!r}, context={context!r}")
    params, kv1 = _llm_sizes(workload)
    b = bytes_per_element(dtype)
    kv = kv1 * b  # the KV cache is stored in ``dtype`` too
    batch = np.atleast_1d(np.asarray(batch))
    reserve = hw.mem_bytes - usable_bytes(hw, reserve_fraction) if hw is not None and hw.mem_bytes else 0.0
    return pd.DataFrame({"batch": batch, "weights": params * b, "kv_cache": batch * context * kv,
                         "reserve": reserve, "total": params * b + batch * context * kv + reserve})


def max_batch(workload: str, hw: Hardware, context: int, dtype: str = "fp16",
              reserve_fraction: float = RESERVE_FRACTION) -> int:
    """Largest batch of ``context``-token sequences whose weights + KV cache fit in ``hw``'s
    memory less the runtime reserve (0 when the weights alone do not fit)."""
    if hw.mem_bytes is None:
        raise CohwError(f"{hw.name} has no memory capacity figure; add memory_gb to its hardware.csv row")
    base = serving_memory(workload, 0, context, dtype, reserve_fraction, hw)
    per = serving_memory(workload, 1, context, dtype, reserve_fraction, hw)["kv_cache"].iloc[0]
    free = hw.mem_bytes - base["total"].iloc[0]
    return max(0, int(math.floor(free / per))) if per > 0 else 0


def fig_memory_vs_batch(workloads_: list[str], chips: list[Hardware], context: int = 2048,
                         dtype: str = "fp16", max_b: int = 64) -> Figure:
    """Serving memory (weights + KV cache + activations) against batch size for each LLM, with
    each chip's capacity as a horizontal line: where a curve crosses a line is that chip's
    largest batch at this context (the picture of vLLM's Figure 1, right)."""
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    b = np.arange(0, max_b + 1)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, w in enumerate(workloads_):
        m = serving_memory(w, b, context, dtype)
        ax.plot(b, m["total"] / 1e9, color=colors[i % len(colors)], lw=2,
                label=f"{w} ({dtype}, {context} tokens/seq)")
        ax.axhline(m["weights"].iloc[0] / 1e9, color=colors[i % len(colors)], lw=0.8, ls=":")
    by_capacity: dict[float, list[str]] = {}
    for hw in chips:
        by_capacity.setdefault(hw.mem_bytes, []).append(hw.name)
    for cap, names in by_capacity.items():
        ax.axhline(cap / 1e9, color="gray", lw=1, ls="--")
        ax.annotate(f"{' / '.join(names)}: {cap / 1e9:.0f} GB", (max_b, cap / 1e9), fontsize=7,
                    ha="right", va="bottom", color="dimgray")
    ax.set(xlabel="batch size (sequences)", ylabel="memory (GB)",
           title="Serving memory vs batch: weights (dotted) + KV cache")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig
