"""Command line: ``python -m cohw_utils analyze WORKLOAD_OR_CONFIG_JSON [options]``.

Prints the totals of one traced phase (parameters, weight bytes, FLOPs, MACs, bytes moved,
KV-cache bytes per token, breakdown by operator class), as text or ``--json``. Bad input
prints one line on stderr naming the problem and the fix, and exits with status 2.

The command-line form of Chapters 1-2's summary view (README: `analyze`).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from cohw_utils.core.errors import CohwError

EXIT_BAD_INPUT = 2


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
                description="Op-level cost analysis of the cohw proxy workloads or any HF config.json.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    a = sub.add_parser("analyze", help="trace one phase of a workload and print its totals")
    a.add_argument("workload", help="registry name (see `list`) or path to a Hugging Face config.json")
    a.add_argument("--phase", help="phase to trace (default: the workload's first, e.g. prefill)")
    a.add_argument("--batch", type=_positive_int, default=1, help="batch size (default 1)")
    a.add_argument("--seq-len", type=_positive_int, default=None,
                   help="tokens in the prompt for LLM prefill/decode (default: the workload's)")
    a.add_argument("--dtype", default=None, help="build dtype: fp32, bf16 or fp16 (default: the workload's)")
    a.add_argument("--scale", choices=["full", "tiny"], default="full")
    a.add_argument("--device", default="meta", help="meta (default, no weights), cpu or cuda")
    a.add_argument("--strict", action="store_true", help="fail on the first op with no cost rule")
    a.add_argument("--json", action="store_true", help="print JSON instead of text")
    sub.add_parser("list", help="list the proxy workloads")
    return p


def _fmt(n: float | int | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:,.3f} {unit}"
    return f"{n:,.0f}"


def _print_text(t: dict) -> None:
    seq = f", seq_len {t['seq_len']}" if t["seq_len"] else ""
    print(f"{t['workload']} / {t['phase']}  ({t['scale']} scale on {t['device']}, {t['dtype']}, "
          f"batch {t['batch']}{seq})")
    rows = [
        ("parameters", f"{t['parameters']:,}"),
        ("weight bytes", f"{t['weight_bytes']:,}"),
        ("FLOPs", f"{t['flops']:,}  ({_fmt(t['flops'])}FLOP)"),
        ("  of which contraction", f"{t['contraction_flops']:,}"),
        ("MACs", f"{t['macs']:,}"),
        ("bytes read", f"{t['bytes_read']:,}"),
        ("bytes written", f"{t['bytes_written']:,}"),
        ("bytes moved", f"{t['bytes_moved']:,}  ({_fmt(t['bytes_moved'])}B)"),
        ("intensity", f"{t['intensity']:.2f} FLOP/byte"),
        ("KV cache per token", "n/a" if t["kv_cache_bytes_per_token"] is None
         else f"{t['kv_cache_bytes_per_token']:,} bytes"),
        (f"FLOPs per {t['unit']}", _fmt(t["flops_per_unit"])),
        ("ops (excl. views)", f"{t['ops']:,}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print("  by operator class:")
    for cls, r in t["by_class"].items():
        print(f"    {cls:<14} {r['flops_%']:7.3f}% of FLOPs  {r['bytes_moved_%']:7.3f}% of bytes")
    if t["uncosted"]:
        print("  UNCOSTED ops (excluded from totals): "
              + ", ".join(f"{op} x{n}" for op, n in t["uncosted"].items()))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "list":
            from cohw_utils.workloads import list_workloads
            print(list_workloads().to_string(index=False))
            return 0
        from cohw_utils.spine.analyze import analyze
        result = analyze(args.workload, args.phase, batch=args.batch, seq_len=args.seq_len,
                         dtype=args.dtype, scale=args.scale, device=args.device, strict=args.strict)
    except CohwError as err:
        print(f"python -m cohw_utils: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    t = result.totals()
    if args.json:
        print(json.dumps(t, indent=2))
    else:
        _print_text(t)
    return 0
