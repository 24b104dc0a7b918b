"""Capture GEMM throughput per dtype on a CUDA GPU for Chapter 4.3 (matrix units).

Usage (on a machine with an NVIDIA GPU)::

    python benchmarks/capture_gpu_matmul.py              # all dtypes, default shapes
    python benchmarks/capture_gpu_matmul.py --dtypes bf16 fp8 --repeats 20

Writes ``cohw_utils/data/gpu/matmul.json`` (``--out`` to change) with the device name, compute
capability, software versions, date, the method and one row per (dtype, shape): M, K, N,
best and median seconds, rate (ops/s, best call) and rate_median, the dense spec-sheet peak of
the matching ``hardware.csv`` row (when the device name matches one, e.g. "H100" -> H100-SXM
or H100-PCIe by memory size) and utilization = rate / peak. The chapter shows the file beside
the live CPU sweep when it exists.

Method: :func:`cohw_utils.studies.performance.matmul_dtypes.sweep_dtypes` on ``cuda``: fp32 (``allow_tf32`` off), tf32
(fp32 inputs, ``allow_tf32`` on), bf16, fp16, int8 (``torch._int_mm``) and fp8
(``torch._scaled_mm`` with e4m3 inputs, unit scales, bf16 output) where the GPU and torch
support them; each shape gets ``--warmup`` untimed calls and ``--repeats`` timed calls, each
bracketed by ``torch.cuda.synchronize()`` (:func:`cohw_utils.spine.measure.time_callable`). A dtype
the device cannot run is recorded with the reason. With no GPU the script prints why and
writes nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cohw_utils.studies.performance import matmul_dtypes  # noqa: E402
from cohw_utils.hardware import load_hardware  # noqa: E402

DEFAULT_OUT = ROOT / "cohw_utils" / "data" / "gpu" / "matmul.json"
GPU_SHAPES = ([(f"square {n}", n, n, n) for n in (1024, 2048, 4096, 8192, 16384)]
              + [(f"LLM M={m}", m, 8192, 8192) for m in (1, 16, 128, 512, 2048, 8192)])


def match_hardware(device_name: str, mem_bytes: int):
    """The hardware.csv row for a CUDA device name, or None (never a guess across families)."""
    name = device_name.upper()
    rows = [hw for hw in load_hardware().values() if hw.name.split("-")[0].upper() in name]
    if len(rows) > 1:  # e.g. H100 SXM vs PCIe, A100 40 vs 80 GB: pick by form factor, then memory
        form = [hw for hw in rows if any(tag in name for tag in hw.name.upper().split("-")[1:])]
        rows = form or sorted(rows, key=lambda hw: abs((hw.mem_bytes or 0) - mem_bytes))[:1]
    return rows[0] if rows else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=list(matmul_dtypes.DTYPES))
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("capture_gpu_matmul: torch sees no CUDA GPU here; nothing written.", file=sys.stderr)
        return 1
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    hw = match_hardware(props.name, props.total_memory)
    peaks = dict(hw.peak_flops) if hw else {}
    df = matmul_dtypes.sweep_dtypes(dtypes=tuple(args.dtypes), shapes=GPU_SHAPES, peaks=peaks, device=dev,
                             repeats=args.repeats, warmup=args.warmup, max_seconds_per_call=5.0)
    rec = matmul_dtypes.capture_record(df, dev)
    rec["hardware_row"] = hw.name if hw else None
    rec["peaks_source"] = hw.source if hw else "no matching hardware.csv row: utilization left empty"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rec, indent=1))
    print(f"wrote {args.out}: {rec['device']}, {len(df)} rows")
    print((matmul_dtypes.pivot(df, "rate") / 1e12).round(1).to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
