"""Benchmark: a mid-size LLM through torch.export -> ONNX with external data -> onnxruntime (Chapter 3, issue 19 item 3).

Prints figures; asserts nothing. Method (:func:`cohw_utils.studies.enabling.evidence.large_export`):
TinyLlama-1.1B's architecture (``data/configs/tinyllama-1.1b``, read from its Hugging Face
config) with seeded random weights in fp32 (4.4 GB, beyond protobuf's 2 GiB message limit),
prefill of a 32-token prompt exported with the prompt length dynamic, converted by the
dynamo-based exporter (opset 18), saved with ONNX external data, opened by onnxruntime's CPU
provider from the file, and compared with eager PyTorch (max-norm error over the logits and
every layer's K/V) at 32 tokens and at a second length (17) through the same session. One
run; each stage timed once with time.perf_counter (wall clock, seconds).

    python benchmarks/bench_large_export.py [--layers N] [--scale tiny] [--out DIR]

Needs about 3x the weight bytes of free memory (the eager model, the session's copy, the
exporter's transient state) and 1x on disk (a temporary directory unless ``--out``).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cohw_utils.studies.enabling.evidence import PROTOBUF_LIMIT, large_export  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="tinyllama-1.1b")
    ap.add_argument("--layers", type=int, default=None, help="fewer decoder layers (a stand-in)")
    ap.add_argument("--scale", default="full", choices=["full", "tiny"])
    ap.add_argument("--out", default=None, help="keep the ONNX files here")
    a = ap.parse_args()
    free = shutil.disk_usage(a.out or tempfile.gettempdir()).free
    print(f"free disk where the files go: {free / 1e9:.1f} GB")
    r = large_export(a.config, layers=a.layers, scale=a.scale, out_dir=a.out)
    print(f"{r.config}: {r.layers} layers, {r.parameters:,} parameters, {r.weight_bytes / 1e9:.2f} GB fp32 weights "
          f"({'over' if r.exceeds_protobuf_limit else 'under'} the {PROTOBUF_LIMIT / 2**30:.0f} GiB protobuf limit)")
    print(f"on disk: graph {r.onnx_bytes / 1e6:.2f} MB + external data {r.data_bytes / 1e9:.3f} GB "
          f"= {r.disk_bytes / 1e9:.3f} GB")
    for n, p in r.parity:
        print(f"parity at {n} tokens: max abs {p.max_abs:.3g}, max rel {p.max_rel:.3g} over {p.outputs} outputs "
              f"({'pass' if p.passed else 'FAIL'}, {p.tolerance})")
    for stage, s in r.seconds.items():
        print(f"  {stage:28s} {s:8.1f} s")


if __name__ == "__main__":
    main()
