"""This CPU's theoretical peak FLOP/s, computed from the instruction set it reports.

The spec-sheet peak of a CPU is a product of five facts, each read from the machine where it
can be and each labelled with where it came from (:class:`IsaPeak` carries them all)::

    peak = cores x clock (GHz) x FMA units per core x SIMD lanes for the dtype x 2

* **cores**: physical cores where the machine says (distinct ``(physical id, core id)`` pairs in
  ``/proc/cpuinfo``, else ``lscpu``'s sockets x cores per socket), else logical CPUs, and the
  result says which. In a virtual machine "physical" is the topology the hypervisor shows.
* **clock**: ``lscpu``'s ``CPU max MHz`` (the highest clock the cpufreq driver reports, boost
  included) where present, else the largest ``cpu MHz`` in ``/proc/cpuinfo`` (the current clock
  on bare metal, the nominal TSC rate in most VMs, below the boost clock: a measured rate can
  then exceed this "peak", and the result says so). Pass ``ghz=`` to override.
* **FMA units per core**: not in any flag, so a stated assumption per microarchitecture family
  (:func:`fma_units_for`): 2 for AVX2 and AVX-512 server cores (Intel Haswell onward, Xeon
  Scalable Gold 6xxx/Platinum; AMD Zen 2/3 at 256 bits; AMD Zen 5 at 512 bits), 1 where 512-bit
  instructions are split over two 256-bit halves (AMD Zen 4), 1 for Zen 1's 128-bit pipes at
  256 bits; default 2. Override with ``fma_units=`` (e.g. 1 for a Xeon Silver or Gold 5xxx).
* **SIMD lanes** from the ``flags`` line: ``avx512f`` -> 512-bit vectors, ``avx2`` -> 256,
  anything else -> 128 (SSE2 or NEON). fp64 lanes = bits / 64, fp32 = bits / 32.
  **bf16** counts only where the CPU has bf16 arithmetic: ``amx_bf16`` -> Intel AMX, taken
  as 1024 bf16 FLOP per cycle per core (Intel's figure for one AMX unit; the assumption is
  labelled, and it replaces the FMA x lanes product); else ``avx512_bf16`` -> ``VDPBF16PS``,
  a pair of bf16 products per fp32 lane, so bits / 16 lanes, assumed to issue at the FMA
  rate; else no bf16 peak (``None`` with the reason: torch converts to fp32).
* **x 2**: one FMA is two FLOPs.

A fact that cannot be read gives ``flops=None`` with the reason, never a silent 0. Bad
overrides and unknown dtypes raise :class:`~cohw_utils.core.errors.HardwareError`.

Used by Chapter 4.3 (the matmul ladder's "% of peak") and Chapter 4.1-4.2 (the host roofline's
spec figure beside the probed one).
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cohw_utils.core.errors import HardwareError

#: The dtypes an ISA peak is computed for.
ISA_DTYPES: tuple[str, ...] = ("fp64", "fp32", "bf16")
#: FMA units per core where the family is not in the table.
DEFAULT_FMA_UNITS = 2
#: bf16 FLOP per cycle per core of one Intel AMX unit (TDPBF16PS; Intel's stated AMX figure).
AMX_BF16_FLOP_PER_CYCLE = 1024


@dataclass(frozen=True)
class CpuFacts:
    """What the machine says about its CPU (``None`` where it does not say)."""

    vendor: str
    model_name: str
    family: int | None
    model: int | None
    flags: frozenset[str]
    logical_cpus: int | None
    physical_cores: int | None
    mhz: float | None
    mhz_source: str


def _cpuinfo_text() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _lscpu_text() -> str:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5, check=True,
                              env={**os.environ, "LC_ALL": "C"}).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _fields(text: str) -> list[dict[str, str]]:
    """``key: value`` lines, one dict per blank-line separated block."""
    blocks: list[dict[str, str]] = [{}]
    for line in text.splitlines():
        if not line.strip():
            if blocks[-1]:
                blocks.append({})
            continue
        if ":" in line:
            key, _, value = line.partition(":")
            blocks[-1].setdefault(key.strip().lower(), value.strip())
    return [b for b in blocks if b]


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def read_cpu_facts(cpuinfo: str | None = None, lscpu: str | None = None) -> CpuFacts:
    """This machine's CPU facts from ``/proc/cpuinfo`` and ``lscpu`` (pass their text to parse
    another machine's, as the tests do)."""
    cpuinfo = _cpuinfo_text() if cpuinfo is None else cpuinfo
    lscpu = _lscpu_text() if lscpu is None else lscpu
    procs = [b for b in _fields(cpuinfo) if "processor" in b]
    ls = _fields(lscpu)[0] if _fields(lscpu) else {}
    first = procs[0] if procs else {}
    flags = frozenset((first.get("flags") or ls.get("flags") or first.get("features") or "").split())
    pairs = {(b.get("physical id", "0"), b["core id"]) for b in procs if "core id" in b}
    physical: int | None = len(pairs) or None
    if physical is None and ls.get("core(s) per socket") and ls.get("socket(s)"):
        cps, sockets = _number(ls["core(s) per socket"]), _number(ls["socket(s)"])
        physical = int(cps * sockets) if cps and sockets else None
    logical = len(procs) or (int(_number(ls.get("cpu(s)")) or 0) or None)
    max_mhz = _number(ls.get("cpu max mhz"))
    cur = [m for m in (_number(b.get("cpu mhz")) for b in procs) if m]
    if max_mhz:
        mhz, source = max_mhz, "lscpu 'CPU max MHz'"
    elif cur:
        mhz, source = max(cur), ("/proc/cpuinfo 'cpu MHz' (no 'CPU max MHz' from lscpu: this is the "
                                 "current or, in a VM, the nominal clock; boost clocks are higher)")
    else:
        mhz, source = None, "no clock: lscpu has no 'CPU max MHz' and /proc/cpuinfo no 'cpu MHz'"
    family = _number(first.get("cpu family") or ls.get("cpu family"))
    model = _number(first.get("model") or ls.get("model"))
    return CpuFacts(vendor=first.get("vendor_id") or ls.get("vendor id") or "unknown",
                    model_name=first.get("model name") or ls.get("model name") or "unknown CPU",
                    family=int(family) if family is not None else None,
                    model=int(model) if model is not None else None, flags=flags,
                    logical_cpus=logical, physical_cores=physical, mhz=mhz, mhz_source=source)


def vector_bits(flags: frozenset[str] | set[str]) -> int:
    """Widest SIMD register the flags advertise: 512 (avx512f), 256 (avx2), else 128."""
    return 512 if "avx512f" in flags else 256 if "avx2" in flags else 128


def fma_units_for(facts: CpuFacts) -> tuple[int, str]:
    """(FMA units per core at the widest vector width, the assumption that gave it)."""
    wide = vector_bits(facts.flags)
    amd, intel = facts.vendor == "AuthenticAMD", facts.vendor == "GenuineIntel"
    if amd and facts.family == 0x1A:
        return 2, "assumed: AMD Zen 5 (family 0x1A), two 512-bit FMA pipes (server/desktop parts)"
    if amd and facts.family == 0x19 and wide == 512:
        return 1, "assumed: AMD Zen 4 (family 0x19 with AVX-512), 512-bit ops run on two 256-bit FMA halves"
    if amd and facts.family == 0x19:
        return 2, "assumed: AMD Zen 3 (family 0x19), two 256-bit FMA pipes"
    if amd and facts.family == 0x17:
        if (facts.model or 0) >= 0x30:
            return 2, "assumed: AMD Zen 2 (family 0x17, model >= 0x30), two 256-bit FMA pipes"
        return 1, "assumed: AMD Zen 1 (family 0x17), two 128-bit FMA pipes = one 256-bit FMA per cycle"
    if intel and wide == 512:
        return 2, ("assumed: Intel AVX-512 server core with two 512-bit FMA units (Xeon Scalable Gold "
                   "6xxx/Platinum and later); Silver/Bronze/Gold 5xxx and client cores have one: pass fma_units=1")
    if intel and wide == 256:
        return 2, "assumed: Intel AVX2 core (Haswell or later), two 256-bit FMA units"
    return DEFAULT_FMA_UNITS, f"assumed: the default of {DEFAULT_FMA_UNITS} (family not in the table)"


@dataclass(frozen=True)
class IsaPeak:
    """One dtype's ISA peak and the facts it is the product of (``flops`` None: see ``reason``)."""

    dtype: str
    flops: float | None
    reason: str | None
    cores: int | None
    cores_kind: str
    ghz: float | None
    ghz_source: str
    fma_units: int
    fma_source: str
    vector_bits: int
    lanes: float | None
    lanes_source: str
    flop_per_cycle_per_core: float | None

    def implied_ghz(self, rate: float) -> float | None:
        """The clock (GHz) at which a measured ``rate`` (FLOP/s) would be exactly this peak: a
        rate above the peak means the cores ran faster than ``ghz`` (boost), or that an assumed
        FMA count or lane width is too low."""
        if self.flop_per_cycle_per_core is None or not self.cores:
            return None
        return rate / (self.cores * self.flop_per_cycle_per_core * 1e9)

    def describe(self) -> str:
        """``fp64: 166.1 GFLOP/s = 2 physical cores x 2.596 GHz x 2 FMA x 8 lanes x 2 (...)``."""
        if self.flops is None:
            return f"{self.dtype}: no ISA peak ({self.reason})"
        if self.lanes is None:  # AMX: a per-core rate, not FMA x lanes
            core = f"{self.flop_per_cycle_per_core:.0f} FLOP/cycle"
        else:
            core = f"{self.fma_units} FMA x {self.lanes:g} lanes x 2"
        return (f"{self.dtype}: {self.flops / 1e9:.1f} GFLOP/s = {self.cores} {self.cores_kind} cores x "
                f"{self.ghz:.3f} GHz x {core} (clock: {self.ghz_source}; FMA: {self.fma_source}; "
                f"lanes: {self.lanes_source})")


def isa_peak(dtype: str, facts: CpuFacts | None = None, *, cores: int | None = None,
             ghz: float | None = None, fma_units: int | None = None) -> IsaPeak:
    """The theoretical peak of ``dtype`` (``'fp64'``, ``'fp32'``, ``'bf16'``) on this CPU (or
    ``facts``); ``cores``, ``ghz`` and ``fma_units`` override what the machine says."""
    if dtype not in ISA_DTYPES:
        raise HardwareError(f"no ISA peak rule for dtype {dtype!r}; use one of {', '.join(ISA_DTYPES)}")
    for name, value in (("cores", cores), ("ghz", ghz), ("fma_units", fma_units)):
        if value is not None and not (isinstance(value, (int, float)) and value > 0):
            raise HardwareError(f"{name} must be a positive number, got {value!r}; leave it None to read the machine")
    facts = facts or read_cpu_facts()
    if cores is not None:
        n_cores, kind = int(cores), "given"
    elif facts.physical_cores:
        n_cores, kind = facts.physical_cores, "physical"
    elif facts.logical_cpus:
        n_cores, kind = facts.logical_cpus, "logical (physical count unknown)"
    else:
        n_cores, kind = None, "unknown"
    clock = float(ghz) if ghz is not None else (facts.mhz / 1e3 if facts.mhz else None)
    clock_source = "given" if ghz is not None else facts.mhz_source
    units, units_source = (int(fma_units), "given") if fma_units is not None else fma_units_for(facts)
    bits = vector_bits(facts.flags)
    width = f"{bits}-bit vectors from the cpuinfo flags ({'avx512f' if bits == 512 else 'avx2' if bits == 256 else 'no avx2/avx512f'})"
    lanes: float | None
    per_cycle: float | None
    reason = None
    if dtype == "fp64":
        lanes, lanes_source = bits / 64, f"{width}, 64-bit lanes"
    elif dtype == "fp32":
        lanes, lanes_source = bits / 32, f"{width}, 32-bit lanes"
    elif "amx_bf16" in facts.flags:
        lanes, lanes_source = None, (f"amx_bf16 flag: assumed {AMX_BF16_FLOP_PER_CYCLE} bf16 FLOP per cycle per "
                                     "core (one Intel AMX unit), instead of FMA units x lanes")
    elif "avx512_bf16" in facts.flags:
        lanes, lanes_source = bits / 16, (f"{width}; avx512_bf16 flag: VDPBF16PS does two bf16 products per fp32 "
                                          "lane, assumed to issue at the FMA rate")
    else:
        lanes, lanes_source = None, "no avx512_bf16 or amx_bf16 flag"
        reason = "this CPU has no bf16 arithmetic instructions (no avx512_bf16/amx_bf16): torch converts to fp32"
    if reason is None:
        per_cycle = AMX_BF16_FLOP_PER_CYCLE if lanes is None else units * lanes * 2
    else:
        per_cycle = None
    if reason is None and n_cores is None:
        reason = "the core count is unknown (no /proc/cpuinfo or lscpu); pass cores="
    if reason is None and clock is None:
        reason = f"{clock_source}; pass ghz="
    flops = n_cores * clock * 1e9 * per_cycle if reason is None else None
    return IsaPeak(dtype=dtype, flops=flops, reason=reason, cores=n_cores, cores_kind=kind, ghz=clock,
                   ghz_source=clock_source, fma_units=units, fma_source=units_source, vector_bits=bits,
                   lanes=lanes, lanes_source=lanes_source, flop_per_cycle_per_core=per_cycle)


def isa_peaks(facts: CpuFacts | None = None, **overrides: float | int | None) -> dict[str, IsaPeak]:
    """:func:`isa_peak` for every dtype of :data:`ISA_DTYPES` (same overrides for each)."""
    facts = facts or read_cpu_facts()
    return {d: isa_peak(d, facts, **overrides) for d in ISA_DTYPES}
