"""Structured phase inputs and outputs as flat tensor lists, so that an exporter and a runtime can take them.

``Phase.make_inputs()`` gives structured inputs (a ``RayBundle`` dataclass, a ``DynamicCache``...).
:func:`flatten` turns any nest of tensors, dicts, lists, dataclasses and transformers caches into
a flat list of tensors plus a function that rebuilds the structure; :class:`PhaseModule` wraps
``Phase.run`` so that the exported graph takes and returns flat tensors. Floating-point inputs
and outputs cross the runtime boundary in float32 (:func:`_interface`; cast to the build dtype
inside the graph), so bf16 models can be fed from numpy.

Used by Chapter 3 (SW enabling), through :mod:`.export`, :mod:`.latency` and :mod:`.offload`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import torch
from torch import nn

from cohw_utils import workloads

__all__ = ["flatten", "PhaseModule"]


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
