"""The matmul ladder: every rung multiplies correctly; the table's arithmetic; the paper's data."""
from __future__ import annotations

import numpy as np
import pytest

from cohw_utils.studies.performance import matmul_ladder as ml
from cohw_utils.core.errors import CohwError

PEAKS = {"fp64": 1e11, "fp32": 2e11, "bf16": 8e11}


@pytest.mark.parametrize("key,n", [("python", 7), ("python-ikj", 7), ("numba", 70), ("parallel", 70),
                                   ("tiled", 70), ("vectorized", 70), ("blas-fp64", 64), ("blas-fp32", 64),
                                   ("blas-bf16", 64),
                                   ("numpy", 64)])
def test_every_rung_computes_the_product(key, n):
    row = ml.measure_rung(key, n, repeats=1, warmup=0)
    tol = 2e-2 if key == "blas-bf16" else 1e-5
    assert row["max_rel_err"] < tol
    assert row["gflops"] == pytest.approx(2 * n**3 / row["best_s"] / 1e9)
    assert row["time_at_4096_s"] == pytest.approx(row["best_s"] * (4096 / n) ** 3)


def test_ladder_table_arithmetic():
    df = ml.run_ladder(PEAKS, sizes={"python": 6, "compiled": 32, "blas": 64}, repeats=1,
                       rungs=("python", "python-ikj", "numba", "blas-fp64", "blas-fp32", "blas-bf16"))
    assert list(df.rung) == ["python", "python-ikj", "numba", "blas-fp64", "blas-fp32", "blas-bf16", "numpy"]
    assert df.abs_speedup.iloc[0] == 1.0 and np.isnan(df.rel_speedup.iloc[0])
    np.testing.assert_allclose(df.abs_speedup, df.gflops / df.gflops.iloc[0])
    assert df.rel_speedup.iloc[2] == pytest.approx(df.gflops.iloc[2] / df.gflops.iloc[1])
    assert np.isnan(df.rel_speedup.iloc[-1])  # numpy sits beside the ladder, not on it
    r = df.set_index("rung")
    # every rung against its own dtype's peak: fp64 rungs (Python floats, numba, BLAS fp64) the fp64 one
    for rung, dtype in (("python", "fp64"), ("numba", "fp64"), ("blas-fp64", "fp64"), ("blas-fp32", "fp32"),
                        ("blas-bf16", "bf16"), ("numpy", "fp32")):
        assert r.loc[rung, "dtype"] == dtype and r.loc[rung, "peak_basis"] == f"given {dtype} peak"
        assert r.loc[rung, "pct_of_peak"] == pytest.approx(100 * r.loc[rung, "gflops"] * 1e9 / PEAKS[dtype])
    assert ml.top_rung(df).rung in ("python", "python-ikj", "numba", "blas-fp64")   # fp64 by default
    assert ml.top_rung(df, None).pct_of_peak == df[df.rung != "numpy"].pct_of_peak.max()
    side = ml.side_by_side(df)
    assert side.set_index("rung").loc["python", "paper_running_time_s"] == 25552.48
    assert side.set_index("rung").loc["blas-fp64", "paper_running_time_s"] == 0.41   # version 7, AVX intrinsics
    assert np.isnan(side.set_index("rung").loc["python-ikj", "paper_gflops"])
    vs = ml.versus_paper(df)
    assert vs["paper_pct_of_peak"] == 40.45 and vs["paper_abs_speedup"] == 62806
    assert vs["pct_of_isa_peak"] == pytest.approx(100 * vs["gflops"] * 1e9 / PEAKS["fp64"])


def test_ladder_against_isa_peaks_labels_a_missing_peak():
    from cohw_utils.hardware import isa

    facts = isa.CpuFacts(vendor="GenuineIntel", model_name="test", family=6, model=85,
                         flags=frozenset({"avx2", "avx512f"}), logical_cpus=2, physical_cores=2, mhz=2000.0,
                         mhz_source="test")
    peaks = isa.isa_peaks(facts)      # 2 cores x 2 GHz x 2 FMA x 8 x 2 = 128 GFLOP/s fp64; no bf16 flag
    df = ml.run_ladder(peaks, sizes={"python": 4, "compiled": 8, "blas": 16}, repeats=1,
                       rungs=("python", "blas-bf16"), extra=False).set_index("rung")
    assert df.loc["python", "peak_gflops"] == pytest.approx(128.0) and df.loc["python", "peak_basis"] == "ISA fp64 peak"
    assert np.isnan(df.loc["blas-bf16", "pct_of_peak"]) and "no bf16 arithmetic" in df.loc["blas-bf16", "peak_basis"]


def test_paper_table_is_internally_consistent():
    p = ml.leiserson_table()
    assert list(p.version) == [1, 2, 3, 4, 5, 6, 7]
    assert p.running_time_s.iloc[0] == 25552.48 and p.running_time_s.iloc[-1] == 0.41
    assert p.fraction_of_peak_pct.iloc[-1] == 40.45 and p.absolute_speedup.iloc[-1] == 62806
    # GFLOPS = 2 * 4096^3 / time (times printed to 2 decimals, GFLOPS to 3: tolerances);
    # absolute speedup = time ratio; % of peak against 835 GFLOP/s
    np.testing.assert_allclose(p.gflops, 2 * 4096**3 / p.running_time_s / 1e9, rtol=0.01, atol=1e-3)
    np.testing.assert_allclose(p.absolute_speedup, p.running_time_s.iloc[0] / p.running_time_s, rtol=0.025, atol=0.5)
    np.testing.assert_allclose(p.fraction_of_peak_pct[1:], 100 * p.gflops[1:] / 835, atol=0.05)
    assert p.attrs["citation"] == "leiserson2020there"


def test_bad_input_raises():
    with pytest.raises(CohwError, match="unknown rung"):
        ml.measure_rung("fortran", 8)
    with pytest.raises(CohwError, match="matrix size"):
        ml.measure_rung("numba", 1)
    with pytest.raises(CohwError, match="peaks has no fp64 figure"):
        ml.run_ladder({"fp32": 1e11}, sizes={"python": 4, "compiled": 8, "blas": 8})
    with pytest.raises(CohwError, match="fp64 peak must be a positive"):
        ml.run_ladder({**PEAKS, "fp64": 0}, sizes={"python": 4, "compiled": 8, "blas": 8})
    with pytest.raises(CohwError, match="unknown rung"):
        ml.run_ladder(PEAKS, rungs=("fortran",))
