"""Numerical parity of a second runtime against eager PyTorch: per-dtype tolerances and the comparison.

For every floating output, ``max_abs = max|ort - torch|`` and ``max_rel = max_abs / max|torch|``
(a max-norm relative error, which does not blow up on near-zero elements). A phase passes when
every output has ``max_abs <= atol + rtol * max|torch|`` with the per-dtype :data:`TOLERANCES`;
integer outputs must match exactly; an output of the wrong shape, or non-finite where the
reference is finite (or the other way round), fails. The reference is eager PyTorch in the same
dtype, run on seeded inputs (:func:`_run_reference`).

Used by Chapter 3 (SW enabling), through :mod:`.export` and :mod:`.offload`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cohw_utils.studies.enabling.flatten import _interface, flatten

__all__ = ["TOLERANCES", "Tolerance", "Parity"]


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


@dataclass(frozen=True)
class Parity:
    """Worst output of a torch-vs-runtime comparison."""

    max_abs: float
    max_rel: float
    tolerance: Tolerance
    passed: bool
    outputs: int
    worst_output: int


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
