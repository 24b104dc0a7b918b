"""Benchmark: cost functions -- points per second of a sweep, exactness against direct traces, CLI wall time.

Prints figures; asserts nothing. Goals from the cost-function issue: >= 100,000 points/s for
Llama-2-70B decode over a 10,000-point (batch, context) grid, and a difference of exactly 0 in
FLOPs and bytes from direct traces at 20 random points of that grid where the function is exact.

Method: the decode cost function of Llama-2-70B (fp16, full scale on ``meta``) is built, or read
from the disk cache (``$COHW_CACHE_DIR``, default ``~/.cache/cohw``; the build time is printed
when it builds). The grid is batch 1..100 x 100 contexts spread over 1..4095. Throughput: the
best of ``--repeats`` evaluations of total FLOPs and bytes at all 10,000 points, and separately
of step times on an H100-SXM under the ledger's calibration (``sweep_seconds``). Exactness: 20
grid points drawn with a fixed seed, each traced directly (``analyze``) and compared with the
function's exact totals. CLI: wall time of ``python -m cohw_utils predict`` with an empty cache
directory (cold: traces and builds) and again (warm: reads the cache), in fresh processes
(int4 weights, so that a 70B model fits one 80 GB chip); and of ``analyze`` (decode, batch 8,
context 4000): one trace with nothing cached, ``--cost-function`` (builds), then warm, at the same
and at a new shape.

    python benchmarks/bench_sweep.py [--json] [--model llama-2-70b] [--no-cli]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from cohw_utils.hardware import get_hardware
from cohw_utils.spine.analyze import analyze
from cohw_utils.spine.phase_costs import load_cached, phase_cost_function
from cohw_utils.views.predictor import load_calibration, sweep_seconds


def _best(fn, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), statistics.pstdev(times)


def _cli_wall(args: list[str], env: dict[str, str]) -> tuple[float, int]:
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cohw_utils", *args], env=env, capture_output=True, text=True)
    return time.perf_counter() - t, done.returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-2-70b")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--checks", type=int, default=20)
    ap.add_argument("--no-cli", action="store_true", help="skip the cold/warm CLI timing")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    t = time.perf_counter()
    warm = load_cached(args.model, "decode", "fp16") is not None
    cf = phase_cost_function(args.model, "decode", "fp16")
    build_s = time.perf_counter() - t
    top = cf.variables[1].hi or 4096
    contexts = np.unique(np.linspace(1, min(top, 4095), 100).astype(np.int64))
    grid = np.array([(b, c) for b in range(1, 101) for c in contexts], dtype=np.int64)
    hw, cal = get_hardware("H100-SXM"), load_calibration()

    t_tot, sd_tot = _best(lambda: cf.totals(grid, ("flops", "bytes_read", "bytes_written")), args.repeats)
    t_time, sd_time = _best(lambda: sweep_seconds(cf, grid, hw, cal), args.repeats)

    rng = np.random.default_rng(0)
    picks = grid[rng.choice(len(grid), size=args.checks, replace=False)]
    worst = {"flops": 0.0, "flops_effective": 0.0, "bytes_moved": 0.0}
    exact_points = 0
    t = time.perf_counter()
    for b, c in picks:
        ref = analyze(args.model, "decode", batch=int(b), seq_len=int(c), dtype="fp16").table
        ref = ref[ref["costed"]]
        got = cf.totals_exact((int(b), int(c)))
        exact_points += bool(cf.exact_at([(b, c)])[0])
        pairs = {"flops": (got["flops"], ref["flops"].sum()),
                 "flops_effective": (got["flops_effective"], ref["flops_effective"].sum()),
                 "bytes_moved": (got["bytes_read"] + got["bytes_written"], ref["bytes_read"].sum() + ref["bytes_written"].sum())}
        for k, (g, r) in pairs.items():
            worst[k] = max(worst[k], abs(float(g) - float(r)) / float(r))
    trace_s = (time.perf_counter() - t) / len(picks)

    out = {
        "model": args.model, "phase": "decode", "dtype": "fp16", "grid_points": len(grid),
        "cache": "warm" if warm else "cold (built now)", "build_or_load_s": round(build_s, 2),
        "traces_in_build": cf.meta.get("traces"), "boxes": len(cf.boxes), "exact": cf.exact,
        "totals_points_per_s": round(len(grid) / t_tot), "totals_best_s": t_tot, "totals_sd_s": sd_tot,
        "step_time_points_per_s": round(len(grid) / t_time), "step_time_best_s": t_time, "step_time_sd_s": sd_time,
        "repeats": args.repeats, "direct_trace_s_per_point": round(trace_s, 2),
        "checks": len(picks), "checks_in_exact_boxes": exact_points,
        "max_rel_diff_vs_trace": worst,
        "speedup_vs_tracing": round(trace_s * len(grid) / t_time),
    }
    if not args.no_cli:
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "COHW_CACHE_DIR": tmp}
            cmd = ["predict", args.model, "--hardware", "H100-SXM", "--weights", "int4-wo-g128", "--batch", "4",
                   "--input-len", "512", "--output-len", "128"]
            cold, rc1 = _cli_wall(cmd, env)
            warm_s, rc2 = _cli_wall(cmd, env)
            warm2, _ = _cli_wall([*cmd[:-2], "--output-len", "300"], env)
        out["cli_predict"] = {"cold_s": round(cold, 2), "warm_s": round(warm_s, 2), "warm_new_shape_s": round(warm2, 2),
                              "exit_codes": [rc1, rc2]}
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "COHW_CACHE_DIR": tmp}
            cmd = ["analyze", args.model, "--phase", "decode", "--dtype", "fp16", "--batch", "8", "--seq-len", "4000"]
            traced, rc0 = _cli_wall(cmd, env)  # nothing cached: one trace
            cold, rc1 = _cli_wall([*cmd, "--cost-function"], env)  # builds the function
            warm_s, rc2 = _cli_wall(cmd, env)
            warm2, _ = _cli_wall([*cmd[:-4], "--batch", "32", "--seq-len", "1500"], env)
        out["cli_analyze"] = {"trace_s": round(traced, 2), "cold_build_s": round(cold, 2), "warm_s": round(warm_s, 2),
                              "warm_new_shape_s": round(warm2, 2), "exit_codes": [rc0, rc1, rc2]}
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"{args.model} decode cost function ({out['cache']}, {build_s:.1f} s, {out['traces_in_build']} traces, "
          f"{out['boxes']} boxes, exact: {cf.exact})")
    print(f"  totals over {len(grid):,} points: {out['totals_points_per_s']:,} points/s (best of {args.repeats})")
    print(f"  step times on H100-SXM (calibrated): {out['step_time_points_per_s']:,} points/s; "
          f"{out['speedup_vs_tracing']:,}x tracing each point ({trace_s:.1f} s a trace)")
    print(f"  {len(picks)} random grid points vs direct traces: max relative difference "
          + ", ".join(f"{k} {v:.3g}" for k, v in worst.items()))
    if "cli_predict" in out:
        c = out["cli_predict"]
        print(f"  `predict` CLI wall: cold {c['cold_s']} s, warm {c['warm_s']} s, warm at a new shape {c['warm_new_shape_s']} s")
        c = out["cli_analyze"]
        print(f"  `analyze` CLI wall: one trace {c['trace_s']} s, cold with --cost-function {c['cold_build_s']} s, "
              f"warm {c['warm_s']} s, warm at a new shape {c['warm_new_shape_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
