"""One phase through export -> ONNX -> onnxruntime -> parity, every stage guarded.

The methodology's step 3 made concrete with a real second stack: each proxy phase (tiny scale,
seeded random weights, CPU) is captured with ``torch.export``, converted to ONNX with the
dynamo-based exporter (``torch.onnx.export(..., dynamo=True)``, onnxscript's torch_lib) and run
in onnxruntime's CPU execution provider; its outputs are compared with eager PyTorch's.

Pipeline of :func:`convert`, one phase at a time:

1. **Inputs** (:mod:`.flatten`): structured inputs flattened to tensors; :class:`PhaseModule`
   makes the phase a module over flat tensors, floating ones crossing in float32.
2. **torch.export** (non-strict) with the *serving axis* marked ``Dim.AUTO``: prompt length
   for an LLM prefill, cache length for decode, batch for the image models (built with batch
   2 so that export does not specialise a size-1 dimension), rays for the NeRFs. If that
   export fails, the failure is recorded and a static export is tried; if it succeeds but the
   axis came out specialised to a constant, that is recorded too (``dynamic`` column).
   Training phases go straight to the static export (their capture fails either way).
3. **ONNX conversion** of the exported program (opset 18), optionally after aten-level
   decompositions (:data:`cohw_utils.studies.enabling.decompose.DECOMPOSITIONS`, the
   "decompose the op" dirty fix: :func:`fix`). A crash inside the exporter's ONNX optimizer
   (rather than in lowering an op) is recorded and the conversion retried with ``optimize=False``.
4. **onnxruntime session** on ``CPUExecutionProvider`` (threads = torch's thread count).
5. **Parity** against eager PyTorch on the export example's inputs (:mod:`.parity`: max-norm
   error within the dtype's tolerance); :mod:`.evidence` adds inputs of another seed and a
   second size on every dynamic axis.

A failing stage does not raise: :func:`cohw_utils.studies.enabling.failures.classify_failure`
files the exception under a failure class, and the :class:`Conversion` says which stage
stopped, classed from the exception's message alone. Training phases (``Phase.backward``) call
``loss.backward()`` inside the capture; :mod:`.training` then tries the path that could hold
them (a joint forward+backward graph) and reports what broke there.

Used by Chapter 3 (SW enabling): the conversion and parity tables, and every later section
(latency, dirty fixes, the gap report) starts from a :class:`Conversion`.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pandas as pd
import torch
from torch import nn

from cohw_utils import workloads
from cohw_utils.core.dtypes import dtype_name, parse_dtype
from cohw_utils.core.errors import CohwError
from cohw_utils.studies.enabling.decompose import DECOMPOSITIONS
from cohw_utils.studies.enabling.failures import DYNAMIC_SHAPES, OTHER, UNSUPPORTED_OP, Failure, classify_failure
from cohw_utils.studies.enabling.flatten import PhaseModule, _interface, flatten
from cohw_utils.studies.enabling.parity import TOLERANCES, Parity, _compare, _run_reference

__all__ = [
    "ONNX_OPSET", "TINY_SIZES", "NOT_IN_DEFAULT_PLAN", "Conversion", "build_phase", "ort_session", "convert", "convert_all",
    "fix", "fixable", "plan", "validate_phase_names", "parity_table", "failure_table", "versions",
]

ONNX_OPSET = 18


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
        if phase == "decode" and "cache" in wl.builder.options:
            # exported with its past K/V as plain tensors of a symbolic length: transformers'
            # DynamicCache flattens to them (a StaticCache has a fixed length by design)
            kw["cache"] = "dynamic"
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
    when PyTorch runs on the same cores between calls
    (:func:`cohw_utils.studies.enabling.offload.offload`), where spinning threads
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
        conv.failure = classify_failure(exc, stage)
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
            f = classify_failure(e, "torch.export (dynamic)")
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
        conv.failure = classify_failure(exc, stage)
        conv.failures.append(conv.failure)
        conv.status = "failed"
        return conv

    t0 = time.perf_counter()
    try:
        proto = _to_onnx(conv.exported, decompositions)
    except Exception as e:  # noqa: BLE001
        f = classify_failure(e, "onnx conversion")
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


# Registry workloads the enabling study leaves out of its default plan, with the reason (name them in
# ``plan(names=...)`` to try them anyway; the build error then names what is missing).
NOT_IN_DEFAULT_PLAN: dict[str, str] = {
    "deepseek-v2-lite": "added to the proxy set after this chapter's parity study; its enabling is future work",
    "llava-1.5-7b": "no tiny CPU build yet for vision-language models",
    "flux.1-dev": "added to the proxy set after this chapter's parity study; its enabling is future work",
    "3dgs": "added to the proxy set after this chapter's parity study; its enabling is future work",
}


def plan(names: Iterable[str] | None = None, dtypes: Iterable[str] = ("fp32",)) -> list[tuple[str, str, str]]:
    """``(workload, phase, dtype)`` for every phase of ``names`` (default: the registry, less
    :data:`NOT_IN_DEFAULT_PLAN`) in every dtype; fp32 only for the float32-only NeRF and
    splatting workloads. Unknown names and dtypes raise CohwError."""
    dts = [dtype_name(d) for d in dtypes]
    bad = [d for d in dts if d not in TOLERANCES]
    if bad:
        raise CohwError(f"no parity tolerance for dtype(s) {bad}; use: {', '.join(TOLERANCES)}")
    out = []
    default = [n for n in workloads.WORKLOADS if n not in NOT_IN_DEFAULT_PLAN]
    for name in (list(names) if names is not None else default):
        wl = workloads.get_workload(name)
        for ph in wl.phases:
            for d in dts:
                if d != "fp32" and (wl.library in ("nerfstudio", "gsplat") or wl.domain == "text-to-3d"):
                    continue
                out.append((wl.name, ph, d))
    return out


def validate_phase_names(names: Iterable[str] | str) -> set[str] | str:
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


def versions() -> dict[str, str]:
    """Versions of the stack this chapter measures."""
    import onnx
    import onnxruntime
    import onnxscript

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
            "onnxruntime": onnxruntime.__version__, "onnx_opset": str(ONNX_OPSET)}
