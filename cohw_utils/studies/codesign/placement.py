"""Where a phase's bytes live on a design: weights and KV cache placed in the memory tiers
(sram, hbm, slow, host; :data:`cohw_utils.studies.codesign.accelerator.TIERS`).

* Weights are **resident on chip** when they all fit in SRAM (the rule of
  :class:`cohw_utils.views.energy_model.ReuseModel`); they are then read at SRAM bandwidth.
* Otherwise weights and KV cache fill main memory, then the slow tier, then the host, in the
  order of ``spill`` (:data:`SPILLS`): ``"weights"`` (the KV cache is placed first and weights
  stream from the slower tier, FlexGen-style weight offload) or ``"kv"`` (weights first; the KV
  cache pages out, MemGPT-style context offload). A tensor split across tiers has each of its
  bytes read from the tiers in proportion to the share placed there.
* Activations are assumed to fit and live in main memory (HBM; SRAM for an SRAM-only design),
  as the unfused op table counts them.

Sizes are bytes, bandwidths bytes/s, times seconds. :func:`spill_time` is the hand formula for
streaming weights from two tiers at once.

Used by Chapter 5 (the co-design loop).
"""
from __future__ import annotations

import math

import numpy as np

from cohw_utils.core.errors import CohwError

__all__ = ["SPILLS", "validate_spill", "placement", "spill_time"]

#: Spill policies: what leaves main memory first when a phase's footprint does not fit.
SPILLS = ("weights", "kv")


def validate_spill(spill: str) -> str:
    """Validate a spill policy (see the module docstring); returns it."""
    if spill not in SPILLS:
        raise CohwError(f"spill must be 'weights' (weights stream from the slower tier, KV cache stays) or "
                        f"'kv' (the KV cache pages out first), got {spill!r}")
    return spill



def placement(weights: float, kv: float, sram: float, hbm: float, slow: float,
               spill: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """Where a footprint of ``weights`` and ``kv`` bytes lives on a design with ``sram``,
    ``hbm`` and ``slow`` bytes (the host is unlimited): the fractions of the weights and of the
    KV cache in each tier (sram, hbm, slow, host), and whether the weights are resident on chip.
    See the module docstring for the rule."""
    validate_spill(spill)
    fw, fkv = np.zeros(4), np.zeros(4)
    resident = 0 < weights <= sram
    if hbm > 0:
        caps = [0.0, hbm, slow, math.inf]
        if resident:
            fw[0] = 1.0
            objs = [("kv", kv)]
        else:
            objs = [("kv", kv), ("w", weights)] if spill == "weights" else [("w", weights), ("kv", kv)]
    else:  # SRAM-only: the SRAM is main memory for everything
        caps = [sram, 0.0, slow, math.inf]
        objs = [("w", weights), ("kv", kv)] if spill == "kv" or resident else [("kv", kv), ("w", weights)]
    for what, size in objs:
        f = fw if what == "w" else fkv
        left = size
        for t in range(4):
            if left <= 0:
                break
            put = min(left, caps[t])
            if put > 0:
                f[t] += put / size
                caps[t] -= put
                left -= put
    if weights == 0:
        fw[:] = 0.0
        fw[0 if resident else (1 if hbm > 0 else 0)] = 1.0
    if kv == 0:
        fkv[:] = 0.0
        fkv[1 if hbm > 0 else 0] = 1.0
    return fw, fkv, bool(weights > 0 and fw[0] == 1.0)



def spill_time(weight_bytes: float, hbm_free: float, hbm_bw: float, slow_bw: float) -> float:
    """Seconds to stream ``weight_bytes`` once when only ``hbm_free`` bytes of them fit in HBM
    and the rest stream from a slower tier concurrently: max(in HBM / hbm_bw, spilled / slow_bw)."""
    in_hbm = min(weight_bytes, max(hbm_free, 0.0))
    return max(in_hbm / hbm_bw, (weight_bytes - in_hbm) / slow_bw)
