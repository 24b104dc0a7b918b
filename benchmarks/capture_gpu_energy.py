"""Capture measured GPU energy for Chapter 4.4: J/token of LLM decode and J/step of the SD UNet.

Usage (on a machine with an NVIDIA GPU and driver)::

    python benchmarks/capture_gpu_energy.py                       # defaults below
    python benchmarks/capture_gpu_energy.py --llm llama-2-7b --seq-len 512 --batches 1 8 32

Writes ``cohw_utils/data/gpu/energy.json`` (``--out`` to change) with the device name, driver,
software versions, date, the NVML method (total-energy counter, or sampled power) and, per
measurement, joules per unit both gross (whole board) and net of the idle power measured first.
The chapter shows it beside the energy model's estimate for the same workload, batch and
context. Models are the registry's real architectures with **random fp16 weights** (nothing is
downloaded): energy depends on shapes and dtypes, not on trained values.

Method: idle board power is averaged over ``--idle-s`` seconds; then for each measurement
``--warmup`` untimed calls, then ``--windows`` windows of ``--repeats`` calls, each between two
NVML readings (:func:`cohw_utils.hardware.power_meters.measure_energy`: median per call, with min and max). A
decode step extends the KV cache by one token per call, so the context grows from ``seq_len``
to ``seq_len + warmup + windows x repeats`` (stated in the file). With no GPU or no NVML the script prints why and writes nothing.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cohw_utils.hardware import power_meters as power  # noqa: E402
from cohw_utils import workloads  # noqa: E402
from cohw_utils.core.errors import CohwError  # noqa: E402

DEFAULT_OUT = ROOT / "cohw_utils" / "data" / "gpu" / "energy.json"


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": str(torch.version.cuda), "transformers": transformers.__version__,
            "diffusers": diffusers.__version__}


def _measure(phase: workloads.Phase, *, repeats: int, warmup: int, windows: int, device: str,
             nvml: Any, idle_w: float) -> dict[str, Any]:
    args, kwargs = phase.make_inputs()
    m = power.measure_energy(lambda: phase.run(*args, **kwargs), repeats=repeats, warmup=warmup,
                             windows=windows, source="nvml", nvml=nvml, device=device)
    net = m.total_joules - idle_w * m.seconds
    return {"units_per_call": phase.units, "unit": phase.unit_name, "calls": m.calls,
            "windows": windows, "seconds": m.seconds, "seconds_per_call": m.seconds / m.calls,
            "joules_total": m.total_joules, "joules_per_call": m.joules,
            "joules_per_call_min": m.min_joules, "joules_per_call_max": m.max_joules,
            "joules_per_unit": m.joules / phase.units,
            "joules_per_unit_net_idle": net / m.calls / phase.units,
            "mean_power_w": m.watts, "method": m.method}


def capture(llm: str = "llama-2-7b", seq_len: int = 512, batches: tuple[int, ...] = (1, 8, 32),
            image_size: int = 512, repeats: int = 20, warmup: int = 3, windows: int = 3, idle_s: float = 5.0,
            device: str = "cuda", scale: str = "full", dtype: str = "fp16",
            out: Path | None = DEFAULT_OUT, nvml: Any = None) -> dict[str, Any]:
    """Run every measurement and return (and, unless ``out`` is None, write) the record."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise power.NoEnergyCounterError("no CUDA GPU visible to torch; run this on a GPU machine")
    gpu = power.NvmlDevice(nvml)
    record: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else gpu.name,
        "nvml_device": gpu.name, "driver": gpu.driver_version(),
        "energy_counter": "total-energy counter" if gpu.has_counter else "sampled board power",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(), "scale": scale, "dtype": dtype, "weights": "random (seeded)",
        "notes": ("Board energy: includes idle/static power; joules_per_unit_net_idle subtracts "
                  "idle_power_w x measured seconds. Decode context grows by one token per call."),
    }
    gpu.close()
    record["idle_power_w"] = power.idle_power(idle_s, nvml=nvml) if idle_s > 0 else 0.0
    meas = []
    for b in batches:
        # the timed steps reuse one set of inputs, so the cache grows a token per call: transformers'
        # DynamicCache, as generate() runs by default (a static cache holds seq_len + 1 positions)
        built = workloads.build(llm, scale=scale, device=device, dtype=dtype, batch=b, seq_len=seq_len,
                                cache="dynamic")
        row = _measure(built.phase("decode"), repeats=repeats, warmup=warmup, windows=windows,
                       device=device, nvml=nvml, idle_w=record["idle_power_w"])
        meas.append({"workload": built.workload.name, "phase": "decode", "batch": b, "seq_len": seq_len,
                     "context_grows_to": seq_len + warmup + windows * repeats, **row})
        del built
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    kw = {"image_size": image_size} if scale == "full" else {}
    built = workloads.build("sd-1.5", scale=scale, device=device, dtype=dtype, batch=1, **kw)
    row = _measure(built.phase("unet_step"), repeats=repeats, warmup=warmup, windows=windows,
                   device=device, nvml=nvml, idle_w=record["idle_power_w"])
    meas.append({"workload": "sd-1.5", "phase": "unet_step", "batch": 1,
                 "image_size": built.config["image_size"], **row})
    record["measurements"] = meas
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llm", default="llama-2-7b", help="registry name or config.json of a decoder LM")
    p.add_argument("--seq-len", type=int, default=512, help="KV-cache context before the measured steps")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--idle-s", type=float, default=5.0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)
    try:
        rec = capture(a.llm, a.seq_len, tuple(a.batches), a.image_size, a.repeats, a.warmup,
                      a.windows, a.idle_s, out=a.out)
    except CohwError as err:
        print(f"capture_gpu_energy: {err}; nothing written", file=sys.stderr)
        return 1
    for m in rec["measurements"]:
        print(f"{m['workload']}:{m['phase']} batch {m['batch']}: {m['joules_per_unit']:.4g} J/{m['unit']} "
              f"({m['joules_per_unit_net_idle']:.4g} net of idle), {m['seconds_per_call'] * 1e3:.2f} ms/call")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
