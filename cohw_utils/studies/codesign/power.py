"""Power in the co-design loop: static power, and a power cap that slows a design down.

The energy model (:mod:`cohw_utils.views.energy_model`) prices every FLOP and byte, so a
phase's energy divided by its roofline time is the **dynamic power** a design would draw at full
speed. Real chips have two more facts:

* **Static power** (leakage, clocks, the idle floor) flows whenever the chip is on:
  ``static_W = static_w_per_mm2 x die area`` (silicon, all dies). The default, 0.1 W/mm^2, is
  an assumption for a 4/5 nm-class die: about 81 W for GH100's 814 mm^2, 12% of the H100-SXM's
  700 W board power. Its energy, ``static_W x time``, adds to the phase's energy.
* **A power cap** (the board's TDP): a phase may draw at most ``cap - static`` dynamic watts.
  When it would draw more, the chip lowers its clocks until it fits, so the phase takes
  ``dynamic energy / (cap - static)`` seconds instead (first order: energy per operation is held
  fixed, so a real part, which also lowers its voltage, does somewhat better than this). A
  design's cap is its own ``tdp_w`` (the catalog chip's board power) or, for a parametric design
  without one, :attr:`PowerModel.cap_w` (Chapter 5 uses the reference chip's, so that every design
  spends the same area *and* the same power).

:func:`apply_power` turns :func:`cohw_utils.studies.codesign.sweep.evaluate_designs` rows into
power-aware ones; ``evaluate_designs(..., power=PowerModel(...))`` calls it. Units: W, J, s, mm^2.

Used by Chapter 5 (the co-design loop).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cohw_utils.core.errors import CohwError
from cohw_utils.studies.codesign.accelerator import Accelerator

__all__ = ["PowerModel", "apply_power"]


@dataclass(frozen=True)
class PowerModel:
    """Static power per mm^2 of die (W/mm^2) and the cap of designs without a ``tdp_w`` (W;
    None: no cap for them)."""

    static_w_per_mm2: float = 0.1
    cap_w: float | None = 700.0
    source: str = ("assumption: 0.1 W/mm^2 static at a 4/5 nm-class node (GH100: 81 W of its 700 W); "
                   "cap: the design's TDP, else cap_w")

    def __post_init__(self) -> None:
        if not self.static_w_per_mm2 >= 0:
            raise CohwError(f"static_w_per_mm2 must be >= 0 W/mm^2, got {self.static_w_per_mm2!r}")
        if self.cap_w is not None and not self.cap_w > 0:
            raise CohwError(f"cap_w must be a positive power in W or None, got {self.cap_w!r}")

    def cap_for(self, design: Accelerator) -> float:
        """The design's power cap in W (inf where neither it nor the model has one)."""
        cap = design.tdp_w if design.tdp_w is not None else self.cap_w
        return float("inf") if cap is None else float(cap)


def apply_power(rows: pd.DataFrame, designs: Sequence[Accelerator], model: PowerModel) -> pd.DataFrame:
    """``rows`` (one per design x phase, with ``design``, ``time_s``, ``time_per_unit_s``,
    ``energy_J`` and ``die_mm2``) with static power and the cap applied.

    Adds ``static_W``, ``dynamic_W`` (the dynamic power the phase would draw at full speed),
    ``power_W`` (average power as run: dynamic + static, <= the cap), ``cap_W``, ``power_capped``
    and ``time_uncapped_s``; rescales ``time_s``, ``time_per_unit_s``, ``throughput``,
    ``util_compute`` and ``util_memory`` to the capped time; ``energy_J`` and ``J_per_unit``
    gain the static energy. A design whose static power alone exceeds its cap is an error.
    """
    by_name = {d.name: d for d in designs}
    out = rows.copy()
    cap = out["design"].map(lambda n: model.cap_for(by_name[n])).to_numpy(dtype=float)
    static = model.static_w_per_mm2 * out["die_mm2"].to_numpy(dtype=float)
    over = static >= cap
    if over.any():
        bad = out.loc[over, "design"].iloc[0]
        raise CohwError(f"design {bad!r}: static power {static[over][0]:.0f} W alone reaches its {cap[over][0]:.0f} W "
                        "cap; raise tdp_w (or the model's cap_w) or lower static_w_per_mm2")
    t0 = out["time_s"].to_numpy(dtype=float)
    e_dyn = out["energy_J"].to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        dyn_w = np.where(t0 > 0, e_dyn / t0, 0.0)
        t = np.maximum(t0, e_dyn / (cap - static))
    stretch = np.where(t0 > 0, t / t0, 1.0)
    units = out["time_s"] / out["time_per_unit_s"]
    out["time_uncapped_s"] = t0
    out["time_s"] = t
    out["time_per_unit_s"] = t / units
    out["throughput"] = units / t
    for col in ("util_compute", "util_memory"):
        if col in out:
            out[col] = out[col] / stretch
    out["energy_J"] = e_dyn + static * t
    out["J_per_unit"] = out["energy_J"] / units
    out["static_W"] = static
    out["dynamic_W"] = dyn_w
    with np.errstate(divide="ignore", invalid="ignore"):
        out["power_W"] = np.where(t > 0, out["energy_J"] / t, static)
    out["cap_W"] = cap
    out["power_capped"] = t > t0 * (1 + 1e-12)
    return out
