"""What-if features and one turn of the co-design loop, both as ratios to a base design.

:data:`FEATURES` are the changes a team could make to a design (doubled FLOP/s, bandwidth or
capacity, more SRAM, a native int4 weight format, a slow memory tier, a faster host link).
:func:`feature_gains` applies each alone to a base design and reports, per phase, the speedup
(base time / new time), the energy ratio (new / base) and the package area it adds (mm^2).
:func:`iteration` compares a design before and after a change on every phase, with a verdict
per phase (improved, regressed, same).

Used by Chapter 5 (the co-design loop).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from cohw_utils.studies.codesign.accelerator import SLOW_TIERS, Accelerator
from cohw_utils.studies.codesign.phases import PreparedPhase
from cohw_utils.studies.codesign.sweep import evaluate_designs

__all__ = ["FEATURES", "feature_gains", "iteration"]

#: What-if features a team could add to a design: name -> (function, one-line description).
FEATURES: dict[str, tuple[Any, str]] = {
    "2x FLOP/s": (lambda d: d.replace(peak_flops={k: 2 * v for k, v in d.peak_flops.items()}),
                  "every matrix and vector peak doubled"),
    "2x HBM bandwidth": (lambda d: d.replace(hbm_bw=2 * d.hbm_bw) if d.hbm_bytes else d.replace(sram_bw=2 * d.sram_bw),
                         "HBM (main-memory) bandwidth doubled"),
    "2x HBM capacity": (lambda d: d.replace(hbm_bytes=2 * d.hbm_bytes) if d.hbm_bytes
                        else d.replace(sram_bytes=2 * d.sram_bytes),
                        "HBM capacity doubled (taller stacks, same bandwidth)"),
    "4x on-chip SRAM": (lambda d: d.replace(sram_bytes=4 * d.sram_bytes), "SRAM capacity x4, same bandwidth"),
    "int4 weights": (lambda d: d.replace(peak_flops={**d.peak_flops, "int4": 4 * d.peak16}),
                     "native int4 weight format (W4A16 for LLMs)"),
    "LPDDR5X tier": (lambda d: d.replace(slow_bytes=SLOW_TIERS["LPDDR5X"][0], slow_bw=SLOW_TIERS["LPDDR5X"][1],
                                         slow_kind="LPDDR5X"), "480 GB LPDDR5X at 450 GB/s below HBM"),
    "4x host link": (lambda d: d.replace(link_bw=4 * d.link_bw), "host link x4 (PCIe 5 x16 -> NVLink-C2C class)"),
}


def feature_gains(base: Accelerator, phases: Sequence[PreparedPhase], features: Mapping[str, tuple] | None = None,
                  **kw: Any) -> pd.DataFrame:
    """Each feature of ``features`` (default :data:`FEATURES`) applied alone to ``base``, on
    every phase: ``speedup`` (base time / new time), ``energy_ratio`` (new / base) and the
    package area it adds. One row per (phase, feature)."""
    feats = features or FEATURES
    variants = [base] + [fn(base).replace(name=name) for name, (fn, _) in feats.items()]
    res = evaluate_designs(variants, phases, **kw)
    b = res[res["design"] == base.name].set_index("phase")
    f = res[res["design"] != base.name].copy()
    f["speedup"] = f["phase"].map(b["time_s"]) / f["time_s"]
    f["energy_ratio"] = f["energy_J"] / f["phase"].map(b["energy_J"])
    f["area_added_mm2"] = f["package_mm2"] - float(b["package_mm2"].iloc[0])
    return f.rename(columns={"design": "feature"})[["phase", "workload", "klass", "feature", "speedup", "energy_ratio",
                                                    "area_added_mm2", "binding"]].reset_index(drop=True)


def iteration(before: Accelerator, after: Accelerator, phases: Sequence[PreparedPhase], tol: float = 0.02,
              **kw: Any) -> pd.DataFrame:
    """One turn of the loop: ``before`` and ``after`` on every phase, with time and energy
    ratios (after / before) and a verdict per phase: ``improved`` / ``regressed`` (time beyond
    ``tol``), or ``same``."""
    res = evaluate_designs([before, after], phases, **kw)
    b = res[res["design"] == before.name].set_index("phase")
    a = res[res["design"] == after.name].set_index("phase")
    out = pd.DataFrame({"klass": b["klass"], "binding_before": b["binding"], "binding_after": a["binding"],
                        "variant_before": b["variant"], "variant_after": a["variant"],
                        "time_ratio": a["time_s"] / b["time_s"], "energy_ratio": a["energy_J"] / b["energy_J"]})
    out["verdict"] = np.where(out["time_ratio"] < 1 - tol, "improved",
                              np.where(out["time_ratio"] > 1 + tol, "regressed", "same"))
    out.attrs["area"] = (float(b["package_mm2"].iloc[0]), float(a["package_mm2"].iloc[0]))
    return out
