"""Measure this machine: peak GEMM throughput and streaming memory bandwidth, with torch.

What is measured (all rates per second, SI: 1 GFLOP/s = 1e9 FLOP/s, 1 GB/s = 1e9 bytes/s):

* **GEMM**: ``torch.matmul(a, b, out=c)`` on square n x n matrices in fp32 and bf16, for a few
  n. One call counts ``2 * n**3`` FLOPs (one multiply and one add per inner-product term).
  Each size gets warm-up calls, then timed repeats (``time.perf_counter`` around one call);
  per size we keep best (max rate), median, min and max. The dtype's peak is the best rate
  over all sizes. A dtype torch cannot multiply on this CPU is recorded as ``None`` with the
  reason; larger sizes are skipped when the estimated time would blow the time budget.
* **Bandwidth**: float32 arrays far larger than the last-level cache (full mode: at least 8x
  the LLC and at least 256 MiB each; quick mode: 4x and 64 MiB). Three kernels, each counted
  two ways:

  ======  =============================  ================  ========================
  kernel  call                           STREAM bytes      write-allocate bytes
  ======  =============================  ================  ========================
  read    ``torch.sum(a)``               1 x array         1 x array
  copy    ``dst.copy_(src)``             2 x array         3 x array
  add     ``torch.add(a, b, out=c)``     3 x array         4 x array
  ======  =============================  ================  ========================

  The STREAM convention counts the bytes the kernel asks for. The write-allocate column adds
  one read of every destination line, which a write-back cache fetches before the store
  overwrites it: an *assumption* about x86 cores whose library kernels use ordinary
  (not non-temporal, streaming) stores; a kernel with non-temporal stores, or a core that
  skips the fetch for full-line writes, moves the STREAM bytes. The read kernel writes one
  scalar, so its two counts agree: it is the kernel that matches LLM decoding, which reads
  weights and KV cache and writes almost nothing. ``read_bw`` = the read kernel's best rate
  (the denominator of MBU, :mod:`cohw_utils.studies.performance.mbu`); ``mem_bw`` = the best
  STREAM-convention rate of copy and add (the host roofline's bandwidth, as in STREAM: what a
  kernel that moves those bytes can expect, not the bus maximum); ``mem_bw_write_allocate``
  = the best write-allocate-aware rate of copy and add.
* torch runs every kernel on all its intra-op threads (``torch.get_num_threads()``, recorded).

Results are cached as JSON in ``$COHW_CACHE_DIR`` (default ``~/.cache/cohw``), keyed by CPU
model, logical CPU count, thread count, torch version and mode, so a different machine or
torch re-measures. A cached full probe also satisfies a quick request.

Used by Chapters 4.1-4.3 (this machine's roofline) and 4.4.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from cohw_utils.core.errors import HardwareError
from cohw_utils.core.timing import time_callable
from cohw_utils.hardware.specs import Hardware

SCHEMA = 2  # 2: the read kernel, read_bw and write-allocate-aware bytes
MIB = 2**20

#: Matrix sizes, repeats and time budget (seconds per dtype) for each mode.
_GEMM_PLAN: dict[bool, dict[str, Any]] = {
    False: {"sizes": (1024, 2048, 4096), "warmup": 2, "repeats": 10, "budget_s": 20.0},
    True: {"sizes": (256, 512, 1024), "warmup": 2, "repeats": 10, "budget_s": 1.5},
}
#: (LLC multiple, minimum MiB, repeats) for the bandwidth arrays in each mode.
_BW_PLAN: dict[bool, tuple[int, int, int]] = {False: (8, 256, 20), True: (4, 64, 8)}
_DEFAULT_LLC = 32 * MIB

METHOD = (
    "GEMM: torch.matmul(a, b, out=c) on square n x n matrices, FLOPs = 2*n^3 per call; "
    "warm-up then timed repeats (time.perf_counter per call); peak = best rate over sizes. "
    "Bandwidth: float32 arrays >= {mult}x LLC and >= {min_mib} MiB each; read = torch.sum(a) "
    "counting 1 x array bytes; copy = dst.copy_(src) counting 2 x array bytes (STREAM) or 3 x "
    "(write-allocate: the destination line is read before it is written, assumed for x86 without "
    "non-temporal stores); add = torch.add(a, b, out=c) counting 3 x (STREAM) or 4 x; "
    "read_bw = best read rate (decode's denominator), mem_bw = best STREAM rate of copy and add. "
    "torch uses torch.get_num_threads() threads."
)


# ----------------------------------------------------------------------------- machine facts
def cache_dir() -> Path:
    """Where probe results are cached: ``$COHW_CACHE_DIR`` or ``~/.cache/cohw``."""
    return Path(os.environ.get("COHW_CACHE_DIR") or Path.home() / ".cache" / "cohw").expanduser()


def cpu_model() -> str:
    """The CPU model string (from /proc/cpuinfo on Linux, else ``platform``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _parse_size(text: str) -> int:
    """Bytes in a cache size such as ``'32768K'``, ``'32 MiB'`` or ``'1M'``."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMG]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot parse cache size {text!r}")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)


def _llc_from_sysfs() -> int | None:
    """Total last-level cache: the highest cache level, summed over its distinct instances."""
    instances: dict[str, int] = {}
    top = -1
    for index in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cache/index[0-9]*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            level = int((index / "level").read_text())
            size = _parse_size((index / "size").read_text())
            shared = (index / "shared_cpu_list").read_text().strip()
        except (OSError, ValueError):
            continue
        if level > top:
            top, instances = level, {}
        if level == top:
            instances[shared] = size
    return sum(instances.values()) or None


def cache_bytes_per_instance(level: int) -> int | None:
    """Size in bytes of one instance of the data (or unified) cache at ``level`` (e.g. one
    core's L2), from sysfs; None where sysfs does not say. The on-chip memory a tiled CPU
    kernel blocks for (Chapter 4.3's FlashAttention IO)."""
    for index in sorted(Path("/sys/devices/system/cpu").glob("cpu0/cache/index[0-9]*")):
        try:
            if (index / "type").read_text().strip() == "Instruction" or int((index / "level").read_text()) != level:
                continue
            return _parse_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
    return None


def _llc_from_lscpu() -> int | None:
    """Total LLC from ``lscpu --caches`` (summed over instances), if lscpu is available."""
    try:
        out = subprocess.run(
            ["lscpu", "--caches=NAME,ALL-SIZE,LEVEL", "--bytes"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    best: tuple[int, int] | None = None  # (level, bytes)
    for line in out.splitlines()[1:]:
        parts = line.split()
        if len(parts) == 3 and not parts[0].endswith("i") and parts[1].isdigit():
            candidate = (int(parts[2]), int(parts[1]))
            best = max(best, candidate) if best else candidate
    return best[1] if best else None


def detect_llc() -> tuple[int, str]:
    """(LLC bytes, how it was found). Falls back to 32 MiB, saying so, if undetectable."""
    for source, finder in (("sysfs", _llc_from_sysfs), ("lscpu", _llc_from_lscpu)):
        found = finder()
        if found:
            return found, source
    return _DEFAULT_LLC, "assumed 32 MiB (could not read sysfs or lscpu)"


def total_memory_bytes() -> int | None:
    """Physical RAM in bytes, or None where sysconf cannot say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


# ----------------------------------------------------------------------------- measurement
def _summary(rates: list[float]) -> dict[str, float]:
    """best (= max), median, min and max of a list of rates."""
    return {
        "best": max(rates),
        "median": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
    }


def _time_calls(call: Callable[[], object], warmup: int, repeats: int,
                deadline: float) -> list[float]:
    """Seconds per call for ``repeats`` timed calls after ``warmup`` untimed ones, through the
    package's one harness (:func:`cohw_utils.core.timing.time_callable`); stops early (keeping
    at least one timed call) once ``time.perf_counter()`` passes ``deadline``."""
    return list(time_callable(call, repeats=repeats, warmup=warmup, until=deadline).samples)


def measure_gemm(dtype_name: str, quick: bool = False) -> dict[str, Any]:
    """Best/median/min/max GEMM FLOP/s per matrix size for ``'fp32'`` or ``'bf16'``.

    Returns ``{"peak_flops": best rate or None, "reason": why None, "sizes": {n: {...}}}``;
    each size entry has ``seconds`` (per timed call) and ``flops`` (a best/median/min/max
    summary in FLOP/s), or ``skipped`` with the reason.
    """
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    plan = _GEMM_PLAN[quick]
    start = time.perf_counter()
    deadline = start + plan["budget_s"]
    sizes: dict[str, dict[str, Any]] = {}
    best_rate: float | None = None
    for n in plan["sizes"]:
        flops = 2.0 * n**3
        if best_rate is not None:
            estimate = (plan["warmup"] + 1) * flops / best_rate
            if time.perf_counter() + estimate > deadline:
                sizes[str(n)] = {"skipped": f"estimated {estimate:.1f} s exceeds the time budget"}
                continue
        try:
            a = torch.randn(n, n).to(dtype)
            b = torch.randn(n, n).to(dtype)
            c = torch.empty(n, n, dtype=dtype)
            times = _time_calls(lambda: torch.matmul(a, b, out=c), plan["warmup"],
                                plan["repeats"], deadline)
        except (RuntimeError, MemoryError, TypeError) as err:
            reason = f"torch.matmul in {dtype_name} failed at n={n}: {err}".splitlines()[0]
            return {"peak_flops": best_rate, "reason": None if best_rate else reason,
                    "sizes": {**sizes, str(n): {"skipped": reason}}}
        rates = [flops / t for t in times]
        sizes[str(n)] = {"seconds": times, "flops": _summary(rates)}
        best_rate = max(best_rate or 0.0, max(rates))
    return {"peak_flops": best_rate, "reason": None, "sizes": sizes}


#: (kernel, STREAM-convention multiple of the array bytes, write-allocate-aware multiple).
BANDWIDTH_KERNELS: tuple[tuple[str, int, int], ...] = (("read", 1, 1), ("copy", 2, 3), ("add", 3, 4))


def measure_bandwidth(llc_bytes: int, quick: bool = False) -> dict[str, Any]:
    """Streaming bandwidth (bytes/s) of a read, a copy and an add kernel on arrays far beyond
    the LLC (see the module docstring for what each counts).

    Returns ``{"array_bytes", "read_bw", "mem_bw", "mem_bw_write_allocate", "reason",
    "kernels": {...}}``; each kernel has ``bytes_per_call`` (STREAM convention) and
    ``bytes_per_call_write_allocate``, ``seconds`` and ``bytes_per_s`` /
    ``bytes_per_s_write_allocate`` (best/median/min/max summaries). ``None`` rates carry the
    reason.
    """
    import torch

    multiple, min_mib, repeats = _BW_PLAN[quick]
    array_bytes = max(multiple * llc_bytes, min_mib * MIB)
    numel = array_bytes // 4
    result: dict[str, Any] = {"array_bytes": numel * 4, "read_bw": None, "mem_bw": None,
                              "mem_bw_write_allocate": None, "reason": None, "kernels": {}}
    try:
        a = torch.ones(numel, dtype=torch.float32)  # ones/zeros touch every page up front
        b = torch.ones(numel, dtype=torch.float32)
        c = torch.zeros(numel, dtype=torch.float32)
    except (RuntimeError, MemoryError) as err:
        result["reason"] = f"cannot allocate 3 x {numel * 4 / MIB:.0f} MiB: {err}".splitlines()[0]
        return result
    calls: dict[str, Callable[[], object]] = {
        "read": lambda: torch.sum(a),
        "copy": lambda: c.copy_(a),
        "add": lambda: torch.add(a, b, out=c),
    }
    budget = 1.0 if quick else 5.0  # seconds per kernel
    for name, stream, allocate in BANDWIDTH_KERNELS:
        times = _time_calls(calls[name], 1, repeats, time.perf_counter() + budget)
        nbytes, nbytes_wa = stream * numel * 4, allocate * numel * 4
        result["kernels"][name] = {
            "bytes_per_call": nbytes,
            "bytes_per_call_write_allocate": nbytes_wa,
            "seconds": times,
            "bytes_per_s": _summary([nbytes / t for t in times]),
            "bytes_per_s_write_allocate": _summary([nbytes_wa / t for t in times]),
        }
    k = result["kernels"]
    result["read_bw"] = k["read"]["bytes_per_s"]["best"]
    result["mem_bw"] = max(k[n]["bytes_per_s"]["best"] for n in ("copy", "add"))
    result["mem_bw_write_allocate"] = max(k[n]["bytes_per_s_write_allocate"]["best"] for n in ("copy", "add"))
    return result


# ----------------------------------------------------------------------------- probe + cache
def _machine() -> dict[str, Any]:
    import torch

    llc, llc_source = detect_llc()
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "llc_bytes": llc,
        "llc_source": llc_source,
        "mem_bytes": total_memory_bytes(),
    }


def _cache_path(machine: dict[str, Any], quick: bool) -> Path:
    key = json.dumps([SCHEMA, machine["cpu_model"], machine["logical_cpus"],
                      machine["torch_num_threads"], machine["torch_version"], quick])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / f"host_probe_{'quick' if quick else 'full'}_{digest}.json"


def _read_cache(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("schema") == SCHEMA else None


def _write_cache(path: Path, result: dict[str, Any]) -> None:
    """Write atomically; a cache that cannot be written is not an error (just not cached)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(path)
    except OSError:
        pass


def probe_host(quick: bool = False, cache: bool = True, refresh: bool = False) -> dict[str, Any]:
    """Measure (or load from cache) this machine's GEMM peak and streaming bandwidth.

    ``quick=True`` uses small sizes (under ~5 s); the full probe takes up to ~60 s.
    ``cache=False`` neither reads nor writes the cache; ``refresh=True`` re-measures and
    overwrites it. The result is a JSON-able dict: ``peak_flops`` (``{'fp32': FLOP/s or
    None, 'bf16': ...}``), ``peak_reasons`` (why a dtype is None), ``mem_bw`` (bytes/s or
    None: best STREAM-convention copy/add rate), ``read_bw`` (bytes/s of the read-only kernel,
    or None), ``gemm`` and ``bandwidth`` (per-size / per-kernel detail), ``machine`` (CPU model,
    counts, torch version and threads, LLC), ``date``, ``quick``, ``method``, ``elapsed_s``,
    ``load_average`` (1-minute, before measuring) and ``contended`` (load above
    ``BUSY_LOAD`` per CPU: the result is then not cached, since other processes shared the
    cores).
    """
    machine = _machine()
    if cache and not refresh:
        for path in [_cache_path(machine, False)] + ([_cache_path(machine, True)] if quick else []):
            cached = _read_cache(path)
            if cached is not None:
                return cached
    load_before = _load_average()
    start = time.perf_counter()
    gemm = {d: measure_gemm(d, quick) for d in ("fp32", "bf16")}
    bandwidth = measure_bandwidth(machine["llc_bytes"], quick)
    multiple, min_mib, _ = _BW_PLAN[quick]
    result = {
        "schema": SCHEMA,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "machine": machine,
        "peak_flops": {d: g["peak_flops"] for d, g in gemm.items()},
        "peak_reasons": {d: g["reason"] for d, g in gemm.items() if g["reason"]},
        "mem_bw": bandwidth["mem_bw"],
        "read_bw": bandwidth.get("read_bw"),
        "mem_bw_reason": bandwidth["reason"],
        "gemm": gemm,
        "bandwidth": bandwidth,
        "method": METHOD.format(mult=multiple, min_mib=min_mib),
        "elapsed_s": round(time.perf_counter() - start, 2),
        "load_average": load_before,
    }
    # A peak measured while other processes compete for the cores is not this machine's
    # peak: such a result is returned (flagged) but not cached, so a later quiet run measures.
    busy = load_before is not None and load_before > BUSY_LOAD * (os.cpu_count() or 1)
    result["contended"] = busy
    if cache and not busy:
        _write_cache(_cache_path(machine, quick), result)
    return result


#: 1-minute load average per logical CPU above which a probe result is not cached.
BUSY_LOAD = 0.5


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def hardware_from_probe(result: dict[str, Any]) -> Hardware:
    """The probe result as a :class:`Hardware` named ``'host'`` (dtypes it could not measure
    are absent). Raises :class:`HardwareError` if bandwidth could not be measured."""
    if not result.get("mem_bw"):
        raise HardwareError(
            f"host probe could not measure memory bandwidth: {result.get('mem_bw_reason')}"
        )
    machine = result["machine"]
    peak = {d: float(v) for d, v in result["peak_flops"].items() if v}
    skipped = "; ".join(f"{d}: {why}" for d, why in result.get("peak_reasons", {}).items())
    notes = (
        f"Measured on {machine['cpu_model']} ({machine['logical_cpus']} logical CPUs, "
        f"{machine['torch_num_threads']} torch threads, torch {machine['torch_version']}; "
        f"LLC from {machine['llc_source']}); {'quick' if result['quick'] else 'full'} probe. "
        + (f"Not measured: {skipped}. " if skipped else "")
        + (f"Read-only bandwidth (read_bw, the decode denominator): {result['read_bw'] / 1e9:.1f} GB/s; "
           f"mem_bw is the copy/add STREAM figure. " if result.get("read_bw") else "")
        + result["method"]
    )
    return Hardware(
        name="host",
        vendor=machine["cpu_model"],
        year=int(result["date"][:4]),
        peak_flops=peak,
        mem_bw=float(result["mem_bw"]),
        mem_bytes=machine["mem_bytes"],
        llc_bytes=machine["llc_bytes"],
        tdp_w=None,
        source=f"measured by cohw_utils.hardware.probe on {result['date']}",
        notes=notes,
        memory_type="host DRAM",
    )


def host_hardware(quick: bool | None = None) -> Hardware:
    """This machine as :class:`Hardware` (cached probe). ``quick=None`` reads
    ``$COHW_PROBE_QUICK`` (``1`` for the quick probe; default the full one)."""
    if quick is None:
        quick = os.environ.get("COHW_PROBE_QUICK", "").strip().lower() in {"1", "true", "yes"}
    return hardware_from_probe(probe_host(quick=quick))



def describe_probe(probe_result: dict[str, Any]) -> str:
    """The probe's result as the lines a chapter prints: the machine, every GEMM size and
    bandwidth kernel with best/median/min (and max) over its timed calls, the ridge points, and
    the method. Flags a probe taken while other processes shared the cores."""
    host = hardware_from_probe(probe_result)
    m = probe_result["machine"]
    lines = [f"{m['cpu_model']}, {m['logical_cpus']} logical CPUs, {m['torch_num_threads']} torch threads, "
             f"LLC {m['llc_bytes'] / 2**20:.0f} MiB; {'quick' if probe_result['quick'] else 'full'} probe of "
             f"{probe_result['date']}"
             + (f", load average {probe_result['load_average']}" if probe_result.get("load_average") is not None else "")
             + (" (CONTENDED: other processes shared the cores; not cached)" if probe_result.get("contended") else "")]
    for d, g in probe_result["gemm"].items():
        sizes = "; ".join(f"n={n}: best {s['flops']['best'] / 1e9:.0f}, median {s['flops']['median'] / 1e9:.0f} "
                          f"(min {s['flops']['min'] / 1e9:.0f}) over {len(s['seconds'])} calls"
                          for n, s in g["sizes"].items() if "flops" in s)
        lines.append(f"peak GEMM {d}: {(g['peak_flops'] or 0) / 1e9:.0f} GFLOP/s  [{sizes}]")
    for k, v in probe_result["bandwidth"]["kernels"].items():
        b = v["bytes_per_s"]
        line = (f"bandwidth {k}: best {b['best'] / 1e9:.1f} GB/s, median {b['median'] / 1e9:.1f}, "
                f"min {b['min'] / 1e9:.1f}, max {b['max'] / 1e9:.1f} over {len(v['seconds'])} calls "
                f"on {probe_result['bandwidth']['array_bytes'] / 2**20:.0f} MiB arrays "
                f"({v['bytes_per_call'] // probe_result['bandwidth']['array_bytes']}x array bytes"
                + (", STREAM)" if v.get("bytes_per_call_write_allocate", 0) != v["bytes_per_call"] else ")"))
        wa = v.get("bytes_per_s_write_allocate")
        if wa and v.get("bytes_per_call_write_allocate") != v["bytes_per_call"]:
            line += (f"; write-allocate-aware ({v['bytes_per_call_write_allocate'] // probe_result['bandwidth']['array_bytes']}x): "
                     f"best {wa['best'] / 1e9:.1f}, median {wa['median'] / 1e9:.1f} GB/s")
        lines.append(line)
    if probe_result.get("read_bw"):
        lines.append(f"=> read bandwidth (read-only stream, MBU's denominator) {probe_result['read_bw'] / 1e9:.1f} GB/s; "
                     f"roofline bandwidth (best copy/add, STREAM bytes) {probe_result['mem_bw'] / 1e9:.1f} GB/s")
    lines.append(f"=> roofline: fp32 ridge {host.ridge_point('fp32'):.1f} FLOP/B"
                 + (f", bf16 ridge {host.ridge_point('bf16'):.1f} FLOP/B" if "bf16" in host.peak_flops else ""))
    lines.append(f"method: {probe_result['method']}")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m cohw_utils.hardware.probe [--quick] [--refresh]
    import sys

    res = probe_host(quick="--quick" in sys.argv, refresh="--refresh" in sys.argv)
    print(json.dumps({k: res[k] for k in ("peak_flops", "peak_reasons", "mem_bw", "read_bw", "machine",
                                          "elapsed_s")}, indent=1))
