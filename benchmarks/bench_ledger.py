"""Benchmark: how good are the predictions? The ledger of published measurements against the
predictor, ideal and calibrated, on the fixed held-out split.

Prints figures; asserts nothing. Goal from the ledger issue: calibrated held-out median of
|predicted / measured - 1| under 15%. Reported as it is; the fit never sees the held-out rows.

Method (cohw_utils.studies.validation.ledger): every covered row of ``data/ledger.csv`` (one device,
a predictable metric, a config, a hardware spec, a weight format) is traced at full scale on
``meta`` at its own batch and lengths (a prefill, and one decode step at the mean context), and
predicted ideal (100% of spec, unfused bytes) and calibrated (``data/calibration.json``). With
``--fit`` the calibration is refitted on the calibration split's one-chip rows first; ``--write``
saves it. The multi-device rows whose source states the TP x DP split and whose ``link`` is set
are predicted by the parallelism model (cohw_utils.studies.validation.multidevice: per-rank
tables of the model's own TP plan, ring all-reduces on the link, no overlap) with the same
calibration, never fitted on; their error is reported apart (``multi_device``).

    python benchmarks/bench_ledger.py [--fit] [--write] [--json] [--rows]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from cohw_utils.studies.validation import ledger as lg
from cohw_utils.studies.validation import multidevice as md
from cohw_utils.views.predictor import CALIBRATION_FILE, load_calibration


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit", action="store_true", help="refit the calibration on the calibration split")
    ap.add_argument("--write", action="store_true", help="with --fit: write data/calibration.json")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--rows", action="store_true", help="also print every covered row's errors")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    ledger = lg.load_ledger()
    times = lg.all_row_times(ledger)
    t_trace = time.perf_counter() - t0
    if args.fit or args.write:
        cal = lg.fit_calibration([times[i] for i in lg.calibration_rows(ledger)])
        if args.write:
            CALIBRATION_FILE.write_text(cal.to_json())
    else:
        cal = load_calibration()
    errors = lg.ledger_errors(ledger, times, cal)
    t1 = time.perf_counter()
    multi = md.multi_device_errors(ledger, cal)
    report = lg.ledger_report(ledger, errors, cal, multi)
    report["trace_seconds"] = round(t_trace, 1)
    report["multi_device_seconds"] = round(time.perf_counter() - t1, 1)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for k, v in report.items():
            print(f"{k:>28}: {v}")
    if args.rows:
        print(errors.to_string(index=False, float_format=lambda x: f"{x:.4g}"), file=sys.stderr)
        print(multi.to_string(index=False, float_format=lambda x: f"{x:.4g}"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
