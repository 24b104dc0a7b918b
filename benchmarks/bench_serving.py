"""Benchmark: the serving simulator against a real engine on this machine.

Prints figures; asserts nothing. Goal (serving issue): the simulator's median TTFT, median TPOT
and throughput each within 20% of transformers' continuous batching serving the same requests.

Method: a small Llama (random weights, fp32, CPU; :func:`cohw_utils.studies.serving.engine.small_llama`)
served by transformers' ``ContinuousBatchingManager`` (paged attention, FIFO, chunked prefill
under a token budget). The simulator gets the engine's limits (blocks, block size, token budget,
requests per step) and a step-time model fitted on separate calibration runs of the same engine
(:func:`~cohw_utils.studies.serving.engine.calibrate`: batches submitted at once). Then ``--n``
requests arrive as a Poisson process of ``--rate`` per second (prompts and outputs uniform in the
given ranges, seeded), are served in real time by the engine, and the same list is simulated.
Throughput = output tokens / (last finish - first arrival).

    python benchmarks/bench_serving.py [--json] [--rate 3] [--n 40]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from cohw_utils.studies.serving.engine import EngineConfig, calibrate, measured_vs_simulated, small_llama
from cohw_utils.views.serving import poisson_requests


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=3.0, help="requests per second (Poisson)")
    ap.add_argument("--n", type=int, default=40, help="requests")
    ap.add_argument("--prompt", type=int, nargs=2, default=(32, 160), help="prompt tokens, uniform lo hi")
    ap.add_argument("--output", type=int, nargs=2, default=(16, 64), help="output tokens, uniform lo hi")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    model = small_llama()
    engine = EngineConfig()
    t = time.perf_counter()
    step_model, points = calibrate(model, engine)
    calib_s = time.perf_counter() - t
    reqs = poisson_requests(args.rate, args.n, tuple(args.prompt), tuple(args.output), seed=args.seed)
    table = measured_vs_simulated(model, reqs, step_model, engine, seed=args.seed)
    out = {"engine": "transformers ContinuousBatchingManager (paged attention, FIFO), CPU",
           "torch_threads": torch.get_num_threads(), "engine_config": vars(engine),
           "load": {"rate_per_s": args.rate, "requests": args.n, "prompt": args.prompt, "output": args.output,
                    "seed": args.seed},
           "step_model": vars(step_model), "calibration_points": points.to_dict("records"), "calibration_s": calib_s,
           "metrics": table.to_dict("index"),
           "simulated_preempted_requests": table.attrs["preempted"], "simulated_peak_blocks": table.attrs["peak_blocks"]}
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"{out['engine']}, {out['torch_threads']} threads; engine {vars(engine)}")
    print(f"step model (fitted on {len(points)} separate runs, {calib_s:.0f} s): {step_model}")
    print(f"load: {args.n} requests, Poisson {args.rate}/s, prompts {args.prompt}, outputs {args.output}")
    for k, v in out["metrics"].items():
        print(f"  {k:20s} measured {v['measured']:9.4f}  simulated {v['simulated']:9.4f}  error {v['error_%']:+6.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
