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

3. **Fused int8-KV attention** (``--kv-attention``): one layer's decode attention (32 heads of
   128, Llama-2-7B) against an fp32 cache, the int8 cache dequantized whole, the int8 codes read
   tile by tile, and int8 scores by ``torch._int_mm``, at ``--contexts`` tokens
   (:func:`cohw_utils.studies.quantization.kv_quant.time_kv_attention`; median, min/max of
   ``--repeats`` calls after 2 warm-ups).
4. **Measured tables and Chapter 5's LLM bit floor** (``--write-floors``, several minutes):
   trains Chapter 4.2b's model with the chapter's *default* (non-smoke) parameters
   (``cohw_utils.book.claims.DEFAULTS``), measures held-out perplexity with paired 95% intervals
   of its weight methods, the activation methods (W8A8, SmoothQuant, FP8) and the KV-cache
   formats (fp32, int8, int4, int4-g32, fp8-e4m3), and ``--extra-methods`` narrower than the
   chapter's (2-bit by default, so the floor is not merely the narrowest format tried); prints
   the tables, and writes the narrowest
   weight-only format within ``--tolerance`` percent (upper end of its 95% interval;
   :func:`cohw_utils.studies.quantization.results.weight_bit_floor`) with machine, date,
   training steps and the tables to ``cohw_utils/data/measured_bit_floors.json``, which
   ``cohw_utils.studies.codesign.phases`` reads.

    python benchmarks/bench_quant.py [--n 11008] [--k 4096] [--layers 4] [--repeats 10] [--quick]
    python benchmarks/bench_quant.py --skip-ladder --skip-cost --kv-attention --contexts 512 2048 8192
    python benchmarks/bench_quant.py --skip-ladder --skip-cost --write-floors [--tolerance 1.0]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
from pathlib import Path

import pandas as pd
import torch

from cohw_utils.hardware.probe import host_hardware
from cohw_utils.spine.measure import time_callable
from cohw_utils.studies.quantization.awq import awq_search
from cohw_utils.studies.quantization.blocks import InputStats
from cohw_utils.studies.quantization.gptq import gptq_quantize
from cohw_utils.studies.quantization.ladder import gemv_ladder
from cohw_utils.studies.quantization.schemes import quantize_rtn, scheme


FLOORS_FILE = Path(__file__).resolve().parents[1] / "cohw_utils" / "data" / "measured_bit_floors.json"
KV_FORMATS = ("int8", "int4", "int4-g32", "fp8-e4m3")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measured_tables(tolerance: float, extra: tuple[str, ...] = ()) -> dict:
    """Chapter 4.2b's measurements at its default parameters (plus the ``extra`` weight methods,
    narrower than the chapter's, so the floor is not just the narrowest format tried), and the
    LLM bit floor they imply."""
    from transformers import DynamicCache

    from cohw_utils.book.claims import DEFAULTS
    from cohw_utils.studies.quantization import tinylm
    from cohw_utils.studies.quantization.kv_quant import quant_kv_cache
    from cohw_utils.studies.quantization.kv_int8 import int8_kv_cache
    from cohw_utils.studies.quantization.methods import ACT_METHODS
    from cohw_utils.studies.quantization.results import evaluate_methods, weight_bit_floor

    p = DEFAULTS["04c_quantization"]
    cfg = tinylm.TinyLMConfig(steps=p["TRAIN_STEPS"], batch=p["BATCH"])
    lm = tinylm.build_tiny_lm(cfg, callback=lambda s, l: print(f"  step {s:4d} loss {l:.3f}", flush=True), log_every=100)
    windows = tinylm.eval_windows(lm.heldout_ids, cfg.seq_len, p["EVAL_WINDOWS"])
    calib = tinylm.random_windows(lm.train_ids, p["CALIB_WINDOWS"], cfg.seq_len, torch.Generator().manual_seed(1234))
    methods = list(p["METHODS"]) + [m for m in (*extra, *ACT_METHODS) if m not in p["METHODS"]]
    table, _ = evaluate_methods(lm.model, methods, windows, calib=calib, progress=lambda s: print(" ", s, flush=True))
    floor = weight_bit_floor(table, tolerance)
    cols = ["method", "bits_per_weight", "ppl", "delta_pct", "delta_pct_lo", "delta_pct_hi"]
    print(table[cols].round(4).to_string(index=False))
    ref = tinylm.window_nll(lm.model, windows)
    kv_rows = []
    factories = {"fp32": DynamicCache, "int8": lambda: int8_kv_cache(lm.model.config),
                 **{kv: (lambda kv=kv: quant_kv_cache(lm.model.config, kv)) for kv in KV_FORMATS if kv != "int8"}}
    for kv, fac in factories.items():
        nll = tinylm.window_nll(lm.model, windows, cache_factory=fac)
        d, lo, hi = tinylm.paired_change(ref, nll)
        kv_rows.append({"kv": kv, "ppl": math.exp(float(nll.mean())), "delta_pct": d, "delta_pct_lo": lo,
                        "delta_pct_hi": hi})
    kv_table = pd.DataFrame(kv_rows)
    print(kv_table.round(4).to_string(index=False))
    print(f"LLM weight-bit floor: {floor['method']} ({floor['bits']}-bit codes, {floor['bits_per_weight']:.3f} bits/weight), "
          f"perplexity {floor['delta_pct']:+.3f}% (upper 95% bound {floor['delta_pct_hi']:+.3f}% <= {tolerance}%)")
    return {
        "llm": {**floor, "criterion": "narrowest weight-only format (fewest stored bits per weight) whose held-out "
                                      "perplexity increase over fp32 is <= tolerance_pct at the upper end of its paired "
                                      "95% interval (cohw_utils.studies.quantization.results.weight_bit_floor)"},
        "source": "measured: Chapter 4.2b's model trained and evaluated by benchmarks/bench_quant.py --write-floors",
        "training_steps": cfg.steps, "batch": cfg.batch, "seq_len": cfg.seq_len,
        "eval_tokens": int(windows.numel()), "calibration_tokens": int(calib.numel()),
        "extra_methods": list(extra), "final_train_loss": lm.log.losses[-1], "train_seconds": lm.log.seconds,
        "machine": _cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "methods": table[cols].to_dict(orient="records"), "kv": kv_table.to_dict(orient="records"),
    }


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
    ap.add_argument("--skip-ladder", action="store_true")
    ap.add_argument("--kv-attention", action="store_true", help="time the int8-KV attention paths")
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--attn-threads", type=int, default=1, help="torch threads while timing attention")
    ap.add_argument("--write-floors", action="store_true", help=f"measure and write {FLOORS_FILE.name}")
    ap.add_argument("--extra-methods", nargs="*", default=["rtn-int2-g128", "gptq-int2-g128", "gptq-int2-g64"],
                    help="weight methods narrower than the chapter's, measured for the floor")
    ap.add_argument("--tolerance", type=float, default=1.0, help="perplexity increase (%%) allowed at the 95%% upper bound")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {_cpu_name()}")
    if args.kv_attention:
        from cohw_utils.studies.quantization.kv_quant import time_kv_attention

        t = time_kv_attention(args.contexts, repeats=args.repeats, threads=args.attn_threads)
        print(f"decode attention, 1 layer, 32 heads x 128, batch 1, {t.loc[0, 'threads']} thread(s); "
              f"{t.loc[0, 'timing'].split('(', 1)[1].rstrip(')')}")
        print(t.drop(columns="timing").round(4).to_string(index=False))
    if args.write_floors:
        record = measured_tables(args.tolerance, tuple(args.extra_methods))
        FLOORS_FILE.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {FLOORS_FILE.relative_to(FLOORS_FILE.parents[2])}")
    if not args.skip_ladder:
        host = host_hardware(quick=args.quick)
        print(f"host stream bandwidth {host.mem_bw / 1e9:.1f} GB/s, LLC {(host.llc_bytes or 0) / 2**20:.0f} MiB")
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
