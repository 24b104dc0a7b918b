"""Tests for cohw_utils.hardware (the cited spec table) and cohw_utils.hardware.probe (this machine)."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from cohw_utils.hardware import probe
from cohw_utils.core.errors import CohwError, HardwareError
from cohw_utils.hardware import (
    DTYPES,
    Hardware,
    dtype_key,
    get_hardware,
    hardware_table,
    load_hardware,
)

TERA = 1e12
GBS = 1e9

# Figures vendors print WITH 2:4 sparsity, in TFLOP/s (TOPS for int8), from the sheets cited
# in hardware.csv. The table must hold half of each (dense), never the sparse figure itself.
SPARSE_FIGURES: dict[str, dict[str, float]] = {
    "A100-40GB": {"tf32": 312, "fp16": 624, "bf16": 624, "int8": 1248},
    "A100-80GB": {"tf32": 312, "fp16": 624, "bf16": 624, "int8": 1248},
    "H100-SXM": {"tf32": 989, "fp16": 1979, "bf16": 1979, "fp8": 3958, "int8": 3958},
    "H100-PCIe": {"tf32": 756, "fp16": 1513, "bf16": 1513, "fp8": 3026, "int8": 3026},
    "H200-SXM": {"tf32": 989, "fp16": 1979, "bf16": 1979, "fp8": 3958, "int8": 3958},
    "B200": {"tf32": 2200, "fp16": 4500, "bf16": 4500, "fp8": 9000, "int8": 9000},
    "MI300X": {"tf32": 1307.4, "fp16": 2614.9, "bf16": 2614.9, "fp8": 5229.8, "int8": 5229.8},
}

CSV_PATH = Path(__file__).resolve().parents[1] / "cohw_utils" / "data" / "hardware.csv"


# ----------------------------------------------------------------------------- spec table
def test_required_chips_present() -> None:
    names = set(load_hardware())
    for name in ("V100-SXM2-16GB", "V100-SXM2-32GB", "A100-40GB", "A100-80GB", "H100-SXM",
                 "H100-PCIe", "H200-SXM", "MI300X", "B200"):
        assert name in names


@pytest.mark.parametrize(
    ("name", "dtype", "tflops"),
    [
        ("H100-SXM", "bf16", 989.4),   # Hopper whitepaper dense column (datasheet: 1979 sparse)
        ("H100-SXM", "fp8", 1978.9),
        ("H100-SXM", "fp32", 66.9),
        ("H200-SXM", "bf16", 989.4),
        ("A100-40GB", "bf16", 312),
        ("A100-80GB", "bf16", 312),
        ("A100-40GB", "tf32", 156),
        ("V100-SXM2-32GB", "fp16", 125),
        ("MI300X", "bf16", 1307.4),
        ("B200", "bf16", 2250),
    ],
)
def test_dense_peaks_match_cited_sheets(name: str, dtype: str, tflops: float) -> None:
    assert get_hardware(name).peak(dtype) == pytest.approx(tflops * TERA, rel=0.01)


@pytest.mark.parametrize(
    ("name", "gbs"),
    [("V100-SXM2-16GB", 900), ("A100-40GB", 1555), ("A100-80GB", 2039), ("H100-SXM", 3350),
     ("H100-PCIe", 2000), ("H200-SXM", 4800), ("MI300X", 5300), ("B200", 7700)],
)
def test_bandwidths(name: str, gbs: float) -> None:
    assert get_hardware(name).mem_bw == pytest.approx(gbs * GBS, rel=0.001)


def test_capacities_and_caches() -> None:
    # vendors' DRAM "GB" is binary: an H100's 80 GB is five 16 GiB stacks, 85.9e9 bytes (specs.VENDOR_GB)
    assert get_hardware("H100-SXM").mem_bytes == 80 * 2**30 == 85_899_345_920
    assert get_hardware("H200-SXM").mem_bytes == pytest.approx(141 * 2**30)
    assert get_hardware("MI300X").mem_bytes == pytest.approx(192 * 2**30)
    assert get_hardware("A100-40GB").llc_bytes == 40 * 2**20
    assert get_hardware("H100-SXM").llc_bytes == 50 * 2**20
    assert get_hardware("MI300X").llc_bytes == 256 * 2**20
    assert get_hardware("B200").llc_bytes is None  # not published by NVIDIA


def test_every_row_has_a_source_url_and_sane_numbers() -> None:
    for hw in load_hardware().values():
        assert "http" in hw.source, hw.name
        assert hw.year is not None and 2015 <= hw.year <= 2030
        assert hw.mem_bw > 0 and hw.mem_bytes and hw.mem_bytes > 0
        assert set(hw.peak_flops) <= set(DTYPES)
        assert all(v > 0 for v in hw.peak_flops.values())
        if "bf16" in hw.peak_flops:  # matrix bf16 is never slower than plain fp32
            assert hw.peak("bf16") > hw.peak("fp32")


@pytest.mark.parametrize("name", sorted(SPARSE_FIGURES))
def test_no_dense_figure_is_a_sparse_one(name: str) -> None:
    hw = get_hardware(name)
    for dtype, sparse in SPARSE_FIGURES[name].items():
        dense = hw.peak(dtype) / TERA
        assert dense != pytest.approx(sparse, rel=0.01), (name, dtype)
        assert dense == pytest.approx(sparse / 2, rel=0.01), (name, dtype)


def test_halved_rows_say_so() -> None:
    for name in ("H100-SXM", "H100-PCIe", "H200-SXM", "B200"):
        assert "sparsity" in get_hardware(name).notes.lower(), name


def test_ridge_point_by_hand() -> None:
    h100 = get_hardware("H100-SXM")
    assert h100.ridge_point("bf16") == pytest.approx(989.4e12 / 3350e9)  # ~295 FLOP/byte
    assert h100.ridge_point(torch.bfloat16) == pytest.approx(295.34, abs=0.01)
    assert get_hardware("A100-40GB").ridge_point("fp32") == pytest.approx(19.5e12 / 1555e9)


def test_torch_and_alias_dtypes() -> None:
    hw = get_hardware("H100-SXM")
    assert hw.peak(torch.bfloat16) == hw.peak("bf16")
    assert hw.peak(torch.float32) == hw.peak("fp32")
    assert hw.peak(torch.float16) == hw.peak("half")
    assert hw.peak(torch.float8_e4m3fn) == hw.peak("fp8")
    assert hw.peak(torch.float64) == hw.peak("double")
    assert dtype_key(torch.int8) == "int8"
    with pytest.raises(HardwareError, match="complex64"):
        dtype_key(torch.complex64)
    with pytest.raises(HardwareError, match="unknown dtype"):
        hw.peak("fp7")
    with pytest.raises(HardwareError, match="no int4 peak figure"):
        hw.peak("int4")  # a dtype the package knows, but no chip has a column for


def test_missing_dtype_lists_what_the_chip_has() -> None:
    with pytest.raises(HardwareError) as err:
        get_hardware("A100-40GB").peak(torch.float8_e4m3fn)
    message = str(err.value)
    assert "A100-40GB" in message and "fp8" in message and "bf16" in message
    with pytest.raises(HardwareError, match="fp16"):
        get_hardware("V100-SXM2-16GB").peak("bf16")


def test_lookup_is_case_insensitive() -> None:
    assert get_hardware("h100-sxm") is get_hardware("H100-SXM")
    assert get_hardware("  mi300x ").name == "MI300X"


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(HardwareError) as err:
        get_hardware("TPUv9")
    message = str(err.value)
    assert isinstance(err.value, CohwError) and isinstance(err.value, ValueError)
    for name in ("TPUv9", "A100-40GB", "H100-SXM", "MI300X", "B200", "host"):
        assert name in message


def test_hardware_is_frozen_and_hashable() -> None:
    hw = get_hardware("A100-80GB")
    with pytest.raises(AttributeError):
        hw.mem_bw = 1.0  # type: ignore[misc]
    assert len({hw, get_hardware("A100-80GB")}) == 1


def test_hardware_table() -> None:
    table = hardware_table()
    assert isinstance(table, pd.DataFrame)
    assert "H100-SXM" in table.index and "host" not in table.index
    assert table.loc["H100-SXM", "bf16_tflops"] == pytest.approx(989.4)
    assert table.loc["A100-80GB", "mem_bw_gbs"] == pytest.approx(2039)
    assert table.loc["H100-SXM", "ridge_bf16"] == pytest.approx(989.4e3 / 3350)
    assert pd.isna(table.loc["A100-40GB", "fp8_tflops"])


# ----------------------------------------------------------------------------- CSV validation
def _write_csv(tmp_path: Path, edit: dict[str, str] | None = None, row: int = 1,
               drop: str | None = None) -> Path:
    """Copy the packaged CSV, change fields of data row ``row`` (0-based) or drop a column."""
    with CSV_PATH.open(newline="") as f:
        rows = list(csv.DictReader(f))
    fields = [c for c in rows[0] if c != drop]
    for key, value in (edit or {}).items():
        rows[row][key] = value
    out = tmp_path / "hw.csv"
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return out


def test_packaged_csv_round_trips(tmp_path: Path) -> None:
    assert load_hardware(_write_csv(tmp_path)) == load_hardware()


def test_malformed_number_names_file_line_row_and_field(tmp_path: Path) -> None:
    path = _write_csv(tmp_path, {"mem_bw_gbs": "fast"}, row=1)
    with pytest.raises(HardwareError) as err:
        load_hardware(path)
    message = str(err.value)
    assert str(path) in message and "line 3" in message
    assert "V100-SXM2-32GB" in message and "mem_bw_gbs" in message and "'fast'" in message


@pytest.mark.parametrize(
    ("edit", "field"),
    [({"bf16_tflops": "-5"}, "bf16_tflops"), ({"source": ""}, "source"),
     ({"year": ""}, "year"), ({"name": "host"}, "name")],
)
def test_malformed_rows_name_the_field(tmp_path: Path, edit: dict[str, str], field: str) -> None:
    with pytest.raises(HardwareError, match=f"field '{field}'"):
        load_hardware(_write_csv(tmp_path, edit, row=4))


def test_missing_column_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(HardwareError, match="missing column.*tdp_w"):
        load_hardware(_write_csv(tmp_path, drop="tdp_w"))
    with pytest.raises(HardwareError, match="cannot read"):
        load_hardware(tmp_path / "nope.csv")


# ----------------------------------------------------------------------------- host probe
@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("COHW_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("COHW_PROBE_QUICK", "1")
    monkeypatch.setattr(probe, "_load_average", lambda: 0.0)  # a quiet machine, whatever this one is
    return tmp_path


def test_a_probe_under_load_is_flagged_and_not_cached(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe, "_load_average", lambda: 10.0 * (os.cpu_count() or 1))
    result = probe.probe_host(quick=True)
    assert result["contended"] is True and result["load_average"] > 0
    assert not list(cache_dir.glob("*.json"))


def _forbid_measuring(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("re-measured instead of using the cache")

    monkeypatch.setattr(probe, "measure_gemm", boom)
    monkeypatch.setattr(probe, "measure_bandwidth", boom)


def test_quick_probe_measures_and_round_trips_through_cache(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = probe.probe_host(quick=True)
    assert result["peak_flops"]["fp32"] > 1e9  # any CPU does > 1 GFLOP/s
    text = probe.describe_probe(result)
    assert text.count("\npeak GEMM ") == len(result["gemm"]) and "=> roofline: fp32 ridge" in text
    assert text.splitlines()[-1] == f"method: {result['method']}"
    assert result["mem_bw"] > 1e8 and result["read_bw"] > 1e8
    assert result["schema"] == probe.SCHEMA == 2
    assert "read bandwidth (read-only stream" in text
    assert result["machine"]["llc_bytes"] > 0
    assert result["machine"]["torch_num_threads"] == torch.get_num_threads()
    assert result["bandwidth"]["array_bytes"] >= 4 * result["machine"]["llc_bytes"]
    for size in result["gemm"]["fp32"]["sizes"].values():
        if "flops" in size:
            s = size["flops"]
            assert s["min"] <= s["median"] <= s["max"] == s["best"]
    assert len(list(cache_dir.glob("host_probe_quick_*.json"))) == 1

    _forbid_measuring(monkeypatch)
    assert probe.probe_host(quick=True) == result
    host = get_hardware("host")
    assert host.name == "host" and host.peak("fp32") == result["peak_flops"]["fp32"]
    assert host.mem_bw == result["mem_bw"]
    assert host.ridge_point(torch.float32) == pytest.approx(host.peak("fp32") / host.mem_bw)


def _fake_measurements(monkeypatch: pytest.MonkeyPatch, bf16: float | None = 2e9) -> list[str]:
    calls: list[str] = []

    def gemm(dtype: str, quick: bool = False) -> dict[str, object]:
        calls.append(dtype)
        rate = {"fp32": 1e9, "bf16": bf16}[dtype]
        return {"peak_flops": rate, "reason": None if rate else "bf16 matmul unsupported",
                "sizes": {}}

    def bandwidth(llc: int, quick: bool = False) -> dict[str, object]:
        return {"array_bytes": 8 * llc, "mem_bw": 1e10, "read_bw": 9e9, "reason": None, "kernels": {}}

    monkeypatch.setattr(probe, "measure_gemm", gemm)
    monkeypatch.setattr(probe, "measure_bandwidth", bandwidth)
    return calls


def test_cache_is_keyed_by_cpu_and_torch(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_measurements(monkeypatch)
    probe.probe_host(quick=True)
    probe.probe_host(quick=True)
    assert calls == ["fp32", "bf16"]  # second call came from the cache
    monkeypatch.setattr(probe, "cpu_model", lambda: "Some Other CPU")
    probe.probe_host(quick=True)
    assert len(calls) == 4  # different CPU: re-measured
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    probe.probe_host(quick=True)
    assert len(calls) == 6  # different torch: re-measured
    probe.probe_host(quick=True, refresh=True)
    assert len(calls) == 8
    probe.probe_host(quick=True, cache=False)
    assert len(calls) == 10


def test_full_cache_satisfies_quick(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_measurements(monkeypatch)
    full = probe.probe_host(quick=False)
    assert probe.probe_host(quick=True) == full and len(calls) == 2


def test_unavailable_bf16_is_recorded_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    real = torch.matmul

    def matmul(a: torch.Tensor, b: torch.Tensor, **kw: object) -> torch.Tensor:
        if a.dtype == torch.bfloat16:
            raise RuntimeError("\"addmm\" not implemented for 'BFloat16'")
        return real(a, b, **kw)

    monkeypatch.setattr(torch, "matmul", matmul)
    result = probe.measure_gemm("bf16", quick=True)
    assert result["peak_flops"] is None and "not implemented" in result["reason"]


def test_host_without_bf16_or_bandwidth(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_measurements(monkeypatch, bf16=None)
    result = probe.probe_host(quick=True, cache=False)
    assert result["peak_flops"]["bf16"] is None and "bf16" in result["peak_reasons"]
    host = probe.hardware_from_probe(result)
    with pytest.raises(HardwareError, match="host has no bf16.*fp32"):
        host.peak(torch.bfloat16)
    assert "unsupported" in host.notes
    with pytest.raises(HardwareError, match="bandwidth"):
        probe.hardware_from_probe({**result, "mem_bw": None, "mem_bw_reason": "out of memory"})


def test_bandwidth_kernels_count_stream_and_write_allocate_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """read 1x / copy 2x / add 3x the array bytes (STREAM); copy 3x, add 4x with the destination
    line fetched first (write-allocate); read_bw is the read kernel, mem_bw copy/add STREAM."""
    monkeypatch.setitem(probe._BW_PLAN, True, (1, 1, 3))          # 1 MiB arrays, 3 calls
    r = probe.measure_bandwidth(2**20, quick=True)
    assert r["array_bytes"] == 2**20
    k = r["kernels"]
    assert {n: (v["bytes_per_call"], v["bytes_per_call_write_allocate"]) for n, v in k.items()} == {
        "read": (2**20, 2**20), "copy": (2 * 2**20, 3 * 2**20), "add": (3 * 2**20, 4 * 2**20)}
    for name, v in k.items():
        assert v["bytes_per_s"]["best"] == pytest.approx(v["bytes_per_call"] / min(v["seconds"]))
        ratio = {"read": 1, "copy": 3 / 2, "add": 4 / 3}[name]
        assert v["bytes_per_s_write_allocate"]["best"] == pytest.approx(ratio * v["bytes_per_s"]["best"])
    assert r["read_bw"] == k["read"]["bytes_per_s"]["best"]
    assert r["mem_bw"] == max(k["copy"]["bytes_per_s"]["best"], k["add"]["bytes_per_s"]["best"])
    assert r["mem_bw_write_allocate"] == max(k["copy"]["bytes_per_s_write_allocate"]["best"],
                                             k["add"]["bytes_per_s_write_allocate"]["best"])


def test_cache_size_parsing_and_llc_detection() -> None:
    assert probe._parse_size("32768K") == 32 * 2**20
    assert probe._parse_size("32 MiB") == 32 * 2**20
    assert probe._parse_size("1M") == 2**20
    llc, how = probe.detect_llc()
    assert llc > 0 and how
    assert probe.cache_bytes_per_instance(99) is None                  # no such level: None, not 0
    l1 = probe.cache_bytes_per_instance(1)
    assert l1 is None or 4 * 2**10 <= l1 <= llc


def test_probe_result_is_a_hardware(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_measurements(monkeypatch)
    host = probe.host_hardware()
    assert isinstance(host, Hardware)
    assert host.peak("fp32") == 1e9 and host.peak("bf16") == 2e9 and host.mem_bw == 1e10
    assert "host" in hardware_table(include_host=True).index


# ----------------------------------------------------------------------------- ISA spec peak
def _cpuinfo(vendor: str, family: int, model: int, flags: str, cores: list[tuple[int, int]],
             mhz: float | None = 2000.0) -> str:
    """A /proc/cpuinfo text with one block per logical CPU at the (physical id, core id) given."""
    blocks = []
    for i, (pkg, core) in enumerate(cores):
        lines = [f"processor\t: {i}", f"vendor_id\t: {vendor}", f"cpu family\t: {family}",
                 f"model\t\t: {model}", "model name\t: Test CPU", f"physical id\t: {pkg}", f"core id\t\t: {core}"]
        if mhz is not None:
            lines.append(f"cpu MHz\t\t: {mhz}")
        lines.append(f"flags\t\t: fpu sse2 {flags}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


SKYLAKE_SP = _cpuinfo("GenuineIntel", 6, 85, "avx avx2 fma avx512f", [(0, 0), (0, 1), (0, 0), (0, 1)])
LSCPU_3GHZ = "Architecture: x86_64\nCPU(s): 4\nCPU max MHz: 3000.0000\nCPU min MHz: 1000.0000\n"


def test_isa_peak_by_hand_on_a_hyperthreaded_avx512_core() -> None:
    from cohw_utils.hardware import isa

    facts = isa.read_cpu_facts(SKYLAKE_SP, LSCPU_3GHZ)
    assert facts.logical_cpus == 4 and facts.physical_cores == 2 and facts.mhz == 3000.0
    peaks = isa.isa_peaks(facts)
    # 2 physical cores x 3.0 GHz x 2 FMA x 8 fp64 lanes (512-bit) x 2 FLOPs = 192 GFLOP/s
    assert peaks["fp64"].flops == pytest.approx(2 * 3.0e9 * 2 * 8 * 2)
    assert peaks["fp32"].flops == pytest.approx(2 * 3.0e9 * 2 * 16 * 2)
    assert peaks["fp64"].cores_kind == "physical" and "CPU max MHz" in peaks["fp64"].ghz_source
    assert peaks["bf16"].flops is None and "no bf16 arithmetic" in peaks["bf16"].reason
    assert "no ISA peak" in peaks["bf16"].describe() and "192.0 GFLOP/s" in peaks["fp64"].describe()
    assert peaks["fp64"].implied_ghz(96e9) == pytest.approx(1.5)      # half the peak = half the clock
    one = isa.isa_peak("fp64", facts, fma_units=1, ghz=2.0)             # overrides: a Xeon Silver at 2 GHz
    assert one.flops == pytest.approx(2 * 2.0e9 * 1 * 8 * 2) and one.fma_source == "given"


def test_isa_peak_bf16_rules_and_families() -> None:
    from cohw_utils.hardware import isa

    amx = isa.read_cpu_facts(_cpuinfo("GenuineIntel", 6, 143, "avx2 avx512f avx512_bf16 amx_bf16 amx_tile",
                                      [(0, 0), (0, 1)]), LSCPU_3GHZ)
    assert isa.isa_peak("bf16", amx).flops == pytest.approx(2 * 3.0e9 * 1024)   # AMX: 1024 FLOP/cycle/core
    zen4 = isa.read_cpu_facts(_cpuinfo("AuthenticAMD", 25, 17, "avx2 avx512f avx512_bf16", [(0, 0)]), "")
    bf16 = isa.isa_peak("bf16", zen4)
    # no lscpu: the cpuinfo clock (2.0 GHz), labelled; Zen 4 = one 512-bit FMA per cycle; 32 bf16 lanes
    assert bf16.flops == pytest.approx(1 * 2.0e9 * 1 * 32 * 2) and "cpu MHz" in bf16.ghz_source
    assert bf16.fma_units == 1 and "Zen 4" in bf16.fma_source
    zen3 = isa.read_cpu_facts(_cpuinfo("AuthenticAMD", 25, 1, "avx2 fma", [(0, 0)]), "")
    assert isa.isa_peak("fp32", zen3).flops == pytest.approx(2.0e9 * 2 * 8 * 2)   # 256-bit, 2 FMA


def test_isa_peak_missing_facts_and_bad_input() -> None:
    from cohw_utils.hardware import isa

    no_clock = isa.read_cpu_facts(_cpuinfo("GenuineIntel", 6, 85, "avx2", [(0, 0)], mhz=None), "")
    p = isa.isa_peak("fp32", no_clock)
    assert p.flops is None and "pass ghz=" in p.reason                 # never a silent 0
    assert isa.isa_peak("fp32", no_clock, ghz=1.0).flops == pytest.approx(1.0e9 * 2 * 8 * 2)
    no_core_id = "processor\t: 0\nvendor_id\t: X\ncpu MHz\t\t: 1000\nflags\t\t: sse2\n\nprocessor\t: 1\nvendor_id\t: X\n"
    facts = isa.read_cpu_facts(no_core_id, "")
    q = isa.isa_peak("fp64", facts)
    assert facts.physical_cores is None and q.cores == 2 and q.cores_kind.startswith("logical")
    assert q.flops == pytest.approx(2 * 1.0e9 * 2 * 2 * 2)             # 128-bit: 2 fp64 lanes, default 2 FMA
    assert "default" in q.fma_source
    with pytest.raises(HardwareError, match="no ISA peak rule"):
        isa.isa_peak("fp8", facts)
    with pytest.raises(HardwareError, match="ghz must be a positive"):
        isa.isa_peak("fp32", facts, ghz=0)
    here = isa.isa_peak("fp32")                                      # this machine: a positive peak or a reason
    assert (here.flops is None) == (here.reason is not None) and (here.flops is None or here.flops > 0)
