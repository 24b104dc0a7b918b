"""The co-design loop (Chapter 5): a parametric accelerator, evaluated on the proxy set with the
earlier chapters' models, swept, and reduced to Pareto fronts.

This module is a *view*, not a new model. Every number comes from the op tables
(:mod:`cohw_utils.spine.trace`, traced once per phase and reused for every design point), the roofline
of :mod:`cohw_utils.views.roofline` and the energy model of :mod:`cohw_utils.views.energy_model`. What it adds is
(1) a design space, (2) memory tiers below HBM, and (3) sweeps, scores and Pareto fronts.

The design (:class:`Accelerator`)
---------------------------------
Units are SI per chip: FLOP/s, bytes, bytes/s.

* ``peak_flops``: dense peak per dtype key (``fp32`` is the vector-unit rate every
  non-contraction op runs at, as in :mod:`cohw_utils.views.roofline`; ``fp16``/``bf16``/``fp8``/
  ``int8``/``int4`` the matrix units). :func:`make_accelerator` derives them from one 16-bit
  peak and a set of formats: fp32 = 1/16, tf32 = 1/2, fp8 and int8 = 2x, int4 = 4x the 16-bit
  peak (the ratios of NVIDIA's dense tensor-core figures; an assumption for a new design).
* Memory tiers, fastest first: **SRAM** (on-chip, ``sram_bytes``/``sram_bw``), **HBM**
  (``hbm_bytes``/``hbm_bw``; 0 bytes makes an SRAM-only, Cerebras-like design whose main memory
  is the SRAM), a **slow tier** (LPDDR/CXL: ``slow_bytes``/``slow_bw``) and the **host** (host
  DRAM or SSD behind a link of ``link_bw``, unlimited capacity).
* ``matrix_unit``: ``None`` (the roofline's ideal matrix peak) or ``(rows, cols)`` of a
  weight-stationary systolic array; then every forward contraction runs at the array's
  utilization from :mod:`cohw_utils.views.systolic` (fill, drain and padding included).
* ``weight_bits``: the narrowest weight format the datapath reads natively (16, 8 or 4),
  from the formats it has.

Time (the roofline, with tiers)
-------------------------------
Each op runs alone, as in :func:`cohw_utils.views.roofline.op_times`: compute time = FLOPs / peak
for the op's class and dtype (the roofline's own rule, :func:`peak_key`), and each memory tier
is one more roof: ``time = max(FLOPs / peak, bytes_sram / sram_bw, bytes_hbm / hbm_bw,
bytes_slow / slow_bw, bytes_host / link_bw)``. The tiers transfer concurrently with each other
and with compute (the roofline's overlap assumption, extended); the *binding resource* of an op
is the term that attains the max, and of a phase the resource whose bound ops take the most
time. With every byte in HBM, this is ``op_times`` exactly (tested). An optional
:class:`cohw_utils.views.roofline.EfficiencyModel` (the Chapter 4 predictor) divides each op's
compute time by its group's compute efficiency, its byte times by the bandwidth efficiency,
and adds its overhead.

Where bytes live (placement)
----------------------------
The op table splits each op's bytes into weight reads (:func:`cohw_utils.views.energy_model.op_roles`),
KV-cache bytes (for LLMs: the K and V inputs of attention and the KV-cache append) and other
activations. A phase's footprint is its weights plus its KV cache (KV bytes per token x tokens
x batch); activations are assumed to fit and live in main memory (HBM; SRAM for an SRAM-only
design), as the unfused op table counts them.

* Weights are **resident on chip** when they all fit in SRAM (the rule of
  :class:`cohw_utils.views.energy_model.ReuseModel`); they are then read at SRAM bandwidth.
* Otherwise weights and KV cache fill main memory, then the slow tier, then the host, in the
  order of ``spill``: ``"weights"`` (the KV cache is placed first and weights stream from the
  slower tier, FlexGen-style weight offload) or ``"kv"`` (weights first; the KV cache pages
  out, MemGPT-style context offload). A tensor split across tiers has each of its bytes read
  from the tiers in proportion to the share placed there.

Energy
------
:func:`cohw_utils.views.energy_model.workload_energy` of the same phase (with weights off-chip), with each
off-chip byte re-priced at the energy of the tier that serves it: SRAM at the table's on-chip
buffer figure, HBM at its off-chip figure, the slow tier and the host at the data file's
``dram`` row (the only commodity-DRAM figure it has; link energy is not modelled). With every
byte in HBM this equals ``workload_energy`` exactly; with resident weights it equals
``workload_energy`` with ``weights_resident=True`` (tested).

Weight formats
--------------
With ``quantize=True`` a phase's weights are stored in the narrowest format both the design
reads natively and the workload's domain tolerates (:data:`WEIGHT_BITS_FLOOR`, stated
assumptions), as :meth:`cohw_utils.views.energy_model.OpRoles.quantized` transforms them (weight-only: the
MACs stay in the phase's dtype). ``quantize=False`` runs the op table as traced.

Cost proxy (:class:`CostModel`)
-------------------------------
Silicon area in mm^2 at a 4/5 nm-class node, linear in each resource: a fixed part, compute per
dense 16-bit TFLOP/s (plus a fraction for each narrow format), SRAM per MB, PHY and controller
area per TB/s of each off-chip interface, and the interposer footprint of the HBM stacks the
design needs for its capacity or its bandwidth, whichever needs more. Every
coefficient is a labelled assumption (see :data:`COST_SOURCES`); the compute coefficient is
calibrated so that the H100-SXM design point's die is GH100's published 814 mm^2. Package area
= die + HBM footprint is the cost the sweeps use.

Sweeps
------
:func:`sweep` evaluates any number of designs on prepared phases with numpy over a (designs x
distinct op rows) array; identical op rows (the same layer repeated) are evaluated once and
weighted by their count. :func:`pareto_mask` marks non-dominated points.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from cohw_utils.views import energy_model as energy
from cohw_utils.views import roofline
from cohw_utils import workloads
from cohw_utils.spine.costs import CONTRACTION
from cohw_utils.core.dtypes import dtype_name
from cohw_utils.core.errors import CohwError
from cohw_utils.hardware import DTYPES, Hardware, dtype_key, get_hardware, load_hardware

__all__ = [
    "Accelerator", "CostModel", "COST_SOURCES", "make_accelerator", "from_hardware",
    "sram_only", "fit_area", "SPILLS", "check_spill", "TIERS", "RESOURCES", "WEIGHT_BITS_FLOOR",
    "SLOW_TIERS", "HOST_LINKS",
    "peak_key", "PreparedPhase", "prepare", "ProxySet", "trace_proxy_set", "phase_weights",
    "placement", "design_op_times", "evaluate", "sweep", "design_grid", "pareto_mask", "class_scores",
    "choose", "sensitivity", "feature_gains", "FEATURES", "iteration", "growth_table",
    "growth_figure", "pareto_figure", "gains_figure", "iteration_figure",
    "check_spill_time", "check_binding", "check_pareto",
]

#: Spill policies: what leaves main memory first when a phase's footprint does not fit.
SPILLS = ("weights", "kv")


def check_spill(spill: str) -> str:
    """Validate a spill policy (see the module docstring)."""
    if spill not in SPILLS:
        raise CohwError(f"spill must be 'weights' (weights stream from the slower tier, KV cache stays) or "
                        f"'kv' (the KV cache pages out first), got {spill!r}")
    return spill


#: Memory tiers, fastest first, and the resources that can bind an op.
TIERS = ("sram", "hbm", "slow", "host")
RESOURCES = ("compute", "SRAM", "HBM", "slow tier", "link")
_TIER_LABEL = dict(zip(TIERS, RESOURCES[1:]))

#: Narrowest weight format (bits) each domain is assumed to tolerate without a visible quality
#: loss, with post-training quantization. LLMs: 4-bit weights (GPTQ, AWQ); diffusion and vision:
#: 8-bit (4-bit diffusion weights need calibration schemes beyond plain PTQ); NeRF and the
#: text-to-3D training step: unquantized (trained in fp32/fp16 with gradients flowing through).
WEIGHT_BITS_FLOOR: dict[str, int] = {"llm": 4, "diffusion": 8, "vision": 8, "nerf": 32, "text-to-3d": 16}

#: Slower tiers a design can add: (capacity bytes, bandwidth B/s as the accelerator sees it, source).
SLOW_TIERS: dict[str, tuple[float, float, str]] = {
    "LPDDR5X": (480e9, 450e9, "NVIDIA GH200 Grace Hopper: 480 GB LPDDR5X on the Grace CPU, reached over "
                "NVLink-C2C at 900 GB/s bidirectional = 450 GB/s per direction (the binding figure)"),
    "CXL": (1e12, 64e9, "assumption: a 1 TB CXL 2.0 memory expander on a PCIe 5.0 x16 link "
            "(32 GT/s x 16 lanes, about 64 GB/s per direction)"),
}

#: Host link per catalog chip (B/s per direction): PCIe generation x16 as each vendor lists it.
#: PCIe 3.0/4.0/5.0 x16 = 15.75/31.5/63 GB/s per direction (8/16/32 GT/s, 128b/130b encoding).
HOST_LINKS: dict[str, float] = {"V100": 15.75e9, "A100": 31.5e9, "H100": 63e9, "H200": 63e9,
                                "MI300X": 63e9, "B200": 63e9}

#: Assumed SRAM bandwidth of a catalog chip, as a multiple of its HBM bandwidth (not in the data:
#: L2 bandwidth is rarely published; microbenchmarks put it at 2-4x HBM on recent GPUs).
SRAM_BW_X = 3.0

#: The H100-SXM die area used to calibrate the compute coefficient.
GH100_DIE_MM2 = 814.0

COST_SOURCES: dict[str, str] = {
    "die_calibration": "GH100 die 814 mm^2, TSMC 4N (NVIDIA H100 Tensor Core GPU Architecture whitepaper)",
    "base_mm2": "assumption: NVLink/PCIe PHYs, media engines, control and the on-chip network",
    "mm2_per_tflops": "calibrated: the H100-SXM point's die equals 814 mm^2 given the other coefficients",
    "format_area": "assumption: fp8, int8 and int4 datapaths reuse the 16-bit multipliers; each adds a "
                   "few percent of compute area for decode, alignment and accumulators",
    "mm2_per_mb_sram": "assumption: 0.5 mm^2/MB; a 5 nm high-density bit cell (0.021 um^2) is 0.18 mm^2 "
                       "per MB of cells, about 3x that with periphery, redundancy and the network",
    "mm2_per_tbs_hbm": "assumption: 12 mm^2 of PHY and controller per TB/s of HBM (on the die)",
    "hbm_stack": "HBM3E 12-high stack: 36 GB and 1.2 TB/s (1024 pins at 9.6 Gb/s, JEDEC HBM3E), about "
                 "11 x 11 mm = 121 mm^2 of interposer each (assumption); a design needs enough stacks for "
                 "its capacity and for its bandwidth, whichever is more (fractional stacks, to keep it smooth)",
    "mm2_per_tbs_slow": "assumption: 40 mm^2 per TB/s of LPDDR/CXL interface (wider PHYs per GB/s than HBM)",
    "mm2_per_tbs_link": "assumption: 60 mm^2 per TB/s of PCIe/CXL SerDes",
}


# ============================================================================ cost proxy
@dataclass(frozen=True)
class CostModel:
    """Linear area proxy (mm^2, 4/5 nm-class). See :data:`COST_SOURCES` for each coefficient."""

    base_mm2: float = 120.0
    mm2_per_tflops: float | None = None  # None: calibrate on GH100 (see calibrated())
    format_area: Mapping[str, float] = field(default_factory=lambda: {"fp8": 0.08, "int8": 0.04, "int4": 0.04})
    mm2_per_mb_sram: float = 0.5
    mm2_per_tbs_hbm: float = 12.0
    hbm_stack_mm2: float = 121.0
    hbm_stack_gb: float = 36.0
    hbm_stack_tbs: float = 1.2
    mm2_per_tbs_slow: float = 40.0
    mm2_per_tbs_link: float = 60.0

    def calibrated(self) -> "CostModel":
        """A copy whose ``mm2_per_tflops`` makes the H100-SXM design's die 814 mm^2."""
        if self.mm2_per_tflops is not None:
            return self
        h = from_hardware("H100-SXM")
        rest = self._die(h, 0.0)
        fmt = 1.0 + sum(self.format_area.get(f, 0.0) for f in h.formats)
        return dataclasses.replace(self, mm2_per_tflops=(GH100_DIE_MM2 - rest) / (h.peak16 / 1e12 * fmt))

    def _die(self, d: "Accelerator", per_tflops: float) -> float:
        fmt = 1.0 + sum(self.format_area.get(f, 0.0) for f in d.formats)
        return (self.base_mm2 + per_tflops * d.peak16 / 1e12 * fmt
                + self.mm2_per_mb_sram * d.sram_bytes / 2**20 + self.mm2_per_tbs_hbm * d.hbm_bw / 1e12
                + self.mm2_per_tbs_slow * d.slow_bw / 1e12 + self.mm2_per_tbs_link * d.link_bw / 1e12)

    def breakdown(self, d: "Accelerator") -> dict[str, float]:
        """Area by part (mm^2): base, compute, formats, sram, hbm_phy, slow_phy, link_phy,
        die; then hbm_stacks (count), hbm_footprint and package (= die + footprint)."""
        m = self.calibrated()
        c = m.mm2_per_tflops * d.peak16 / 1e12
        parts = {"base": m.base_mm2, "compute": c,
                 "formats": c * sum(m.format_area.get(f, 0.0) for f in d.formats),
                 "sram": m.mm2_per_mb_sram * d.sram_bytes / 2**20,
                 "hbm_phy": m.mm2_per_tbs_hbm * d.hbm_bw / 1e12,
                 "slow_phy": m.mm2_per_tbs_slow * d.slow_bw / 1e12,
                 "link_phy": m.mm2_per_tbs_link * d.link_bw / 1e12}
        parts["die"] = sum(parts.values())
        parts["hbm_stacks"] = max(d.hbm_bytes / 1e9 / m.hbm_stack_gb, d.hbm_bw / 1e12 / m.hbm_stack_tbs)
        parts["hbm_footprint"] = m.hbm_stack_mm2 * parts["hbm_stacks"]
        parts["package"] = parts["die"] + parts["hbm_footprint"]
        return parts


# ============================================================================ the design
@dataclass(frozen=True)
class Accelerator:
    """One design point. Units: FLOP/s, bytes, bytes/s (see the module docstring)."""

    name: str
    peak_flops: Mapping[str, float] = field(hash=False)
    sram_bytes: float
    sram_bw: float
    hbm_bytes: float
    hbm_bw: float
    slow_bytes: float = 0.0
    slow_bw: float = 0.0
    link_bw: float = 63e9
    matrix_unit: tuple[int, int] | None = None
    slow_kind: str = ""
    year: int | None = None
    source: str = "parametric design"

    def __post_init__(self) -> None:
        if "fp32" not in self.peak_flops:
            raise CohwError(f"design {self.name!r}: peak_flops needs an 'fp32' entry (the vector-unit rate "
                            "every non-contraction op runs at)")
        for k, v in self.peak_flops.items():
            dtype_name(k)
            if not (math.isfinite(v) and v > 0):
                raise CohwError(f"design {self.name!r}: peak_flops[{k!r}] = {v!r} must be a positive FLOP/s")
        for f in ("sram_bytes", "sram_bw", "hbm_bytes", "hbm_bw", "slow_bytes", "slow_bw", "link_bw"):
            v = getattr(self, f)
            if not (v >= 0 and math.isfinite(v)):
                raise CohwError(f"design {self.name!r}: {f} = {v!r} must be a finite number >= 0")
        if self.hbm_bytes > 0 and self.hbm_bw <= 0:
            raise CohwError(f"design {self.name!r}: HBM of {self.hbm_bytes:.3g} B needs hbm_bw > 0")
        if self.hbm_bytes == 0 and self.sram_bw <= 0:
            raise CohwError(f"design {self.name!r}: an SRAM-only design (hbm_bytes=0) needs sram_bw > 0")
        if (self.slow_bytes > 0) != (self.slow_bw > 0):
            raise CohwError(f"design {self.name!r}: give the slow tier both slow_bytes and slow_bw, or neither")
        if self.link_bw <= 0:
            raise CohwError(f"design {self.name!r}: link_bw must be > 0 (the host link spills go over)")
        if self.matrix_unit is not None and (len(self.matrix_unit) != 2 or min(self.matrix_unit) < 1):
            raise CohwError(f"design {self.name!r}: matrix_unit must be None or (rows, cols) >= 1")

    @property
    def peak16(self) -> float:
        """Dense 16-bit matrix peak (bf16, else fp16, else fp32) in FLOP/s: the cost driver."""
        for k in ("bf16", "fp16", "fp32"):
            if k in self.peak_flops:
                return float(self.peak_flops[k])
        raise CohwError(f"design {self.name!r} has no 16- or 32-bit peak")

    @property
    def formats(self) -> tuple[str, ...]:
        """The narrow matrix formats it has (fp8, int8, int4)."""
        return tuple(f for f in ("fp8", "int8", "int4") if f in self.peak_flops)

    @property
    def weight_bits(self) -> int:
        """Narrowest weight storage read natively: 4 with int4, 8 with int8 or fp8, else 16."""
        return 4 if "int4" in self.formats else 8 if self.formats else 16

    @property
    def main_tier(self) -> str:
        """Where activations live: HBM, or the SRAM of an SRAM-only design."""
        return "hbm" if self.hbm_bytes > 0 else "sram"

    def peak(self, key: str) -> float:
        """Peak for a dtype key; fp64 falls back to fp32 as in the roofline."""
        if key in self.peak_flops:
            return float(self.peak_flops[key])
        if key == "fp64":
            return float(self.peak_flops["fp32"])
        raise CohwError(f"design {self.name!r} has no {key} peak; it has {', '.join(self.peak_flops)}: "
                        "add it to peak_flops or evaluate the phase in a dtype it has")

    def bandwidth(self, tier: str) -> float:
        return {"sram": self.sram_bw, "hbm": self.hbm_bw, "slow": self.slow_bw, "host": self.link_bw}[tier]

    def capacity(self, tier: str) -> float:
        return {"sram": self.sram_bytes, "hbm": self.hbm_bytes, "slow": self.slow_bytes, "host": math.inf}[tier]

    def to_hardware(self) -> Hardware:
        """The design as a :class:`~cohw_utils.hardware.Hardware` for the roofline: main memory
        (HBM, or SRAM for an SRAM-only design) is ``mem_bw``/``mem_bytes``, SRAM the LLC."""
        main = self.main_tier
        return Hardware(name=self.name, vendor="design", year=self.year,
                        peak_flops=dict(self.peak_flops), mem_bw=self.bandwidth(main),
                        mem_bytes=self.capacity(main), llc_bytes=self.sram_bytes or None,
                        tdp_w=None, source=self.source)

    def cost(self, model: CostModel | None = None) -> dict[str, float]:
        """:meth:`CostModel.breakdown` under ``model`` (default coefficients)."""
        return (model or CostModel()).breakdown(self)

    def replace(self, **kw: Any) -> "Accelerator":
        return dataclasses.replace(self, **kw)

    def describe(self) -> str:
        parts = [f"{self.peak16 / 1e12:,.0f} TFLOP/s16"]
        if self.formats:
            parts[-1] += "+" + "/".join(self.formats)
        parts.append(f"SRAM {self.sram_bytes / 2**20:,.0f} MB @ {self.sram_bw / 1e12:,.1f} TB/s")
        if self.hbm_bytes:
            parts.append(f"HBM {self.hbm_bytes / 1e9:,.0f} GB @ {self.hbm_bw / 1e12:.2f} TB/s")
        if self.slow_bytes:
            parts.append(f"{self.slow_kind or 'slow tier'} {self.slow_bytes / 1e9:,.0f} GB "
                         f"@ {self.slow_bw / 1e9:,.0f} GB/s")
        parts.append(f"link {self.link_bw / 1e9:,.0f} GB/s")
        if self.matrix_unit:
            parts.append(f"{self.matrix_unit[0]}x{self.matrix_unit[1]} array")
        return f"{self.name}: " + ", ".join(parts)


#: Matrix-peak multiples of the 16-bit peak for a parametric design (NVIDIA dense ratios).
_FORMAT_X = {"fp32": 1 / 16, "tf32": 0.5, "fp16": 1.0, "bf16": 1.0, "fp8": 2.0, "int8": 2.0, "int4": 4.0}


def make_accelerator(name: str, tflops16: float, hbm_gb: float, hbm_tbs: float, sram_mb: float,
                     formats: Iterable[str] = ("fp8", "int8"), sram_tbs: float | None = None,
                     slow: str | None = None, link_gbs: float = 63.0,
                     matrix_unit: tuple[int, int] | None = None) -> Accelerator:
    """A design from headline numbers: dense 16-bit TFLOP/s, HBM GB and TB/s, SRAM MB (MiB),
    narrow formats, SRAM TB/s (default :data:`SRAM_BW_X` x HBM), an optional slow tier from
    :data:`SLOW_TIERS` and the host link in GB/s."""
    bad = set(formats) - {"fp8", "int8", "int4"}
    if bad:
        raise CohwError(f"unknown formats {sorted(bad)}; a design can add fp8, int8, int4")
    if tflops16 <= 0:
        raise CohwError(f"tflops16 must be > 0, got {tflops16}")
    peak = {k: tflops16 * 1e12 * x for k, x in _FORMAT_X.items() if k not in ("fp8", "int8", "int4")}
    peak.update({f: tflops16 * 1e12 * _FORMAT_X[f] for f in formats})
    slow_bytes = slow_bw = 0.0
    if slow is not None:
        if slow not in SLOW_TIERS:
            raise CohwError(f"unknown slow tier {slow!r}; use one of {', '.join(SLOW_TIERS)} or None")
        slow_bytes, slow_bw = SLOW_TIERS[slow][:2]
    sram_bw = (sram_tbs * 1e12) if sram_tbs is not None else SRAM_BW_X * hbm_tbs * 1e12
    return Accelerator(name=name, peak_flops=peak, sram_bytes=sram_mb * 2**20, sram_bw=sram_bw,
                       hbm_bytes=hbm_gb * 1e9, hbm_bw=hbm_tbs * 1e12, slow_bytes=slow_bytes,
                       slow_bw=slow_bw, link_bw=link_gbs * 1e9, matrix_unit=matrix_unit,
                       slow_kind=slow or "")


def from_hardware(hw: str | Hardware, sram_bw_x: float = SRAM_BW_X, link_bw: float | None = None,
                  slow: str | None = None) -> Accelerator:
    """A catalog chip (``hardware.csv``) as a design point: its dense peaks, HBM and LLC as
    printed; SRAM bandwidth ``sram_bw_x`` x HBM (an assumption); host link from
    :data:`HOST_LINKS` (PCIe generation); no slow tier unless ``slow`` names one. A chip whose
    LLC is not published (B200) gets 0 bytes of SRAM."""
    h = get_hardware(hw) if isinstance(hw, str) else hw
    if link_bw is None:
        link_bw = next((v for k, v in HOST_LINKS.items() if h.name.upper().startswith(k)), 63e9)
    slow_bytes = slow_bw = 0.0
    if slow is not None:
        if slow not in SLOW_TIERS:
            raise CohwError(f"unknown slow tier {slow!r}; use one of {', '.join(SLOW_TIERS)} or None")
        slow_bytes, slow_bw = SLOW_TIERS[slow][:2]
    return Accelerator(name=h.name, peak_flops=dict(h.peak_flops), sram_bytes=float(h.llc_bytes or 0.0),
                       sram_bw=sram_bw_x * h.mem_bw, hbm_bytes=float(h.mem_bytes or 0.0), hbm_bw=h.mem_bw,
                       slow_bytes=slow_bytes, slow_bw=slow_bw, link_bw=link_bw, slow_kind=slow or "",
                       year=h.year, source=h.source)


def sram_only(name: str = "SRAM-only (WSE-3-like)", tflops16: float = 1000.0, sram_gb: float = 44.0,
              sram_pbs: float = 21.0, formats: Iterable[str] = ("fp8", "int8"), link_gbs: float = 63.0) -> Accelerator:
    """An SRAM-only, Cerebras-like design: weights resident on chip across many cores, no HBM.
    Defaults: Cerebras WSE-3's published 44 GB of SRAM at 21 PB/s, with the compute of the
    H100-class point (1000 dense 16-bit TFLOP/s) so that the comparison isolates memory."""
    d = make_accelerator(name, tflops16, hbm_gb=0.0, hbm_tbs=0.0, sram_mb=sram_gb * 1e9 / 2**20,
                         formats=formats, sram_tbs=sram_pbs * 1e3, link_gbs=link_gbs)
    return d.replace(source="Cerebras WSE-3 memory figures (44 GB SRAM, 21 PB/s); compute as the H100-class point")


# ============================================================================ phases
class _KeyOf:
    """Stands in for a Hardware in :func:`roofline._peak_for` and returns the dtype key it asks
    for, so this module applies the roofline's own peak rule, not a copy of it."""

    peak_flops = {d: 1.0 for d in (*DTYPES, "int4")}

    def peak(self, dtype: Any) -> str:  # noqa: D401 - duck-typed Hardware.peak
        return dtype_key(dtype)


def peak_key(op_class: str, dtype: str) -> str:
    """The dtype key of the peak an op runs at: :func:`cohw_utils.views.roofline.op_times`' rule."""
    return roofline._peak_for(_KeyOf(), op_class, dtype)  # noqa: SLF001 - see _KeyOf


def _domain_class(domain: str, phase: str) -> str:
    if domain == "llm":
        return "LLM prefill" if phase == "prefill" else "LLM decode"
    names = {"diffusion": "diffusion", "nerf": "NeRF", "text-to-3d": "text-to-3D", "vision": "vision"}
    return names.get(domain, domain)


#: Workload classes, in display order.
CLASSES = ("LLM prefill", "LLM decode", "diffusion", "text-to-3D", "NeRF", "vision")


@dataclass
class _Rows:
    """Per-op arrays of one weight-format variant of a phase."""

    flops: np.ndarray
    w: np.ndarray      # weight bytes read
    kv: np.ndarray     # KV-cache bytes read + written
    act: np.ndarray    # other bytes
    key: np.ndarray    # peak dtype key per row (object)
    group: np.ndarray  # efficiency-model group per row (object)
    roles: Any         # energy.OpRoles of the variant
    weight_footprint: float


@dataclass
class PreparedPhase:
    """One traced phase, ready for any number of designs (see :func:`prepare`)."""

    label: str
    workload: str
    phase: str
    domain: str
    klass: str
    dtype: str
    batch: int
    seq_len: int | None
    units: int
    unit_name: str
    weight_bytes: float
    kv_bytes: float
    table: pd.DataFrame = field(repr=False)
    kv_in_place: bool = False
    variants: dict[str, _Rows] = field(default_factory=dict, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def native_bits(self) -> int:
        return int(8 * {"fp32": 4, "fp16": 2, "bf16": 2}.get(self.dtype, 2))

    def variant_for(self, weight_bits: int, quantize: bool = True) -> str:
        """The weight-format variant a design with ``weight_bits`` runs (``native``/``int8``/``int4``)."""
        if not quantize:
            return "native"
        bits = max(int(weight_bits), WEIGHT_BITS_FLOOR.get(self.domain, 16))
        if bits >= self.native_bits:
            return "native"
        return "int4" if bits <= 4 else "int8"

    def rows(self, variant: str) -> _Rows:
        if variant not in self.variants:
            base = self.variants["native"]
            roles = base.roles.quantized(variant)
            ratio = roles.weight_bytes / base.roles.weight_bytes if base.roles.weight_bytes else 1.0
            self.variants[variant] = dataclasses.replace(
                base, w=roles.weight_read.copy(), roles=roles, weight_footprint=self.weight_bytes * ratio)
        return self.variants[variant]


def _kv_bytes_rows(table: pd.DataFrame, roles: Any, is_llm: bool, in_place: bool) -> tuple[np.ndarray, np.ndarray]:
    """KV-cache bytes per row (attention's K and V inputs, and the KV append), and the rows'
    total bytes after the optional in-place append."""
    total = roles.weight_read + roles.act_read + roles.written
    kv = np.zeros(len(table))
    if not is_llm:
        return kv, total
    if in_place:
        total = np.where(roles.kv_append, 2 * roles.kv_new + (roles.weight_read), total)
    kv = np.where(roles.kv_append, total - roles.weight_read, 0.0)
    esize = np.array([energy._esize(d) for d in roles.dtype])  # noqa: SLF001 - same element sizes
    for i, (op, shapes) in enumerate(zip(table["op"].to_numpy(), table["input_shapes"].to_numpy())):
        if "scaled_dot_product" in op and len(shapes) >= 3 and table["costed"].iat[i]:
            kv[i] = (np.prod(shapes[1]) + np.prod(shapes[2])) * esize[i]
    return kv, total


def prepare(analysis: Any, kv_in_place: bool = False, label: str | None = None) -> PreparedPhase:
    """Turn an :class:`~cohw_utils.spine.analyze.Analysis` into a :class:`PreparedPhase`: per-op
    FLOPs, weight / KV-cache / other bytes (:func:`cohw_utils.views.energy_model.op_roles`), the peak key of
    each op (the roofline's rule) and the footprint (weights + KV cache for its tokens x batch).

    ``kv_in_place=True`` replaces the eager ``torch.cat`` KV append by an in-place write of the
    new entries, as :class:`cohw_utils.views.energy_model.ReuseModel` does.
    """
    if not (hasattr(analysis, "table") and hasattr(analysis, "units")):
        raise CohwError(f"prepare needs an Analysis (cohw_utils.spine.analyze.analyze), got {type(analysis).__name__}")
    wl = workloads.get_workload(analysis.workload)
    table = analysis.table
    roles = energy.op_roles(analysis)
    is_llm = wl.domain == "llm"
    kv, total = _kv_bytes_rows(table, roles, is_llm, kv_in_place)
    act = np.maximum(total - roles.weight_read - kv, 0.0)
    flops = np.nan_to_num(table["flops"].to_numpy(dtype=float)) * table["costed"].to_numpy(dtype=bool)
    keys = {k: peak_key(*k) for k in set(zip(table["op_class"], table["dtype"]))}
    key = np.array([keys[k] for k in zip(table["op_class"], table["dtype"])], dtype=object)
    group_of = getattr(roofline, "op_group", None)
    group = np.array([group_of(o, c) if group_of else c for o, c in zip(table["op"], table["op_class"])],
                     dtype=object)
    kv_tokens = 0
    if is_llm and analysis.kv_bytes_per_token:
        ctx = analysis.seq_len or workloads.DEFAULT_SEQ_LEN
        kv_tokens = (ctx + (1 if analysis.phase == "decode" else 0)) * analysis.batch
    kv_foot = float((analysis.kv_bytes_per_token or 0) * kv_tokens)
    ctx_txt = f" ctx {analysis.seq_len}" if is_llm and analysis.seq_len else ""
    batch_txt = f" b{analysis.batch}" if analysis.batch > 1 else ""
    name = label or f"{analysis.workload}:{analysis.phase}{batch_txt}{ctx_txt}"
    p = PreparedPhase(label=name, workload=analysis.workload, phase=analysis.phase, domain=wl.domain,
                      klass=_domain_class(wl.domain, analysis.phase), dtype=analysis.dtype,
                      batch=analysis.batch, seq_len=analysis.seq_len, units=analysis.units,
                      unit_name=analysis.unit_name, weight_bytes=float(analysis.weight_bytes),
                      kv_bytes=kv_foot, table=table, kv_in_place=kv_in_place)
    p.variants["native"] = _Rows(flops=flops, w=roles.weight_read.copy(), kv=kv, act=act, key=key, group=group,
                                 roles=roles, weight_footprint=float(analysis.weight_bytes))
    return p


# ============================================================================ the proxy set
@dataclass
class ProxySet:
    """Every traced phase of the proxy set (Chapter 1's phases, plus LLM variants), with the
    Chapter 1 criteria inputs: ``overview`` (workload, phase, memory_bound_share on the
    reference chip) and each workload's ``op_sets``."""

    phases: list[PreparedPhase]
    overview: pd.DataFrame
    op_sets: dict[str, set[str]]
    seconds: float

    def by_label(self) -> dict[str, PreparedPhase]:
        return {p.label: p for p in self.phases}


def trace_proxy_set(names: Iterable[str] | None = None, seq_len: int = 2048, rays: int = 4096,
                    llm_variants: Iterable[tuple[str, int, int]] = (), reference: str = "H100-SXM",
                    kv_in_place: bool = True) -> ProxySet:
    """Trace every phase of ``names`` (default: the registry) once, at full scale on ``meta``,
    as Chapter 1 does (fp16 inference, fp32 NeRFs; LLMs at ``seq_len``, NeRFs at ``rays``), plus
    each ``(llm, batch, context)`` decode in ``llm_variants``. Returns the prepared phases and
    the inputs of :func:`cohw_utils.studies.proxies.proxy_set.criteria` (so the ranking is Chapter 1's)."""
    from cohw_utils.studies.proxies import ranking as priority
    from cohw_utils.studies.proxies import proxy_set as proxies
    from cohw_utils.spine.analyze import analyze

    start = time.perf_counter()
    chip = get_hardware(reference)
    names = list(names) if names is not None else list(workloads.WORKLOADS)
    phases, rows, op_sets = [], [], {}
    for name in names:
        wl = workloads.get_workload(name)
        kw = {"rays": rays} if wl.library == "nerfstudio" else {}
        ops: set[str] = set()
        for ph in wl.phases:
            a = analyze(name, ph, seq_len=seq_len if wl.domain == "llm" else None,
                        dtype=proxies.phase_dtype(name), **kw)
            ops |= priority.op_set(a.table)
            rows.append({"workload": wl.name, "domain": wl.domain, "phase": ph,
                         "memory_bound_share": roofline.roofline_summary(a.table, chip)["memory_bound_share"]})
            phases.append(prepare(a, kv_in_place=kv_in_place))
        op_sets[wl.name] = ops
    for llm, batch, ctx in llm_variants:
        if workloads.get_workload(llm).domain != "llm":
            raise CohwError(f"llm_variants: {llm!r} is not a decoder LM; use one of the llama-2 workloads")
        a = analyze(llm, "decode", batch=int(batch), seq_len=int(ctx), dtype=proxies.phase_dtype(llm))
        p = prepare(a, kv_in_place=kv_in_place)
        if p.label not in {q.label for q in phases}:
            phases.append(p)
    return ProxySet(phases, pd.DataFrame(rows), op_sets, time.perf_counter() - start)


def phase_weights(phases: Sequence[PreparedPhase], ranked: pd.DataFrame) -> pd.Series:
    """Weight of each phase in the weighted proxy set: a workload's Chapter 1 priority score
    (normalised to sum 1 over the workloads present), split equally between its phases, and a
    phase's share equally between its (batch, context) variants."""
    scores = ranked["score"].astype(float)
    present = list(dict.fromkeys(p.workload for p in phases))
    missing = [w for w in present if w not in scores.index]
    if missing:
        raise CohwError(f"no priority score for {missing}; rank them with priority.rank first")
    s = scores.reindex(present)
    s = s / s.sum()
    out = {}
    for wl in present:
        mine = [p for p in phases if p.workload == wl]
        kinds = list(dict.fromkeys(p.phase for p in mine))
        for p in mine:
            n_var = sum(q.phase == p.phase for q in mine)
            out[p.label] = s[wl] / len(kinds) / n_var
    return pd.Series(out, name="weight").reindex([p.label for p in phases])


# ============================================================================ placement
def placement(weights: float, kv: float, sram: float, hbm: float, slow: float,
               spill: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """Where a footprint of ``weights`` and ``kv`` bytes lives on a design with ``sram``,
    ``hbm`` and ``slow`` bytes (the host is unlimited): the fractions of the weights and of the
    KV cache in each tier (sram, hbm, slow, host), and whether the weights are resident on chip.
    See the module docstring for the rule."""
    check_spill(spill)
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


def _matrix_util(p: PreparedPhase, shape: tuple[int, int] | None) -> np.ndarray:
    """Per-row utilization of a weight-stationary ``shape`` array (1 for non-contractions)."""
    n = len(p.table)
    if shape is None:
        return np.ones(n)
    key = ("util", tuple(shape))
    if key not in p._cache:
        try:
            from cohw_utils.views import systolic
        except ImportError:  # Chapter 4's systolic-array model is not installed
            raise CohwError("matrix_unit needs cohw_utils.views.systolic (Chapter 4's systolic-array model), which "
                            "is not importable here; use matrix_unit=None (the ideal matrix peak)") from None

        r, c = int(shape[0]), int(shape[1])
        util = np.ones(n)
        t = p.table
        for i, (op, cls, ins, outs, ps) in enumerate(zip(t["op"], t["op_class"], t["input_shapes"],
                                                         t["output_shapes"], t["pass"])):
            if cls != CONTRACTION or ps != "forward":
                continue
            gemms = systolic._row_gemms(op, ins, outs)  # noqa: SLF001 - the chapter 4 GEMM extraction
            macs = sum(g.M * g.K * g.N * g.count for _, g in gemms)
            cyc = sum(systolic.cycles(int(g.M), int(g.K), int(g.N), r, c, "ws") * g.count for _, g in gemms)
            if macs and cyc:
                util[i] = macs / (r * c * cyc)
        p._cache[key] = util
    return p._cache[key]


def _efficiency_arrays(groups: np.ndarray, model: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if model is None:
        one = np.ones(len(groups))
        return one, one, np.zeros(len(groups))
    params = {g: model.params(g) for g in set(groups)}
    e = np.array([params[g][0] for g in groups], dtype=float)
    b = np.array([params[g][1] for g in groups], dtype=float)
    t0 = np.array([0.0 if g == "view" else params[g][2] for g in groups], dtype=float)
    return e, b, t0


# ============================================================================ one design
def design_op_times(design: Accelerator, phase: PreparedPhase | Any, quantize: bool = False,
                    spill: str = "weights", efficiency: Any = None) -> pd.DataFrame:
    """Per-op times of one phase on one design: :func:`cohw_utils.views.roofline.op_times` (or
    :func:`~cohw_utils.views.roofline.predict_times` with an ``efficiency`` model) on
    ``design.to_hardware()`` for the compute roof, plus one roof per memory tier.

    ``phase`` is a :class:`PreparedPhase` or an Analysis. Columns: op, module, op_class,
    ``t_compute``, ``t_sram``, ``t_hbm``, ``t_slow``, ``t_host``, ``time``, ``bound`` (one of
    :data:`RESOURCES`, or ``uncosted``)."""
    p = phase if isinstance(phase, PreparedPhase) else prepare(phase)
    v = p.variant_for(design.weight_bits, quantize)
    rows = p.rows(v)
    hw = design.to_hardware()
    table = p.table
    if efficiency is None:
        base = roofline.op_times(table, hw)
        e_b, t0 = np.ones(len(table)), np.zeros(len(table))
    else:
        base = roofline.predict_times(table, hw, efficiency)
        _, e_b, t0 = _efficiency_arrays(rows.group, efficiency)
    t_c = np.nan_to_num(base["t_compute"].to_numpy(dtype=float)) / _matrix_util(p, design.matrix_unit)
    fw, fkv, _ = placement(rows.weight_footprint, p.kv_bytes, design.sram_bytes, design.hbm_bytes,
                            design.slow_bytes, spill)
    out = table[["op", "module", "op_class"]].copy()
    out["t_compute"] = t_c
    main = TIERS.index(design.main_tier)
    for i, tier in enumerate(TIERS):
        b = rows.w * fw[i] + rows.kv * fkv[i] + (rows.act if i == main else 0.0)
        bw = design.bandwidth(tier)
        out[f"t_{tier}"] = np.divide(b, bw * e_b, out=np.where(b > 0, np.inf, 0.0), where=bw > 0)
    stack = out[["t_compute", *(f"t_{t}" for t in TIERS)]].to_numpy()
    costed = table["costed"].to_numpy(dtype=bool)
    out["time"] = stack.max(axis=1) + t0 * costed
    bound = np.array(RESOURCES, dtype=object)[stack.argmax(axis=1)]
    out["bound"] = np.where(costed, bound, "uncosted")
    return out


# ============================================================================ vectorised sweep
def _compressed(p: PreparedPhase, variant: str, shape: tuple[int, int] | None, model: Any) -> dict[str, np.ndarray]:
    """Distinct op rows of a variant with their multiplicities."""
    key = ("rows", variant, tuple(shape) if shape else None, id(model))
    if key in p._cache:
        return p._cache[key]
    r = p.rows(variant)
    util = _matrix_util(p, shape)
    keys = sorted(set(r.key))
    kidx = np.array([keys.index(k) for k in r.key], dtype=float)
    e, b, t0 = _efficiency_arrays(r.group, model)
    costed = p.table["costed"].to_numpy(dtype=bool)
    mat = np.column_stack([r.flops / (util * e), r.w / b, r.kv / b, r.act / b, kidx, t0, costed.astype(float)])
    uniq, inv, counts = np.unique(mat, axis=0, return_inverse=True, return_counts=True)
    out = {"F": uniq[:, 0], "W": uniq[:, 1], "KV": uniq[:, 2], "A": uniq[:, 3],
           "key": uniq[:, 4].astype(int), "t0": uniq[:, 5] * uniq[:, 6], "n": counts.astype(float),
           "keys": keys, "ideal_flops": float(r.flops.sum())}
    p._cache[key] = out
    return out


def _energy_base(p: PreparedPhase, variant: str, table: energy.EnergyTable) -> dict[str, Any]:
    key = ("energy", variant, table.name, id(table))
    if key not in p._cache:
        m = energy.ReuseModel(onchip_bytes=0.0, weights_resident=False, kv_in_place=p.kv_in_place)
        p._cache[key] = energy.workload_energy(table, p.rows(variant).roles, m)
    return p._cache[key]


def _tier_pj(table: energy.EnergyTable) -> np.ndarray:
    """pJ/byte of each tier (sram, hbm, slow, host)."""
    dram = energy.load_energy_data()
    row = dram[(dram["kind"] == "memory") & (dram["level"] == "dram") & (dram["preferred"] == "yes")]
    slow = float(row["pj_per_byte"].iloc[0]) if len(row) else table.byte_pj["offchip"]
    return np.array([table.byte_pj["buffer"], table.byte_pj["offchip"], slow, slow])


def _design_arrays(designs: Sequence[Accelerator]) -> dict[str, np.ndarray]:
    return {
        "cap": np.array([[d.sram_bytes, d.hbm_bytes, d.slow_bytes, math.inf] for d in designs]),
        "bw": np.array([[d.sram_bw, d.hbm_bw, d.slow_bw, d.link_bw] for d in designs]),
        "main": np.array([TIERS.index(d.main_tier) for d in designs]),
    }


def evaluate(designs: Accelerator | Sequence[Accelerator], phases: PreparedPhase | Sequence[PreparedPhase],
             table: energy.EnergyTable | None = None, quantize: bool = True, spill: str = "weights",
             efficiency: Any = None, cost: CostModel | None = None) -> pd.DataFrame:
    """Every design on every phase: one row per (design, phase).

    Columns: ``design``, ``phase`` (label), ``workload``, ``klass``, ``variant`` (weight format
    used), ``time_s``, ``time_per_unit_s``, ``throughput`` (units/s), ``unit``, ``energy_J``,
    ``J_per_unit``, ``binding`` (the resource whose bound ops take most of the time),
    ``share_<resource>`` (time share bound by each), ``util_compute`` (ideal compute time /
    time), ``util_memory`` (main-memory transfer time / time), ``bytes_<tier>``,
    ``spilled_bytes`` (footprint outside main memory and SRAM), ``fits`` (footprint fits SRAM +
    main memory), ``resident`` (weights on chip), ``die_mm2``, ``package_mm2``.
    ``table`` defaults to the ``7nm-hbm2e`` energy table.
    """
    ds = [designs] if isinstance(designs, Accelerator) else list(designs)
    ps = [phases] if isinstance(phases, PreparedPhase) else list(phases)
    if not ds or not ps:
        raise CohwError("evaluate needs at least one design and one phase")
    names = [d.name for d in ds]
    if len(set(names)) != len(names):
        raise CohwError("design names must be unique (they label the results)")
    et = table or energy.EnergyTable.load("7nm-hbm2e")
    pj = _tier_pj(et) * 1e-12
    arr = _design_arrays(ds)
    cm = (cost or CostModel()).calibrated()
    areas = [cm.breakdown(d) for d in ds]
    frames = []
    for p in ps:
        var = np.array([p.variant_for(d.weight_bits, quantize) for d in ds], dtype=object)
        shapes = [d.matrix_unit for d in ds]
        groups: dict[tuple, list[int]] = {}
        for i, (v, s) in enumerate(zip(var, shapes)):
            groups.setdefault((v, tuple(s) if s else None), []).append(i)
        res = {k: np.zeros(len(ds)) for k in ("time", "energy", "t_ideal", "t_main", *[f"b_{t}" for t in TIERS],
                                              *[f"s_{r}" for r in RESOURCES], "spilled", "fits", "resident")}
        for (v, s), idx in groups.items():
            idx = np.array(idx)
            c = _compressed(p, v, s, efficiency)
            foot_w = p.rows(v).weight_footprint
            fw = np.zeros((len(idx), 4))
            fkv = np.zeros((len(idx), 4))
            resident = np.zeros(len(idx), dtype=bool)
            for j, i in enumerate(idx):
                d = ds[i]
                fw[j], fkv[j], resident[j] = placement(foot_w, p.kv_bytes, d.sram_bytes, d.hbm_bytes,
                                                       d.slow_bytes, spill)
            peaks = np.array([[ds[i].peak(k) for k in c["keys"]] for i in idx])  # (D, K)
            t_c = c["F"][None, :] / peaks[:, c["key"]]
            main = arr["main"][idx]
            times = [t_c]
            tier_bytes = []
            for t in range(4):
                b = (c["W"][None, :] * fw[:, t:t + 1] + c["KV"][None, :] * fkv[:, t:t + 1]
                     + c["A"][None, :] * (main == t)[:, None])
                bw = arr["bw"][idx, t][:, None]
                with np.errstate(divide="ignore", invalid="ignore"):
                    tt = np.where(b > 0, b / np.where(bw > 0, bw, 1.0), 0.0)
                tt = np.where((b > 0) & (bw <= 0), np.inf, tt)
                times.append(tt)
                tier_bytes.append(b)
            stack = np.stack(times, axis=0)               # (5, D, n)
            t_op = stack.max(axis=0) + c["t0"][None, :]
            bound = stack.argmax(axis=0)
            n = c["n"][None, :]
            res["time"][idx] = (t_op * n).sum(axis=1)
            for r_i, r in enumerate(RESOURCES):
                res[f"s_{r}"][idx] = ((bound == r_i) * t_op * n).sum(axis=1)
            res["t_ideal"][idx] = (c["F"][None, :] / peaks[:, c["key"]] * n).sum(axis=1)
            for t in range(4):
                res[f"b_{TIERS[t]}"][idx] = (tier_bytes[t] * n).sum(axis=1)
            main_bytes = np.take_along_axis(np.stack(tier_bytes, 0), main[None, :, None], 0)[0]
            res["t_main"][idx] = (main_bytes * n).sum(axis=1) / arr["bw"][idx, main]
            eb = _energy_base(p, v, et)
            off_j = eb["offchip_J"]
            res["energy"][idx] = eb["total_J"] - off_j + sum(res[f"b_{TIERS[t]}"][idx] * pj[t] for t in range(4))
            spilled = foot_w * (fw[:, 2] + fw[:, 3]) + p.kv_bytes * (fkv[:, 2] + fkv[:, 3])
            res["spilled"][idx] = spilled
            res["fits"][idx] = spilled <= 0
            res["resident"][idx] = resident
        total = res["time"]
        shares = np.stack([res[f"s_{r}"] for r in RESOURCES], axis=1)
        frame = pd.DataFrame({
            "design": names, "phase": p.label, "workload": p.workload, "klass": p.klass, "variant": var,
            "time_s": total, "time_per_unit_s": total / p.units, "throughput": p.units / total,
            "unit": p.unit_name, "energy_J": res["energy"], "J_per_unit": res["energy"] / p.units,
            "binding": np.array(RESOURCES, dtype=object)[shares.argmax(axis=1)],
        })
        for k, r in enumerate(RESOURCES):
            frame[f"share_{r}"] = shares[:, k] / total
        frame["util_compute"] = res["t_ideal"] / total
        frame["util_memory"] = res["t_main"] / total
        for t in TIERS:
            frame[f"bytes_{t}"] = res[f"b_{t}"]
        frame["spilled_bytes"] = res["spilled"]
        frame["fits"] = res["fits"].astype(bool)
        frame["resident"] = res["resident"].astype(bool)
        frame["die_mm2"] = [a["die"] for a in areas]
        frame["package_mm2"] = [a["package"] for a in areas]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def design_grid(tflops16: Sequence[float], hbm_tbs: Sequence[float], hbm_gb: Sequence[float],
                sram_mb: Sequence[float], formats: Sequence[tuple[str, ...]] = (("fp8", "int8"),),
                slow: Sequence[str | None] = (None,), link_gbs: float = 63.0) -> list[Accelerator]:
    """The full factorial grid of :func:`make_accelerator` designs, each named by its values
    (``"1000T 4TB/s 80GB 64MB fp8/int8 LPDDR5X"``)."""
    out = []
    for f, b, g, s, fm, sl in itertools.product(tflops16, hbm_tbs, hbm_gb, sram_mb, formats, slow):
        name = f"{f:g}T {b:g}TB/s {g:g}GB {s:g}MB {'/'.join(fm) or 'fp16'}" + (f" {sl}" if sl else "")
        out.append(make_accelerator(name, f, g, b, s, formats=fm, slow=sl, link_gbs=link_gbs))
    return out


def fit_area(d: Accelerator, package_mm2: float, cost: CostModel | None = None, name: str | None = None) -> Accelerator:
    """``d`` with every peak scaled so that its package area is ``package_mm2``: how much
    compute the rest of the design leaves room for at a fixed budget."""
    b = (cost or CostModel()).breakdown(d)
    rest = b["package"] - b["compute"] - b["formats"]
    if package_mm2 <= rest:
        raise CohwError(f"{package_mm2:.0f} mm^2 does not even cover {d.name}'s non-compute area ({rest:.0f} mm^2)")
    s = (package_mm2 - rest) / (b["compute"] + b["formats"])
    return d.replace(peak_flops={k: v * s for k, v in d.peak_flops.items()}, name=name or d.name)


def design_params(designs: Sequence[Accelerator]) -> pd.DataFrame:
    """The headline parameters of each design, indexed by name."""
    return pd.DataFrame([{"design": d.name, "tflops16": d.peak16 / 1e12, "hbm_tbs": d.hbm_bw / 1e12,
                          "hbm_gb": d.hbm_bytes / 1e9, "sram_mb": d.sram_bytes / 2**20,
                          "formats": "/".join(d.formats) or "fp16", "weight_bits": d.weight_bits,
                          "slow": d.slow_kind or "none", "link_gbs": d.link_bw / 1e9} for d in designs]
                        ).set_index("design")


def sweep(designs: Sequence[Accelerator], phases: Sequence[PreparedPhase], **kw: Any) -> tuple[pd.DataFrame, float]:
    """:func:`evaluate` every design on every phase; returns ``(results, seconds)``."""
    start = time.perf_counter()
    out = evaluate(designs, phases, **kw)
    return out, time.perf_counter() - start


# ============================================================================ scores, Pareto
def pareto_mask(points: np.ndarray | pd.DataFrame) -> np.ndarray:
    """Boolean mask of the non-dominated rows of ``points`` (n x k), every column minimised.

    Row i is dominated when some row j is <= it in every column and < in at least one.
    Duplicates of a non-dominated point are all kept. O(n^2 k) with numpy: fine for 10^4 rows.
    """
    x = np.asarray(points, dtype=float)
    if x.ndim != 2:
        raise CohwError(f"pareto_mask needs a 2-D array (points x objectives), got shape {x.shape}")
    if np.isnan(x).any():
        raise CohwError("pareto_mask: NaN objectives; drop or fill them first")
    keep = np.ones(len(x), dtype=bool)
    for i in range(len(x)):
        le = (x <= x[i]).all(axis=1)
        lt = (x < x[i]).any(axis=1)
        if (le & lt).any():
            keep[i] = False
    return keep


def _gmean(values: pd.Series, weights: pd.Series) -> float:
    w = weights / weights.sum()
    return float(np.exp((np.log(values) * w).sum()))


def class_scores(results: pd.DataFrame, reference: str, weights: pd.Series | None = None) -> pd.DataFrame:
    """Per design and workload class (and ``weighted proxy set``): the weighted geometric mean
    over the class's phases of time and energy *relative to* ``reference`` (1 = the same, 0.5 =
    twice as fast), with the package area. ``weights`` (phase label -> weight, from
    :func:`phase_weights`) weight the phases; equal weights where None. ``pareto`` marks the
    designs no other design beats in both area and time within the class; ``pareto3`` the same
    with energy as a third objective."""
    ref = results[results["design"] == reference].set_index("phase")
    if ref.empty:
        raise CohwError(f"reference design {reference!r} is not in the results; add it to the sweep")
    r = results.assign(time_rel=results["time_s"] / results["phase"].map(ref["time_s"]),
                       energy_rel=results["energy_J"] / results["phase"].map(ref["energy_J"]))
    w = weights if weights is not None else pd.Series(1.0, index=ref.index)
    r["w"] = r["phase"].map(w).fillna(0.0)
    groups = [("klass", k) for k in r["klass"].unique()] + [(None, "weighted proxy set")]
    rows = []
    area = results.groupby("design")[["package_mm2", "die_mm2"]].first()
    for col, k in groups:
        sub = r if col is None else r[r[col] == k]
        if col is not None and sub["w"].sum() == 0:
            sub = sub.assign(w=1.0)
        sub = sub[sub["w"] > 0]
        piv_t = sub.pivot(index="design", columns="phase", values="time_rel")
        piv_e = sub.pivot(index="design", columns="phase", values="energy_rel")
        ww = sub.groupby("phase")["w"].first().reindex(piv_t.columns)
        lw = ww / ww.sum()
        rows.append(pd.DataFrame({"klass": k, "time_rel": np.exp(np.log(piv_t).mul(lw, axis=1).sum(axis=1)),
                                  "energy_rel": np.exp(np.log(piv_e).mul(lw, axis=1).sum(axis=1))}))
    out = pd.concat(rows).reset_index().rename(columns={"index": "design"})
    out = out.join(area, on="design")
    out["pareto"] = False
    out["pareto3"] = False
    for k, g in out.groupby("klass"):
        out.loc[g.index, "pareto"] = pareto_mask(g[["package_mm2", "time_rel"]].to_numpy())
        out.loc[g.index, "pareto3"] = pareto_mask(g[["package_mm2", "time_rel", "energy_rel"]].to_numpy())
    return out


def choose(scores: pd.DataFrame, budget_mm2: float) -> pd.DataFrame:
    """Per class: the fastest design within the area budget (ties: the cheaper, then the more
    energy-efficient), with its time and energy relative to the reference."""
    fit = scores[scores["package_mm2"] <= budget_mm2 * (1 + 1e-9)]
    if fit.empty:
        raise CohwError(f"no design within {budget_mm2:.0f} mm^2; raise the budget or add cheaper designs")
    best = fit.sort_values(["klass", "time_rel", "package_mm2", "energy_rel"]).groupby("klass", sort=False).head(1)
    order = {k: i for i, k in enumerate((*CLASSES, "weighted proxy set"))}
    return best.assign(_o=best["klass"].map(order)).sort_values("_o").drop(columns="_o").set_index("klass")


def sensitivity(scores: pd.DataFrame, params: pd.DataFrame,
                axes: Sequence[str] = ("tflops16", "hbm_tbs", "hbm_gb", "sram_mb")) -> pd.DataFrame:
    """The sweep's answer to "what does each knob buy?": for every axis of a factorial grid,
    pair each design with its neighbour one step up that axis (all other parameters equal) and
    express the speedup (ratio of ``time_rel``) *per doubling* of the parameter,
    ``speedup ** (1 / log2(step))``, so that grids with uneven steps compare. Columns
    ``<axis>``: the geometric mean over all such pairs of a class (1.0 = the parameter buys
    nothing, 2.0 = time halves with every doubling); ``<axis>_max``: the largest;
    ``<axis>_steps``: how many pairs."""
    s = scores.join(params, on="design")
    out = {}
    for ax in axes:
        others = [c for c in params.columns if c != ax]
        vals = sorted(params[ax].unique())
        if len(vals) < 2:
            continue
        nxt = dict(zip(vals[:-1], vals[1:]))
        lo = s[s[ax].isin(nxt)].copy()
        lo["_up"] = lo[ax].map(nxt)
        hi = s.rename(columns={ax: "_up", "time_rel": "time_hi"})
        m = lo.merge(hi[["klass", "_up", "time_hi", *others]], on=["klass", "_up", *others])
        m["step"] = m["_up"] / m[ax]
        per_doubling = np.log2(m["time_rel"] / m["time_hi"]) / np.log2(m["step"])
        out[ax] = 2.0 ** per_doubling.groupby(m["klass"]).mean()
        out[f"{ax}_max"] = 2.0 ** per_doubling.groupby(m["klass"]).max()
        out[f"{ax}_steps"] = m.groupby("klass").size()
    return pd.DataFrame(out)


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
    res = evaluate(variants, phases, **kw)
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
    res = evaluate([before, after], phases, **kw)
    b = res[res["design"] == before.name].set_index("phase")
    a = res[res["design"] == after.name].set_index("phase")
    out = pd.DataFrame({"klass": b["klass"], "binding_before": b["binding"], "binding_after": a["binding"],
                        "variant_before": b["variant"], "variant_after": a["variant"],
                        "time_ratio": a["time_s"] / b["time_s"], "energy_ratio": a["energy_J"] / b["energy_J"]})
    out["verdict"] = np.where(out["time_ratio"] < 1 - tol, "improved",
                              np.where(out["time_ratio"] > 1 + tol, "regressed", "same"))
    out.attrs["area"] = (float(b["package_mm2"].iloc[0]), float(a["package_mm2"].iloc[0]))
    return out


# ============================================================================ generations
GENERATIONS = ("V100-SXM2-32GB", "A100-80GB", "H100-SXM", "H200-SXM", "B200")


def growth_table(names: Sequence[str] = GENERATIONS) -> pd.DataFrame:
    """Per GPU generation (from ``hardware.csv``): dense 16-bit TFLOP/s, HBM TB/s and GB, the
    FLOP-per-byte ratio (ridge point) and each relative to the first."""
    table = load_hardware()
    rows = []
    for n in names:
        if n not in table:
            raise CohwError(f"unknown accelerator {n!r}; known: {', '.join(table)}")
        h = table[n]
        f16 = h.peak_flops.get("bf16", h.peak_flops.get("fp16"))
        rows.append({"name": n, "year": h.year, "tflops16": f16 / 1e12, "hbm_tbs": h.mem_bw / 1e12,
                     "hbm_gb": h.mem_bytes / 1e9, "flop_per_byte": f16 / h.mem_bw})
    df = pd.DataFrame(rows).set_index("name")
    for c in ("tflops16", "hbm_tbs", "hbm_gb", "flop_per_byte"):
        df[f"{c}_x"] = df[c] / df[c].iloc[0]
    return df


def growth_figure(names: Sequence[str] = GENERATIONS) -> Figure:
    """Left: dense 16-bit FLOP/s, HBM bandwidth and capacity across GPU generations, relative
    to the first (log scale). Right: the FLOP-per-byte ratio each generation needs to be
    compute-bound."""
    g = growth_table(names)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(g))
    for col, lab, mk in (("tflops16_x", "dense 16-bit FLOP/s", "o"), ("hbm_tbs_x", "HBM bandwidth", "s"),
                         ("hbm_gb_x", "HBM capacity", "^")):
        ax.plot(x, g[col], marker=mk, label=f"{lab}: {g[col].iloc[-1]:.1f}x")
    ax.set(yscale="log", ylabel=f"relative to {g.index[0]}", title="Growth across NVIDIA generations")
    _plain_log(ax, "y")
    ax.set_xticks(x, [f"{n}\n({y})" for n, y in zip(g.index, g["year"])], fontsize=7)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    bars = ax2.bar(x, g["flop_per_byte"], color="tab:purple", alpha=0.8)
    for b, v in zip(bars, g["flop_per_byte"]):
        ax2.annotate(f"{v:.0f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax2.set_xticks(x, g.index, fontsize=7)
    ax2.set(ylabel="FLOP per byte of HBM (dense 16-bit)", title="FLOP/s : bandwidth ratio (ridge point)")
    ax2.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


# ============================================================================ figures
def _plain_log(ax, which: str = "both") -> None:
    """Log axes labelled 0.5, 1, 2, 1000 rather than 5x10^-1 (minor labels off)."""
    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    for axis in ((ax.xaxis, ax.yaxis) if which == "both" else (ax.xaxis,) if which == "x" else (ax.yaxis,)):
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(fmt)
        axis.set_minor_formatter(NullFormatter())


def pareto_figure(scores: pd.DataFrame, chosen: pd.DataFrame | None = None,
                  marks: Mapping[str, str] | None = None, classes: Sequence[str] | None = None,
                  ncols: int = 4) -> Figure:
    """One panel per class: every design's time relative to the reference against its package
    area (grey), the Pareto front (coloured by energy relative to the reference), the chosen
    design per class (star, named) and labelled reference points ``marks`` (design -> label)."""
    ks = list(classes or [k for k in (*CLASSES, "weighted proxy set") if k in set(scores["klass"])])
    rows = int(np.ceil(len(ks) / ncols))
    fig, axes = plt.subplots(rows, ncols, figsize=(4.2 * ncols, 3.8 * rows), squeeze=False, layout="constrained")
    sc = None
    vmin, vmax = np.log2(scores["energy_rel"]).quantile([0.02, 0.98])
    for ax, k in zip(axes.flat, ks):
        g = scores[scores["klass"] == k]
        ax.scatter(g["package_mm2"], g["time_rel"], s=4, color="0.8", rasterized=True)
        f = g[g["pareto"]].sort_values("package_mm2")
        ax.plot(f["package_mm2"], f["time_rel"], "-", color="0.3", lw=0.8)
        sc = ax.scatter(f["package_mm2"], f["time_rel"], c=np.log2(f["energy_rel"]), cmap="viridis",
                        vmin=vmin, vmax=vmax, s=18, zorder=3)
        for name, lab in (marks or {}).items():
            m = g[g["design"] == name]
            if len(m):
                ax.scatter(m["package_mm2"], m["time_rel"], marker="^", color="tab:red", s=30, zorder=4)
                ax.annotate(lab, (m["package_mm2"].iloc[0], m["time_rel"].iloc[0]), fontsize=6, xytext=(3, 3),
                            textcoords="offset points", color="tab:red")
        if chosen is not None and k in chosen.index:
            c = chosen.loc[k]
            ax.scatter([c["package_mm2"]], [c["time_rel"]], marker="*", s=160, color="tab:orange",
                       edgecolors="black", zorder=5)
            ax.annotate(c["design"], (c["package_mm2"], c["time_rel"]), fontsize=6, xytext=(-4, -11),
                        textcoords="offset points", ha="right")
        ax.set(xscale="log", yscale="log", title=k, xlabel="package area (mm$^2$, cost proxy)")
        _plain_log(ax)
        ax.grid(True, which="major", alpha=0.3)
    for ax in list(axes.flat)[len(ks):]:
        ax.set_visible(False)
    for r in range(rows):
        axes[r, 0].set_ylabel("time relative to reference")
    if sc is not None:
        cb = fig.colorbar(sc, ax=axes.ravel().tolist(), shrink=0.7)
        cb.set_label("log2 energy relative to reference")
    return fig


def gains_figure(gains: pd.DataFrame, weights: pd.Series | None = None) -> Figure:
    """Speedup of each feature per workload class (weighted geometric mean over the class's
    phases), as grouped horizontal bars."""
    g = gains.copy()
    g["w"] = g["phase"].map(weights).fillna(1.0) if weights is not None else 1.0
    piv = g.groupby(["klass", "feature"]).apply(lambda d: _gmean(d["speedup"], d["w"]), include_groups=False).unstack()
    piv = piv.reindex([k for k in CLASSES if k in piv.index])
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(piv) * 1.6 + 1.5))
    n = len(piv.columns)
    y = np.arange(len(piv))
    h = 0.8 / n
    for i, f in enumerate(piv.columns):
        ax.barh(y + i * h, piv[f], height=h, label=f)
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks(y + 0.4 - h / 2, piv.index)
    ax.invert_yaxis()
    ax.set(xscale="log", xlabel="speedup over the base design (log; weighted geometric mean over the class)",
           title="What each feature buys, per workload class")
    _plain_log(ax, "x")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def iteration_figure(it: pd.DataFrame) -> Figure:
    """Time and energy ratio (after / before) per phase, green where it improved, red where it
    regressed."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 0.28 * len(it) + 1.6), sharey=True)
    y = np.arange(len(it))
    colors = it["verdict"].map({"improved": "tab:green", "regressed": "tab:red", "same": "0.6"})
    ax.barh(y, it["time_ratio"] - 1, left=1.0, color=colors)  # bars grow from 1: left = better
    e_col = np.where(it["energy_ratio"] < 0.98, "tab:green", np.where(it["energy_ratio"] > 1.02, "tab:red", "0.6"))
    ax2.barh(y, it["energy_ratio"] - 1, left=1.0, color=e_col)
    for a, t, col in ((ax, "time after / before (left of 1 = faster)", "time_ratio"),
                      (ax2, "energy after / before (left of 1 = less)", "energy_ratio")):
        a.axvline(1.0, color="black", lw=0.8)
        a.set(xscale="log", xlabel=t, xlim=(min(it[col].min(), 1.0) / 1.25, max(it[col].max(), 1.0) * 1.25))
        _plain_log(a, "x")
        a.grid(True, axis="x", which="both", alpha=0.3)
    ax.set_yticks(y, it.index, fontsize=7)
    ax.invert_yaxis()
    fig.tight_layout()
    return fig


# ============================================================================ exercise checks
def _verdict():
    from cohw_utils.book.exercises import Verdict, compare

    return Verdict, compare


def spill_time(weight_bytes: float, hbm_free: float, hbm_bw: float, slow_bw: float) -> float:
    """Seconds to stream ``weight_bytes`` once when only ``hbm_free`` bytes of them fit in HBM
    and the rest stream from a slower tier concurrently: max(in HBM / hbm_bw, spilled / slow_bw)."""
    in_hbm = min(weight_bytes, max(hbm_free, 0.0))
    return max(in_hbm / hbm_bw, (weight_bytes - in_hbm) / slow_bw)


def check_spill_time(answer: float, weight_gb: float = 140.0, hbm_gb: float = 80.0, hbm_tbs: float = 3.35,
                     slow_gbs: float = 450.0) -> Any:
    """Chapter 5: time (s) to read ``weight_gb`` of weights once when ``hbm_gb`` of them sit
    in HBM at ``hbm_tbs`` and the rest in a slow tier at ``slow_gbs`` (tiers in parallel)."""
    Verdict, compare = _verdict()
    exp = spill_time(weight_gb * 1e9, hbm_gb * 1e9, hbm_tbs * 1e12, slow_gbs * 1e9)
    v = compare(answer, exp, "weight-streaming time (s)", 0.02)
    if not v.ok:
        serial = hbm_gb * 1e9 / (hbm_tbs * 1e12) + (weight_gb - hbm_gb) * 1e9 / (slow_gbs * 1e9)
        if abs(float(answer) / serial - 1) < 0.02:
            return Verdict(False, v.message + " That is the serial sum: the model lets the two tiers transfer at "
                           "the same time, so the time is the slower of the two.")
        if abs(float(answer) / (weight_gb * 1e9 / (hbm_tbs * 1e12)) - 1) < 0.02:
            return Verdict(False, v.message + " That is all weights at HBM speed: the spilled part streams from "
                           "the slow tier.")
    return v


def check_binding(answer: str, design: Accelerator, phase: PreparedPhase, **kw: Any) -> Any:
    """Chapter 5: which resource binds ``phase`` on ``design`` (one of :data:`RESOURCES`)?"""
    Verdict, _ = _verdict()
    r = evaluate(design, phase, **kw).iloc[0]
    shares = ", ".join(f"{x} {r[f'share_{x}']:.0%}" for x in RESOURCES if r[f"share_{x}"] > 0.005)
    if str(answer).strip().lower() == r["binding"].lower():
        return Verdict(True, f"{r['binding']} binds {phase.label} on {design.name} (time shares: {shares})")
    if str(answer).strip() not in RESOURCES:
        return Verdict(False, f"answer one of {', '.join(RESOURCES)}")
    return Verdict(False, f"not {answer}: the time shares by binding resource are {shares}")


def check_pareto(answer: Iterable[str], points: pd.DataFrame, columns: Sequence[str] = ("cost", "time")) -> Any:
    """Chapter 5: the names (index of ``points``) of the Pareto-optimal rows, every column in
    ``columns`` minimised."""
    Verdict, _ = _verdict()
    mask = pareto_mask(points[list(columns)].to_numpy())
    exp = set(points.index[mask])
    got = set(answer)
    if got == exp:
        return Verdict(True, f"the front is {sorted(exp)}")
    extra, miss = sorted(got - exp), sorted(exp - got)
    msg = []
    if extra:
        msg.append(f"{extra} {'is' if len(extra) == 1 else 'are'} dominated (another point is no worse in every "
                   "column and better in one)")
    if miss:
        msg.append(f"missing {miss}: nothing dominates {'it' if len(miss) == 1 else 'them'}")
    return Verdict(False, "; ".join(msg))
