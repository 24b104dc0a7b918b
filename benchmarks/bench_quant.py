"""Benchmark: weight-only quantized GEMV kernels on this CPU, and the cost of GPTQ/AWQ.

Prints figures; asserts nothing (performance numbers are not timed tests).

1. **Kernel ladder** (:func:`cohw_utils.studies.quantization.ladder.gemv_ladder`): one token (``x`` of shape 1 x K)
   through ``--layers`` distinct N x K weights (default 4 x 11008 x 4096, a Llama-2-7B
   gate/up projection: the int4 copies alone exceed a 32 MB last-level cache) in fp32, bf16,
   int8 per-channel (``torch._weight_int8pack_mm`` and dequantize-then-matmul), int4 g128
   (``_weight_int4pack_mm_for_cpu`` and dequantize-then-matmul) and GGUF Q4_0 (int4pack).
   Each row: packed weight bytes read per token, median/min/max time over ``--repeats`` calls
   after 2 warm-ups (``cohw_utils.spine.measure.time_callable``), GB/s, and MBU against the host's
   probed stream bandwidth (``cohw_utils.hardware.probe``; ``--quick`` uses the quick probe).
2. **Quantization cost**: wall time of RTN, GPTQ and AWQ's 20-point scale search, int4 g128,
   on one ``--cost-n`` x ``--cost-k`` weight (default 4096 x 4096, a Llama-2-7B attention
   projection) with the Hessian of 4096 random inputs (per-layer algorithm cost only; one call
   each, no warm-up, ``time_callable(repeats=1, warmup=0)``; ``--skip-cost`` to omit).

    python benchmarks/bench_quant.py [--n 11008] [--k 4096] [--layers 4] [--repeats 10] [--quick]
"""
from __future__ import annotations

import argparse

import torch

from cohw_utils.hardware.probe import host_hardware
from cohw_utils.spine.measure import time_callable
from cohw_utils.studies.quantization.awq import awq_search
from cohw_utils.studies.quantization.blocks import InputStats
from cohw_utils.studies.quantization.gptq import gptq_quantize
from cohw_utils.studies.quantization.ladder import gemv_ladder
from cohw_utils.studies.quantization.schemes import quantize_rtn, scheme


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=11008)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="quick host probe")
    ap.add_argument("--cost-n", type=int, default=4096)
    ap.add_argument("--cost-k", type=int, default=4096)
    ap.add_argument("--skip-cost", action="store_true")
    args = ap.parse_args()

    host = host_hardware(quick=args.quick)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; host stream bandwidth "
          f"{host.mem_bw / 1e9:.1f} GB/s, LLC {(host.llc_bytes or 0) / 2**20:.0f} MiB")
    ladder = gemv_ladder(args.n, args.k, layers=args.layers, repeats=args.repeats)
    ladder["MBU"] = ladder["GB/s"] * 1e9 / host.mem_bw
    print(f"{args.layers} x ({args.n} x {args.k}); {ladder.loc[0, 'timing'].method}")
    print(ladder.drop(columns="timing").round(4).to_string(index=False))

    if args.skip_cost:
        return
    g = torch.Generator().manual_seed(0)
    n, k = args.cost_n, args.cost_k
    w = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(4096, k, generator=g)
    H = (x.T @ x / len(x)).double()
    st = InputStats(H, x.abs().mean(0).double(), len(x))
    sch = scheme(4, 128)
    for name, fn in [("rtn", lambda: quantize_rtn(w, sch)),
                     ("gptq", lambda: gptq_quantize(w, H, sch)),
                     ("awq search (20 alphas)", lambda: awq_search([w], st, sch))]:
        t = time_callable(fn, repeats=1, warmup=0)
        print(f"{name:24s} int4 g128 on {n} x {k}: {t.median:.2f} s")


if __name__ == "__main__":
    main()
