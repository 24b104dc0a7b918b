"""The op-level tracer: run a callable, get an op table.

:func:`trace` runs any PyTorch callable under a ``TorchDispatchMode`` and returns an *op
table*: a pandas DataFrame with one row per aten op executed (forward and, if the callable
runs it, backward). It works on ``meta`` tensors (full-scale models without weights), CPU and
CUDA alike, because it reads only shapes, strides and dtypes.

Columns
-------
``op``             aten op, e.g. ``aten.mm.default``
``module``         path of the innermost ``nn.Module`` that issued it, as in
                   ``model.named_modules()`` (e.g. ``model.layers.3.self_attn.o_proj``);
                   ``<root>`` for ops of the root module itself, ``<global>`` outside any module
``module_class``   class name of that module
``phase``          the label the caller gave (``prefill``, ``decode``, ``unet_step``...)
``pass``           ``forward`` or ``backward``
``op_class``       contraction / normalization / element-wise / data movement / view / other
``input_shapes``   tuple of shapes of the tensor inputs; ``output_shapes`` likewise
``dtype``          dtype of the first tensor input (the compute dtype), e.g. ``bfloat16``
``flops``, ``macs``, ``bytes_read``, ``bytes_written``  see :mod:`cohw_utils.spine.costs`
``flops_effective`` ``flops`` everywhere except fused attention rows, where it is the work a
                   causal / sliding-window flash kernel does (see :mod:`cohw_utils.spine.costs`)
``intensity``      flops / (bytes_read + bytes_written), NaN where no bytes move
``costed``         False where no cost rule applied (costs are then NaN, never zero)

The counting semantics live in :mod:`cohw_utils.spine.costs`. Tracer-level choices:

* **Module attribution** uses torch's ``ModuleTracker`` (forward hooks, and multi-grad hooks
  for backward), so backward ops are attributed to the module whose forward created them;
  shared modules are named by call path (see ``PathTracker``).
* **Attention on ``meta``**: with no real kernel to pick, torch runs the *math* path of
  ``scaled_dot_product_attention`` on ``meta`` (explicit QK^T, mask, softmax, PV, with the
  T x T score matrix in memory). A GPU or CPU run uses a fused kernel instead. So that a
  full-scale analysis on ``meta`` shows what a fused (flash) kernel does, the tracer records
  each such call as one ``aten.scaled_dot_product_attention`` row reading Q, K, V (and the
  mask) once and writing the output once, with torch's attention FLOP formula. Pass
  ``fused_attention=False`` to see the math path. When autograd needs the attention graph
  (inputs require grad), the math path always runs.
* **Causality of attention** (for ``flops_effective``): from the call's ``is_causal=True``, or,
  when the call carries a mask tensor, from the innermost module's ``is_causal`` and sliding
  window (:func:`module_causality`): the tracer maps the module path back to the module.
* **Sectors**: ``sector_bytes`` (default 32, NVIDIA's DRAM transaction; pass
  ``hw.sector_bytes`` for a chip) is the granularity gathers and scattered writes round up to.

Used by every chapter: the counting semantics it applies are stated in :mod:`cohw_utils.spine.costs`.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace
from typing import Any, Callable

import pandas as pd
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import sdpa_flop_count
from torch.utils._pytree import tree_leaves
from torch.utils.module_tracker import ModuleTracker

try:  # DTensor: the tracer defers to it, to record per-rank (local) work
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # a torch built without distributed
    _DTensor = None

from cohw_utils.spine import costs
from cohw_utils.core.errors import ConfigError, UncostedOpError

COLUMNS = [
    "op", "module", "module_class", "phase", "pass", "op_class", "input_shapes",
    "output_shapes", "dtype", "flops", "flops_effective", "macs", "bytes_read", "bytes_written",
    "intensity", "costed",
]
_SDPA_ROW_OP = "aten.scaled_dot_product_attention"
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")

# Metadata queries that are not computation (FlopCounterMode skips the same set).
_SKIP = {
    getattr(torch.ops.aten, n).default
    for n in ("is_contiguous", "size", "sym_size", "stride", "sym_stride", "storage_offset",
              "sym_storage_offset", "numel", "sym_numel", "dim", "is_strides_like_format",
              "is_non_overlapping_and_dense", "sym_is_contiguous")
    if hasattr(torch.ops.aten, n)
}


class PathTracker(ModuleTracker):
    """torch's ModuleTracker, naming modules by their path under a root and by call path.

    * **Names.** torch's tracker names a module by the first module it sees plus attribute
      names; a callable that calls a submodule directly (``model["unet"](...)``) would lose the
      ``unet.`` prefix. Here a module is named by ``root.named_modules()``.
    * **Shared modules.** A module reachable by several paths (nerfstudio's density field holds
      its hash encoding as ``encoding`` and as ``mlp_base.0``; MLPs share one activation
      instance) is named, on each call, by the path that extends its caller's path; the
      innermost module in forward is the one entered *last* (not the one with the deepest
      name).
    * **Backward.** ModuleTracker leaves a module "entered" in backward until a hook on its
      *inputs* fires; when no input needs grad (the first layer fed by an encoding) it never
      fires and later backward ops would go to that stale module. Here, in backward, the
      innermost module is the one whose backward started last (its output-grad hook fired
      after the most recent op), the deepest among those that started together; a module whose
      backward ended before it started (an identity such as eval-mode Dropout) is not entered.
    * ModuleTracker registers backward hooks on every tensor that requires grad; a tensor that
      requires grad but has no autograd node (made under no_grad from a leaf, as nerfstudio's
      samplers do) makes that registration fail, so only tensors that can carry a backward are
      handed to it.
    """

    def __init__(self, root: torch.nn.Module | None):
        super().__init__()
        self.paths: dict[torch.nn.Module, str] = {}
        self.objects: dict[str, torch.nn.Module] = {}  # path -> module, for its attributes
        self.classes: dict[str, str] = {}
        self._all: dict[torch.nn.Module, list[str]] = {}
        if root is not None:
            for name, mod in root.named_modules(remove_duplicate=False):
                path = name or "<root>"
                self.paths.setdefault(mod, path)
                self._all.setdefault(mod, []).append(path)
                self.objects.setdefault(path, mod)
                self.classes.setdefault(path, type(mod).__name__)
        self._override: dict[torch.nn.Module, str] = {}
        self._stack: dict[torch.nn.Module, list[str]] = {}
        self._seq = 0
        self._entered: dict[str, int] = {}
        self._ops = 0
        self._bw_started: dict[str, int] = {}
        self._bw_ended: dict[str, int] = {}

    def _name_of(self, mod) -> str:
        name = self.paths.get(mod)
        if name is None:
            name = super()._get_mod_name(mod)
            self.classes.setdefault(name, type(mod).__name__)
            self.objects.setdefault(name, mod)
        return name

    def _get_mod_name(self, mod):  # ModuleTracker asks this for the name of the running module
        return self._override.get(mod) or self._name_of(mod)

    def _current(self) -> str:
        live = [n for n in self.parents if n != "Global"]
        return max(live, key=lambda n: self._entered.get(n, -1)) if live else ""

    def _choose(self, mod) -> str:
        paths = self._all.get(mod, [])
        if len(paths) < 2:
            return self._name_of(mod)
        caller = self._current().split(".")

        def shared(p: str) -> int:
            n = 0
            for a, b in zip(p.split("."), caller):
                if a != b:
                    break
                n += 1
            return n

        return max(paths, key=shared)  # ties: the first (canonical) path

    @staticmethod
    def _backward_capable(tree: Any) -> list[torch.Tensor]:
        if not torch.is_grad_enabled():
            return []
        return [t for t in costs.tensors(tree)
                if t.requires_grad and (t.grad_fn is not None or t.is_leaf)]

    def _fw_pre_hook(self, mod, input) -> None:
        name = self._choose(mod)
        self._stack.setdefault(mod, []).append(name)
        self._override[mod] = name
        try:
            super()._fw_pre_hook(mod, self._backward_capable(input))
        finally:
            self._override.pop(mod, None)

    def _fw_post_hook(self, mod, input, output) -> None:
        stack = self._stack.get(mod)
        self._override[mod] = stack.pop() if stack else self._name_of(mod)
        try:
            super()._fw_post_hook(mod, input, self._backward_capable(output))
        finally:
            self._override.pop(mod, None)

    def _get_append_fn(self, name, is_bw):
        inner = super()._get_append_fn(name, is_bw)

        def fn(*args):
            if is_bw:
                if self._bw_ended.get(name) == self._ops:
                    return  # its backward already ended with no op in it
                self._bw_started[name] = self._ops
            else:
                self._seq += 1
                self._entered[name] = self._seq
            inner(*args)

        return fn

    def _get_pop_fn(self, name, is_bw):
        inner = super()._get_pop_fn(name, is_bw)

        def fn(*args):
            if is_bw:
                self._bw_ended[name] = self._ops
            inner(*args)

        return fn

    def innermost(self) -> str:
        """The module running now (its forward, or its backward); counts one op."""
        if self.is_bw:
            self._ops += 1
        return self.running()

    def running(self) -> str:
        """The module running now, without counting an op (see :meth:`innermost`)."""
        live = [n for n in self.parents if n != "Global"]
        if not live:
            return "<global>"
        if not self.is_bw:
            return max(live, key=lambda n: self._entered.get(n, -1))
        return max(live, key=lambda n: (self._bw_started.get(n, -1), 0 if n == "<root>" else n.count(".") + 1))


def attention_call(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> tuple:
    """``(query, key, is_causal, mask)`` of one fused attention call, read by argument name
    from the op's schema (``mask`` is ``attn_mask`` or ``attn_bias``, None when absent)."""
    bound = dict(zip((a.name for a in func._schema.arguments), args))
    bound.update(kwargs)
    mask = bound.get("attn_mask", bound.get("attn_bias"))
    return (bound["query"], bound["key"], bool(bound.get("is_causal", False)),
            mask if isinstance(mask, torch.Tensor) else None)


def module_causality(module: Any) -> tuple[bool, int | None]:
    """``(causal, window)`` an attention module declares: its ``is_causal`` attribute (absent:
    not causal) and, when causal, its ``sliding_window`` attribute, else its
    ``config.sliding_window`` (Mistral and Phi-3 pass the window to attention as an argument);
    a window that is not a positive int means none."""
    if module is None or not bool(getattr(module, "is_causal", False)):
        return False, None
    if hasattr(module, "sliding_window"):
        window = module.sliding_window
    else:
        window = getattr(getattr(module, "config", None), "sliding_window", None)
    ok = isinstance(window, int) and not isinstance(window, bool) and window > 0
    return True, window if ok else None


def _shape_tuple(tree: Any) -> tuple:
    return tuple(tuple(t.shape) for t in costs.tensors(tree))


def _dtype_name(args: tuple, kwargs: dict, out: Any) -> str:
    ts = costs.tensors((args, kwargs)) or costs.tensors(out)
    return str(ts[0].dtype).removeprefix("torch.") if ts else ""


def _under_fake_mode() -> bool:
    """Whether a fake-tensor mode is active (DTensor's metadata propagation runs under one)."""
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


def _group_size(args: tuple) -> int:
    """Ranks in the process group a collective names: by group name (functional collectives)
    or by the ProcessGroup object (c10d ops); 1 if it names none."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    for a in tree_leaves(args):
        if isinstance(a, str):
            try:
                return _resolve_process_group(a).size()
            except Exception:  # not a group name (a reduce op, say): keep looking
                continue
        if isinstance(a, dist.ProcessGroup):
            return a.size()
        if isinstance(a, torch.ScriptObject) and "c10d.ProcessGroup" in a._type().qualified_name():
            return dist.ProcessGroup.unbox(a).size()   # how c10d ops pass their group under dispatch
    return 1


def _collective_call(func: torch._ops.OpOverload, args: tuple, cost: costs.OpCost) -> dict:
    """A collective row's group size and message bytes. The message is the buffer the
    collective's cost formula takes (:mod:`cohw_utils.views.collectives`): the gathered output
    of an all-gather or a receive, the input of every other collective."""
    name = func._overloadpacket.__name__  # e.g. all_gather_into_tensor, _allgather_base_, recv_
    by_output = "gather" in name or name.startswith("recv")
    return {"op": f"{func.namespace}.{name}", "group_size": _group_size(args),
            "nbytes": cost.bytes_written if by_output else cost.bytes_read}


class _Recorder(TorchDispatchMode):
    """Dispatch mode that executes each op and appends one row per op to ``rows``."""

    def __init__(self, tracker: PathTracker, phase: str, strict: bool,
                 sector_bytes: int = costs.DEFAULT_SECTOR_BYTES):
        super().__init__()
        self.tracker, self.phase, self.strict = tracker, phase, strict
        self.sector_bytes = sector_bytes
        self.rows: list[tuple] = []
        self.uncosted: Counter[str] = Counter()
        self.paused = False  # set while the tracer itself creates tensors
        self.rule_errors: dict[str, str] = {}
        self.collectives: dict[int, dict] = {}  # row position -> group size and message bytes

    def record(self, op: str, cost: costs.OpCost | None, args: tuple, kwargs: dict, out: Any) -> None:
        module = self.tracker.innermost()
        module_class = self.tracker.classes.get(module, "")
        npass = "backward" if self.tracker.is_bw else "forward"
        if cost is None:
            self.uncosted[op] += 1
            op_class, flops, macs, br, bw, costed = costs.OTHER, math.nan, math.nan, math.nan, math.nan, False
            effective = math.nan
        else:
            op_class, flops, macs, br, bw, costed = (cost.op_class, cost.flops, cost.macs,
                                                     cost.bytes_read, cost.bytes_written, True)
            effective = cost.flops if cost.flops_effective is None else cost.flops_effective
            # Element-wise/reduction ops inside a norm module (RMSNorm written as pow/mean/
            # rsqrt/mul) are normalization work: class them so, as Ivanov et al. do.
            if op_class == costs.ELEMENTWISE and "norm" in module_class.lower():
                op_class = costs.NORMALIZATION
        moved = br + bw
        intensity = flops / moved if costed and moved else math.nan
        self.rows.append((op, module, module_class, self.phase, npass, op_class,
                          _shape_tuple((args, kwargs)), _shape_tuple(out),
                          _dtype_name(args, kwargs, out), flops, effective, macs, br, bw, intensity,
                          costed))

    def effective(self, flops: int, q: torch.Tensor, k: torch.Tensor, is_causal: bool,
                  mask: torch.Tensor | None) -> int:
        """Attention FLOPs a causal / sliding-window flash kernel does (costs' semantics)."""
        tq, tk = (q.shape[-2], k.shape[-2]) if q.dim() >= 2 and k.dim() >= 2 else (1, 1)
        if is_causal:  # torch's is_causal: causal, aligned at the first key
            keys = costs.attended_keys(tq, tk, True, aligned="start")
            return costs.effective_attention_flops(flops, tq, tk, keys)
        if mask is None:  # no mask, no flag: the call computes full attention
            return flops
        module = self.tracker.objects.get(self.tracker.running())
        causal, window = module_causality(module)
        if not causal:
            return flops
        if mask.dim() >= 2 and mask.shape[-2] == 1 < tq:
            # one decode token, its query heads packed into the query dim (pack_gqa): every row
            # is the query at position tk - 1
            keys = tq * costs.attended_keys(1, tk, True, window)
        else:
            keys = costs.attended_keys(tq, tk, True, window)
        return costs.effective_attention_flops(flops, tq, tk, keys)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _DTensor is not None and any(issubclass(t, _DTensor) for t in types):
            # A DTensor op is global: let DTensor dispatch it, so that this mode records the
            # local op (per-rank shapes) and any redistribution collective it issues.
            return NotImplemented
        if self.paused or func in _SKIP or _under_fake_mode():
            # (DTensor's sharding propagation runs each op on fake tensors of *global* shape
            # to learn the output's metadata: no work happens, so nothing is recorded.)
            return func(*args, **kwargs)
        rule = costs.rule_for(func, args, kwargs, None)
        if rule is None:
            # No rule: a composite op may decompose into ops that have one (as FlopCounterMode does).
            with self:
                r = func.decompose(*args, **kwargs)
            if r is not NotImplemented:
                return r
            if self.strict:
                raise UncostedOpError(
                    f"no cost rule for {func} (issued by module '{self.tracker.innermost()}'); "
                    "add one with cohw_utils.spine.costs.register_cost, or trace with strict=False "
                    "to record it as uncosted")
        out = func(*args, **kwargs)
        cost = None
        if rule is not None:
            try:
                cost = costs.op_cost(func, args, kwargs, out, sector_bytes=self.sector_bytes)
                if func._overloadpacket in costs.ATTENTION_OPS and cost is not None:
                    q, k, causal, mask = attention_call(func, args, kwargs)
                    effective = self.effective(cost.flops, q, k, causal, mask)
                    cost = replace(cost, flops_effective=effective)
            except Exception as err:  # a rule that cannot cost this call: uncosted, with the reason
                reason = f"cost rule failed ({type(err).__name__}: {err})"
                if self.strict:
                    raise UncostedOpError(f"{func}: {reason}; fix its rule in cohw_utils.spine.costs") from err
                self.rule_errors[str(func)] = reason
        if cost is not None and cost.op_class == costs.COMMUNICATION:
            self.collectives[len(self.rows)] = _collective_call(func, args, cost)
        self.record(str(func), cost, args, kwargs, out)
        return out


class _FusedAttentionOnMeta(TorchFunctionMode):
    """Records scaled_dot_product_attention on meta tensors as one fused-kernel row."""

    def __init__(self, recorder: _Recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            # Callers pass Q, K, V by position (transformers) or by name (diffusers' Flux
            # processors: query=, key=, value=): bind them to the signature's names first.
            bound = dict(zip(_SDPA_ARGS, args))
            bound.update(kwargs)
            q, k, v = bound.pop("query"), bound.pop("key"), bound.pop("value")
            needs_graph = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
            if q.device.type == "meta" and not needs_graph:
                return self._fused(q, k, v, (q, k, v), bound)
        return func(*args, **kwargs)

    def _fused(self, q, k, v, args, kwargs):
        self.recorder.paused = True
        try:
            out = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)
        finally:
            self.recorder.paused = False
        # K/V with fewer heads (GQA/MQA, enable_gqa=True) are read once by a fused kernel;
        # the FLOPs are those of attention with K/V broadcast to every query head.
        heads = q.shape[-3] if q.dim() >= 3 else 1
        k_full = (*k.shape[:-3], heads, *k.shape[-2:]) if k.dim() >= 3 else tuple(k.shape)
        v_full = (*v.shape[:-3], heads, *v.shape[-2:]) if v.dim() >= 3 else tuple(v.shape)
        flops = int(sdpa_flop_count(tuple(q.shape), k_full, v_full))
        ins = [q, k, v] + [t for t in costs.tensors((args[3:], kwargs))]
        # F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, ...)
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        is_causal = bool(kwargs.get("is_causal", args[5] if len(args) > 5 else False))
        mask = mask if isinstance(mask, torch.Tensor) else None
        cost = costs.OpCost(costs.CONTRACTION, flops, flops // 2,
                            sum(costs.tensor_bytes(t) for t in ins), costs.tensor_bytes(out),
                            self.recorder.effective(flops, q, k, is_causal, mask))
        self.recorder.record(_SDPA_ROW_OP, cost, (q, k, v), kwargs, out)
        return out


def trace(fn: Callable[..., Any], *args: Any, model: torch.nn.Module | None = None,
          phase: str = "forward", strict: bool = False, fused_attention: bool = True,
          sector_bytes: int = costs.DEFAULT_SECTOR_BYTES, **kwargs: Any) -> pd.DataFrame:
    """Run ``fn(*args, **kwargs)`` and return its op table (see the module docstring).

    ``model`` is the root module whose ``named_modules()`` paths name the ``module`` column
    (without it, modules are named by class as torch's ModuleTracker does). ``strict=True``
    raises :class:`~cohw_utils.core.errors.UncostedOpError` at the first op with no cost rule;
    otherwise such ops are recorded with NaN costs and listed in ``table.attrs['uncosted']``
    (with the reason in ``table.attrs['rule_errors']`` when a rule exists but failed).
    ``sector_bytes`` (default 32; ``hw.sector_bytes`` for a chip) is the DRAM access granularity
    gathers and scatters are rounded up to; it is kept in ``table.attrs['sector_bytes']``.
    """
    if isinstance(sector_bytes, bool) or not isinstance(sector_bytes, int) or sector_bytes <= 0:
        raise ConfigError(f"trace(sector_bytes={sector_bytes!r}): must be a positive whole number of "
                          "bytes, e.g. 32 (NVIDIA GPUs) or 64 (a CPU cache line); pass hw.sector_bytes")
    tracker = PathTracker(model)
    recorder = _Recorder(tracker, phase, strict, sector_bytes)
    attention = _FusedAttentionOnMeta(recorder) if fused_attention else None
    with tracker:
        if attention is not None:
            with attention, recorder:
                fn(*args, **kwargs)
        else:
            with recorder:
                fn(*args, **kwargs)
    table = pd.DataFrame.from_records(recorder.rows, columns=COLUMNS)
    table.attrs["phase"] = phase
    table.attrs["uncosted"] = dict(recorder.uncosted)
    table.attrs["rule_errors"] = dict(recorder.rule_errors)
    table.attrs["sector_bytes"] = sector_bytes
    if recorder.collectives:
        table.attrs["collectives"] = dict(recorder.collectives)
    return table


def concat(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """Stack op tables of several phases into one (uncosted counts are summed)."""
    out = pd.concat(tables, ignore_index=True)
    merged: Counter[str] = Counter()
    for t in tables:
        merged.update(t.attrs.get("uncosted", {}))
    out.attrs = {"phase": "+".join(t.attrs.get("phase", "?") for t in tables),
                 "uncosted": dict(merged)}
    sectors = {t.attrs.get("sector_bytes") for t in tables}
    if len(sectors) == 1 and None not in sectors:  # kept only where every table agrees
        out.attrs["sector_bytes"] = sectors.pop()
    return out
