"""Offload: run on the target (onnxruntime) what it can of a phase, and fall back to PyTorch for the rest.

Where the target cannot run a whole phase (a training step, an op with no lowering), move what
it can. :func:`offload` walks the module tree top-down: each submodule that carries at least
``min_share`` of the phase's FLOPs and is called without needing autograd is exported on its
own (:mod:`.export`'s pipeline, with :data:`~cohw_utils.studies.enabling.decompose.DECOMPOSITIONS`
applied); if it converts and matches (:mod:`.parity`), it runs in onnxruntime inside the
otherwise-eager phase, else its children are tried.

The shares on the target are measured, not estimated: FLOPs and bytes from tracing the hybrid
run (onnxruntime work is invisible to the tracer, so target share = 1 - PyTorch share), time
from timers around each onnxruntime call (sessions created without thread spinning, so that
idle onnxruntime workers do not steal the cores PyTorch runs on). Parity compares the hybrid
run with eager PyTorch; when nothing was offloaded there is no hybrid run and no parity is
claimed (:data:`NOTHING_OFFLOADED`). Shares are fractions 0..1
(percentages in :func:`offload_table`), times in milliseconds in the table.

Used by Chapter 3 (SW enabling), section "dirty fixes: offload".
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
import torch
from torch import nn

from cohw_utils.core.dtypes import dtype_name
from cohw_utils.spine.measure import Timing, time_callable
from cohw_utils.spine.optable import totals
from cohw_utils.spine.trace import trace
from cohw_utils.studies.enabling.decompose import DECOMPOSITIONS
from cohw_utils.studies.enabling.export import _export, _feeds, _to_onnx, build_phase, ort_session
from cohw_utils.studies.enabling.failures import classify_failure
from cohw_utils.studies.enabling.flatten import PhaseModule, _interface, flatten
from cohw_utils.studies.enabling.parity import TOLERANCES, Parity, _compare

__all__ = ["Offload", "offload", "offload_table", "NOTHING_OFFLOADED"]

NOTHING_OFFLOADED = "nothing offloaded: the phase stays in PyTorch (no parity claimed)"


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
    """A phase run with some modules on the target (onnxruntime) and the rest in PyTorch.

    When nothing converts (``on_target`` empty), ``parity`` and ``timing`` are None: the run
    would be the eager run compared with itself, which proves nothing."""

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
    if not on_target:  # nothing moved: there is no second runtime's output to compare, so no parity
        return Offload(built.workload.name, phase, NOTHING_OFFLOADED, [], kept,
                       0.0, 0.0, 0.0, None, None, eager, exports)
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
            "parity": ("pass" if o.parity.passed else "FAIL") if o.parity else "n/a (nothing offloaded)",
            "max_abs_err": o.parity.max_abs if o.parity else math.nan,
            "hybrid_ms": o.timing.median * 1e3 if o.timing else math.nan,
            "eager_ms": o.eager.median * 1e3 if o.eager else math.nan,
        })
    return pd.DataFrame(rows)
