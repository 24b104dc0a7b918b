"""Benchmark: tracer wall time and peak memory on a full-scale model on ``meta``.

Prints figures; asserts nothing (performance targets are not timed tests). Target from the
foundation issue: Llama-2-70B prefill of 4096 tokens under 15 s and 2 GB, within 1.5x of plain
torch FlopCounterMode on the same run.

Method: the model is built once on ``meta``; each of ``--repeats`` runs traces the same
prefill (after one warm-up) and we report the median and min..max wall time. Peak memory is
the process's maximum resident set size (``ru_maxrss``), which includes the Python
interpreter, torch and transformers (~0.4 GB before any tracing).

    python benchmarks/bench_tracer.py [--workload llama-2-70b] [--seq-len 4096] [--repeats 5]
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from cohw_utils.spine import optable as summary
from cohw_utils import workloads
from cohw_utils.spine.trace import trace


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="llama-2-70b")
    ap.add_argument("--phase", default="prefill")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    t0 = time.perf_counter()
    built = workloads.build(args.workload, scale="full", device="meta", seq_len=args.seq_len)
    build_s = time.perf_counter() - t0
    phase = built.phase(args.phase)
    a, kw = phase.make_inputs()
    tables = []

    def run_trace():
        with torch.no_grad():
            tables.append(trace(phase.run, *a, model=built.model, phase=phase.name, **kw))

    counter = FlopCounterMode(display=False)

    def run_fcm():
        with torch.no_grad(), counter:
            phase.run(*a, **kw)

    t_fcm = timed(run_fcm, args.repeats)
    t_trace = timed(run_trace, args.repeats)
    table = tables[-1]
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    tot = summary.totals(table)
    med_t, med_f = statistics.median(t_trace), statistics.median(t_fcm)
    print(f"{args.workload} {args.phase}, seq_len {args.seq_len}, batch 1, on meta "
          f"(build {build_s:.2f} s; {len(table):,} ops traced; torch {torch.__version__})")
    print(f"  tracer          median {med_t:6.2f} s  (min {min(t_trace):.2f}, max {max(t_trace):.2f}, n={args.repeats})")
    print(f"  FlopCounterMode median {med_f:6.2f} s  (min {min(t_fcm):.2f}, max {max(t_fcm):.2f}, n={args.repeats})")
    print(f"  ratio tracer / FlopCounterMode: {med_t / med_f:.2f}x  (target <= 1.5x)")
    print(f"  peak RSS of the process: {peak_gb:.2f} GB  (target < 2 GB)")
    print(f"  contraction FLOPs: tracer {tot['contraction_flops']:,}  FlopCounterMode {counter.get_total_flops():,}")


if __name__ == "__main__":
    main()
