"""Measured energy: hardware energy counters where the machine has them, a clear message where not.

Two counters, both read before and after a workload so the difference is its energy:

* **RAPL** (CPUs, Intel and AMD via Linux's powercap driver): ``<root>/intel-rapl:N/energy_uj``
  is a cumulative count in microjoules for package N; sub-domains ``intel-rapl:N:M`` (``core``,
  ``uncore``, ``dram``) split it. The counter wraps at ``max_energy_range_uj``; a reading lower
  than the one before it means one wrap, and the delta is ``after + range - before``. (Two
  wraps between readings cannot be told from one: at ~100 W the package range of ~262 kJ lasts
  ~45 min, so measured calls must be shorter.) The total reported is the sum of the package
  domains plus any ``dram`` sub-domains (which the package count does not include); ``psys``
  (whole platform, overlapping the packages) is reported but not summed. Since Linux 5.10
  ``energy_uj`` is readable by root only (CVE-2020-8694, the PLATYPUS power side channel), so a
  counter can exist and still be unreadable; the message says so.
* **NVML** (NVIDIA GPUs, ``nvidia-ml-py``): ``nvmlDeviceGetTotalEnergyConsumption`` (mJ since
  the driver loaded; Volta and newer). Where it is not supported, board power
  (``nvmlDeviceGetPowerUsage``, mW) is sampled every ``interval_s`` on a background thread and
  integrated with the trapezoid rule; the method string says which was used.

Both measure the whole package or board: idle and static power, other processes, fans. A
chapter prints the method and spread and compares with the model's *dynamic* estimate
(:mod:`cohw_utils.views.energy_model`) knowing that.

Where no counter exists (a VM such as this book's CI machine has no ``/sys/class/powercap``,
and no NVIDIA driver), :func:`measure_energy` raises :class:`NoEnergyCounterError` whose message
names each counter and why it is unavailable; :func:`status` returns the same as text.
"""
from __future__ import annotations

import json
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cohw_utils.core.errors import CohwError
from cohw_utils.core.data import load_gpu_capture

POWERCAP = Path("/sys/class/powercap")


class NoEnergyCounterError(CohwError):
    """No usable energy counter on this machine (the message says which and why)."""


def _read_int(path: Path) -> int:
    """One integer from a sysfs file (a seam the tests replace to simulate permissions)."""
    return int(path.read_text().strip())


# ------------------------------------------------------------------------------ RAPL
@dataclass(frozen=True)
class RaplDomain:
    """One powercap RAPL zone: ``name`` from its ``name`` file (``package-0``, ``dram``...)."""

    name: str
    path: Path
    max_energy_uj: int
    top_level: bool

    def read_uj(self) -> int:
        return _read_int(self.path / "energy_uj")

    @property
    def summed(self) -> bool:
        """Whether it counts towards the total (packages, and dram sub-domains)."""
        return (self.top_level and self.name.startswith("package")) or self.name == "dram"


def rapl_delta_uj(before: int, after: int, max_energy_uj: int) -> int:
    """Microjoules between two readings of a counter that wraps at ``max_energy_uj``."""
    if after >= before:
        return after - before
    if max_energy_uj <= 0:
        raise CohwError(f"RAPL counter went backwards ({before} -> {after}) and its range is unknown")
    return after + max_energy_uj - before


def rapl_domains(root: str | Path = POWERCAP) -> list[RaplDomain]:
    """The readable RAPL domains under ``root``; raises :class:`NoEnergyCounterError` saying
    why there are none (no powercap tree, no RAPL zone, or not readable)."""
    root = Path(root)
    if not root.is_dir():
        raise NoEnergyCounterError(
            f"RAPL: {root} does not exist (no powercap driver: a virtual machine, or a kernel "
            "without intel_rapl); CPU energy cannot be measured here")
    zones = sorted(p for p in root.glob("intel-rapl:*") if p.is_dir())
    if not zones:
        raise NoEnergyCounterError(
            f"RAPL: {root} has no intel-rapl:* zone (the CPU or hypervisor exposes none); "
            "CPU energy cannot be measured here")
    out, unreadable = [], []
    for z in zones:
        try:
            _read_int(z / "energy_uj")
        except PermissionError:
            unreadable.append(z.name)
            continue
        except (OSError, ValueError):
            continue
        try:
            name = (z / "name").read_text().strip()
        except OSError:
            name = z.name
        try:
            rng = _read_int(z / "max_energy_range_uj")
        except (OSError, ValueError):
            rng = 0
        out.append(RaplDomain(name, z, rng, top_level=z.name.count(":") == 1))
    if not out:
        if unreadable:
            raise NoEnergyCounterError(
                f"RAPL: {root}/{unreadable[0]}/energy_uj exists but is not readable (root-only "
                "since Linux 5.10, CVE-2020-8694); run as root or `sudo chmod a+r "
                f"{root}/intel-rapl:*/energy_uj`")
        raise NoEnergyCounterError(f"RAPL: no zone under {root} has a readable energy_uj")
    return out


# ------------------------------------------------------------------------------ NVML
def _import_nvml():
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        raise NoEnergyCounterError("NVML: the nvidia-ml-py package (module pynvml) is not "
                                   "installed; `pip install nvidia-ml-py`") from None
    return pynvml


class NvmlDevice:
    """An initialised NVML handle for GPU ``index``; ``energy_mj()`` is None where the total
    energy counter is not supported (then use ``power_mw()`` sampling)."""

    def __init__(self, nvml: Any = None, index: int = 0):
        self.nvml = nvml if nvml is not None else _import_nvml()
        try:
            self.nvml.nvmlInit()
        except self.nvml.NVMLError as err:
            raise NoEnergyCounterError(f"NVML: cannot initialise ({err}); no NVIDIA driver or GPU "
                                       "here, so GPU energy cannot be measured") from None
        try:
            count = self.nvml.nvmlDeviceGetCount()
            if not 0 <= index < count:
                raise NoEnergyCounterError(f"NVML: no GPU with index {index} (found {count})")
            self.handle = self.nvml.nvmlDeviceGetHandleByIndex(index)
            name = self.nvml.nvmlDeviceGetName(self.handle)
            self.name = name.decode() if isinstance(name, bytes) else str(name)
        except self.nvml.NVMLError as err:
            raise NoEnergyCounterError(f"NVML: cannot open GPU {index} ({err})") from None
        self.index = index
        try:
            self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            self.has_counter = True
        except self.nvml.NVMLError:
            self.has_counter = False

    def energy_mj(self) -> int | None:
        if not self.has_counter:
            return None
        return int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))

    def power_mw(self) -> int:
        return int(self.nvml.nvmlDeviceGetPowerUsage(self.handle))

    def driver_version(self) -> str:
        try:
            v = self.nvml.nvmlSystemGetDriverVersion()
            return v.decode() if isinstance(v, bytes) else str(v)
        except self.nvml.NVMLError:
            return "unknown"

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except self.nvml.NVMLError:
            pass


class _PowerSampler:
    """Samples ``read_w()`` every ``interval_s`` on a thread; ``joules()`` integrates (trapezoid)."""

    def __init__(self, read_w: Callable[[], float], interval_s: float):
        self.read_w, self.interval_s = read_w, interval_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self.read_w()))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "_PowerSampler":
        self.samples.append((time.perf_counter(), self.read_w()))
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.perf_counter(), self.read_w()))

    def joules(self) -> float:
        s = sorted(self.samples)
        return sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in zip(s, s[1:]))


# ------------------------------------------------------------------------------ measuring
@dataclass(frozen=True)
class EnergyMeasurement:
    """Energy of a callable measured over ``windows`` counter windows of ``calls // windows``
    calls each. ``joules`` is the median per-call energy over the windows (``min_joules`` and
    ``max_joules`` its spread); ``domains`` are per-domain totals (J) for RAPL."""

    joules: float
    total_joules: float
    calls: int
    seconds: float
    source: str
    method: str
    device: str
    domains: dict[str, float] = field(default_factory=dict)
    per_window: tuple[float, ...] = ()

    @property
    def watts(self) -> float:
        return self.total_joules / self.seconds if self.seconds else float("nan")

    @property
    def min_joules(self) -> float:
        return min(self.per_window) if self.per_window else self.joules

    @property
    def max_joules(self) -> float:
        return max(self.per_window) if self.per_window else self.joules

    def describe(self) -> str:
        return (f"{self.joules:.4g} J per call (min {self.min_joules:.4g}, max {self.max_joules:.4g} over "
                f"{len(self.per_window)} windows; {self.total_joules:.4g} J over {self.calls} calls in "
                f"{self.seconds:.3g} s, mean {self.watts:.1f} W; {self.method} on {self.device})")


def status(root: str | Path = POWERCAP, nvml: Any = None) -> str:
    """One line per counter: what is available here, or why not."""
    lines = []
    try:
        doms = rapl_domains(root)
        lines.append("RAPL: " + ", ".join(f"{d.name} ({d.path.name})" for d in doms))
    except NoEnergyCounterError as err:
        lines.append(str(err))
    try:
        dev = NvmlDevice(nvml)
        how = "total-energy counter" if dev.has_counter else "power sampling (no energy counter)"
        lines.append(f"NVML: GPU 0 {dev.name}, {how}")
        dev.close()
    except NoEnergyCounterError as err:
        lines.append(str(err))
    return "\n".join(lines)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def measure_energy(fn: Callable[[], Any], *, repeats: int = 10, warmup: int = 1, windows: int = 3,
                   source: str = "auto", root: str | Path = POWERCAP, nvml: Any = None,
                   index: int = 0, interval_s: float = 0.02, device: str = "cpu",
                   setup: Callable[[], Any] | None = None) -> EnergyMeasurement:
    """Energy of ``fn()`` per call: ``setup`` once, ``warmup`` untimed calls, then ``windows``
    times: read the counter, run ``fn`` ``repeats`` times, read it again. The result is the
    median per-call energy over the windows, with their min and max.

    ``source``: ``"rapl"``, ``"nvml"`` or ``"auto"`` (NVML when ``device`` is CUDA, else RAPL).
    Raises :class:`NoEnergyCounterError` (saying why) when the counter is not available.
    """
    if repeats < 1 or warmup < 0 or windows < 1:
        raise CohwError(f"repeats and windows must be >= 1 and warmup >= 0, got {repeats}, {windows}, {warmup}")
    if source not in ("auto", "rapl", "nvml"):
        raise CohwError(f"unknown energy source {source!r}; use 'auto', 'rapl' or 'nvml'")
    if source == "auto":
        source = "nvml" if str(device).startswith("cuda") else "rapl"
    dev = str(device)
    doms = rapl_domains(root) if source == "rapl" else []  # fail before running anything
    gpu = NvmlDevice(nvml, index) if source == "nvml" else None
    try:
        return _measure_windows(fn, repeats, warmup, windows, setup, dev, doms, gpu, interval_s)
    finally:
        if gpu is not None:
            gpu.close()


def _measure_windows(fn, repeats, warmup, windows, setup, dev, doms, gpu, interval_s) -> EnergyMeasurement:
    if setup is not None:
        setup()
    for _ in range(warmup):
        fn()
    _sync(dev)

    def run() -> float:
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        _sync(dev)
        return time.perf_counter() - t0

    totals, secs, per = [], 0.0, {}
    if gpu is None:
        for _ in range(windows):
            before = [d.read_uj() for d in doms]
            secs += run()
            after = [d.read_uj() for d in doms]
            deltas = [rapl_delta_uj(b, a, d.max_energy_uj) * 1e-6 for d, b, a in zip(doms, before, after)]
            for d, j in zip(doms, deltas):
                key = d.name if d.top_level else f"{d.path.name}:{d.name}"
                per[key] = per.get(key, 0.0) + j
            totals.append(sum(j for d, j in zip(doms, deltas) if d.summed))
        names = ", ".join(d.name for d in doms if d.summed)
        method = (f"RAPL energy_uj delta ({names}; wrap-around handled), {windows} windows of {repeats} "
                  f"calls after {warmup} warm-up")
    else:
        if gpu.has_counter:
            for _ in range(windows):
                e0 = gpu.energy_mj()
                secs += run()
                totals.append((gpu.energy_mj() - e0) * 1e-3)
            how = "NVML total-energy counter delta"
        else:
            n = 0
            for _ in range(windows):
                with _PowerSampler(lambda: gpu.power_mw() * 1e-3, interval_s) as sampler:
                    secs += run()
                totals.append(sampler.joules())
                n += len(sampler.samples)
            how = f"NVML board power sampled every {interval_s * 1e3:g} ms ({n} samples) and integrated"
        method = f"{how} on {gpu.name}, {windows} windows of {repeats} calls after {warmup} warm-up"
    per_call = tuple(t / repeats for t in totals)
    return EnergyMeasurement(statistics.median(per_call), sum(totals), repeats * windows, secs,
                             "rapl" if gpu is None else "nvml", method, dev, per, per_call)


def idle_power(seconds: float = 3.0, *, nvml: Any = None, index: int = 0,
               interval_s: float = 0.05) -> float:
    """Mean GPU board power (W) over ``seconds`` with nothing running: the baseline a
    measurement's net-of-idle energy subtracts."""
    gpu = NvmlDevice(nvml, index)
    try:
        samples = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            samples.append(gpu.power_mw() * 1e-3)
            time.sleep(interval_s)
        return statistics.mean(samples) if samples else float("nan")
    finally:
        gpu.close()


def load_gpu_energy(path: str | Path | None = None) -> dict | None:
    """The GPU measurements written by ``benchmarks/capture_gpu_energy.py``, or None when the
    file does not exist (no GPU run has been captured); read by
    :func:`cohw_utils.core.data.load_gpu_capture`."""
    data = load_gpu_capture("energy", path)
    if data is None:
        return None
    for key in ("versions", "measurements"):
        if key not in data:
            raise CohwError(f"energy.json: missing '{key}'; re-run benchmarks/capture_gpu_energy.py")
    return data
