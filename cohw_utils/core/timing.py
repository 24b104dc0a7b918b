"""The one timing harness: repeated calls, a stated method, the median and the spread.

Method: ``warmup`` untimed calls, then ``repeats`` calls each timed with ``time.perf_counter``
(on CUDA, bracketed by ``torch.cuda.synchronize()`` so the time covers the kernels, not just
their launch). The reported value is the **median**; the spread is min..max and the
inter-quartile range. :meth:`Timing.describe` prints all of it beside the number.

In ``core`` so that every layer measures the same way: the hardware probe (peak GEMM, stream
bandwidth), the spine's ``profile_ops`` and every chapter's measurements (Chapters 3, 4, 4.4).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from cohw_utils.core.errors import CohwError

__all__ = ["Timing", "synchronize", "time_callable"]


@dataclass(frozen=True)
class Timing:
    """Wall time of repeated calls, in seconds. ``median`` is the figure to report."""

    median: float
    min: float
    max: float
    q1: float
    q3: float
    repeats: int
    warmup: int
    device: str
    samples: tuple[float, ...] = field(repr=False)

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def method(self) -> str:
        sync = ", CUDA-synchronised" if self.device.startswith("cuda") else ""
        return (f"median of {self.repeats} timed calls after {self.warmup} warm-up "
                f"(time.perf_counter{sync}) on {self.device}")

    def describe(self, unit: str = "ms") -> str:
        """``12.3 ms (min 12.1, max 13.0, IQR 0.2; median of 10 timed calls ...)``."""
        s = {"s": 1.0, "ms": 1e3, "us": 1e6}[unit]
        return (f"{self.median * s:.3f} {unit} (min {self.min * s:.3f}, max {self.max * s:.3f}, "
                f"IQR {self.iqr * s:.3f}; {self.method})")


def synchronize(device: str) -> None:
    """Wait for the device's queued kernels (CUDA); a no-op on the CPU."""
    if device.startswith("cuda"):
        import torch  # only where there is a GPU to wait for

        torch.cuda.synchronize()


def time_callable(fn: Callable[[], Any], repeats: int = 10, warmup: int = 2,
                  device: str | torch.device = "cpu", setup: Callable[[], Any] | None = None,
                  until: float | None = None) -> Timing:
    """Time ``fn()`` ``repeats`` times after ``warmup`` calls (see the module docstring).

    ``setup``, if given, runs untimed before every call (e.g. to rebuild a KV cache that
    ``fn`` extends). ``until``, a ``time.perf_counter()`` value, stops the timed calls early
    once passed (at least one is always taken; ``Timing.repeats`` says how many ran).
    """
    if repeats < 1 or warmup < 0:
        raise CohwError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    dev = str(device)
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    synchronize(dev)
    samples = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        synchronize(dev)
        t0 = time.perf_counter()
        fn()
        synchronize(dev)
        samples.append(time.perf_counter() - t0)
        if until is not None and time.perf_counter() > until:
            break
    repeats = len(samples)
    q = np.percentile(samples, [25, 75]) if len(samples) > 1 else (samples[0], samples[0])
    return Timing(statistics.median(samples), min(samples), max(samples), float(q[0]), float(q[1]),
                  repeats, warmup, dev, tuple(samples))
