"""Benchmark: the matmul ladder (Leiserson et al. 2020, Table 1) on this machine.

Prints the ladder beside the paper's table and the benchmark figure: the top fp64 rung's rate
as a % of this CPU's ISA fp64 peak (cores x GHz x FMA units x SIMD lanes x 2, every factor read
from the machine or a labelled assumption: :mod:`cohw_utils.hardware.isa`), the same kind of
figure as the paper's 40.45% of its spec fp64 peak. Rungs in fp32 and bf16 are against their
own dtype's ISA peak. Where a rung passes 100%, the clock its rate implies is printed: the
machine's reported clock is then below the one it ran at (a VM's nominal clock, or boost).
Asserts nothing and has no target (performance figures are not tests; the old ">= 50% of our
probed peak" target was against our own torch GEMM and could not fail).

Method: :mod:`cohw_utils.studies.performance.matmul_ladder` (each rung at its own size, scaled to 4096 by n^3;
rate = best of ``--repeats`` calls after one warm-up). The load average is printed: other
processes on the cores lower every rate. ``--ghz`` and ``--fma-units`` override the machine's.

    python benchmarks/bench_matmul_ladder.py [--quick] [--repeats 3] [--compiled-n 1536] [--ghz 3.5]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from cohw_utils.hardware import isa  # noqa: E402
from cohw_utils.studies.performance import matmul_ladder  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the chapter's smoke sizes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--python-n", type=int)
    ap.add_argument("--compiled-n", type=int)
    ap.add_argument("--blas-n", type=int)
    ap.add_argument("--ghz", type=float, help="override the clock the machine reports")
    ap.add_argument("--fma-units", type=int, help="override the FMA units per core")
    args = ap.parse_args()
    peaks = isa.isa_peaks(ghz=args.ghz, fma_units=args.fma_units)
    sizes = matmul_ladder.default_sizes(args.quick)
    for key, v in (("python", args.python_n), ("compiled", args.compiled_n), ("blas", args.blas_n)):
        if v:
            sizes[key] = v
    print(f"load average before: {os.getloadavg()[0]:.2f}; sizes {sizes}")
    print("ISA peaks of this CPU:")
    for p in peaks.values():
        print("  " + p.describe())
    ladder = matmul_ladder.run_ladder(peaks, sizes=sizes, repeats=args.repeats, repeats_python=args.repeats)
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.max_colwidth", 40):
        print(matmul_ladder.side_by_side(ladder).round(3).to_string(index=False))
    vs = matmul_ladder.versus_paper(ladder)
    print(f"\nBENCHMARK top fp64 rung: {vs['implementation']} {vs['gflops']:.1f} GFLOP/s = "
          f"{vs['pct_of_isa_peak']:.1f}% of this CPU's ISA fp64 peak ({vs['peak_gflops']:.0f} GFLOP/s) "
          f"(Leiserson et al.: {vs['paper_gflops']:.0f} GFLOP/s = {vs['paper_pct_of_peak']:.2f}% of their spec fp64 "
          f"peak); {vs['abs_speedup']:,.0f}x over Python (paper {vs['paper_abs_speedup']:,.0f}x)")
    for _, r in ladder[ladder["dtype"] != "fp64"].iterrows():
        print(f"beyond the paper: {r['implementation']} {r['gflops']:.1f} GFLOP/s = {r['pct_of_peak']:.1f}% "
              f"of the {r['peak_basis']}")
    for rung, ghz in vs["above_peak"].items():
        print(f"NOTE: {rung} passes its ISA peak: its rate implies a clock of at least "
              f"{ghz:.2f} GHz" if ghz else f"NOTE: {rung} passes its peak")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
