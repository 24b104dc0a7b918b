"""Energy counters: RAPL (a simulated powercap tree) and NVML (a fake pynvml), both ways:
where the counter exists the joules come out right, where it does not the message says why."""
from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

from cohw_utils.hardware import power_meters as power
from cohw_utils.core.errors import CohwError

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- RAPL
def _zone(root: Path, zone: str, name: str, energy: int, max_range: int = 2**32) -> Path:
    z = root / zone
    z.mkdir(parents=True)
    (z / "name").write_text(name + "\n")
    (z / "energy_uj").write_text(f"{energy}\n")
    (z / "max_energy_range_uj").write_text(f"{max_range}\n")
    return z


def _bump(zone: Path, uj: int) -> None:
    max_range = int((zone / "max_energy_range_uj").read_text())
    value = (int((zone / "energy_uj").read_text()) + uj) % max_range
    (zone / "energy_uj").write_text(f"{value}\n")


@pytest.fixture()
def powercap(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "powercap"
    zones = {
        "package": _zone(root, "intel-rapl:0", "package-0", 1_000_000),
        "core": _zone(root, "intel-rapl:0:0", "core", 0),
        "dram": _zone(root, "intel-rapl:0:1", "dram", 5_000),
        "psys": _zone(root, "intel-rapl:1", "psys", 7),
    }
    (root / "intel-rapl").mkdir()  # the control type directory, not a zone
    return {"root": root, **zones}


def test_rapl_measures_package_plus_dram(powercap):
    def work():  # each call: 2 J package (of which 1 J core), 0.5 J DRAM, 3 J platform
        _bump(powercap["package"], 2_000_000)
        _bump(powercap["core"], 1_000_000)
        _bump(powercap["dram"], 500_000)
        _bump(powercap["psys"], 3_000_000)

    doms = power.rapl_domains(powercap["root"])
    assert {d.name for d in doms} == {"package-0", "core", "dram", "psys"}
    assert {d.name for d in doms if d.summed} == {"package-0", "dram"}
    m = power.measure_energy(work, repeats=4, warmup=1, windows=2, root=powercap["root"])
    assert m.source == "rapl" and m.calls == 8
    assert m.joules == pytest.approx(2.5)  # package + dram; core is inside package, psys overlaps
    assert m.per_window == pytest.approx((2.5, 2.5)) and m.min_joules == m.max_joules
    assert m.total_joules == pytest.approx(20.0)
    assert m.domains["package-0"] == pytest.approx(16.0)
    assert m.domains["psys"] == pytest.approx(24.0)
    assert "RAPL" in m.method and "wrap-around" in m.method
    assert "J per call" in m.describe()


def test_rapl_wrap_around(tmp_path):
    assert power.rapl_delta_uj(100, 300, 1000) == 200
    assert power.rapl_delta_uj(900, 100, 1000) == 200  # wrapped once at 1000
    with pytest.raises(CohwError, match="backwards"):
        power.rapl_delta_uj(900, 100, 0)
    root = tmp_path / "pc"
    z = _zone(root, "intel-rapl:0", "package-0", 9_500_000, max_range=10_000_000)
    m = power.measure_energy(lambda: _bump(z, 1_000_000), repeats=3, warmup=0, windows=1, root=root)
    assert m.total_joules == pytest.approx(3.0)  # crossed the 10 J range once


def test_rapl_missing_says_why(tmp_path):
    with pytest.raises(power.NoEnergyCounterError, match="does not exist"):
        power.rapl_domains(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(power.NoEnergyCounterError, match="no intel-rapl"):
        power.measure_energy(lambda: None, root=tmp_path / "empty")


def test_rapl_unreadable_says_why(powercap, monkeypatch):
    real = power._read_int

    def deny(path: Path) -> int:
        if path.name == "energy_uj":
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(power, "_read_int", deny)
    with pytest.raises(power.NoEnergyCounterError, match="not readable.*CVE-2020-8694"):
        power.rapl_domains(powercap["root"])


# ----------------------------------------------------------------------------- NVML
class FakeNVML:
    """Just enough of pynvml: a board drawing ``watts`` whose energy counter follows the clock."""

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    def __init__(self, watts: float = 100.0, counter: bool = True, present: bool = True):
        self.watts, self.counter, self.present = watts, counter, present
        self.t0 = time.perf_counter()
        self.inits = self.shutdowns = 0

    def nvmlInit(self):
        if not self.present:
            raise self.NVMLError("NVML Shared Library Not Found")
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("gpu", i)

    def nvmlDeviceGetName(self, h):
        return b"Fake H100"

    def nvmlSystemGetDriverVersion(self):
        return "999.1"

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if not self.counter:
            raise self.NVMLError_NotSupported("Not Supported")
        return int((time.perf_counter() - self.t0) * self.watts * 1e3)  # mJ

    def nvmlDeviceGetPowerUsage(self, h):
        return int(self.watts * 1e3)  # mW


def _nap():
    time.sleep(0.01)


def test_nvml_energy_counter():
    fake = FakeNVML(watts=100.0)
    m = power.measure_energy(_nap, repeats=5, warmup=1, source="nvml", nvml=fake)
    assert m.source == "nvml" and "total-energy counter" in m.method and "Fake H100" in m.method
    # the counter is read just before and after the timed window: ~100 W x the window
    assert m.total_joules == pytest.approx(100.0 * m.seconds, rel=0.1, abs=0.01)
    assert m.watts == pytest.approx(100.0, rel=0.1)
    assert fake.inits == fake.shutdowns == 1


def test_nvml_power_sampling_fallback():
    fake = FakeNVML(watts=250.0, counter=False)
    m = power.measure_energy(_nap, repeats=5, warmup=0, source="nvml", nvml=fake, interval_s=0.002)
    assert "sampled" in m.method and "integrated" in m.method
    # constant power: the trapezoid integral is 250 W x the sampled span (a little over the window)
    assert m.total_joules == pytest.approx(250.0 * m.seconds, rel=0.2)
    assert power.idle_power(0.02, nvml=fake, interval_s=0.005) == pytest.approx(250.0)


def test_nvml_missing_says_why(monkeypatch):
    with pytest.raises(power.NoEnergyCounterError, match="NVML: cannot initialise.*no NVIDIA driver"):
        power.measure_energy(_nap, source="nvml", nvml=FakeNVML(present=False))
    monkeypatch.setitem(sys.modules, "pynvml", None)  # package not installed
    with pytest.raises(power.NoEnergyCounterError, match="nvidia-ml-py"):
        power.NvmlDevice()


def test_status_both_ways(powercap, tmp_path):
    s = power.status(powercap["root"], nvml=FakeNVML())
    assert "RAPL: package-0" in s and "NVML: GPU 0 Fake H100, total-energy counter" in s
    s = power.status(tmp_path / "none", nvml=FakeNVML(present=False))
    assert "does not exist" in s and "cannot initialise" in s


def test_bad_arguments():
    with pytest.raises(CohwError, match="source"):
        power.measure_energy(_nap, source="joulemeter")
    with pytest.raises(CohwError, match="repeats"):
        power.measure_energy(_nap, repeats=0)
    with pytest.raises(CohwError, match="windows"):
        power.measure_energy(_nap, windows=0)


# ----------------------------------------------------------------------------- GPU capture
def _capture_module():
    spec = importlib.util.spec_from_file_location("capture_gpu_energy", ROOT / "benchmarks" / "capture_gpu_energy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_capture_script_writes_a_complete_record(tmp_path):
    cap = _capture_module()
    out = tmp_path / "gpu" / "energy.json"
    rec = cap.capture(seq_len=16, batches=(2,), repeats=2, warmup=1, windows=2, idle_s=0, device="cpu", scale="tiny",
                      dtype="fp32", out=out, nvml=FakeNVML(watts=50.0))
    data = power.load_gpu_energy(out)
    assert data == json.loads(json.dumps(rec))
    assert data["nvml_device"] == "Fake H100" and data["driver"] == "999.1"
    assert {"torch", "transformers", "diffusers", "cuda"} <= set(data["versions"])
    phases = [(m["phase"], m["batch"]) for m in data["measurements"]]
    assert phases == [("decode", 2), ("unet_step", 1)]
    dec2 = data["measurements"][0]
    assert dec2["context_grows_to"] == 16 + 1 + 2 * 2 and dec2["calls"] == 4
    assert dec2["joules_per_call_min"] <= dec2["joules_per_call"] <= dec2["joules_per_call_max"]
    assert dec2["unit"] == "token" and dec2["units_per_call"] == 2
    assert dec2["joules_per_unit"] == pytest.approx(dec2["joules_per_call"] / 2)
    assert dec2["joules_per_call"] == pytest.approx(50.0 * dec2["seconds_per_call"], rel=0.3, abs=1e-3)


def test_capture_script_refuses_without_gpu(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    cap = _capture_module()
    assert cap.main(["--out", str(tmp_path / "e.json")]) == 1
    assert "nothing written" in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists()
    assert power.load_gpu_energy(tmp_path / "e.json") is None
