"""Software enabling on a second runtime: export, convert, run, compare, time, and fall back.

The methodology's step 3 made concrete with a real second stack: each proxy phase (tiny scale,
seeded random weights, CPU) is captured with ``torch.export``, converted to ONNX with the
dynamo-based exporter (``torch.onnx.export(..., dynamo=True)``, onnxscript's torch_lib) and run
in onnxruntime's CPU execution provider; its outputs are compared with eager PyTorch's.

Pipeline of :func:`convert`, one phase at a time, every stage guarded:

1. **Inputs.** ``Phase.make_inputs()`` gives structured inputs (a ``RayBundle`` dataclass, a
   ``DynamicCache``...). :func:`flatten` turns any nest of tensors, dicts, lists, dataclasses
   and transformers caches into a flat list of tensors plus a function that rebuilds the
   structure; :class:`PhaseModule` wraps ``Phase.run`` so that the exported graph takes and
   returns flat tensors. Floating-point inputs and outputs cross the boundary in float32 (cast
   to the build dtype inside the graph), so bf16 models can be fed from numpy.
2. **torch.export** (non-strict) with the *serving axis* marked ``Dim.AUTO``: prompt length
   for an LLM prefill, cache length for decode, batch for the image models (built with batch
   2 so that export does not specialise a size-1 dimension), rays for the NeRFs. If that
   export fails, the failure is recorded and a static export is tried; if it succeeds but the
   axis came out specialised to a constant, that is recorded too (``dynamic`` column).
   Training phases go straight to the static export (their capture fails either way).
3. **ONNX conversion** of the exported program (opset 18), optionally after aten-level
   decompositions (:data:`DECOMPOSITIONS`, the "decompose the op" dirty fix). A crash inside
   the exporter's ONNX optimizer (rather than in lowering an op) is recorded and the
   conversion retried with ``optimize=False``.
4. **onnxruntime session** on ``CPUExecutionProvider`` (threads = torch's thread count).
5. **Parity** on fresh inputs: for every floating output, ``max_abs = max|ort - torch|`` and
   ``max_rel = max_abs / max|torch|`` (a max-norm relative error, which does not blow up on
   near-zero elements). A phase passes when every output has
   ``max_abs <= atol + rtol * max|torch|`` with the per-dtype :data:`TOLERANCES`; integer
   outputs must match exactly. The reference is eager PyTorch in the same dtype.

A failing stage does not raise: :func:`classify_failure` files the exception under one of
:data:`FAILURE_CLASSES` with its key line, and the :class:`Conversion` says which stage
stopped. Training phases (``Phase.backward``) call ``loss.backward()``, which an inference
graph capture cannot represent; their failures are classed ``autograd (training step)``.

Latency (:func:`latency`): eager vs ``torch.compile`` (inductor, CPU) vs onnxruntime, each
through :func:`cohw_utils.spine.measure.time_callable` with fresh inputs before every call (untimed).
Compilation is timed separately as the first call's wall time, with a fresh inductor cache
and ``torch._dynamo.reset()`` so that nothing carries over from an earlier run.

Dirty fixes. :func:`fix` decomposes an op the converter cannot lower into ops it can
(:data:`DECOMPOSITIONS`, applied to the exported program with ``run_decompositions``) and
re-converts. :func:`offload`: where the target cannot run a whole phase, move what it can.
Top-down over the module tree, each submodule that carries at least ``min_share`` of the
phase's FLOPs and is called without needing autograd is exported on its own; if it converts
and matches, it runs in onnxruntime inside the otherwise-eager phase, else its children are
tried. The shares on the target are measured, not estimated: FLOPs and bytes from tracing
the hybrid run (onnxruntime work is invisible to the tracer, so target share = 1 - PyTorch
share), time from timers around each onnxruntime call (sessions created without thread
spinning, so that idle onnxruntime workers do not steal the cores PyTorch runs on).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
import torch
from torch import nn

from cohw_utils import workloads
from cohw_utils.core.dtypes import dtype_name, parse_dtype
from cohw_utils.core.errors import CohwError
from cohw_utils.spine.measure import Timing, time_callable
from cohw_utils.spine.optable import totals
from cohw_utils.spine.trace import trace

__all__ = [
    "TOLERANCES", "FAILURE_CLASSES", "DECOMPOSITIONS", "Tolerance", "Failure", "Parity", "Conversion",
    "Offload", "flatten", "PhaseModule", "classify_failure", "build_phase", "convert", "convert_all",
    "fix", "fixable", "plan", "check_phase_names", "parity_table", "failure_table", "latency", "latency_table", "offload", "offload_table",
    "searchsorted_by_comparison", "ort_session", "versions",
]

ONNX_OPSET = 18


# --------------------------------------------------------------------------------------------
# Tolerances and failure classes
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tolerance:
    """Pass when ``max_abs <= atol + rtol * max|reference|`` for every output."""

    rtol: float
    atol: float

    def __str__(self) -> str:
        return f"max|d| <= {self.atol:g} + {self.rtol:g} * max|ref|"


# Unit roundoff: fp32 6e-8, fp16 4.9e-4, bf16 3.9e-3. A few layers of accumulation in a
# different order (MLAS vs ATen kernels) stay well inside ~100 ulps of the output's range.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(rtol=1e-4, atol=1e-5),
    "fp16": Tolerance(rtol=1e-2, atol=1e-3),
    "bf16": Tolerance(rtol=5e-2, atol=1e-2),
}

AUTOGRAD = "autograd (training step)"
UNSUPPORTED_OP = "unsupported op"
DATA_DEPENDENT = "data-dependent control flow"
DYNAMIC_SHAPES = "dynamic shapes"
CUSTOM_KERNEL = "custom kernel"
OTHER = "other"
FAILURE_CLASSES = (UNSUPPORTED_OP, DATA_DEPENDENT, DYNAMIC_SHAPES, CUSTOM_KERNEL, AUTOGRAD, OTHER)


@dataclass(frozen=True)
class Failure:
    """Why a stage failed: class (one of FAILURE_CLASSES), the exception's key line, the op if
    the message names one, and the exception type."""

    stage: str
    klass: str
    key_line: str
    op: str = ""
    exc_type: str = ""


@dataclass(frozen=True)
class Parity:
    """Worst output of a torch-vs-runtime comparison."""

    max_abs: float
    max_rel: float
    tolerance: Tolerance
    passed: bool
    outputs: int
    worst_output: int


# --------------------------------------------------------------------------------------------
# Flattening structured inputs and outputs
# --------------------------------------------------------------------------------------------
def _is_cache(obj: Any) -> bool:
    return type(obj).__name__.endswith("Cache") and (hasattr(obj, "layers") or hasattr(obj, "key_cache"))


def flatten(obj: Any) -> tuple[list[torch.Tensor], Callable[[list[torch.Tensor]], Any]]:
    """Tensors of a nest (tensor, dict, list/tuple, dataclass, transformers cache, constants)
    in a fixed order, and ``rebuild(tensors)`` that puts tensors back into the same structure.

    Non-tensor leaves (bools, ints, None, strings) are constants of the structure. A transformers
    ``DynamicCache`` flattens to its (key, value) tensors per layer and is rebuilt as a new
    ``DynamicCache``; a dataclass (nerfstudio's ``RayBundle``, ``RaySamples``) is rebuilt with
    ``dataclasses.replace``; a transformers ``ModelOutput`` with its class.
    """
    if isinstance(obj, torch.Tensor):
        return [obj], lambda ts: ts[0]
    if _is_cache(obj):
        from transformers import DynamicCache

        pairs = workloads.cache_tensors(obj)
        flat = [t for kv in pairs for t in kv]
        return flat, lambda ts: DynamicCache(ddp_cache_data=[(ts[2 * i], ts[2 * i + 1])
                                                             for i in range(len(ts) // 2)])
    if isinstance(obj, dict):
        keys, vals = list(obj), list(obj.values())
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        keys = [f.name for f in dataclasses.fields(obj)]
        vals = [getattr(obj, k) for k in keys]
    elif isinstance(obj, (list, tuple)):
        keys, vals = None, list(obj)
    else:
        return [], lambda ts: obj
    parts = [flatten(v) for v in vals]
    counts = [len(p[0]) for p in parts]
    flat = [t for p in parts for t in p[0]]

    def rebuild(ts: list[torch.Tensor]) -> Any:
        out, i = [], 0
        for (_, rb), n in zip(parts, counts):
            out.append(rb(ts[i:i + n]))
            i += n
        if isinstance(obj, dict):
            if type(obj) is dict:
                return dict(zip(keys, out))
            if hasattr(obj, "to_tuple"):  # transformers ModelOutput: keyword construction
                return type(obj)(**dict(zip(keys, out)))
            return type(obj)(zip(keys, out))
        if keys is not None:
            return dataclasses.replace(obj, **dict(zip(keys, out)))
        return type(obj)(out) if not hasattr(obj, "_fields") else type(obj)(*out)

    return flat, rebuild


class PhaseModule(nn.Module):
    """``run(*args, **kwargs)`` of a phase as a module over flat tensors, for export.

    ``forward(*tensors)`` casts each floating input to its original dtype, rebuilds the
    structured inputs, calls ``run`` and returns its output tensors (floating ones as float32).
    ``model`` is registered as a submodule so that export lifts its parameters.
    """

    def __init__(self, model: nn.Module, run: Callable[..., Any], rebuild: Callable, dtypes: list[torch.dtype]):
        super().__init__()
        self.model = model
        self._run, self._rebuild, self._dtypes = run, rebuild, dtypes

    def forward(self, *ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ts = [t.to(d) if t.is_floating_point() and t.dtype != d else t for t, d in zip(ts, self._dtypes)]
        args, kwargs = self._rebuild(list(ts))
        out, _ = flatten(self._run(*args, **kwargs))
        return tuple(t.float() if t.is_floating_point() else t for t in out)


def _interface(ts: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """What crosses the runtime boundary: detached, contiguous, floating as float32."""
    return [(t.detach().float() if t.is_floating_point() else t.detach()).contiguous() for t in ts]


# --------------------------------------------------------------------------------------------
# Failure classification
# --------------------------------------------------------------------------------------------
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RULES: list[tuple[str, re.Pattern]] = [
    (CUSTOM_KERNEL, re.compile(r"tcnn|tinycudann|triton|custom op|no (fake|meta|abstract) (impl|kernel)|"
                               r"op='(?!aten\.|prims\.)[\w]+\.", re.I)),
    (DATA_DEPENDENT, re.compile(r"data[- ]dependent|GuardOnDataDependent|unbacked|\.item\(\)|"
                                r"nonzero|Could not extract specialized integer", re.I)),
    (DYNAMIC_SHAPES, re.compile(r"Constraints violated|ConstraintViolation|specializ|dynamic_shapes|"
                                r"Dim\.(DYNAMIC|AUTO)|symbolic shape", re.I)),
    (UNSUPPORTED_OP, re.compile(r"No ONNX function found|Could not find an implementation|NOT_IMPLEMENTED|"
                                r"Unsupported|not supported|Type Error: Type|is invalid|"
                                r"no (kernel|implementation|decomposition)", re.I)),
]
_KEY = re.compile(r"No ONNX function found[^\n]*|Could not find an implementation[^\n]*|Type Error:[^\n]*|"
                  r"Constraints violated[^\n]*|specialized[^\n]*|Could not guard on data-dependent[^\n]*|"
                  r"GuardOnDataDependent[^\n]*|fake tensor in the exported program[^\n]*|"
                  r"Unsupported[^\n]*|not supported[^\n]*", re.I)
_OP = [re.compile(r"op='([\w.]+)', overload='(\w+)'"), re.compile(r"implementation for (\w+)\(\d+\)"),
       re.compile(r"of operator \((\w+)\)"), re.compile(r"target=torch\.ops\.([\w.]+)")]


def _messages(exc: BaseException) -> list[str]:
    out, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        out.append(_ANSI.sub("", f"{type(exc).__name__}: {exc}"))
        exc = exc.__cause__ or exc.__context__
    return out


def classify_failure(exc: BaseException, stage: str, backward: bool = False) -> Failure:
    """File an exception from ``stage`` under one of :data:`FAILURE_CLASSES`.

    A capture of a phase that runs ``loss.backward()`` (``backward=True``) at the export stage
    is ``autograd (training step)`` whatever the message (the backward runs on fake tensors
    and leaks them into the graph's constants). Otherwise the message chain is matched against
    patterns, most specific first (custom kernel, data-dependent, dynamic shapes, unsupported
    op); no match is ``other``. ``key_line`` is the most telling line (<= 220 characters).
    """
    msgs = _messages(exc)
    text = "\n".join(msgs)
    klass = OTHER
    if backward and stage.startswith("torch.export"):
        klass = AUTOGRAD
    else:
        for name, pat in _RULES:
            if pat.search(text):
                klass = name
                break
    m = _KEY.search(text)
    if m:
        key = m.group(0)
    else:  # the root cause, unless it is an internal slip (AttributeError on None...) of a wrapper
        internal = ("AttributeError", "KeyError", "IndexError", "TypeError", "AssertionError")
        chosen = next((x for x in reversed(msgs) if not x.startswith(internal)), msgs[-1])
        key = next((ln for ln in chosen.splitlines() if ln.strip()), chosen)
    op = ""
    for pat in _OP:
        hit = pat.search(text)
        if hit:
            op = ".".join(hit.groups())
            break
    key = " ".join(key.split())
    return Failure(stage, klass, key[:217] + "..." if len(key) > 220 else key, op, type(exc).__name__)


# --------------------------------------------------------------------------------------------
# Building a phase, exporting, converting
# --------------------------------------------------------------------------------------------
TINY_SIZES = {"seq_len": 32, "batch": 2}


def build_phase(workload: str, phase: str, dtype: str = "fp32", device: str = "cpu", **options: Any):
    """Tiny-scale build of one workload phase on ``device``; returns ``(built, phase)``.

    LLMs get ``seq_len=32`` (batch 1: a cache of 32 tokens for decode); the image models and
    Stable Diffusion batch 2, so that export can keep the batch dimension symbolic; the NeRFs
    their tiny default of 256 rays. ``options`` override these and pass workload options.
    """
    wl = workloads.get_workload(workload)
    kw: dict[str, Any] = {}
    if wl.domain == "llm":
        kw["seq_len"] = TINY_SIZES["seq_len"]
    elif wl.domain in ("vision", "diffusion"):
        kw["batch"] = TINY_SIZES["batch"]
    kw.update(options)
    built = workloads.build(workload, scale="tiny", device=device, dtype=parse_dtype(dtype), **kw)
    return built, built.phase(phase)


def _serving_axes(domain: str, phase: str, ts: list[torch.Tensor]) -> tuple[tuple, str]:
    """``dynamic_shapes`` for :class:`PhaseModule` (Dim.AUTO on the serving axis) and its name."""
    from torch.export import Dim

    if domain == "llm" and phase == "prefill":
        spec = [{1: Dim.AUTO} if t.dim() == 2 else None for t in ts]
        name = "prompt length"
    elif domain == "llm":
        spec = [{2: Dim.AUTO} if t.dim() == 4 else None for t in ts]
        name = "cache length"
    elif domain in ("nerf", "text-to-3d"):
        n = ts[0].shape[0] if ts and ts[0].dim() else None
        spec = [{0: Dim.AUTO} if t.dim() and t.shape[0] == n else None for t in ts]
        name = "rays"
    else:
        spec = [{0: Dim.AUTO} if t.dim() else None for t in ts]
        name = "batch"
    return (tuple(spec),), name


def _axis_kept(ep, spec: tuple) -> bool | None:
    """Whether every dimension marked in ``spec`` stayed symbolic in the exported program."""
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    user = set(ep.graph_signature.user_inputs)
    vals = [n.meta.get("val") for n in placeholders if n.name in user]
    marked = [(v, d) for v, s in zip(vals, spec[0]) if s for d in s]
    if not marked:
        return None
    return all(isinstance(v.shape[d], torch.SymInt) for v, d in marked)


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' warnings and progress logs (their failures are caught as findings)."""
    loggers = [logging.getLogger(n) for n in ("torch.export", "torch._export", "torch.onnx",
                                              "torch._dynamo", "torch.fx", "onnxscript", "torch._subclasses")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(None):
                yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def ort_session(model_proto, providers: tuple[str, ...] = ("CPUExecutionProvider",), spin: bool = True):
    """An onnxruntime session on ``providers`` with torch's intra-op thread count.

    ``spin=False`` stops onnxruntime's worker threads from busy-waiting after each run: needed
    when PyTorch runs on the same cores between calls (:func:`offload`), where spinning threads
    would steal its time.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.log_severity_level = 3
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model_proto.SerializeToString(), sess_options=opts, providers=list(providers))


def _feeds(session, ts: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """Feed dict for a session exported from :class:`PhaseModule` (inputs named ``ts_<i>``)."""
    out = {}
    for pos, inp in enumerate(session.get_inputs()):
        m = re.fullmatch(r"ts_(\d+)", inp.name)
        out[inp.name] = ts[int(m.group(1)) if m else pos].cpu().numpy()
    return out


def _compare(got: list, ref: list[torch.Tensor], tol: Tolerance) -> Parity:
    worst_abs, worst_rel, passed, worst = 0.0, 0.0, len(got) == len(ref), -1
    for i, (g, r) in enumerate(zip(got, ref)):
        g = np.asarray(g)
        r = r.detach().float().numpy() if r.is_floating_point() else r.detach().numpy()
        if g.shape != r.shape:
            passed, worst = False, i
            continue
        if not np.issubdtype(r.dtype, np.floating):
            bad = int(np.count_nonzero(g != r))
            passed &= bad == 0
            continue
        if g.size == 0:
            continue
        if not (np.isfinite(g).all() and np.isfinite(r).all()):
            same = bool(np.array_equal(np.isfinite(g), np.isfinite(r)))
            passed &= same
            mask = np.isfinite(r) & np.isfinite(g)
            g, r = g[mask], r[mask]
            if g.size == 0:
                continue
        d = float(np.max(np.abs(g.astype(np.float64) - r.astype(np.float64))))
        scale = float(np.max(np.abs(r)))
        rel = d / scale if scale > 0 else (0.0 if d == 0 else math.inf)
        ok = d <= tol.atol + tol.rtol * scale
        passed &= ok
        if rel > worst_rel or worst < 0:
            worst_abs, worst_rel, worst = d, rel, i
    return Parity(worst_abs, worst_rel, tol, bool(passed), len(ref), worst)


def _run_reference(phase, seed: int = 0) -> list[torch.Tensor]:
    args, kwargs = phase.make_inputs()
    torch.manual_seed(seed)
    out, _ = flatten(phase.run(*args, **kwargs))
    return _interface(out)


@dataclass
class Conversion:
    """One phase through export -> ONNX -> onnxruntime -> parity (see the module docstring).

    ``status``: ``"ok"`` (parity passed), ``"mismatch"`` (ran, parity failed) or ``"failed"``
    (``failure.stage`` stopped it). ``dynamic``: what happened to the serving axis.
    ``failures``: every recorded failure, the dynamic-axis one included.
    """

    workload: str
    phase: str
    dtype: str
    backward: bool
    status: str = "failed"
    failure: Failure | None = None
    failures: list[Failure] = field(default_factory=list)
    axis: str = ""
    dynamic: str = ""
    parity: Parity | None = None
    fix: str = ""
    export_s: float = math.nan
    onnx_s: float = math.nan
    session_s: float = math.nan
    onnx_nodes: int = 0
    built: Any = field(default=None, repr=False)
    phase_obj: Any = field(default=None, repr=False)
    exported: Any = field(default=None, repr=False)
    onnx_model: Any = field(default=None, repr=False)
    session: Any = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _export(module: nn.Module, ts: list[torch.Tensor], dynamic_shapes=None):
    with _quiet():
        return torch.export.export(module, tuple(ts), dynamic_shapes=dynamic_shapes, strict=False)


@functools.lru_cache(maxsize=1)
def _registry():
    """The exporter's op registry (onnxscript's torch_lib), built once per process.

    ``torch.onnx.export`` rebuilds it on every call (about 1.7 s on 2 cores); the exporter's
    ``_core.export`` takes it as an argument. Private API: :func:`_to_onnx` falls back to the
    public ``torch.onnx.export`` if it moves.
    """
    from torch.onnx._internal.exporter import _registration

    return _registration.ONNXRegistry.from_torchlib(opset_version=ONNX_OPSET)


def _to_onnx(ep, decompositions: dict | None = None, optimize: bool = True):
    """ExportedProgram -> ONNX ModelProto (opset 18), after optional aten decompositions."""
    with _quiet():
        if decompositions:
            ep = ep.run_decompositions(decompositions)
        try:
            from torch.onnx._internal.exporter import _core

            registry = _registry()
        except (ImportError, AttributeError):
            return torch.onnx.export(ep, (), dynamo=True, verbose=False, optimize=optimize,
                                     opset_version=ONNX_OPSET).model_proto
        return _core.export(ep, registry=registry, verbose=False, optimize=optimize,
                            opset_version=ONNX_OPSET).model_proto


def convert(workload: str, phase: str, dtype: str = "fp32", *, dynamic: bool = True,
            decompositions: dict | None = None, keep: bool = True, **options: Any) -> Conversion:
    """Export one tiny phase, convert it to ONNX, run it in onnxruntime CPU and check parity.

    Never raises for a failing stage: the returned :class:`Conversion` records it. Bad
    arguments (unknown workload, phase or dtype) raise :class:`~cohw_utils.core.errors.CohwError`.
    ``decompositions`` ({aten overload: python function}) are applied to the exported program
    before conversion (see :data:`DECOMPOSITIONS`). ``keep=False`` drops the built model,
    exported program and ONNX model once done (the session is kept for timing).
    """
    dname = dtype_name(dtype)
    if dname not in TOLERANCES:
        raise CohwError(f"no parity tolerance for dtype '{dtype}'; use one of: {', '.join(TOLERANCES)}")
    wl = workloads.get_workload(workload)
    if phase not in wl.phases:
        raise CohwError(f"workload '{wl.name}' has no phase '{phase}'; its phases: {', '.join(wl.phases)}")
    conv = Conversion(wl.name, phase, dname, backward=False)
    try:
        built, ph = build_phase(wl.name, phase, dname, **options)
    except CohwError as e:  # e.g. the NeRFs are float32-only: not a conversion finding
        conv.status, conv.dynamic = "n/a", str(e).split(";")[0]
        return conv
    conv.backward, conv.built, conv.phase_obj = ph.backward, built, ph
    if decompositions:
        conv.fix = "decompose " + ", ".join(str(k).removeprefix("aten.") for k in decompositions)

    def fail(stage: str, exc: BaseException) -> Conversion:
        conv.failure = classify_failure(exc, stage, ph.backward)
        conv.failures.append(conv.failure)
        conv.status = "failed"
        return conv

    args, kwargs = ph.make_inputs()
    ts, rebuild = flatten((args, kwargs))
    module = PhaseModule(built.model, ph.run, rebuild, [t.dtype for t in ts])
    ts = _interface(ts)
    t0 = time.perf_counter()
    ep = None
    if dynamic and ph.backward:
        conv.dynamic = "not tried (training step)"
    elif dynamic:
        spec, conv.axis = _serving_axes(wl.domain, phase, ts)
        try:
            ep = _export(module, ts, spec)
            kept = _axis_kept(ep, spec)
            conv.dynamic = "kept" if kept else ("specialized" if kept is False else "")
            if kept is False:
                conv.failures.append(Failure("torch.export (dynamic)", DYNAMIC_SHAPES,
                                             f"export specialized the {conv.axis} axis to its example size",
                                             "", ""))
        except Exception as e:  # noqa: BLE001 - every failure is a finding
            f = classify_failure(e, "torch.export (dynamic)", ph.backward)
            conv.failures.append(f)
            conv.dynamic = f"failed ({f.klass})"
            args, kwargs = ph.make_inputs()  # the failed capture may have consumed them
            ts, rebuild = flatten((args, kwargs))
            module = PhaseModule(built.model, ph.run, rebuild, [t.dtype for t in ts])
            ts = _interface(ts)
    if ep is None:
        try:
            ep = _export(module, ts)
        except Exception as e:  # noqa: BLE001
            conv.export_s = time.perf_counter() - t0
            fail("torch.export", e)
            if len(conv.failures) > 1 and conv.failures[-2].stage == "torch.export (dynamic)" \
                    and conv.failures[-2].klass == conv.failure.klass:
                del conv.failures[-2]  # the same failure twice: keep the static export's
                conv.dynamic = ""
            return conv
    conv.export_s = time.perf_counter() - t0
    conv.exported = ep
    _finish(conv, decompositions)
    if not keep:
        conv.built = conv.exported = conv.onnx_model = None
    return conv


def _finish(conv: Conversion, decompositions: dict | None = None) -> Conversion:
    """ONNX conversion -> session -> parity for a conversion whose export succeeded.

    A conversion that fails inside the exporter's ONNX optimizer (not in translating an op) is
    retried with ``optimize=False``: the failure stays listed, the phase goes on.
    """
    ph = conv.phase_obj

    def fail(stage: str, exc: BaseException) -> Conversion:
        conv.failure = classify_failure(exc, stage, ph.backward)
        conv.failures.append(conv.failure)
        conv.status = "failed"
        return conv

    t0 = time.perf_counter()
    try:
        proto = _to_onnx(conv.exported, decompositions)
    except Exception as e:  # noqa: BLE001
        f = classify_failure(e, "onnx conversion", ph.backward)
        if f.klass == UNSUPPORTED_OP:
            conv.onnx_s = time.perf_counter() - t0
            return fail("onnx conversion", e)
        conv.failures.append(Failure("onnx optimizer", f.klass, f.key_line, f.op, f.exc_type))
        try:
            proto = _to_onnx(conv.exported, decompositions, optimize=False)
            conv.fix = ", ".join(filter(None, [conv.fix, "optimize=False"]))
        except Exception as e2:  # noqa: BLE001
            conv.onnx_s = time.perf_counter() - t0
            return fail("onnx conversion", e2)
    conv.onnx_s = time.perf_counter() - t0
    conv.onnx_model, conv.onnx_nodes = proto, len(proto.graph.node)
    t0 = time.perf_counter()
    try:
        sess = ort_session(proto)
    except Exception as e:  # noqa: BLE001
        return fail("onnxruntime session", e)
    conv.session_s = time.perf_counter() - t0
    conv.session = sess
    try:
        ref = _run_reference(ph)
        args, kwargs = ph.make_inputs()
        got = sess.run(None, _feeds(sess, _interface(flatten((args, kwargs))[0])))
    except Exception as e:  # noqa: BLE001
        return fail("onnxruntime run", e)
    conv.parity = _compare(got, ref, TOLERANCES[conv.dtype])
    conv.status = "ok" if conv.parity.passed else "mismatch"
    conv.failure = None
    if not conv.parity.passed:
        conv.failures.append(Failure("parity", OTHER, f"max abs error {conv.parity.max_abs:.3g} exceeds "
                                     f"{conv.parity.tolerance}", "", ""))
    return conv


def fixable(conv: Conversion, decompositions: dict | None = None) -> bool:
    """Whether :func:`fix` applies: the export succeeded and ONNX conversion stopped on an aten
    op that ``decompositions`` (default :data:`DECOMPOSITIONS`) rewrites."""
    table = DECOMPOSITIONS if decompositions is None else decompositions
    f = conv.failure
    return (conv.status == "failed" and conv.exported is not None and f is not None
            and f.stage == "onnx conversion" and f.op in {str(k) for k in table})


def fix(conv: Conversion, decompositions: dict | None = None) -> Conversion:
    """The "decompose the op" dirty fix: re-convert an exported phase with aten-level
    ``decompositions`` (default :data:`DECOMPOSITIONS`) applied first. Returns a new
    :class:`Conversion` (``fix`` names the decompositions); the original is left as it was.
    Only a phase whose torch.export succeeded can be fixed this way."""
    if conv.exported is None:
        raise CohwError(f"{conv.workload}:{conv.phase} has no exported program to fix "
                        f"(it {conv.status} at {conv.failure.stage if conv.failure else '?'}); "
                        "convert it with keep=True, or fall back with offload()")
    decompositions = DECOMPOSITIONS if decompositions is None else decompositions
    new = copy.copy(conv)
    new.failures = [f for f in conv.failures if f.stage.startswith("torch.export")]
    new.failure, new.parity, new.session, new.onnx_model, new.onnx_nodes = None, None, None, None, 0
    new.fix = "decompose " + ", ".join(str(k).removeprefix("aten.") for k in decompositions)
    return _finish(new, decompositions)


def plan(names: Iterable[str] | None = None, dtypes: Iterable[str] = ("fp32",)) -> list[tuple[str, str, str]]:
    """``(workload, phase, dtype)`` for every phase of ``names`` (default: the registry) in
    every dtype; fp32 only for the float32-only NeRF workloads and for training phases (whose
    export fails before dtype matters). Unknown names and dtypes raise CohwError."""
    dts = [dtype_name(d) for d in dtypes]
    bad = [d for d in dts if d not in TOLERANCES]
    if bad:
        raise CohwError(f"no parity tolerance for dtype(s) {bad}; use: {', '.join(TOLERANCES)}")
    out = []
    for name in (list(names) if names is not None else list(workloads.WORKLOADS)):
        wl = workloads.get_workload(name)
        for ph in wl.phases:
            for d in dts:
                if d != "fp32" and (wl.library == "nerfstudio" or wl.domain == "text-to-3d"):
                    continue
                out.append((wl.name, ph, d))
    return out


def check_phase_names(names: Iterable[str] | str) -> set[str] | str:
    """Validate ``"workload:phase"`` names (or the string ``"all"``); returns them as a set."""
    if names == "all":
        return "all"
    known = {f"{w}:{p}" for w, p, _ in plan()}
    names = {names} if isinstance(names, str) else set(names)
    bad = sorted(names - known)
    if bad:
        raise CohwError(f"unknown phase(s) {bad}; use 'all' or names like 'llama-2-7b:prefill' "
                        f"(known: {', '.join(sorted(known))})")
    return names


def convert_all(items: Iterable[tuple[str, str, str]], **kw: Any) -> list[Conversion]:
    """:func:`convert` for every ``(workload, phase, dtype)`` of ``items`` (see :func:`plan`)."""
    return [convert(w, p, d, **kw) for w, p, d in items]


def parity_table(convs: Iterable[Conversion]) -> pd.DataFrame:
    """One row per conversion: status, where it stopped, serving axis, errors vs tolerance."""
    rows = []
    for c in convs:
        p = c.parity
        rows.append({
            "workload": c.workload, "phase": c.phase, "dtype": c.dtype, "status": c.status,
            "stopped_at": c.failure.stage if c.failure and c.status == "failed" else "",
            "failure_class": c.failure.klass if c.failure and c.status == "failed" else "",
            "axis": c.axis, "dynamic": c.dynamic, "onnx_nodes": c.onnx_nodes or None,
            "max_abs_err": p.max_abs if p else math.nan, "max_rel_err": p.max_rel if p else math.nan,
            "tolerance": str(p.tolerance) if p else "", "fix": c.fix,
            "export_s": c.export_s, "onnx_s": c.onnx_s,
        })
    return pd.DataFrame(rows)


def failure_table(convs: Iterable[Conversion]) -> pd.DataFrame:
    """Every recorded failure (stopping or not): workload, phase, dtype, stage, class, op, key line."""
    rows = [{"workload": c.workload, "phase": c.phase, "dtype": c.dtype, "stage": f.stage,
             "class": f.klass, "op": f.op, "key_line": f.key_line}
            for c in convs for f in c.failures]
    return pd.DataFrame(rows, columns=["workload", "phase", "dtype", "stage", "class", "op", "key_line"])


# --------------------------------------------------------------------------------------------
# Decompositions: the "decompose the op" dirty fix
# --------------------------------------------------------------------------------------------
def searchsorted_by_comparison(sorted_sequence, self, *, out_int32=False, right=False, side=None, sorter=None):
    """``aten.searchsorted`` as compare-and-count: the index of each value is the number of
    sorted entries below it (``<`` for side="left", ``<=`` for "right").

    ONNX has no binary-search operator. This costs N comparisons per query instead of
    log2(N), but uses only Less/LessOrEqual and ReduceSum, which every runtime has; with NeRF's
    32..256 samples per ray that is cheap next to the field MLPs.
    """
    if sorter is not None:
        sorted_sequence = sorted_sequence.gather(-1, sorter)
    right = right or side == "right"
    s, v = sorted_sequence.unsqueeze(-2), self.unsqueeze(-1)
    below = (s <= v) if right else (s < v)
    return below.sum(-1, dtype=torch.int32 if out_int32 else torch.int64)


DECOMPOSITIONS: dict = {torch.ops.aten.searchsorted.Tensor: searchsorted_by_comparison}


# --------------------------------------------------------------------------------------------
# Latency: eager vs torch.compile vs onnxruntime
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _cold_compile():
    """Compile from scratch: reset dynamo and point inductor at an empty cache for the duration,
    so that a second run of the chapter (CI runs it twice) does not reuse compiled code."""
    from torch._inductor.utils import fresh_cache

    torch._dynamo.reset()
    try:
        with _quiet(), fresh_cache():
            yield
    finally:
        torch._dynamo.reset()


def latency(conv: Conversion, backends: Iterable[str] = ("eager", "compile", "onnxruntime"),
            repeats: int = 10, warmup: int = 2, device: str = "cpu") -> list[dict]:
    """Time one converted phase on each backend (rows for :func:`latency_table`).

    Inputs are made afresh before every call, untimed (``setup``). ``prepare_s`` is the one-off
    cost before the first timed call: for ``compile`` the first call's wall time (dynamo capture
    + inductor codegen + C++ build + one run), for ``onnxruntime`` export + conversion + session
    creation. A backend that fails records its failure class and key line instead of a time.
    """
    if conv.phase_obj is None:
        raise CohwError(f"{conv.workload}:{conv.phase} was not built ({conv.status}); convert it first")
    ph = conv.phase_obj
    rows = []
    state: dict[str, Any] = {}

    def torch_setup():
        state["in"] = ph.make_inputs()

    def row(backend, timing: Timing | None, prepare: float, failure: Failure | None = None) -> dict:
        r = {"workload": conv.workload, "phase": conv.phase, "dtype": conv.dtype, "fix": conv.fix, "backend": backend,
             "device": device, "median_ms": math.nan, "min_ms": math.nan, "max_ms": math.nan,
             "iqr_ms": math.nan, "repeats": 0, "prepare_s": prepare, "method": "", "error": ""}
        if timing is not None:
            r.update(median_ms=timing.median * 1e3, min_ms=timing.min * 1e3, max_ms=timing.max * 1e3,
                     iqr_ms=timing.iqr * 1e3, repeats=timing.repeats, method=timing.method)
        if failure is not None:
            r["error"] = f"{failure.klass}: {failure.key_line}"
        return r

    for backend in backends:
        if backend == "eager":
            fn = ph.run
            t = time_callable(lambda: fn(*state["in"][0], **state["in"][1]), repeats, warmup, device, torch_setup)
            rows.append(row("eager", t, 0.0))
        elif backend == "compile":
            try:
                with _cold_compile():
                    cfn = torch.compile(ph.run)
                    torch_setup()
                    t0 = time.perf_counter()
                    cfn(*state["in"][0], **state["in"][1])
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    first = time.perf_counter() - t0
                    t = time_callable(lambda: cfn(*state["in"][0], **state["in"][1]), repeats, warmup,
                                      device, torch_setup)
                rows.append(row("compile", t, first))
            except Exception as e:  # noqa: BLE001
                rows.append(row("compile", None, math.nan, classify_failure(e, "torch.compile", ph.backward)))
        elif backend == "onnxruntime":
            if conv.session is None:
                rows.append(row("onnxruntime", None, math.nan, conv.failure))
                continue
            sess = conv.session

            def ort_setup():
                args, kwargs = ph.make_inputs()
                state["feeds"] = _feeds(sess, _interface(flatten((args, kwargs))[0]))

            t = time_callable(lambda: sess.run(None, state["feeds"]), repeats, warmup, "cpu", ort_setup)
            rows.append(row("onnxruntime", t, conv.export_s + conv.onnx_s + conv.session_s))
        else:
            raise CohwError(f"unknown backend '{backend}'; use eager, compile or onnxruntime")
    return rows


def latency_table(convs: Iterable[Conversion], backends: Iterable[str] = ("eager", "compile", "onnxruntime"),
                  repeats: int = 10, warmup: int = 2, device: str = "cpu") -> pd.DataFrame:
    """:func:`latency` for every conversion that ran, with ``vs_eager`` = eager median / median."""
    rows = []
    for c in convs:
        if c.phase_obj is not None and c.status in ("ok", "mismatch"):
            rows += latency(c, backends, repeats, warmup, device)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    eager = df[df.backend == "eager"].set_index(["workload", "phase", "dtype"])["median_ms"]
    key = list(zip(df.workload, df.phase, df.dtype))
    df["vs_eager"] = [eager.get(k, math.nan) / m if m == m and m > 0 else math.nan
                      for k, m in zip(key, df.median_ms)]
    return df


# --------------------------------------------------------------------------------------------
# Offload: run what the target can, fall back to PyTorch for the rest
# --------------------------------------------------------------------------------------------
@dataclass
class _Call:
    inputs: list[torch.Tensor]
    rebuild_in: Callable
    dtypes: list[torch.dtype]
    outputs: list[torch.Tensor]
    rebuild_out: Callable
    grad_needed: bool

    @property
    def signature(self) -> tuple:
        return tuple((tuple(t.shape), t.dtype) for t in self.inputs)


def _capture(paths: dict[str, nn.Module], run: Callable[[], Any]) -> dict[str, list[_Call]]:
    """Run ``run()`` with each module's ``forward`` wrapped to record its calls (inputs cloned)."""
    calls: dict[str, list[_Call]] = {p: [] for p in paths}
    originals = {}

    def recorder(path, mod, orig):
        def fwd(*args, **kwargs):
            ts, rb = flatten((args, kwargs))
            grad = torch.is_grad_enabled() and (any(t.requires_grad for t in ts)
                                                or any(p.requires_grad for p in mod.parameters()))
            out = orig(*args, **kwargs)
            ots, orb = flatten(out)
            calls[path].append(_Call([t.detach().clone() for t in ts], rb, [t.dtype for t in ts],
                                     [t.detach().clone() for t in ots], orb, grad))
            return out
        return fwd

    for path, mod in paths.items():
        originals[path] = mod.__dict__.get("forward")
        mod.forward = recorder(path, mod, mod.forward)
    try:
        run()
    finally:
        for path, mod in paths.items():
            if originals[path] is None:
                del mod.forward
            else:
                mod.forward = originals[path]
    return calls


class _OrtShim:
    """A module's ``forward`` replaced by onnxruntime sessions, one per input signature."""

    def __init__(self, sessions: dict[tuple, tuple[Any, Callable]], clock: list[float]):
        self.sessions, self.clock = sessions, clock

    def __call__(self, *args, **kwargs):
        ts, _ = flatten((args, kwargs))
        sig = tuple((tuple(t.shape), t.dtype) for t in ts)
        sess, rebuild_out, out_dtypes = self.sessions[sig]
        feeds = _feeds(sess, _interface(ts))
        t0 = time.perf_counter()
        outs = sess.run(None, feeds)
        self.clock[-1] += time.perf_counter() - t0
        return rebuild_out([torch.from_numpy(o).to(d) for o, d in zip(outs, out_dtypes)])


@dataclass
class Offload:
    """A phase run with some modules on the target (onnxruntime) and the rest in PyTorch."""

    workload: str
    phase: str
    method: str
    on_target: list[str]
    kept: list[tuple[str, str]]
    flops_share: float
    bytes_share: float
    time_share: float
    parity: Parity | None
    timing: Timing | None
    eager: Timing | None
    exports: int


def _module_shares(table: pd.DataFrame) -> dict[str, float]:
    """FLOP share of each module path prefix in an op table."""
    t = table[table["costed"]]
    total = float(t["flops"].sum()) or 1.0
    shares: dict[str, float] = {}
    for mod, f in t.groupby("module")["flops"].sum().items():
        parts = mod.split(".")
        for i in range(1, len(parts) + 1):
            key = ".".join(parts[:i])
            shares[key] = shares.get(key, 0.0) + float(f) / total
    return shares


def _seeded(ph, seed: int = 0):
    def run():
        args, kwargs = ph.make_inputs()
        torch.manual_seed(seed)
        return ph.run(*args, **kwargs)
    return run


def offload(workload: str, phase: str, dtype: str = "fp32", *, max_depth: int = 3, min_share: float = 0.01,
            max_signatures: int = 4, repeats: int = 5, warmup: int = 1, **options: Any) -> Offload:
    """Partition one phase between onnxruntime and PyTorch at module granularity (see the
    module docstring) and measure what then runs on the target.

    ``min_share``: a module is tried only if its subtree carries at least this share of the
    phase's FLOPs (tiny helpers are not worth a runtime hop). ``max_signatures``: a module
    called with more distinct input shapes than this is not exported (one graph per shape).
    """
    built, ph = build_phase(workload, phase, dtype, **options)
    root = built.model
    named = dict(root.named_modules())
    grad_ctx = contextlib.nullcontext if ph.backward else torch.no_grad
    with grad_ctx():
        eager_table = trace(_seeded(ph), model=root, phase=phase)
    shares = _module_shares(eager_table)
    reference = _interface(flatten(_seeded(ph)())[0])

    on_target: dict[str, _OrtShim] = {}
    kept: list[tuple[str, str]] = []
    clock: list[float] = [0.0]
    exports = 0
    frontier = [n for n in named if n and n.count(".") == 0]
    depth = 1
    while frontier and depth <= max_depth:
        candidates = {p: named[p] for p in frontier if shares.get(p, 0.0) >= min_share}
        calls = _capture(candidates, _seeded(ph)) if candidates else {}
        nxt = []
        for path in frontier:
            children = [n for n in named if n.startswith(path + ".") and n.count(".") == depth]
            if path not in candidates:
                continue
            cs = calls.get(path, [])
            if not cs:
                reason = "not called through forward()"
            elif any(c.grad_needed for c in cs):
                reason = "needs autograd"
            elif len({c.signature for c in cs}) > max_signatures:
                reason = f"called with {len({c.signature for c in cs})} input shapes"
            else:
                sessions, reason = {}, ""
                for c in {c.signature: c for c in cs}.values():
                    mod = named[path]
                    pm = PhaseModule(mod, mod.forward, lambda ts, rb=c.rebuild_in: rb(ts), c.dtypes)
                    exports += 1
                    try:
                        ep = _export(pm, _interface(c.inputs))
                        proto = _to_onnx(ep, DECOMPOSITIONS)
                        sess = ort_session(proto, spin=False)
                        got = sess.run(None, _feeds(sess, _interface(c.inputs)))
                    except Exception as e:  # noqa: BLE001
                        f = classify_failure(e, "export")
                        reason = f"{f.klass}: {f.key_line}"
                        break
                    par = _compare(got, _interface(c.outputs), TOLERANCES[dtype_name(dtype)])
                    if not par.passed:
                        reason = f"parity: max abs error {par.max_abs:.3g}"
                        break
                    sessions[c.signature] = (sess, c.rebuild_out, [t.dtype for t in c.outputs])
                if not reason:
                    on_target[path] = _OrtShim(sessions, clock)
                    continue
            kept.append((path, reason))
            nxt += children
        frontier, depth = nxt, depth + 1

    state: dict[str, Any] = {}
    eager = time_callable(lambda: ph.run(*state["in"][0], **state["in"][1]), repeats, warmup, "cpu",
                          lambda: state.__setitem__("in", ph.make_inputs()))
    if not on_target:  # nothing moved: the hybrid run is the eager run
        return Offload(built.workload.name, phase, "nothing offloadable: the phase stays in PyTorch", [], kept,
                       0.0, 0.0, 0.0, _compare([g.numpy() for g in reference], reference,
                                               TOLERANCES[dtype_name(dtype)]), eager, eager, exports)
    # the hybrid run: shims in place of the offloaded modules' forward
    for path, shim in on_target.items():
        named[path].forward = shim
    try:
        with grad_ctx():
            hybrid_table = trace(_seeded(ph), model=root, phase=phase)
        got = _interface(flatten(_seeded(ph)())[0])
        par = _compare([g.numpy() for g in got], reference, TOLERANCES[dtype_name(dtype)])
        samples_clock: list[int] = []

        def setup():
            clock.append(0.0)
            samples_clock.append(len(clock) - 1)
            state["in"] = ph.make_inputs()

        hybrid = time_callable(lambda: ph.run(*state["in"][0], **state["in"][1]), repeats, warmup, "cpu", setup)
    finally:
        for path in on_target:
            del named[path].forward
    timed = [clock[i] for i in samples_clock[-repeats:]]
    time_share = float(np.median([c / s for c, s in zip(timed, hybrid.samples)]))
    te, th = totals(eager_table), totals(hybrid_table)
    f_share = 1 - th["flops"] / te["flops"] if te["flops"] else 0.0
    b_share = 1 - th["bytes_moved"] / te["bytes_moved"] if te["bytes_moved"] else 0.0
    return Offload(built.workload.name, phase, "modules on onnxruntime, the rest in PyTorch", list(on_target), kept,
                   max(f_share, 0.0), max(b_share, 0.0), time_share, par, hybrid, eager, exports)


def offload_table(results: Iterable[Offload]) -> pd.DataFrame:
    """One row per :func:`offload` result."""
    rows = []
    for o in results:
        rows.append({
            "workload": o.workload, "phase": o.phase, "method": o.method,
            "on_target": ", ".join(o.on_target) or "-",
            "kept_in_pytorch": "; ".join(f"{p} ({r})" for p, r in o.kept[:4]) + (" ..." if len(o.kept) > 4 else ""),
            "flops_on_target_%": 100 * o.flops_share, "bytes_on_target_%": 100 * o.bytes_share,
            "time_on_target_%": 100 * o.time_share,
            "parity": ("pass" if o.parity.passed else "FAIL") if o.parity else "",
            "max_abs_err": o.parity.max_abs if o.parity else math.nan,
            "hybrid_ms": o.timing.median * 1e3 if o.timing else math.nan,
            "eager_ms": o.eager.median * 1e3 if o.eager else math.nan,
        })
    return pd.DataFrame(rows)


def versions() -> dict[str, str]:
    """Versions of the stack this chapter measures."""
    import onnx
    import onnxruntime
    import onnxscript

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
            "onnxruntime": onnxruntime.__version__, "onnx_opset": str(ONNX_OPSET)}
