"""Benchmark: a real two-process run on this machine (gloo, TP=2 and DP=2) against the model.

Prints figures; asserts nothing. Goal (parallelism issue): the measured collective bandwidth and
step times of a ``torchrun --nproc-per-node 2`` run beside the prediction for this machine, with
the error.

Method (:mod:`cohw_utils.studies.parallel.gloo_run`, :mod:`cohw_utils.studies.parallel.host_check`):
two ranks of one CPU thread each, gloo over shared memory. An fp32 all-reduce sweep (4 KiB to
``--max-bytes``), a TP=2 forward of a 4-layer Llama (the model's own plan, parallelize_module, real
weights) and the same per-rank work without collectives, a DP=2 DistributedDataParallel training
step with and without its gradient all-reduce. Each timed ``--repeats`` times between barriers after
two warm-ups; the slower rank's median is kept, min and max beside it. The prediction fits the
link's latency and bandwidth on the sweep (relative least squares), counts the collectives from the
per-rank op table traced on meta, and times compute with this machine's probed roofline, half per rank.

    python benchmarks/bench_parallel.py [--json] [--repeats 5] [--batch 4] [--seq 128]
"""
from __future__ import annotations

import argparse
import json

from cohw_utils.hardware import get_hardware
from cohw_utils.studies.parallel import gloo_run, host_check


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--max-bytes", type=int, default=1 << 24)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    measured = gloo_run.run(batch=a.batch, seq=a.seq, repeats=a.repeats, max_bytes=a.max_bytes)
    check = host_check.predict_run(measured, measured["folder"], get_hardware("host"))
    link = check.attrs["link"]
    if a.json:
        print(json.dumps({"link_GBps": link.bw_per_dir / 1e9, "latency_us": link.latency_s * 1e6,
                          "bus_bandwidth_GBps": check.attrs["bus_bandwidth_GBps"],
                          "rows": check.reset_index().to_dict(orient="records"),
                          "sweep": measured["all_reduce"]}, indent=1))
        return 0
    print(f"torchrun, 2 ranks x 1 thread, gloo; {a.repeats} timed repeats per point (median of the slower rank)")
    print(f"{'bytes':>10} {'median ms':>10} {'min':>8} {'max':>8} {'busbw GB/s':>11}")
    from cohw_utils.views.collectives import bus_bandwidth
    for s in measured["all_reduce"]:
        print(f"{s['bytes']:>10} {s['median_s'] * 1e3:>10.3f} {s['min_s'] * 1e3:>8.3f} {s['max_s'] * 1e3:>8.3f} "
              f"{bus_bandwidth('all_reduce', s['bytes'], 2, s['median_s']) / 1e9:>11.2f}")
    print(f"fitted link: {link.bw_per_dir / 1e9:.2f} GB/s per direction, {link.latency_s * 1e6:.0f} us per step")
    print(check.T.round(3).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
