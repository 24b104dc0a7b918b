"""The parametric accelerator of the co-design loop and its silicon-area cost proxy.

The design (:class:`Accelerator`)
---------------------------------
Units are SI per chip: FLOP/s, bytes, bytes/s.

* ``peak_flops``: dense peak per dtype key (``fp32`` is the vector-unit rate every
  non-contraction op runs at, as in :mod:`cohw_utils.views.roofline`; ``fp16``/``bf16``/``fp8``/
  ``int8``/``int4`` the matrix units). :func:`make_accelerator` derives them from one 16-bit
  peak and a set of formats: fp32 = 1/16, tf32 = 1/2, fp8 and int8 = 2x, int4 = 4x the 16-bit
  peak (:data:`FORMAT_X`). These are ratios of dense tensor-core figures, but of no single
  generation: int8 = 2x holds from Ampere to Blackwell, fp8 = 2x from Hopper on, and int4 = 4x
  is Ampere's alone (A100: 1,248 INT4 TOPS dense beside 312 FP16 TFLOP/s); Hopper has no INT4
  rate and Blackwell's 4-bit matrix format is FP4. :func:`format_rates` tabulates each catalog
  chip's own ratios, so a design with int4 reads as the what-if it is.
* Memory tiers (:data:`TIERS`), fastest first: **SRAM** (on-chip, ``sram_bytes``/``sram_bw``),
  **HBM** (``hbm_bytes``/``hbm_bw``; 0 bytes makes an SRAM-only, Cerebras-like design whose main
  memory is the SRAM), a **slow tier** (LPDDR/CXL: ``slow_bytes``/``slow_bw``, see
  :data:`SLOW_TIERS`) and the **host** (host DRAM or SSD behind a link of ``link_bw``,
  unlimited capacity). :data:`RESOURCES` names what can bind an op: compute or one of the tiers.
* ``matrix_unit``: ``None`` (the roofline's ideal matrix peak) or ``(rows, cols)`` of a
  weight-stationary systolic array; then every forward contraction runs at the array's
  utilization from :mod:`cohw_utils.views.systolic` (padding, one fill and drain, and
  double-buffered weight loads included).
* ``weight_bits``: the narrowest weight format the datapath reads natively (16, 8 or 4),
  from the formats it has.

:func:`from_hardware` turns a catalog chip (``hardware.csv``) into a design point,
:func:`sram_only` builds a wafer-scale-like one, :func:`fit_area` rescales the compute of a
design to a fixed package area.

Cost proxy (:class:`CostModel`)
-------------------------------
Silicon area in mm^2 at a 4/5 nm-class node, linear in each resource: a fixed part, compute per
dense 16-bit TFLOP/s (plus a fraction for each narrow format), SRAM per MB, PHY and controller
area per TB/s of each off-chip interface, and the interposer footprint of the HBM stacks the
design needs for its capacity or its bandwidth, whichever needs more. No die can exceed the
lithography reticle (26 x 33 mm = 858 mm^2): a design whose logic needs more is split into
``ceil(logic / reticle)`` dies joined by die-to-die interfaces, each of which costs area on both
sides (as B200's two reticle-sized dies are); ``dies`` in :meth:`CostModel.breakdown`. Every
coefficient is a labelled assumption (see :data:`COST_SOURCES`); the compute coefficient is
calibrated so that the H100-SXM design point's die is GH100's published 814 mm^2. Package area
= die + HBM footprint is the cost the sweeps use.

Used by Chapter 5 (the co-design loop).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cohw_utils.core.dtypes import dtype_name
from cohw_utils.core.errors import CohwError
from cohw_utils.hardware import Hardware, get_hardware
from cohw_utils.hardware.specs import VENDOR_GB

__all__ = ["TIERS", "RESOURCES", "SLOW_TIERS", "HOST_LINKS", "SRAM_BW_X", "GH100_DIE_MM2", "COST_SOURCES",
           "FORMAT_X", "INT4_TOPS", "CostModel", "Accelerator", "make_accelerator", "from_hardware", "sram_only",
           "fit_area", "format_rates"]

#: Memory tiers, fastest first, and the resources that can bind an op.
TIERS = ("sram", "hbm", "slow", "host")
RESOURCES = ("compute", "SRAM", "HBM", "slow tier", "link")

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
    "reticle_mm2": "the 26 mm x 33 mm exposure field of DUV and 0.33-NA EUV scanners (858 mm^2): the largest "
                   "die one exposure prints",
    "d2d_mm2": "assumption: 40 mm^2 of die-to-die PHY per die boundary (both sides together)",
}


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
    reticle_mm2: float = 858.0
    d2d_mm2: float = 40.0

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
        """Area by part (mm^2): base, compute, formats, sram, hbm_phy, slow_phy, link_phy; then
        ``dies`` (count: the logic over the reticle, rounded up), ``d2d`` (die-to-die PHY,
        ``(dies - 1) x d2d_mm2``) and ``die`` (all silicon: logic + d2d); then hbm_stacks (count),
        hbm_footprint and package (= die + footprint)."""
        m = self.calibrated()
        c = m.mm2_per_tflops * d.peak16 / 1e12
        parts = {"base": m.base_mm2, "compute": c,
                 "formats": c * sum(m.format_area.get(f, 0.0) for f in d.formats),
                 "sram": m.mm2_per_mb_sram * d.sram_bytes / 2**20,
                 "hbm_phy": m.mm2_per_tbs_hbm * d.hbm_bw / 1e12,
                 "slow_phy": m.mm2_per_tbs_slow * d.slow_bw / 1e12,
                 "link_phy": m.mm2_per_tbs_link * d.link_bw / 1e12}
        logic = sum(parts.values())
        parts["dies"] = max(1, math.ceil(logic / m.reticle_mm2 - 1e-9))
        parts["d2d"] = (parts["dies"] - 1) * m.d2d_mm2
        parts["die"] = logic + parts["d2d"]
        parts["hbm_stacks"] = max(d.hbm_bytes / VENDOR_GB / m.hbm_stack_gb, d.hbm_bw / 1e12 / m.hbm_stack_tbs)
        parts["hbm_footprint"] = m.hbm_stack_mm2 * parts["hbm_stacks"]
        parts["package"] = parts["die"] + parts["hbm_footprint"]
        return parts


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
    tdp_w: float | None = None  # power cap (W); None: the power model's default cap

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
        if self.tdp_w is not None and not (math.isfinite(self.tdp_w) and self.tdp_w > 0):
            raise CohwError(f"design {self.name!r}: tdp_w = {self.tdp_w!r} must be a positive power in W, or None")
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
        """Peak for a dtype key; fp64 falls back to fp32 as in the roofline, and bf16 to fp16 on a
        part without bf16 units (a V100 runs a bf16-published model in fp16: same 2 bytes)."""
        if key in self.peak_flops:
            return float(self.peak_flops[key])
        if key == "fp64":
            return float(self.peak_flops["fp32"])
        if key == "bf16" and "fp16" in self.peak_flops:
            return float(self.peak_flops["fp16"])
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
                        tdp_w=self.tdp_w, source=self.source)

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


#: Matrix-peak multiples of the 16-bit peak for a parametric design (dense ratios; int4's is
#: Ampere's only, see the module docstring and :func:`format_rates`).
FORMAT_X: dict[str, float] = {"fp32": 1 / 16, "tf32": 0.5, "fp16": 1.0, "bf16": 1.0, "fp8": 2.0, "int8": 2.0, "int4": 4.0}


def make_accelerator(name: str, tflops16: float, hbm_gb: float, hbm_tbs: float, sram_mb: float,
                     formats: Iterable[str] = ("fp8", "int8"), sram_tbs: float | None = None,
                     slow: str | None = None, link_gbs: float = 63.0,
                     matrix_unit: tuple[int, int] | None = None, tdp_w: float | None = None) -> Accelerator:
    """A design from headline numbers: dense 16-bit TFLOP/s, HBM GB (a vendor's binary GB, as
    ``hardware.csv``: x 2**30 bytes) and TB/s, SRAM MB (MiB),
    narrow formats, SRAM TB/s (default :data:`SRAM_BW_X` x HBM), an optional slow tier from
    :data:`SLOW_TIERS`, the host link in GB/s and a power cap in W (None: the power model's)."""
    bad = set(formats) - {"fp8", "int8", "int4"}
    if bad:
        raise CohwError(f"unknown formats {sorted(bad)}; a design can add fp8, int8, int4")
    if tflops16 <= 0:
        raise CohwError(f"tflops16 must be > 0, got {tflops16}")
    peak = {k: tflops16 * 1e12 * x for k, x in FORMAT_X.items() if k not in ("fp8", "int8", "int4")}
    peak.update({f: tflops16 * 1e12 * FORMAT_X[f] for f in formats})
    slow_bytes = slow_bw = 0.0
    if slow is not None:
        if slow not in SLOW_TIERS:
            raise CohwError(f"unknown slow tier {slow!r}; use one of {', '.join(SLOW_TIERS)} or None")
        slow_bytes, slow_bw = SLOW_TIERS[slow][:2]
    sram_bw = (sram_tbs * 1e12) if sram_tbs is not None else SRAM_BW_X * hbm_tbs * 1e12
    return Accelerator(name=name, peak_flops=peak, sram_bytes=sram_mb * 2**20, sram_bw=sram_bw,
                       hbm_bytes=hbm_gb * VENDOR_GB, hbm_bw=hbm_tbs * 1e12, slow_bytes=slow_bytes,
                       slow_bw=slow_bw, link_bw=link_gbs * 1e9, matrix_unit=matrix_unit,
                       slow_kind=slow or "", tdp_w=tdp_w)


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
                       year=h.year, source=h.source, tdp_w=h.tdp_w)


def sram_only(name: str = "SRAM-only (WSE-3-like)", tflops16: float = 1000.0, sram_gb: float = 44.0,
              sram_pbs: float = 21.0, formats: Iterable[str] = ("fp8", "int8"), link_gbs: float = 63.0) -> Accelerator:
    """An SRAM-only, Cerebras-like design: weights resident on chip across many cores, no HBM.
    Defaults: Cerebras WSE-3's published 44 GB of SRAM at 21 PB/s, with the compute of the
    H100-class point (1000 dense 16-bit TFLOP/s) so that the comparison isolates memory."""
    d = make_accelerator(name, tflops16, hbm_gb=0.0, hbm_tbs=0.0, sram_mb=sram_gb * 1e9 / 2**20,
                         formats=formats, sram_tbs=sram_pbs * 1e3, link_gbs=link_gbs)
    return d.replace(source="Cerebras WSE-3 memory figures (44 GB SRAM, 21 PB/s); compute as the H100-class point")


def fit_area(d: Accelerator, package_mm2: float, cost: CostModel | None = None, name: str | None = None) -> Accelerator:
    """``d`` with every peak scaled so that its package area is ``package_mm2``: how much
    compute the rest of the design leaves room for at a fixed budget. The die count follows the
    compute (the reticle limit): the first count whose die-to-die area leaves compute that
    needs exactly that many dies is used."""
    m = (cost or CostModel()).calibrated()
    b = m.breakdown(d)
    scaled = b["compute"] + b["formats"]
    rest = b["package"] - scaled - b["d2d"]          # neither compute nor die-to-die PHY
    logic_rest = b["die"] - b["d2d"] - scaled        # the rest's share of the logic silicon
    for dies in range(1, 1025):
        room = package_mm2 - rest - (dies - 1) * m.d2d_mm2
        if room <= 0:
            break
        if max(1, math.ceil((logic_rest + room) / m.reticle_mm2 - 1e-9)) == dies:
            s = room / scaled
            return d.replace(peak_flops={k: v * s for k, v in d.peak_flops.items()}, name=name or d.name)
    raise CohwError(f"{package_mm2:.0f} mm^2 does not even cover {d.name}'s non-compute area "
                    f"({rest + b['d2d']:.0f} mm^2)")


#: Dense INT4 tensor-core rates (ops/s) where a catalog chip has one; hardware.csv has no int4
#: column because only Ampere among its chips prints one.
INT4_TOPS: dict[str, tuple[float, str]] = {
    "A100-40GB": (1248e12, "NVIDIA A100 Tensor Core GPU datasheet: INT4 Tensor Core 1,248 TOPS | 2,496 TOPS "
                           "(dense | 2:4 sparse)"),
    "A100-80GB": (1248e12, "NVIDIA A100 Tensor Core GPU datasheet: INT4 Tensor Core 1,248 TOPS | 2,496 TOPS "
                           "(dense | 2:4 sparse)"),
}


def format_rates(chips: Iterable[str | Hardware]) -> "pd.DataFrame":
    """Each chip's narrow-format matrix rates as multiples of its dense 16-bit peak (fp8, int8
    from ``hardware.csv``; int4 from :data:`INT4_TOPS`), NaN where the chip has no such rate,
    beside :data:`FORMAT_X`'s parametric ratios (row ``parametric design``)."""
    import pandas as pd

    rows = []
    for c in chips:
        h = get_hardware(c) if isinstance(c, str) else c
        p16 = h.peak_flops.get("bf16", h.peak_flops.get("fp16"))
        row = {"chip": h.name, "year": h.year}
        for f in ("fp8", "int8"):
            row[f] = h.peak_flops[f] / p16 if (f in h.peak_flops and p16) else float("nan")
        row["int4"] = INT4_TOPS[h.name][0] / p16 if h.name in INT4_TOPS and p16 else float("nan")
        rows.append(row)
    rows.append({"chip": "parametric design", "year": None, **{f: FORMAT_X[f] for f in ("fp8", "int8", "int4")}})
    return pd.DataFrame(rows).set_index("chip")
