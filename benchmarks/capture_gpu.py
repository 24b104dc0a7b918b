"""Every GPU capture in one go (at most ~8 minutes on one GPU): run it once on any CUDA machine.

    python benchmarks/capture_gpu.py                 # all captures, into cohw_utils/data/gpu/
    python benchmarks/capture_gpu.py --only ops      # just the per-op timings
    python benchmarks/capture_gpu.py --device cpu --out-dir _build/gpu-test --only ops --quick   # test the script here

Runs, each in its own process with a time limit (a capture that fails or runs out of time is
recorded as such in ``capture_log.json`` and the others still run):

* ``matmul``   -- benchmarks/capture_gpu_matmul.py   (GEMM rate per dtype; Chapter 4.3)
* ``mbu``      -- benchmarks/capture_gpu_mbu.py      (batch-1 decode MBU; Chapter 4.1-4.2)
* ``energy``   -- benchmarks/capture_gpu_energy.py   (J/token, J/step via NVML; Chapter 4.4)
* ``enabling`` -- benchmarks/capture_gpu_enabling.py (eager / compile / onnxruntime; Chapter 3)
* ``ops``      -- this file: per-op timings of one Llama-2-7B decoder layer (prefill at 1 x 512 and
  decode at batch 1, 8, 32 against a 512-token cache) and one BERT-large encoder layer (batch 8 x
  384), full width, random fp16 weights, each op timed by torch.profiler
  (:func:`cohw_utils.spine.measure.profile_ops`: median of 5 profiled runs after 2 warm-ups), so the
  ledger's calibration can be checked per op class on a real GPU. Writes ``ops.json`` with the
  device name, versions, date and one record per op (op, module, class, shapes, FLOPs, bytes,
  seconds min/median/max).

Nothing is downloaded; every model is a real architecture from ``cohw_utils/data/configs``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_DIR = ROOT / "cohw_utils" / "data" / "gpu"
CAPTURES = {  # name -> (script, extra arguments, time limit in seconds)
    "matmul": ("capture_gpu_matmul.py", ["--repeats", "10"], 90),
    "mbu": ("capture_gpu_mbu.py", ["--new-tokens", "64"], 120),
    "energy": ("capture_gpu_energy.py", ["--repeats", "10"], 120),
    "enabling": ("capture_gpu_enabling.py", ["--repeats", "10"], 120),
}


def _versions() -> dict[str, str]:
    import torch
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda),
            "transformers": transformers.__version__}


def _layer_case(name: str, device: str, batch: int, seq: int, decode: bool):
    """One decoder or encoder layer of a real config, random fp16 weights, and a call of it."""
    import torch
    from transformers import AutoConfig
    from transformers.models.bert.modeling_bert import BertLayer
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    dtype = torch.float16 if device == "cuda" else torch.float32
    cfg = AutoConfig.from_pretrained(ROOT / "cohw_utils" / "data" / "configs" / name)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    if name.startswith("bert"):
        layer = BertLayer(cfg).to(device, dtype).eval()
        x = torch.randn(batch, seq, cfg.hidden_size, device=device, dtype=dtype)
        return layer, (lambda: layer(x)), f"{name} layer, batch {batch} x {seq}"
    layer = LlamaDecoderLayer(cfg, 0).to(device, dtype).eval()
    rope = LlamaRotaryEmbedding(cfg).to(device)
    q_len = 1 if decode else seq
    x = torch.randn(batch, q_len, cfg.hidden_size, device=device, dtype=dtype)
    pos = torch.arange(seq, seq + q_len, device=device).expand(batch, -1) if decode else \
        torch.arange(q_len, device=device).expand(batch, -1)
    cos_sin = rope(x, pos)
    if not decode:
        return layer, (lambda: layer(x, position_embeddings=cos_sin, attention_mask=None)), \
            f"{name} decoder layer, prefill {batch} x {seq}"
    from transformers import DynamicCache
    kv, hd = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    cache = DynamicCache()
    k = torch.randn(batch, kv, seq, hd, device=device, dtype=dtype)
    cache.update(k, k.clone(), 0)

    def step():  # attend to the 512-token cache; crop back so every call sees the same context
        out = layer(x, position_embeddings=cos_sin, attention_mask=None, cache=cache, use_cache=True)
        cache.crop(-1)  # drop the token this step appended
        return out
    return layer, step, f"{name} decoder layer, decode batch {batch} at context {seq}"


def capture_ops(device: str, out_dir: Path, quick: bool = False) -> Path:
    import torch
    from cohw_utils.spine.measure import profile_ops

    cases = [("llama-2-7b", 1, 512, False), ("llama-2-7b", 1, 512, True), ("llama-2-7b", 8, 512, True),
             ("llama-2-7b", 32, 512, True), ("bert-large", 8, 384, False)]
    if quick:
        cases = [("llama-2-7b", 1, 32, False), ("bert-large", 1, 16, False)]
    records = []
    for name, batch, seq, decode in cases:
        layer, fn, label = _layer_case(name, device, batch, seq, decode)
        with torch.no_grad():
            table = profile_ops(fn, model=layer, phase="decode" if decode else "forward",
                                repeats=2 if quick else 5, warmup=1 if quick else 2)
        keep = ["op", "module", "op_class", "input_shapes", "dtype", "flops", "bytes_read", "bytes_written",
                "time_s", "time_min_s", "time_max_s"]
        rows = table.loc[table["op_class"] != "view", keep]
        records.append({"case": label, "wall_s": table.attrs["wall_s"], "method": table.attrs["method"],
                        "ops": json.loads(rows.to_json(orient="records", default_handler=str))})
        del layer
    dev_name = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"
    out = out_dir / "ops.json"
    out.write_text(json.dumps({"device": dev_name, "date": dt.date.today().isoformat(), "versions": _versions(),
                               "dtype": "fp16" if device == "cuda" else "fp32", "cases": records}, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=[*CAPTURES, "ops"], default=None)
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu only to test the script")
    ap.add_argument("--out-dir", type=Path, default=GPU_DIR)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (script test)")
    args = ap.parse_args(argv)
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("capture_gpu: no CUDA device here; nothing captured (use --device cpu to test the script)")
        return 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    todo = args.only or [*CAPTURES, "ops"]
    log = {"date": dt.date.today().isoformat(), "runs": {}}
    for name in todo:
        t0 = time.perf_counter()
        if name == "ops":
            try:
                path = capture_ops(args.device, args.out_dir, args.quick)
                status = f"ok: {path.name}"
            except Exception as err:  # noqa: BLE001 -- record it and go on to the next capture
                status = f"failed: {type(err).__name__}: {err}"
        else:
            script, extra, limit = CAPTURES[name]
            out = args.out_dir / f"{name}.json"
            cmd = [sys.executable, str(ROOT / "benchmarks" / script), *extra, "--out", str(out)]
            try:
                done = subprocess.run(cmd, timeout=limit, capture_output=True, text=True)
                status = "ok" if done.returncode == 0 else f"exit {done.returncode}: {done.stderr.strip()[-300:]}"
            except subprocess.TimeoutExpired:
                status = f"timed out after {limit} s"
        log["runs"][name] = {"status": status, "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{name:>9}: {log['runs'][name]}")
    (args.out_dir / "capture_log.json").write_text(json.dumps(log, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
