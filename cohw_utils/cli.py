"""Command line: ``python -m cohw_utils analyze WORKLOAD_OR_CONFIG [options]`` and
``python -m cohw_utils predict MODEL --hardware NAME [--batch B --input-len I --output-len O]``.

``WORKLOAD_OR_CONFIG`` is a registry name (``python -m cohw_utils list``) or a path to any
config.json (or the folder holding one) that :func:`cohw_utils.spine.analyze.analyze` builds:
decoder LMs, encoders, seq2seq, VLMs, state-space models, and diffusers model configs such as
``cohw_utils/data/configs/flux.1-dev/transformer``. It traces one phase (full scale on ``meta`` by
default: shapes only, no weights) and prints, as text or ``--json``:

* parameters, active parameters (those one token uses: a mixture-of-experts model's routed
  k of E experts; = parameters for a dense model; "n/a" where the analysis does not give them),
  weight bytes;
* FLOPs two ways: ``flops``, torch's convention (``FlopCounterMode``: attention counted full,
  the masked half of a causal score matrix included), and ``flops_effective``, what a causal or
  sliding-window flash kernel computes (masked-out tiles skipped); the same two for the
  contraction ops alone (``contraction_flops``, ``contraction_flops_effective``); MACs; bytes
  read / written / moved; intensity (torch-convention FLOPs per byte moved);
* the cache the phase returned, measured (:mod:`cohw_utils.workloads.caches`): one line per
  layer type (full attention, sliding window (W), recurrent state, cross attention) with its
  layers, window, bytes per token of context per sequence as transformers holds it
  ("framework") and as a serving engine stores it ("serving"), constant bytes, and bytes at the
  analysed context; then the number the analyses use (``used``, the serving one) and whether
  the two differ. A phase that returns no cache (a denoising step, an encoder forward) has no
  cache block;
* the share of FLOPs and bytes by operator class, and any op with no cost rule.

``--json`` prints :meth:`~cohw_utils.spine.analyze.Analysis.totals` (the same fields; the cache
block is its ``cache`` key, ``None`` without one), made strictly JSON-serialisable: tuples become
lists, numpy scalars Python numbers, a non-finite float (the intensity of a phase that moves no
bytes) ``null``. Bad input prints one line on stderr naming the problem and the fix, and exits
with status 2.

``predict`` prints TTFT, TPOT, end-to-end latency and output tokens/s of ``batch`` requests of a
decoder LM on one chip (:func:`cohw_utils.studies.validation.predict.predict_request`): calibrated
on the ledger by default, ``--ideal`` for the 100%-of-spec roofline, with its assumptions listed.
An unknown hardware name, impossible lengths or a model that does not fit exit 2 with one line.
``--tp/--pp/--dp/--ep`` (with ``--link`` and ``--microbatches``) predict the request under a parallel
plan (:func:`cohw_utils.studies.parallel.plans.predict_plan`): each stage's per-rank time, the
communication per collective, the pipeline bubble, TTFT, TPOT and tokens/s; a degree that does not
divide the heads, layers, experts or batch exits 2 naming the fix.

The command-line form of Chapters 1-2's summary view (README: `analyze`); Chapter 2's cache and
FLOP-convention discussion is what the cache block and the two FLOP lines print.
"""
from __future__ import annotations

import argparse
import json
import math
import numbers
import sys
from typing import Any, Sequence

from cohw_utils.core.errors import CohwError

EXIT_BAD_INPUT = 2

FLOPS_LABEL = "FLOPs (torch convention: attention counted full)"
FLOPS_EFFECTIVE_LABEL = "FLOPs (effective: causal/window attention as a flash kernel computes)"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage block is behind --help)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m cohw_utils",
                description="Op-level cost analysis of the cohw proxy workloads or any HF/diffusers config.json.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    a = sub.add_parser("analyze", help="trace one phase of a workload and print its totals")
    a.add_argument("workload", help="registry name (see `list`) or path to a Hugging Face or diffusers "
                                    "config.json (or its folder)")
    a.add_argument("--phase", help="phase to trace (default: the workload's first, e.g. prefill)")
    a.add_argument("--batch", type=_positive_int, default=1, help="batch size (default 1)")
    a.add_argument("--seq-len", type=_positive_int, default=None,
                   help="tokens in the prompt for LLM prefill/decode, text tokens for a diffusion "
                        "denoiser (default: the workload's)")
    a.add_argument("--dtype", default=None, help="build dtype: fp32, bf16 or fp16 (default: the workload's)")
    a.add_argument("--scale", choices=["full", "tiny"], default="full")
    a.add_argument("--device", default="meta", help="meta (default, no weights), cpu or cuda")
    a.add_argument("--strict", action="store_true", help="fail on the first op with no cost rule")
    a.add_argument("--json", action="store_true", help="print JSON instead of text")
    a.add_argument("--cost-function", action="store_true",
                   help="build the phase's cost function if it is not cached (slow once), then answer from it; "
                        "a cached one is used without this flag")
    r = sub.add_parser("predict", help="predict TTFT, TPOT, latency and tokens/s of LLM requests on one chip")
    r.add_argument("workload", help="registry name, a config folder under cohw_utils/data/configs, or a "
                                    "path to a decoder LM's config.json")
    r.add_argument("--hardware", required=True, help="a name in cohw_utils/data/hardware.csv (e.g. H100-SXM)")
    r.add_argument("--batch", type=_positive_int, default=1, help="concurrent sequences (default 1)")
    r.add_argument("--input-len", type=_positive_int, default=128, help="prompt tokens (default 128)")
    r.add_argument("--output-len", type=_positive_int, default=128, help="generated tokens (default 128)")
    r.add_argument("--dtype", default="fp16", help="activation dtype traced: fp16 (default) or bf16")
    r.add_argument("--weights", default=None, help="weight format: fp16, bf16, int8-wo, int4-wo-g32, "
                                                  "int4-wo-g128, fp8, int8 (default: --dtype)")
    mode = r.add_mutually_exclusive_group()
    mode.add_argument("--calibrated", dest="calibrated", action="store_true", default=True,
                      help="efficiencies fitted on the ledger (default)")
    mode.add_argument("--ideal", dest="calibrated", action="store_false",
                      help="100%% of spec, unfused bytes, no overhead")
    r.add_argument("--tp", type=_positive_int, default=1,
                   help="tensor-parallel degree: predict one rank of the model's own TP plan (default 1)")
    r.add_argument("--pp", type=_positive_int, default=1,
                   help="pipeline stages: the layers split evenly, GPipe schedule (default 1)")
    r.add_argument("--dp", type=_positive_int, default=1,
                   help="data-parallel replicas, each serving batch / dp sequences (default 1)")
    r.add_argument("--ep", type=_positive_int, default=1,
                   help="expert-parallel degree of a mixture-of-experts model (default 1)")
    r.add_argument("--microbatches", type=_positive_int, default=1,
                   help="microbatches a pipeline carries per step (default 1; must divide batch / (dp x ep))")
    r.add_argument("--link", default=None, help="interconnect for --tp/--pp/--ep > 1, a name in "
                                               "cohw_utils/data/interconnects.csv (e.g. nvlink4-h100)")
    r.add_argument("--json", action="store_true", help="print JSON instead of text")
    w = sub.add_parser("sweep", help="costs (and step times on a chip) of one phase over a grid of shapes, "
                                     "from the phase's cost function")
    w.add_argument("workload", help="registry name, a config folder under cohw_utils/data/configs, or a config path")
    w.add_argument("--phase", default="decode", help="phase (default decode)")
    w.add_argument("--batch", type=_grid_arg, default=[1], help="batch sizes: 1,2,4 or a range 1:64 (default 1)")
    w.add_argument("--seq-len", type=_grid_arg, default=None,
                   help="lengths (prompt for prefill, context for decode): 128,1024 or 1:4096:64")
    w.add_argument("--image-size", type=_grid_arg, default=None, help="image sizes of a diffusion phase")
    w.add_argument("--dtype", default="fp16", help="traced dtype (default fp16)")
    w.add_argument("--hardware", default=None, help="also time each step on this chip (hardware.csv name)")
    w.add_argument("--weights", default=None, help="weight format for the step times (see predict)")
    w.add_argument("--ideal", action="store_true", help="ideal roofline times instead of the calibration")
    w.add_argument("--csv", default=None, help="write the table to this CSV file instead of printing it")
    sub.add_parser("list", help="list the proxy workloads")
    return p


def _grid_arg(text: str) -> list[int]:
    """``1,2,4`` or ``lo:hi[:step]`` (inclusive) -> the positive integers."""
    try:
        if ":" in text:
            parts = [int(x) for x in text.split(":")]
            lo, hi, step = (parts + [1])[:3] if len(parts) in (2, 3) else (0, 0, 0)
            values = list(range(lo, hi + 1, step)) if step > 0 else []
        else:
            values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers as 1,2,4 or lo:hi[:step], got '{text}'")
    return values


def _fmt(n: float | int | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:,.3f} {unit}"
    return f"{n:,.0f}"


def _int(n: int | None) -> str:
    return "n/a" if n is None else f"{n:,}"


def _jsonable(x: Any) -> Any:
    """``x`` with every value json.dumps accepts under ``allow_nan=False``: dict keys as str,
    tuples/sets as lists, numpy/torch scalars as Python numbers, NaN/inf as None (no number)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in x]
    if x is None or isinstance(x, (str, bool)):
        return x
    if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", 0) == 0:  # numpy / torch scalar
        x = x.item()
    if isinstance(x, bool):
        return x
    if isinstance(x, numbers.Integral):
        return int(x)
    if isinstance(x, numbers.Real):
        return float(x) if math.isfinite(float(x)) else None
    return str(x)  # a dtype, a path...: its name


def _active_parameters(t: dict) -> str:
    active, total = t.get("active_parameters"), t.get("parameters")
    if active is None:
        return "n/a"
    if total and active != total:
        return f"{active:,}  ({100 * active / total:.1f}% of parameters: routed experts, k of E per token)"
    return f"{active:,}  (all: no routed experts)"


def _cache_lines(c: dict, t: dict) -> list[str]:
    """The cache block: one line per layer type, then the total the analyses use."""
    ctx, batch = c.get("context"), c.get("batch", t.get("batch", 1))
    at = "n/a" if ctx is None else f"{ctx:,} tokens" + (f" x batch {batch}" if batch != 1 else "")
    used = c.get("used", "serving")
    lines = [f"  cache ({c.get('class', '?')}, {c.get('layers', '?')} layers; bytes/token = bytes one more "
             f"token of context adds, per sequence; analysed context {at}):"]
    by_type = c.get("by_type") or {}
    width = max([len(k) for k in by_type] + [len("total")])
    for name, r in by_type.items():
        fw, sv = r["framework_bytes_per_token"], r["serving_bytes_per_token"]
        per = (f"{sv:,} bytes/token (framework = serving)" if fw == sv else
               f"framework {fw:,} / serving {sv:,} bytes/token (framework != serving)")
        window = "none" if r.get("window") is None else f"{r['window']:,} tokens"
        parts = [f"{r['layers']} layers", f"window {window}", per]
        if r.get("constant_bytes"):
            parts.append(f"{r['constant_bytes']:,} constant bytes/sequence")
        fa, sa = r.get("framework_bytes_at_context"), r.get("serving_bytes_at_context")
        parts.append(f"{_int(sa)} bytes at context" if fa == sa else
                     f"framework {_int(fa)} / serving {_int(sa)} bytes at context")
        lines.append(f"    {name:<{width}}  " + ", ".join(parts))
    fw, sv = c["framework_bytes_per_token"], c["serving_bytes_per_token"]
    total = f"{c['kv_bytes_per_token']:,} bytes/token ({used}: the number the analyses use)"
    if fw != sv:
        total += f"; framework != serving: transformers holds {fw:,}, a serving engine stores {sv:,}"
    else:
        total += "; framework = serving"
    if c.get("state_bytes"):
        total += f"; {c['state_bytes']:,} constant bytes/sequence"
    at_ctx = c.get(f"{used}_bytes_at_context", c.get("serving_bytes_at_context"))
    total += f"; {_int(at_ctx)} bytes at context"
    lines.append(f"    {'total':<{width}}  {total}")
    nxt = c.get("bytes_per_token_at_context")
    if nxt is not None and ctx is not None and nxt != c["kv_bytes_per_token"]:
        lines.append(f"    {'':<{width}}  the token after {ctx:,} adds {nxt:,} bytes (full sliding windows add none)")
    for note in c.get("notes") or []:
        lines.append(f"    note: {note}")
    return lines


def _print_text(t: dict) -> None:
    seq = f", seq_len {t['seq_len']}" if t.get("seq_len") else ""
    print(f"{t['workload']} / {t['phase']}  ({t['scale']} scale on {t['device']}, {t['dtype']}, "
          f"batch {t['batch']}{seq})")
    flops, eff = t["flops"], t.get("flops_effective")
    share = f"; {100 * eff / flops:.1f}% of the torch count" if eff is not None and flops else ""
    rows = [
        ("parameters", f"{t['parameters']:,}"),
        ("active parameters", _active_parameters(t)),
        ("weight bytes", f"{t['weight_bytes']:,}"),
        (FLOPS_LABEL, f"{flops:,}  ({_fmt(flops)}FLOP)"),
        (FLOPS_EFFECTIVE_LABEL, "n/a" if eff is None else f"{eff:,}  ({_fmt(eff)}FLOP{share})"),
        ("contraction FLOPs (torch convention)", _int(t.get("contraction_flops"))),
        ("contraction FLOPs (effective)", _int(t.get("contraction_flops_effective"))),
        ("MACs", f"{t['macs']:,}"),
        ("bytes read", f"{t['bytes_read']:,}"),
        ("bytes written", f"{t['bytes_written']:,}"),
        ("bytes moved", f"{t['bytes_moved']:,}  ({_fmt(t['bytes_moved'])}B)"),
        ("intensity (torch FLOPs / byte)", "n/a" if t["intensity"] is None or not math.isfinite(t["intensity"])
         else f"{t['intensity']:.2f} FLOP/byte"),
        (f"FLOPs per {t['unit']} (torch convention)", _fmt(t["flops_per_unit"])),
        ("ops (excl. views)", f"{t['ops']:,}"),
    ]
    cache = t.get("cache")
    if cache is None and t.get("kv_cache_bytes_per_token") is not None:
        rows.append(("KV cache per token", f"{t['kv_cache_bytes_per_token']:,} bytes/token (closed form of the "
                                           "config; the phase returned no cache to measure)"))
    # the two long FLOP labels are aligned with each other, not widening the other rows
    width = max(len(k) for k, _ in rows if len(k) <= 40)
    wide = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width if len(k) <= 40 else wide}}  {v}")
    if cache is not None:
        for line in _cache_lines(cache, t):
            print(line)
    print("  by operator class (shares of torch-convention FLOPs and of bytes moved):")
    for cls, r in t["by_class"].items():
        print(f"    {cls:<14} {r['flops_%']:7.3f}% of FLOPs  {r['bytes_moved_%']:7.3f}% of bytes")
    if t["uncosted"]:
        print("  UNCOSTED ops (excluded from totals): "
              + ", ".join(f"{op} x{n}" for op, n in t["uncosted"].items()))


def _predict_plan(args: argparse.Namespace) -> int:
    from cohw_utils.studies.parallel.plans import predict_plan

    p = predict_plan(args.workload, args.hardware, args.link, tp=args.tp, pp=args.pp, dp=args.dp, ep=args.ep,
                     microbatches=args.microbatches, batch=args.batch, input_len=args.input_len,
                     output_len=args.output_len, dtype=args.dtype, weight_fmt=args.weights or args.dtype,
                     calibration="calibrated" if args.calibrated else None)
    d = _jsonable(p.as_dict())
    if args.json:
        print(json.dumps(d, indent=2, allow_nan=False))
        return 0
    plan = " x ".join(f"{k} {v}" for k, v in p.plan.items() if k != "microbatches")
    over = f" over {p.link}" if p.link else ""
    print(f"{args.workload} on {p.devices} x {p.hardware}{over} ({plan}): batch {args.batch}, "
          f"{args.input_len} in / {args.output_len} out ({p.mode})")
    print("  per rank, one microbatch (ms):")
    print(p.stages.to_string(index=False, float_format=lambda x: f"{x:,.3f}").replace("\n", "\n    ").join(["    ", ""]))
    if len(p.collectives):
        print("  communication per collective (one rank, one microbatch):")
        print(p.collectives.to_string(index=False, float_format=lambda x: f"{x:,.3f}")
              .replace("\n", "\n    ").join(["    ", ""]))
    print(f"  pipeline bubble     {100 * p.bubble:.1f}% of each step ({args.pp} stages, {args.microbatches} microbatches)")
    print(f"  TTFT                {d['TTFT (ms)']:,.3f} ms")
    print(f"  TPOT                {d['TPOT (ms)']:,.3f} ms")
    print(f"  tokens/s            {d['tokens/s']:,.1f}  ({d['tokens/s per device']:,.1f} per device)")
    print("  assumptions:")
    for a in p.assumptions:
        print(f"    - {a}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from cohw_utils.studies.validation.predict import predict_request
    if max(args.tp, args.pp, args.dp, args.ep, args.microbatches) > 1 or args.link is not None:
        return _predict_plan(args)
    p = predict_request(args.workload, args.hardware, batch=args.batch, input_len=args.input_len,
                        output_len=args.output_len, dtype=args.dtype, weight_fmt=args.weights,
                        calibrated=args.calibrated, cost_function=True)
    d = _jsonable(p.as_dict())
    if args.json:
        print(json.dumps(d, indent=2, allow_nan=False))
        return 0
    print(f"{args.workload} on {p.hardware}: batch {p.batch}, {p.input_len} in / {p.output_len} out ({p.mode})")
    print(f"  TTFT                {d['ttft_ms']:,.2f} ms")
    print(f"  TPOT                {d['tpot_ms']:,.3f} ms")
    print(f"  end-to-end latency  {d['latency_ms']:,.1f} ms")
    print(f"  output tokens/s     {p.tokens_per_s:,.1f}  (all {p.batch} sequences)")
    print("  assumptions:")
    for a in p.assumptions:
        print(f"    - {a}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    import itertools

    import numpy as np
    import pandas as pd

    from cohw_utils.spine.phase_costs import phase_cost_function  # reads the disk cache first
    opts = {"prefill_logits": "last"} if args.phase == "prefill" else {}
    cf = phase_cost_function(args.workload, args.phase, args.dtype, **opts)
    axes = {"batch": args.batch, "seq_len": args.seq_len, "image_size": args.image_size}
    for name in cf.names:
        if axes.get(name) is None:
            raise CohwError(f"the {args.phase} cost function of {args.workload} takes {', '.join(cf.names)}: give "
                            f"--{name.replace('_', '-')}")
    pts = np.array(list(itertools.product(*[axes[n] for n in cf.names])), dtype=np.int64)
    tot = cf.totals(pts, ("flops", "flops_effective", "bytes_read", "bytes_written"))
    out = pd.DataFrame(pts, columns=list(cf.names))
    out["flops"], out["flops_effective"] = tot[:, 0], tot[:, 1]
    out["bytes_moved"] = tot[:, 2] + tot[:, 3]
    out["exact"] = cf.exact_at(pts)
    if args.hardware:
        from cohw_utils.hardware import get_hardware
        from cohw_utils.views.predictor import Calibration, load_calibration, sweep_seconds
        cal = Calibration.ideal() if args.ideal else load_calibration()
        out["step_ms"] = 1e3 * sweep_seconds(cf, pts, get_hardware(args.hardware), cal, args.weights)
    if args.csv:
        out.to_csv(args.csv, index=False)
        print(f"wrote {len(out):,} rows to {args.csv}")
    else:
        print(out.to_string(index=False))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns the exit status
    (0, or :data:`EXIT_BAD_INPUT` after one line on stderr)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # a usage error (one line already on stderr) or --help
        return int(done.code or 0) if not isinstance(done.code, str) else EXIT_BAD_INPUT
    try:
        if args.command == "list":
            from cohw_utils.workloads import list_workloads
            print(list_workloads().to_string(index=False))
            return 0
        if args.command == "predict":
            return _predict(args)
        if args.command == "sweep":
            return _sweep(args)
        totals, source = _analysis(args)
        t = _jsonable(totals)
    except CohwError as err:
        print(f"python -m cohw_utils: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.json:
        print(json.dumps(t, indent=2, allow_nan=False))
    else:
        _print_text(t)
        print(f"  source: {source}")
    return 0


def _analysis(args: argparse.Namespace) -> tuple[dict, str]:
    """The totals ``analyze`` prints and where they came from: a cached cost function of the phase
    (exact at this shape, torch-free) when there is one, else a trace (``--cost-function``: build
    the function first)."""
    if args.device == "meta" and not args.strict:
        from cohw_utils.spine import phase_costs
        kw = dict(batch=args.batch, seq_len=args.seq_len, dtype=args.dtype, scale=args.scale)
        t = phase_costs.cached_analysis(args.workload, args.phase, **kw)
        if t is None and args.cost_function:
            from cohw_utils.core.dtypes import dtype_name
            from cohw_utils.workloads import get_workload
            wl = get_workload(phase_costs.resolve_model(args.workload))
            phase, dtype = args.phase or wl.phases[0], args.dtype or dtype_name(wl.default_dtype)
            phase_costs.phase_cost_function(args.workload, phase, dtype, scale=args.scale)
            t = phase_costs.cached_analysis(args.workload, args.phase, **kw)
        if t is not None:
            return t, "the phase's cached cost function (exact at this shape: the same numbers as a trace)"
    elif args.cost_function:
        raise CohwError("--cost-function needs --device meta and no --strict (cost functions are built on meta)")
    from cohw_utils.spine.analyze import analyze
    result = analyze(args.workload, args.phase, batch=args.batch, seq_len=args.seq_len,
                     dtype=args.dtype, scale=args.scale, device=args.device, strict=args.strict)
    return result.totals(), f"a trace on {args.device}"
