"""How long each chapter took to execute in the last ``make book``, read from the book's
execution cache (jupyter-cache records the seconds of every notebook it executed).

    python tools/book_times.py [--budget 900] [--json]

Prints one line per chapter (in the order of ``_toc.yml``), the sum, and whether it is within
``--budget`` seconds (the full build's budget is 15 minutes of execution on 2 cores). A chapter
the cache has no record of (never executed, or the cache was cleared) is listed as missing.
Exit status 0 always: a measurement, not a test.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "_build" / ".jupyter_cache"


def toc_notebooks() -> list[str]:
    """The chapters of ``_toc.yml`` that are notebooks, in order (file names without suffix)."""
    files = re.findall(r"file:\s*(\S+)", (ROOT / "_toc.yml").read_text())
    return [f for f in files if (ROOT / f"{f}.ipynb").exists()]


def execution_seconds() -> dict[str, float]:
    """Seconds per executed notebook (by path relative to the repository), newest record each."""
    from jupyter_cache import get_cache

    if not CACHE.exists():
        return {}
    out: dict[str, tuple[float, float]] = {}
    for rec in get_cache(str(CACHE)).list_cache_records():
        secs = (rec.data or {}).get("execution_seconds")
        if secs is None:
            continue
        key = str(Path(rec.uri).resolve().relative_to(ROOT).with_suffix("")) if Path(rec.uri).is_absolute() else rec.uri
        when = rec.created.timestamp()
        if key not in out or when > out[key][1]:
            out[key] = (float(secs), when)
    return {k: v[0] for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=900.0, help="seconds the whole build may take (default 900)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    secs = execution_seconds()
    rows = [(nb, secs.get(nb)) for nb in toc_notebooks()]
    total = sum(s for _, s in rows if s is not None)
    if args.json:
        print(json.dumps({"chapters": dict(rows), "total_s": total, "budget_s": args.budget}, indent=1))
        return 0
    if not secs:
        print(f"no execution records in {CACHE.relative_to(ROOT)}: run `make book` first")
        return 0
    for nb, s in rows:
        print(f"{nb:45s} {'missing' if s is None else f'{s:7.1f} s'}")
    verdict = "within" if total <= args.budget else "OVER"
    print(f"{'total':45s} {total:7.1f} s ({total / 60:.1f} min; {verdict} the {args.budget / 60:.0f}-minute budget)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
