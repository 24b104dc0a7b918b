"""Benchmark: fusion of bandwidth-bound chains, eager vs torch.compile, with the allocator stated.

Prints, per chain of :data:`cohw_utils.studies.performance.fusion.CHAINS`: eager time with glibc's default malloc
(measured in a fresh process), eager and compiled time with the retaining allocator
(``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD, 2**31-1)``), the speedup, bytes before
(eager op table) and after (the compiled graph's inputs, outputs and buffers), and the fused
kernel count. Asserts nothing.

    python benchmarks/bench_fusion.py [--quick] [--repeats 10]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from cohw_utils.studies.performance import fusion  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the chapter's smoke sizes")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    default = fusion.run_in_subprocess("studies.performance.fusion.eager_times", {"smoke": args.quick, "repeats": args.repeats},
                                       allocator="default")
    print(fusion.set_allocator("retain"))
    bench = fusion.benchmark(smoke=args.quick, repeats=args.repeats)
    bench.insert(1, "eager_default_malloc_ms", default["eager_ms"])
    cols = ["shape", "eager_default_malloc_ms", "eager_ms", "compiled_ms", "speedup", "kernels_eager",
            "kernels_compiled", "bytes_before", "bytes_after", "bytes_saved_%", "compile_s"]
    with pd.option_context("display.width", 220, "display.max_columns", 30):
        print(bench[cols].round(3).to_string())
    print(f"{bench.attrs['method']}; allocator {bench.attrs['allocator']}; {bench.attrs['threads']} threads; "
          f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
