"""Accelerator specifications: peak throughput, memory bandwidth, capacity and cache.

Units and semantics (everything here is SI, per second, per chip):

* ``Hardware.peak_flops[dtype]``: **dense** peak throughput in FLOP/s (operations per second
  for ``int8``), for a matrix multiply in that dtype, as the vendor's spec sheet or whitepaper
  states it. Figures NVIDIA prints "with sparsity" (2:4 structured sparsity) are halved in the
  data file, and the row's ``notes`` says so. Keys are ``'fp64', 'fp32', 'tf32', 'fp16',
  'bf16', 'fp8', 'int8'``; a dtype the chip has no figure for is absent (not zero).
* ``Hardware.mem_bw``: peak off-chip (HBM) bandwidth in bytes/s (1 GB/s = 1e9 bytes/s).
* ``Hardware.mem_bytes``: the vendor's capacity in bytes, ``memory_gb x 2**30``
  (:data:`VENDOR_GB`). **Units convention of the book**: memory vendors' "GB" of DRAM is binary
  (DRAM dies hold 2^n bits: an H100's "80 GB" is five 16 GiB HBM3 stacks), so a capacity is
  converted once, here, and everything the book prints is SI: 1 GB = 1e9 bytes, 1 GB/s = 1e9
  bytes/s. An H100-SXM thus holds 85.9 GB, and a model "fits" against that. (Until the units
  issue this was ``x 1e9``, which understated every capacity by 7.4%.) Bandwidths are SI as
  printed by the vendors; on-chip SRAM and caches are binary (MiB x 2**20).
* ``Hardware.llc_bytes``: last-level on-chip cache in bytes (MiB x 2**20), or ``None`` where
  the vendor does not publish it.
* ``Hardware.ridge_point(dtype)``: peak FLOP/s / bandwidth, in FLOP per byte: the arithmetic
  intensity above which a kernel can be compute-bound on that chip (the roofline's knee).
* ``Hardware.sector_bytes``: the smallest unit, in bytes, in which the chip moves data between
  its last-level cache and DRAM: 32 on NVIDIA GPUs since compute capability 6.0 (CUDA C++ Best
  Practices Guide, "Coalesced Access to Global Memory": a warp's accesses coalesce into 32-byte
  transactions), 32 on MI300X (the smallest L2-to-HBM read request, ROCm performance-counter
  docs), 64 on a CPU (one cache line). The tracer rounds gathers and scattered writes up to it:
  ``trace(..., sector_bytes=hw.sector_bytes)`` (:mod:`cohw_utils.spine.costs`). An empty CSV cell
  (or a CSV without the column) means :data:`DEFAULT_SECTOR_BYTES`.

The table lives in ``cohw_utils/data/hardware.csv`` (see ``cohw_utils/data/README.md``); the
special name ``'host'`` is this machine, measured by :mod:`cohw_utils.hardware.probe`.

Used by Chapters 2, 4.1-4.4 and 5, through :func:`cohw_utils.hardware.get_hardware`.
"""
from __future__ import annotations

import functools
import math
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cohw_utils.core.dtypes import dtype_name
from cohw_utils.core.errors import CohwError, HardwareError
from cohw_utils.core.data import DATA_DIR

#: Sector size assumed where a chip's is not stated: 32 bytes, NVIDIA's DRAM access granularity
#: (CUDA C++ Best Practices Guide, "Coalesced Access to Global Memory").
DEFAULT_SECTOR_BYTES = 32

#: The dtype keys of ``Hardware.peak_flops``, in display order.
DTYPES: tuple[str, ...] = ("fp64", "fp32", "tf32", "fp16", "bf16", "fp8", "int8")

#: CSV column holding each dtype's dense peak, in TFLOP/s (TOPS for int8).
_DTYPE_COLUMNS: dict[str, str] = {
    "fp64": "fp64_tflops",
    "fp32": "fp32_tflops",
    "tf32": "tf32_tflops",
    "fp16": "fp16_tflops",
    "bf16": "bf16_tflops",
    "fp8": "fp8_tflops",
    "int8": "int8_tops",
}

_REQUIRED_TEXT = ("name", "vendor", "source")
#: Bytes in one vendor "GB" of DRAM capacity (binary, see the module docstring).
VENDOR_GB = 2**30
_REQUIRED_NUMBERS = ("year", "memory_gb", "mem_bw_gbs")
_OPTIONAL_NUMBERS = ("llc_mib", "tdp_w", *_DTYPE_COLUMNS.values())
_COLUMNS = (*_REQUIRED_TEXT, "memory_type", "notes", *_REQUIRED_NUMBERS, *_OPTIONAL_NUMBERS)


def dtype_key(dtype: Any) -> str:
    """Package-wide short name (``'bf16'``, ...) of a string or ``torch.dtype``.

    ``torch.bfloat16 -> 'bf16'``, ``torch.float32 -> 'fp32'``, ``'half' -> 'fp16'``; the
    spelling rules are :func:`cohw_utils.core.dtypes.dtype_name`'s. Raises :class:`HardwareError`
    for a dtype the package does not know.
    """
    try:
        return dtype_name(dtype)
    except CohwError as err:
        raise HardwareError(str(err)) from None


@dataclass(frozen=True)
class Hardware:
    """One accelerator (or this host). Units: see the module docstring.

    ``peak_flops`` maps dtype keys to dense FLOP/s; ``mem_bw`` is bytes/s; ``mem_bytes`` and
    ``llc_bytes`` are bytes; ``tdp_w`` is watts. ``None`` means "not published/measured".
    ``sector_bytes`` is the DRAM access granularity in bytes (default
    :data:`DEFAULT_SECTOR_BYTES`; a CPU host should pass 64, its cache line).
    """

    name: str
    vendor: str
    year: int | None
    peak_flops: dict[str, float] = field(hash=False)
    mem_bw: float
    mem_bytes: float | None
    llc_bytes: float | None
    tdp_w: float | None
    source: str
    notes: str = ""
    memory_type: str = ""
    sector_bytes: int = DEFAULT_SECTOR_BYTES

    def peak(self, dtype: Any) -> float:
        """Dense peak throughput for ``dtype`` in FLOP/s (ops/s for int8).

        Accepts ``'bf16'``-style keys and torch dtypes. Raises :class:`HardwareError`,
        listing the dtypes this chip has, when it has no figure for ``dtype``.
        """
        key = dtype_key(dtype)
        try:
            return self.peak_flops[key]
        except KeyError:
            have = ", ".join(d for d in DTYPES if d in self.peak_flops) or "none"
            raise HardwareError(
                f"{self.name} has no {key} peak figure; it has: {have}"
            ) from None

    def ridge_point(self, dtype: Any) -> float:
        """Peak FLOP/s in ``dtype`` divided by memory bandwidth: FLOP per byte."""
        return self.peak(dtype) / self.mem_bw


def _default_csv() -> Path:
    return DATA_DIR / "hardware.csv"


def _bad(path: Path, line: int, name: str, column: str, value: object, why: str) -> HardwareError:
    return HardwareError(
        f"{path}: line {line} (row {name or '?'!s}): field '{column}' = {value!r} {why}; "
        "fix the row in the hardware CSV"
    )


def _row_to_hardware(path: Path, line: int, row: pd.Series, numbers: pd.Series) -> Hardware:
    """Validate one CSV row (text in ``row``, coerced numbers in ``numbers``) into Hardware."""
    name = row["name"].strip()
    for column in _REQUIRED_TEXT:
        if not row[column].strip():
            raise _bad(path, line, name, column, row[column], "is empty")
    for column in (*_REQUIRED_NUMBERS, *_OPTIONAL_NUMBERS):
        raw, value = row[column].strip(), numbers[column]
        if column in _REQUIRED_NUMBERS and not raw:
            raise _bad(path, line, name, column, raw, "is empty")
        if raw and not (math.isfinite(value) and value > 0):
            raise _bad(path, line, name, column, raw, "is not a positive number")
    peak = {d: float(numbers[c]) * 1e12 for d, c in _DTYPE_COLUMNS.items() if row[c].strip()}
    if not peak:
        raise _bad(path, line, name, "fp32_tflops", "", "and every other peak column is empty")

    def optional(column: str, scale: float) -> float | None:
        return float(numbers[column]) * scale if row[column].strip() else None

    sector = DEFAULT_SECTOR_BYTES
    raw_sector = str(row.get("sector_bytes", "")).strip()
    if raw_sector:
        value = pd.to_numeric(raw_sector, errors="coerce")
        if not (math.isfinite(value) and value > 0 and float(value).is_integer()):
            raise _bad(path, line, name, "sector_bytes", raw_sector,
                       "is not a positive whole number of bytes")
        sector = int(value)

    return Hardware(
        name=name,
        vendor=row["vendor"].strip(),
        year=int(numbers["year"]),
        peak_flops=peak,
        mem_bw=float(numbers["mem_bw_gbs"]) * 1e9,
        mem_bytes=float(numbers["memory_gb"]) * VENDOR_GB,
        llc_bytes=optional("llc_mib", 2.0**20),
        tdp_w=optional("tdp_w", 1.0),
        source=row["source"].strip(),
        notes=row["notes"].strip(),
        memory_type=row["memory_type"].strip(),
        sector_bytes=sector,
    )


@functools.lru_cache(maxsize=8)
def _load(path: Path) -> dict[str, Hardware]:
    try:
        text = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (OSError, pd.errors.ParserError) as err:
        raise HardwareError(f"cannot read hardware CSV {path}: {err}") from None
    missing = [c for c in _COLUMNS if c not in text.columns]
    if missing:
        raise HardwareError(f"{path}: missing column(s) {', '.join(missing)}")
    numeric = [*_REQUIRED_NUMBERS, *_OPTIONAL_NUMBERS]
    numbers = text[numeric].apply(pd.to_numeric, errors="coerce")
    table: dict[str, Hardware] = {}
    for i in range(len(text)):
        line = i + 2  # 1-based, after the header line
        hw = _row_to_hardware(path, line, text.iloc[i], numbers.iloc[i])
        if hw.name.lower() in {k.lower() for k in table} or hw.name.lower() == "host":
            raise _bad(path, line, hw.name, "name", hw.name, "is a duplicate or reserved name")
        table[hw.name] = hw
    return table


def load_hardware(path: str | Path | None = None) -> dict[str, Hardware]:
    """All rows of the hardware CSV (default: the packaged one), keyed by name.

    Validates every row; a malformed one raises :class:`HardwareError` naming the file, line,
    row and field. Parsed tables are cached per path; the returned dict is a fresh copy.
    """
    resolved = Path(path).expanduser().resolve() if path is not None else _default_csv()
    return dict(_load(resolved))


def scaled(hw: Hardware, bandwidth: float = 1.0, capacity: float = 1.0, flops: float = 1.0,
           name: str | None = None) -> Hardware:
    """``hw`` with its memory bandwidth, capacity and every peak multiplied (same vendor, so the
    same calibration applies): a what-if chip."""
    label = name or hw.name + "".join(f" {k} x{v:g}" for k, v in
                                      (("BW", bandwidth), ("capacity", capacity), ("FLOP/s", flops)) if v != 1.0)
    return dataclasses.replace(hw, name=label, mem_bw=hw.mem_bw * bandwidth, mem_bytes=hw.mem_bytes * capacity,
                               peak_flops={k: v * flops for k, v in hw.peak_flops.items()})
