"""Capture batch-1 decode MBU on a CUDA GPU and write ``cohw_utils/data/gpu/mbu.json``.

Chapter 4 shows this file beside the live CPU numbers when it exists. Run it on a machine
with an NVIDIA GPU (no network needed: the weights are random)::

    python benchmarks/capture_gpu_mbu.py [--workload llama-2-7b] [--dtype fp16] [--new-tokens 64]

Method: Llama-2-7B's architecture (``data/configs/llama-2-7b``) with seeded random fp16
weights on the GPU (13.5 GB; needs a 24 GB card or larger), built by
``cohw_utils.studies.performance.mbu.build_random_llm``; bandwidth = a device-to-device copy of a 2 GiB buffer
(counted 2 x bytes), best of 20, timed with CUDA events, before and after the decode run;
decode = ``cohw_utils.studies.performance.mbu.measure_decode`` (eager transformers, greedy, one CUDA-synchronised
timing sample per token). MBU is reported against the spec-sheet bandwidth of the matching
``hardware.csv`` row and against the measured copy bandwidth. Eager decoding launches a few
hundred kernels per token, so on a fast GPU it is partly launch-bound: the MBU here is that
of eager PyTorch, lower than gpt-fast's compiled, CUDA-graphed loop.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cohw_utils.studies.performance import mbu  # noqa: E402
from cohw_utils import workloads  # noqa: E402
from cohw_utils.hardware import load_hardware  # noqa: E402

OUT = ROOT / "cohw_utils" / "data" / "gpu" / "mbu.json"
SPEC_NAMES = {"H100": "H100-SXM", "H200": "H200-SXM", "A100-SXM4-80GB": "A100-80GB", "A100 80GB": "A100-80GB",
              "A100-SXM4-40GB": "A100-40GB", "A100-PCIE-40GB": "A100-40GB", "V100": "V100-SXM2-32GB",
              "MI300X": "MI300X", "B200": "B200"}


def copy_bandwidth(gib: float = 2.0, repeats: int = 20) -> dict:
    n = int(gib * 2**30) // 2
    a = torch.ones(n, dtype=torch.float16, device="cuda")
    b = torch.empty_like(a)
    rates = []
    for _ in range(3):
        b.copy_(a)
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        torch.cuda.synchronize()
        rates.append(2 * a.numel() * a.element_size() / (start.elapsed_time(end) * 1e-3))
    del a, b
    torch.cuda.empty_cache()
    rates.sort()
    return {"best_GBps": rates[-1] / 1e9, "median_GBps": rates[len(rates) // 2] / 1e9, "min_GBps": rates[0] / 1e9,
            "calls": repeats, "buffer_GiB": gib}


def spec_row(device_name: str):
    table = load_hardware()
    for key, row in SPEC_NAMES.items():
        if key.lower() in device_name.lower():
            return table[row]
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="llama-2-7b")
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("capture_gpu_mbu: no CUDA device; nothing captured (the chapter says so when the file is absent)")
        return 1
    import transformers

    name = torch.cuda.get_device_name()
    config = workloads.CONFIG_DIR / args.workload / "config.json"
    model = mbu.build_random_llm(config, args.dtype, device="cuda")
    before = copy_bandwidth()
    run = mbu.measure_decode(model, args.prompt_len, args.new_tokens, name=args.workload)
    after = copy_bandwidth()
    spec = spec_row(name)
    t = run.timing
    result = {
        "device": name, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "python": platform.python_version(), "workload": args.workload, "dtype": args.dtype,
        "parameters": run.parameters, "prompt_len": run.prompt_len, "new_tokens": run.new_tokens,
        "ms_per_token": {"median": 1e3 * t.median, "min": 1e3 * t.min, "max": 1e3 * t.max, "q1": 1e3 * t.q1,
                         "q3": 1e3 * t.q3},
        "tokens_per_s": run.tokens_per_s, "bytes_per_token": run.bytes_per_token,
        "achieved_GBps": run.achieved_bw / 1e9, "copy_before": before, "copy_after": after,
        "spec_row": spec.name if spec else None, "spec_GBps": spec.mem_bw / 1e9 if spec else None,
        "MBU_vs_spec_%": 100 * run.achieved_bw / spec.mem_bw if spec else None,
        "MBU_vs_copy_%": 100 * run.achieved_bw / (before["best_GBps"] * 1e9),
        "method": __doc__.split("Method: ")[1].split("\n\n")[0].replace("\n", " "),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
