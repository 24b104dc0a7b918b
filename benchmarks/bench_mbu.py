"""Benchmark: model bandwidth utilization (MBU) of batch-1 LLM decoding on this machine.

Prints figures; asserts nothing (performance targets are not timed tests). Target from the
Chapter 4 issue: MBU at least 60% of the read-only streaming bandwidth probed in the same session.
Decode is a read-only stream, so MBU is against the probe's read kernel (``torch.sum`` over an
array far beyond the LLC); the MBU against the copy/add figure (STREAM bytes) is printed beside
it, labelled, as is the write-allocate-aware copy/add figure (issue 20, item 1).

Method (cohw_utils.studies.performance.mbu): the model is TinyLlama-1.1B's architecture (22 layers, hidden 2048,
GQA with 4 KV heads; ``data/configs/tinyllama-1.1b``) with seeded random weights, 2.07 GB in
bf16: 60x the 32 MiB last-level cache, so every decode step streams its weights from DRAM.
Each run: (1) streaming bandwidth now (the probe's read, copy and add kernels on 256 MiB arrays;
the read kernel's best rate and median, copy/add beside), (2) a prompt of ``--prompt-len`` tokens fills the KV cache, then 2
warm-up and ``--new-tokens`` timed greedy decode steps, one timing sample per token
(time.perf_counter), (3) bandwidth again. Bytes per token = weights read (all parameters but
the input embedding table) + the KV cache read at each step's context + the new token's K/V.
MBU = bytes per token x tokens/s (median step time) / read bandwidth measured right before.
(4) The GEMV ceiling: how fast torch's own matrix-vector kernel streams a 256 MiB weight
matrix in the same dtype, which splits the MBU gap into kernel and everything else.
``--runs`` repeats the whole run on the same model, to show the spread between runs.
Each run is made in each ``--modes`` entry: eager PyTorch, and compiled as gpt-fast does it
(static KV cache, ``torch.compile`` with inductor freezing; :func:`cohw_utils.studies.performance.mbu.measure_decode`).
(5) Other GEMV kernels on the same fp32 matrix (numpy's BLAS sgemv; a torch.compile'd
multiply-and-reduce): is a better kernel than torch's available on this machine, and how close
does the best one come to the read bandwidth?

    python benchmarks/bench_mbu.py [--dtype bf16] [--prompt-len 128] [--new-tokens 32] [--runs 3]
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time

import numpy as np
import torch

from cohw_utils.studies.performance import mbu
from cohw_utils.hardware import probe
from cohw_utils.spine.measure import time_callable
from cohw_utils.hardware.probe import cpu_model


def gemv_kernels(repeats: int = 10) -> dict[str, float]:
    """Best streaming rate (bytes/s) of three fp32 GEMV kernels on one matrix >= 8x the LLC
    and >= 256 MiB (the size of :func:`cohw_utils.studies.performance.mbu.measure_gemv_bandwidth`): torch's
    ``F.linear``, numpy's ``@`` (its BLAS sgemv) and ``torch.compile`` of ``(w * x).sum(-1)``.
    Benchmark-only: no chapter needs these kernels, only the comparison."""
    llc, _ = probe.detect_llc()
    k = 2048
    n = int(max(8 * llc, 256 * 2**20) // (4 * k))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(1, k, generator=g)
    wn, xn = w.numpy(), x[0].numpy()
    fused = torch.compile(lambda v: (w * v).sum(-1))
    kernels = {"torch F.linear (fp32)": lambda: torch.nn.functional.linear(x, w),
               f"numpy @ ({np.__version__}, BLAS sgemv)": lambda: wn @ xn,
               "torch.compile (w * x).sum(-1) (fp32)": lambda: fused(x)}
    return {name: w.numel() * 4 / time_callable(fn, repeats=repeats, warmup=2).min for name, fn in kernels.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(mbu.MBU_CONFIG))
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--modes", default="eager,compiled",
                    help="comma-separated decode modes: eager PyTorch and/or compiled (gpt-fast style)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # mbu_benchmark keeps it (threads=None)

    print(f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    t0 = time.perf_counter()
    model = mbu.build_random_llm(args.config, args.dtype)
    print(f"model: {args.config} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params, "
          f"{args.dtype}), built in {time.perf_counter() - t0:.1f} s")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"eager", "compiled"}:
        ap.error(f"--modes takes eager and/or compiled, got {args.modes!r}")
    mbus: dict[str, list[float]] = {m: [] for m in modes}
    vs_copy: dict[str, list[float]] = {m: [] for m in modes}
    for mode, i in itertools.product(modes, range(args.runs)):
        run = mbu.mbu_benchmark(args.config, args.dtype, args.prompt_len, args.new_tokens, model=model,
                                compiled=(mode == "compiled"))
        s = run.summary()
        mbus[mode].append(s["MBU_vs_before_best_%"])
        vs_copy[mode].append(s.get("MBU_vs_copy_before_%", float("nan")))
        print(f"\n{mode} run {i + 1}/{args.runs}" + (f" (compiling took {run.extra['compile_s']:.0f} s)"
                                                     if "compile_s" in run.extra else ""))
        print(f"  read bandwidth before: {run.bw_before.describe()}")
        print(f"  decode: {run.timing.describe('ms')} per token, context {s['context']}")
        print(f"  {s['tokens_per_s']:.2f} tokens/s; {run.bytes_per_token / 1e9:.3f} GB per token "
              f"(weights {run.weight_bytes / 1e9:.3f} GB + KV); achieved {s['achieved_GBps']:.1f} GB/s")
        print(f"  read bandwidth after:  {run.bw_after.describe()}")
        print(f"  GEMV ceiling:     {run.gemv.describe()}: decode reaches {s['achieved_vs_gemv_%']:.0f}% of it; "
              f"it is {s['gemv_vs_read_%']:.0f}% of the read bandwidth before")
        print(f"  MBU vs read bandwidth right before: {s['MBU_vs_before_best_%']:.1f}% of best, "
              f"{s['MBU_vs_before_median_%']:.1f}% of median; vs after: {s['MBU_vs_after_best_%']:.1f}% of best")
        print(f"  beside it: vs copy/add (STREAM bytes) before {s.get('MBU_vs_copy_before_%', float('nan')):.1f}%, "
              f"vs copy/add (write-allocate bytes) {s.get('MBU_vs_copy_write_allocate_before_%', float('nan')):.1f}%")
    print()
    for mode, vals in mbus.items():
        print(f"BENCHMARK MBU {mode} (vs best read bandwidth measured right before), {args.runs} runs: median "
              f"{statistics.median(vals):.1f}%, min {min(vals):.1f}%, max {max(vals):.1f}%; target >= 60%: "
              f"{'met' if statistics.median(vals) >= 60 else 'NOT met'}; vs copy/add (STREAM bytes): median "
              f"{statistics.median(vs_copy[mode]):.1f}%")
    now = mbu.bandwidth_now()
    read, copy = now.best, now.others.get(mbu.COPY_STREAM, float("nan"))
    print(f"\nGEMV kernels on one fp32 matrix (best of 10 calls), against read {read / 1e9:.1f} GB/s "
          f"and copy/add {copy / 1e9:.1f} GB/s now:")
    for name, rate in gemv_kernels().items():
        print(f"  {name:40s} {rate / 1e9:6.1f} GB/s = {100 * rate / read:5.1f}% of read, {100 * rate / copy:5.1f}% of copy/add")


if __name__ == "__main__":
    main()
