"""Benchmark: FlashAttention's IO (Dao et al. 2022, Theorem 2), computed and measured on this CPU.

Prints (1) the bytes the math path (S and P written to and read from memory) and a tiled
flash kernel move for each sequence length, with the on-chip memory M of an A100 SM (192 KB,
the paper's figure) and of this CPU's L2 per core (sysfs), and (2) the measured CPU comparison:
``F.scaled_dot_product_attention`` under ``sdpa_kernel(SDPBackend.MATH)`` against
``SDPBackend.FLASH_ATTENTION``, median/min/max of ``--repeats`` timed calls, and the bytes each
materialises (a dispatch mode over its aten ops). Asserts nothing.

Method: :mod:`cohw_utils.studies.performance.flash_io`.

    python benchmarks/bench_flash_io.py [--seq-lens 512,1024,2048,4096] [--heads 4] [--head-dim 64] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from cohw_utils.hardware import probe  # noqa: E402
from cohw_utils.studies.performance import flash_io  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-lens", default="512,1024,2048,4096")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    seq_lens = [int(n) for n in args.seq_lens.split(",") if n.strip()]
    l2 = probe.cache_bytes_per_instance(2)
    pd.set_option("display.width", 220, "display.max_columns", 30)
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    for label, sram, dtype in (("A100 SM, 192 KB (Dao et al.), fp16", flash_io.A100_SRAM_BYTES, "fp16"),
                               (f"this CPU's L2 per core, {l2 / 2**10:.0f} KiB, {args.dtype}" if l2 else None, l2, args.dtype)):
        if sram is None:
            print("this CPU's L2 size is not in sysfs: its IO model is skipped")
            continue
        t = flash_io.io_table(seq_lens, args.head_dim, args.heads, 1, dtype, sram)
        print(f"\nIO model, batch 1, {args.heads} heads, head_dim {args.head_dim}; M = {label} (q-outer tiling):")
        print(t.round(3).to_string())
    m = flash_io.measure_sdpa(seq_lens, args.head_dim, args.heads, 1, args.dtype, repeats=args.repeats)
    print(f"\nmeasured: {m.attrs['method']}")
    cols = ["math_ms", "math_min_ms", "math_max_ms", "flash_ms", "flash_min_ms", "flash_max_ms", "speedup",
            "math_alloc_MiB", "math_peak_MiB", "model_math_MiB", "flash_alloc_MiB", "max_abs_diff"]
    print(m[cols].round(3).to_string())
    last = m.iloc[-1]
    print(f"\nBENCHMARK flash vs math SDPA on this CPU at N={m.index[-1]}: {last['speedup']:.1f}x faster (medians), "
          f"{last['math_alloc_MiB']:.0f} MiB vs {last['flash_alloc_MiB']:.1f} MiB materialised; "
          f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
