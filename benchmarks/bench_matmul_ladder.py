"""Benchmark: the matmul ladder (Leiserson et al. 2020, Table 1) on this machine.

Prints the ladder beside the paper's table and the benchmark figure: the top rung's rate as a
% of this machine's probed GEMM peak in its dtype (target: >= 50%; the paper's top rung
reached 40.45% of its spec-sheet peak). Asserts nothing (performance targets are not tests).

Method: :mod:`cohw_utils.studies.performance.matmul_ladder` (each rung at its own size, scaled to 4096 by n^3;
rate = best of ``--repeats`` calls after one warm-up; peaks from :func:`cohw_utils.hardware.probe.probe_host`,
cached). The load average is printed: other processes on the cores lower every rate.

    python benchmarks/bench_matmul_ladder.py [--quick] [--repeats 3] [--compiled-n 1536]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from cohw_utils.studies.performance import matmul_ladder  # noqa: E402
from cohw_utils.hardware import probe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the chapter's smoke sizes and the quick probe")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--python-n", type=int)
    ap.add_argument("--compiled-n", type=int)
    ap.add_argument("--blas-n", type=int)
    args = ap.parse_args()
    res = probe.probe_host(quick=args.quick)
    sizes = matmul_ladder.default_sizes(args.quick)
    for key, v in (("python", args.python_n), ("compiled", args.compiled_n), ("blas", args.blas_n)):
        if v:
            sizes[key] = v
    print(f"load average before: {os.getloadavg()[0]:.2f}; sizes {sizes}; peaks "
          f"fp32 {res['peak_flops']['fp32'] / 1e9:.0f}, bf16 {res['peak_flops']['bf16'] / 1e9:.0f} GFLOP/s "
          f"({'quick' if res['quick'] else 'full'} probe of {res['date']})")
    ladder = matmul_ladder.run_ladder(res["peak_flops"], sizes=sizes, repeats=args.repeats,
                                      repeats_python=args.repeats)
    with pd.option_context("display.width", 220, "display.max_columns", 30):
        print(matmul_ladder.side_by_side(ladder).round(3).to_string(index=False))
    top = matmul_ladder.top_rung(ladder)
    print(f"\nBENCHMARK top rung: {top['implementation']} {top['gflops']:.1f} GFLOP/s = "
          f"{top['pct_of_peak']:.1f}% of the probed {top['dtype']} peak (target >= 50%; paper 40.45%); "
          f"{top['abs_speedup']:,.0f}x over Python (paper 62,806x); load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
