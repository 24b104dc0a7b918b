"""Benchmark: model FLOPs utilization of a training step, measured on this machine's CPU and
predicted for Megatron-LM's GPU runs beside the published figures.

Prints figures; asserts nothing.

Method (cohw_utils.studies.parallel.training and .megatron):

* **Formula vs tracer**: PaLM's 6N + 12LHQT FLOPs per token beside the tracer's count of one
  forward + backward of the same model on ``meta`` (contraction FLOPs, and all FLOPs).
* **Measured**: the 4-layer Llama of the gloo run (random weights) trained with AdamW in fp32 on
  ``--batch`` x ``--seq`` random token ids; ``--repeats`` timed steps after ``--warmup`` steps
  (median, min, max, IQR); MFU = tokens/s x model FLOPs per token / this host's probed fp32 GEMM
  peak (the ISA spec peak printed beside it where the machine reports one).
* **Predicted vs published**: every row of Megatron-LM's Table 1 (Narayanan et al. 2021), one
  rank's step from its own TP plan traced per rank, the calibrated A100 predictor, NVLink
  all-reduces, the 1F1B bubble, InfiniBand sends and the data-parallel all-reduce; the error of
  the predicted teraFLOP/s per GPU, and both as MFU.

    python benchmarks/bench_mfu.py [--batch 4] [--seq 128] [--repeats 5] [--warmup 2] [--rows N] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import pandas as pd

from cohw_utils.studies.parallel import megatron as mg
from cohw_utils.studies.parallel import training as tr
from cohw_utils.studies.parallel.gloo_run import SMALL_LLAMA


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rows", type=int, default=None, help="only the first N rows of Table 1")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    check = tr.flops_check(SMALL_LLAMA, args.batch, args.seq)
    run = tr.measure_train_step(batch=args.batch, seq_len=args.seq, repeats=args.repeats, warmup=args.warmup)
    try:
        from cohw_utils.hardware.isa import isa_peak

        spec = isa_peak(run.dtype).flops
    except Exception:  # the ISA peak is context, not part of the measurement
        spec = None
    table = mg.load_table1()
    if args.rows:
        table = table.head(args.rows)
    cmp = mg.compare_table1(table)
    err = cmp["error"].abs()
    report = {
        "formula_flops": check["formula"], "traced_contraction_ratio": round(check["contraction_ratio"], 5),
        "traced_total_ratio": round(check["total_ratio"], 5), "norm_bias_term": check["norm_bias_term"],
        "tokens_per_s": round(run.tokens_per_s, 1), "step_median_ms": round(run.timing.median * 1e3, 2),
        "step_min_ms": round(run.timing.min * 1e3, 2), "step_max_ms": round(run.timing.max * 1e3, 2),
        "repeats": run.timing.repeats, "warmup": run.timing.warmup,
        "mfu_probed_peak": round(run.mfu, 4), "mfu_range": [round(x, 4) for x in run.mfu_range],
        "probed_peak_gflops": round(run.peak_flops / 1e9, 1),
        "isa_peak_gflops": round(spec / 1e9, 1) if spec else None,
        "mfu_isa_peak": round(run.achieved_flops / spec, 4) if spec else None,
        "megatron_rows": int(len(cmp)), "megatron_median_abs_error": round(float(err.median()), 4),
        "megatron_worst_abs_error": round(float(err.max()), 4),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print("Formula vs tracer, one training step of the measured model "
          f"({args.batch} x {args.seq} tokens, forward + backward on meta):")
    print(f"  6N + 12LHQT: {check['formula'] / 1e9:.3f} GFLOP; traced contractions x "
          f"{check['contraction_ratio']:.5f} (the formula's 6 x {check['norm_bias_params']} norm gains per token "
          f"= {check['norm_bias_term'] / 1e6:.2f} MFLOP do no matmul); all traced FLOPs x {check['total_ratio']:.4f} "
          f"({', '.join(f'{k} {v / 1e6:.1f} M' for k, v in check['non_contraction'].items())})")
    print("\nMeasured on this machine:")
    print("  " + run.describe())
    if spec:
        print(f"  against the ISA spec peak ({spec / 1e9:.1f} GFLOP/s, cores x GHz x FMA x lanes x 2): "
              f"MFU {run.achieved_flops / spec:.1%}")
    print("\nMegatron-LM Table 1 (Narayanan et al. 2021) on A100-80GB, predicted per rank vs published "
          "(TFLOP/s per GPU as the paper counts them, Eq. 3 with recomputation; MFU without it):")
    cols = ["t", "p", "d", "GPUs", "batch", "published TFLOP/s per GPU", "predicted TFLOP/s per GPU", "error",
            "published MFU", "predicted MFU", "bubble", "tp comm (s)", "dp all-reduce (s)", "step (s)"]
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(cmp[cols].round(3).to_string())
    print(f"\n  |error| median {err.median():.1%}, worst {err.max():.1%} over {len(cmp)} rows "
          f"({time.perf_counter() - t0:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
