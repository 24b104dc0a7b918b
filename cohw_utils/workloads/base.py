"""The registry's types: :class:`Phase` (one traceable piece of a workload), :class:`Built` (a
constructed workload: model, config, phases) and :class:`Workload` (a registry entry), plus the
builder wrapper that validates ``scale``, ``device``, ``dtype``, ``batch``, ``seq_len`` and the
workload's options before calling a family's build function.

Every family module returns a :class:`Built` made of :class:`Phase` objects, and
:mod:`cohw_utils.workloads.registry` lists :class:`Workload` entries; the tracer
(:mod:`cohw_utils.spine.trace`) runs a :class:`Phase`. Chapters 1-5 all build workloads, so all
use these types (re-exported as ``cohw_utils.workloads.Phase`` / ``Built`` / ``Workload``).
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from cohw_utils.core.errors import CohwError
from cohw_utils.workloads.helpers import _as_device, _as_dtype

SCALES = ("full", "tiny")


@dataclass(frozen=True)
class Phase:
    """One traceable piece of a workload: ``run(*args, **kwargs)`` on ``make_inputs()``."""

    name: str
    make_inputs: Callable[[], tuple[tuple, dict]]
    run: Callable[..., Any]
    units: int
    unit_name: str
    backward: bool = False
    description: str = ""


@dataclass(repr=False)
class Built:
    """A constructed workload: its root module, config(s) and phases."""

    workload: "Workload"
    scale: str
    device: torch.device
    dtype: torch.dtype
    model: nn.Module
    config: Any
    phases: dict[str, Phase]

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return (f"Built(workload={self.workload.name!r}, scale={self.scale!r}, device={self.device}, "
                f"dtype={self.dtype}, params={n:,}, phases=[{', '.join(self.phases)}])")

    def phase(self, name: str) -> Phase:
        try:
            return self.phases[name]
        except KeyError:
            raise CohwError(
                f"workload '{self.workload.name}' has no phase '{name}'; "
                f"its phases: {', '.join(self.phases)}"
            ) from None


@dataclass(frozen=True)
class Workload:
    """A registry entry: what the workload is, where it comes from, and how to build it."""

    name: str
    domain: str
    description: str
    source: str
    library: str
    phases: tuple[str, ...]
    default_dtype: torch.dtype
    builder: Callable[..., Built]
    calls_per_request: Mapping[str, int] | None = None

    def calls(self, phase: str) -> int:
        """How many times ``phase`` runs to serve one request (one answer, one image, one frame).

        From ``calls_per_request`` (e.g. Stable Diffusion: 2 text encodes for classifier-free
        guidance, 50 denoising steps, 1 VAE decode); 1 for a phase it does not name. Chapter 1
        weights a workload's phases by these counts (time per request), not one each.
        """
        if phase not in self.phases:
            raise CohwError(f"workload '{self.name}' has no phase '{phase}'; its phases: {', '.join(self.phases)}")
        return int((self.calls_per_request or {}).get(phase, 1))


class _Builder:
    """The callable stored as ``Workload.builder``.

    ``builder(scale="full", device="meta", dtype=None, batch=1, seq_len=None, **kw)`` validates and
    normalises the common arguments, then calls the workload's build function. Options in ``kw``
    are the keyword-only parameters of that function (see each ``_build_*`` docstring).
    """

    def __init__(self, fn: Callable[..., Built], **bound: Any):
        self.fn = fn
        self.bound = bound
        self.workload: Workload | None = None  # set by _workload() once the Workload exists
        functools.update_wrapper(self, fn)  # the build function's docstring documents the workload
        del self.__wrapped__  # ...but inspect.signature(builder) should show __call__'s arguments

    def __repr__(self) -> str:
        shown = "".join(f" {k}={v!r}" if not isinstance(v, Path) else f" {k}={v.parent.name}/{v.name}"
                        for k, v in self.bound.items() if not isinstance(v, dict))
        return f"<builder {self.fn.__name__}{shown}>"

    @property
    def options(self) -> tuple[str, ...]:
        params = inspect.signature(self.fn).parameters.values()
        return tuple(
            p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in self.bound
        )

    def __call__(self, scale="full", device="meta", dtype=None, batch=1, seq_len=None, **kw):
        wl = self.workload
        assert wl is not None, "builder not attached to a Workload"
        if scale not in SCALES:
            raise CohwError(f"unknown scale '{scale}' for workload '{wl.name}'; use one of: {', '.join(SCALES)}")
        dev = _as_device(device)
        dt = _resolve_dtype(wl, dev, dtype)
        if not isinstance(batch, int) or batch < 1:
            raise CohwError(f"batch must be a positive integer, got {batch!r}")
        if seq_len is not None and (not isinstance(seq_len, int) or seq_len < 1):
            raise CohwError(f"seq_len must be a positive integer, got {seq_len!r}")
        unknown = sorted(set(kw) - set(self.options))
        if unknown:
            opts = ", ".join(self.options) or "none"
            raise CohwError(
                f"workload '{wl.name}' has no option {', '.join(repr(u) for u in unknown)}; its options: {opts}"
            )
        return self.fn(wl, scale, dev, dt, batch, seq_len, **self.bound, **kw)


def _workload(name, domain, description, source, library, phases, default_dtype, fn, *,
              calls_per_request: Mapping[str, int] | None = None, **bound) -> Workload:
    builder = _Builder(fn, **bound)
    if calls_per_request:
        unknown = sorted(set(calls_per_request) - set(phases))
        if unknown or any(int(v) < 1 for v in calls_per_request.values()):
            raise CohwError(f"workload '{name}': calls_per_request {dict(calls_per_request)} must name its phases "
                            f"({', '.join(phases)}) with counts >= 1")
    wl = Workload(name, domain, description, source, library, tuple(phases), default_dtype, builder,
                  dict(calls_per_request) if calls_per_request else None)
    builder.workload = wl
    return wl


def _resolve_dtype(wl: Workload, device: torch.device, dtype) -> torch.dtype:
    """``None`` -> the workload's published dtype, except on CPU, where it is float32 (CPU
    half-precision kernels are slow or missing)."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else wl.default_dtype
    return _as_dtype(dtype)
