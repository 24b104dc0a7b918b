"""Record Chapter 3's latency table on a CUDA GPU: eager vs torch.compile vs onnxruntime.

Usage (on a machine with a CUDA GPU)::

    python benchmarks/capture_gpu_enabling.py                 # every inference phase, fp16
    python benchmarks/capture_gpu_enabling.py --workloads llama-2-7b vit-b-16 --dtype fp32 --repeats 50

Each inference phase is built at tiny scale (the chapter's sizes, seeded random weights) on
``cuda`` and timed with :func:`cohw_utils.spine.measure.time_callable` (CUDA-synchronised) in eager
mode and under ``torch.compile`` (inductor, cold cache; the first call's time is recorded as
``prepare_s``). onnxruntime is timed when its CUDA execution provider is installed
(``pip install onnxruntime-gpu==1.32.0`` in place of ``onnxruntime``): the phase is exported on
the CPU exactly as the chapter does, the session runs on ``CUDAExecutionProvider``, and the
time covers ``session.run`` with numpy inputs and outputs (host-device copies included). When
the provider is missing, the file says so and has no onnxruntime rows. Training phases are left
out (they do not export; see the chapter).

Writes ``cohw_utils/data/gpu/enabling.json``: ``device``, ``versions``, ``date``, ``method``,
``onnxruntime_cuda`` and ``rows`` (the columns of :func:`cohw_utils.studies.enabling.latency.latency_table`).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cohw_utils.studies.enabling import export  # noqa: E402
from cohw_utils.studies.enabling.latency import latency  # noqa: E402

OUT = ROOT / "cohw_utils" / "data" / "gpu" / "enabling.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="*", default=None, help="registry names (default: all)")
    ap.add_argument("--dtype", default="fp16", help="fp32, fp16 or bf16 (default fp16, the LLM/SD serving dtype)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu only to test the script")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("capture_gpu_enabling: torch sees no CUDA GPU; run this on a GPU machine", file=sys.stderr)
        return 2
    import onnxruntime as ort

    cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers() and a.device.startswith("cuda")
    providers = ("CUDAExecutionProvider", "CPUExecutionProvider") if cuda_ep else ("CPUExecutionProvider",)
    rows = []
    for name, phase, dtype in export.plan(a.workloads, [a.dtype]):
        try:
            _, ph = export.build_phase(name, phase, dtype, device=a.device)
        except Exception as e:  # noqa: BLE001 - e.g. a float32-only workload in fp16
            print(f"skip {name}:{phase} ({e})")
            continue
        if ph.backward:  # training steps do not export (see the chapter)
            continue
        backends = ["eager", "compile"]
        conv = export.Conversion(name, phase, dtype, backward=False, status="ok", phase_obj=ph)
        if cuda_ep or not a.device.startswith("cuda"):
            cpu_conv = export.convert(name, phase, dtype)
            if cpu_conv.onnx_model is not None:
                conv.session = export.ort_session(cpu_conv.onnx_model, providers)
                conv.export_s, conv.onnx_s, conv.session_s = cpu_conv.export_s, cpu_conv.onnx_s, cpu_conv.session_s
                backends.append("onnxruntime")
        for r in latency(conv, backends, a.repeats, a.warmup, device=a.device):
            r["device"] = a.device if r["backend"] != "onnxruntime" else ",".join(providers)
            rows.append({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})
        print(f"{name}:{phase} done")
    dev = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu (script test)"
    data = {
        "device": dev,
        "versions": {**export.versions(), "cuda": torch.version.cuda, "python": sys.version.split()[0]},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "method": (f"tiny-scale phases in {a.dtype}; cohw_utils.spine.measure.time_callable, median of {a.repeats} "
                   f"calls after {a.warmup} warm-up, inputs rebuilt untimed before each call; torch.compile "
                   "with a cold inductor cache; onnxruntime session.run with numpy I/O"),
        "onnxruntime_cuda": cuda_ep,
        "onnxruntime_note": ("CUDAExecutionProvider used" if cuda_ep else
                             "onnxruntime's CUDA execution provider is not installed (pip install "
                             "onnxruntime-gpu==1.32.0): no onnxruntime rows"),
        "rows": rows,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    print(f"wrote {out} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
