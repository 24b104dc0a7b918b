"""The ledger of published measurements, the calibration fitted on it, and its held-out error
(Chapter 4.5, ``benchmarks/bench_ledger.py``).

``data/ledger.csv`` holds measured performance read in its source (one row per number: source,
table or figure, model, hardware and its vendor, devices and parallelism, framework, dtype, batch, input and
output lengths, metric, value, unit, bibliography key, where it was read) and a fixed ``split``
(``calibration`` / ``heldout``) and a ``task`` (``inference`` / ``training``). Two columns are ours: ``config`` (the model config in the repo the
predictor builds; empty where the repo has none) and ``format`` (the weight format of
:data:`~cohw_utils.views.predictor.WEIGHT_FORMATS` the row's dtype means; empty if none fits).

Coverage (:func:`row_coverage`): a row is *covered* when the predictor can compute it today: a
predictable metric (tokens/s, TTFT, TPOT, latency), a config, a hardware spec, a known format,
and batch and lengths stated, on one device -- or on several, when the source states the
tensor x data-parallel split and the row's ``link`` column names the interconnect (predicted by
the parallelism model, :mod:`cohw_utils.studies.validation.multidevice`). Every other row is kept
and counted, with the reason; nothing is guessed. ``load_ledger(parallel=False)`` gives the
coverage without the parallelism model (every multi-device row out), the "before" of Chapter 4.5.

The fit (:func:`fit_calibration`) chooses the four parameters of
:class:`~cohw_utils.views.predictor.Calibration` that minimise the squared log error
``log(predicted / measured)`` over the *calibration* rows only (scipy's bounded least squares);
a vendor with at least ``min_vendor_rows`` calibration rows gets its own set, fitted from the
global one. The fit sees one-chip rows only (:func:`calibration_rows`); a multi-device row is
never fitted on, and its error is reported apart (:func:`ledger_report`). The held-out rows judge
it (:func:`ledger_errors`, :func:`error_summary`); nothing is tuned on them. The per-row evaluation uses each op's ideal compute and memory times, so the fit's
objective is exactly :func:`~cohw_utils.views.predictor.phase_seconds` under the same parameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date

import numpy as np
import pandas as pd

from cohw_utils.core.data import read_table
from cohw_utils.core.errors import CohwError, DataFileError
from cohw_utils.hardware import Hardware, load_hardware
from cohw_utils.hardware.interconnects import load_interconnects
from cohw_utils.spine.costs import CONTRACTION, VIEW
from cohw_utils.studies.validation.multidevice import link_coverage, plan_coverage
from cohw_utils.views.predictor import BOUNDS, PARAMS, WEIGHT_FORMATS, Calibration
from cohw_utils.views.roofline import op_times

__all__ = ["LEDGER_COLUMNS", "PREDICTED_METRICS", "load_ledger", "row_coverage", "RowTimes", "row_times",
           "all_row_times", "one_chip", "pick_rows", "calibration_rows", "reason_counts", "predicted_value", "regime", "fit_calibration", "ledger_errors",
           "error_summary", "ledger_report", "load_peers", "fig_predicted_vs_measured"]

LEDGER_COLUMNS = ("id", "split", "task", "source", "table_figure", "model", "config", "hardware", "vendor", "devices",
                  "parallelism", "framework", "dtype", "format", "batch", "input_len", "output_len",
                  "metric", "value", "unit", "citation", "note", "evidence", "link")
#: metric -> the unit it must be stated in; the predictor computes these (one device or a TP x DP plan).
PREDICTED_METRICS = {"tokens_per_s": "tokens/s", "tokens_per_s_per_device": "tokens/s",
                     "tpot_ms": "ms", "ttft_ms": "ms", "latency_ms": "ms"}
SPLITS = ("calibration", "heldout")
TASKS = ("inference", "training")


def load_ledger(path: str | None = None, parallel: bool = True) -> pd.DataFrame:
    """The ledger with one ``covered`` bool and a ``why`` column added (see :func:`row_coverage`;
    ``parallel=False``: without the parallelism model)."""
    df = read_table(path or "ledger.csv", LEDGER_COLUMNS, numeric=("devices", "batch", "input_len",
                                                                     "output_len", "value"),
                    keep_default_na=False, na_values={c: [""] for c in ("batch", "input_len", "output_len")})
    bad = df.loc[~df["split"].isin(SPLITS), "id"].tolist()
    odd = df.loc[~df["task"].isin(TASKS), "id"].tolist()
    if odd:
        raise DataFileError(f"ledger.csv rows {odd[:5]} have a task other than {' / '.join(TASKS)}")
    if bad:
        raise DataFileError(f"ledger.csv rows {bad[:5]} have a split other than {' / '.join(SPLITS)}")
    if df["id"].duplicated().any():
        raise DataFileError(f"ledger.csv ids repeat: {sorted(set(df.loc[df['id'].duplicated(), 'id']))[:5]}")
    hw, links = load_hardware(), load_interconnects()
    cov = [row_coverage(r, hw, parallel=parallel, interconnects=links) for r in df.itertuples(index=False)]
    df["covered"] = [c is None for c in cov]
    df["why"] = [c or "" for c in cov]
    return df


def row_coverage(row, hardware: dict[str, Hardware] | None = None, parallel: bool = True,
                 interconnects: dict | None = None) -> str | None:
    """None when the predictor covers ``row``; else the reason it does not (one phrase).
    ``parallel=False``: every multi-device row is out ("needs the parallelism model")."""
    hardware = hardware if hardware is not None else load_hardware()
    if row.task != "inference":
        return f"{row.task} row: needs a training predictor"
    if pd.isna(row.devices):
        return "device count not stated"
    multi = int(row.devices) > 1
    if multi and not parallel:
        return f"{int(row.devices)} devices ({row.parallelism}): needs the parallelism model"
    if multi and (why := plan_coverage(row)):
        return why
    if row.metric not in PREDICTED_METRICS:
        return f"metric {row.metric} is not predicted yet (a serving-load or aggregate figure)"
    if PREDICTED_METRICS[row.metric] != row.unit:
        return f"unit {row.unit!r} for {row.metric}; expected {PREDICTED_METRICS[row.metric]!r}"
    if not row.config:
        return f"no config for {row.model} in the repo"
    if row.hardware not in hardware:
        return f"no spec for {row.hardware} in hardware.csv"
    if row.format not in WEIGHT_FORMATS:
        return f"dtype {row.dtype!r} has no weight format in the predictor"
    needs_out = row.metric != "ttft_ms"
    if pd.isna(row.batch) or pd.isna(row.input_len) or (needs_out and pd.isna(row.output_len)):
        return "batch or lengths not stated"
    return link_coverage(row, interconnects) if multi else None


@dataclass(frozen=True)
class RowTimes:
    """A covered row's phase tables reduced to per-op ideal times (what the fit needs).

    ``tc``/``tm``: ideal compute and memory seconds per op of the prefill (index 0) and decode
    (index 1) tables; ``contraction`` marks contraction ops, ``view`` zero-cost views.
    """

    row: pd.Series
    hw: Hardware
    tc: tuple[np.ndarray, np.ndarray]
    tm: tuple[np.ndarray, np.ndarray]
    contraction: tuple[np.ndarray, np.ndarray]
    view: tuple[np.ndarray, np.ndarray]
    tables: tuple[pd.DataFrame, pd.DataFrame | None]

    @property
    def shape(self) -> tuple[int, int, int]:
        out = 1 if self.row["metric"] == "ttft_ms" else int(self.row["output_len"])
        return int(self.row["batch"]), int(self.row["input_len"]), out


def row_times(row: pd.Series, hardware: dict[str, Hardware] | None = None, dtype: str | None = None) -> RowTimes:
    """Trace a covered row's phases (cached) and reduce them to :class:`RowTimes`."""
    from cohw_utils.studies.validation.predict import step_tables  # the one tracer entry point

    hardware = hardware if hardware is not None else load_hardware()
    hw = hardware[row["hardware"]]
    b = int(row["batch"])
    i = int(row["input_len"])
    o = 1 if row["metric"] == "ttft_ms" else int(row["output_len"])
    # fp16 and bf16 cost the same bytes and peak on every chip in hardware.csv that has both
    trace_dtype = dtype or ("bf16" if row["format"] == "bf16" else "fp16")
    tables = step_tables(row["config"], b, i, o, trace_dtype, row["format"])
    tc, tm, con, view = [], [], [], []
    for t in tables:
        if t is None:
            t = tables[0].iloc[:0]
        ot = op_times(t, hw)
        tc.append(ot["t_compute"].to_numpy(dtype=float))
        tm.append(ot["t_memory"].to_numpy(dtype=float))
        con.append((t["op_class"] == CONTRACTION).to_numpy())
        view.append((t["op_class"] == VIEW).to_numpy())
    return RowTimes(row, hw, tuple(tc), tuple(tm), tuple(con), tuple(view), tables)


def one_chip(ledger: pd.DataFrame) -> pd.Series:
    """Mask of the covered one-device rows (what :class:`RowTimes` and the fit take)."""
    return ledger["covered"] & (ledger["devices"] == 1)


def calibration_rows(ledger: pd.DataFrame) -> list[str]:
    """Ids the calibration is fitted on: covered one-chip rows of the calibration split (never a
    multi-device row; module docstring)."""
    return ledger.loc[one_chip(ledger) & (ledger["split"] == "calibration"), "id"].tolist()


def all_row_times(ledger: pd.DataFrame, ids: list[str] | None = None) -> dict[str, RowTimes]:
    """:class:`RowTimes` of every covered one-chip row (or of ``ids``), keyed by row id."""
    hw = load_hardware()
    rows = ledger[one_chip(ledger)] if ids is None else ledger[ledger["id"].isin(ids)]
    return {r["id"]: row_times(r, hw) for _, r in rows.iterrows()}


def pick_rows(ledger: pd.DataFrame, n: int | None = None, multi: bool = False) -> list[str]:
    """Ids of ``n`` covered one-chip rows (``multi``: multi-device rows) spread evenly over the
    ledger (every such row for ``None``): a small run still sees several sources, metrics and
    both splits."""
    mask = (ledger["covered"] & (ledger["devices"] > 1)) if multi else one_chip(ledger)
    ids = ledger.loc[mask, "id"].tolist()
    if n is None or n >= len(ids):
        return ids
    return [ids[round(k * (len(ids) - 1) / max(n - 1, 1))] for k in range(n)]


def _step(rt: RowTimes, k: int, p: dict[str, float]) -> float:
    if not len(rt.tc[k]):
        return 0.0
    c = rt.contraction[k]
    tc = np.where(c, rt.tc[k] / p["compute"], rt.tc[k])
    tm = np.where(c, rt.tm[k], rt.tm[k] * p["fusion"]) / p["bandwidth"]
    return float(np.maximum(tc, tm).sum()) + p["step_overhead_s"]


def predicted_value(rt: RowTimes, p: dict[str, float]) -> float:
    """The row's metric predicted under parameters ``p`` (in the row's unit)."""
    b, i, o = rt.shape
    ttft = _step(rt, 0, p)
    tpot = _step(rt, 1, p) if o > 1 else 0.0
    e2e = ttft + (o - 1) * tpot
    return {"tokens_per_s": b * o / e2e, "tokens_per_s_per_device": b * o / e2e, "tpot_ms": tpot * 1e3,
            "ttft_ms": ttft * 1e3, "latency_ms": e2e * 1e3}[rt.row["metric"]]


def regime(rt: RowTimes) -> str:
    """``prefill`` (a TTFT row, or prefill >= half the ideal end-to-end time), else ``decode``."""
    if rt.row["metric"] == "ttft_ms":
        return "prefill"
    if rt.row["metric"] == "tpot_ms":
        return "decode"
    ideal = {"compute": 1.0, "bandwidth": 1.0, "fusion": 1.0, "step_overhead_s": 0.0}
    b, i, o = rt.shape
    ttft, tpot = _step(rt, 0, ideal), _step(rt, 1, ideal) if o > 1 else 0.0
    return "prefill" if ttft >= (o - 1) * tpot else "decode"


def fit_calibration(rows: list[RowTimes], min_vendor_rows: int = 6) -> Calibration:
    """Fit :class:`Calibration` on ``rows`` (the calibration split; module docstring)."""
    from scipy.optimize import least_squares  # bounded nonlinear least squares: no need to write one

    multi = [str(r.row["id"]) for r in rows if float(r.row.get("devices", 1) or 1) > 1]  # a synthetic row: one chip
    if multi:
        raise CohwError(f"fit_calibration takes one-chip rows only; {multi[:3]} are multi-device (pick the rows "
                        "with calibration_rows(ledger))")
    if len(rows) < len(PARAMS):
        raise CohwError(f"the fit needs at least {len(PARAMS)} covered calibration rows, got {len(rows)}")
    lo = np.array([BOUNDS[k][0] for k in PARAMS])
    hi = np.array([BOUNDS[k][1] for k in PARAMS])

    def solve(subset: list[RowTimes], x0: np.ndarray) -> np.ndarray:
        meas = np.log([float(r.row["value"]) for r in subset])

        def resid(x: np.ndarray) -> np.ndarray:
            p = dict(zip(PARAMS, x))
            return np.log([predicted_value(r, p) for r in subset]) - meas

        x0 = np.clip(x0, lo + 1e-9, hi - 1e-9)
        return least_squares(resid, x0, bounds=(lo, hi), x_scale=[0.3, 0.3, 0.3, 1e-3]).x

    x_all = solve(rows, np.array([0.6, 0.8, 0.5, 1e-3]))
    params = {"*": dict(zip(PARAMS, map(float, x_all)))}
    vendors = pd.Series([r.hw.vendor for r in rows]).value_counts()
    for vendor, n in vendors.items():
        if n >= min_vendor_rows:
            params[str(vendor)] = dict(zip(PARAMS, map(float, solve([r for r in rows if r.hw.vendor == vendor], x_all))))
    fit = {"rows": [str(r.row["id"]) for r in rows], "min_vendor_rows": min_vendor_rows,
           "objective": "least squares of log(predicted / measured) over the calibration split",
           "date": date.today().isoformat()}
    return Calibration(params, source=f"fitted on {len(rows)} calibration rows of data/ledger.csv "
                       f"({date.today().isoformat()})", fit=fit)


def ledger_errors(ledger: pd.DataFrame, times: dict[str, RowTimes], calibration: Calibration) -> pd.DataFrame:
    """One row per covered one-chip ledger row: measured, ideal and calibrated predictions, their
    ratios to the measurement, and the regime (multi-device rows:
    :func:`~cohw_utils.studies.validation.multidevice.multi_device_errors`)."""
    ideal = Calibration.ideal().for_vendor("*")
    out = []
    for _, row in ledger[one_chip(ledger)].iterrows():
        rt = times[row["id"]]
        pi = predicted_value(rt, ideal)
        pc = predicted_value(rt, calibration.for_vendor(rt.hw.vendor))
        # tokens/s: higher is faster; times: lower is faster. Ratios are predicted / measured.
        out.append({"id": row["id"], "split": row["split"], "source": row["source"], "model": row["model"],
                    "hardware": row["hardware"], "metric": row["metric"], "regime": regime(rt),
                    "measured": float(row["value"]), "ideal": pi, "calibrated": pc,
                    "ideal_ratio": pi / float(row["value"]), "calibrated_ratio": pc / float(row["value"])})
    return pd.DataFrame(out)


def error_summary(errors: pd.DataFrame, split: str = "heldout") -> dict[str, float]:
    """Median and p90 of ``|predicted / measured - 1|``, ideal and calibrated, on one split."""
    e = errors[errors["split"] == split]
    res: dict[str, float] = {"rows": int(len(e))}
    for kind in ("ideal", "calibrated"):
        err = (e[f"{kind}_ratio"] - 1).abs()
        res[f"{kind}_median"] = float(err.median()) if len(e) else float("nan")
        res[f"{kind}_p90"] = float(err.quantile(0.9)) if len(e) else float("nan")
    return res


def reason_counts(ledger: pd.DataFrame) -> pd.Series:
    """Rows per coverage reason, the covered ones as ``covered (one device)`` and ``covered
    (several devices)``; a multi-device reason counted without its ``N devices (plan):`` prefix."""
    why = ledger["why"].where(~ledger["covered"], np.where(ledger["devices"] > 1, "covered (several devices)",
                                                             "covered (one device)"))
    multi = (ledger["devices"] > 1) & ~ledger["covered"] & why.str.match(r"^\d+ devices \(")
    key = why.str.split(":").str[0].where(~multi, why.str.split(": ", n=1).str[1])
    return key.value_counts().rename("rows")


def ledger_report(ledger: pd.DataFrame, errors: pd.DataFrame, calibration: Calibration,
                  multi_errors: pd.DataFrame | None = None) -> dict[str, object]:
    """What ``bench_ledger.py --json`` prints: the ledger's size, coverage, and the errors; the
    held-out keys are the one-chip rows', ``multi_device`` the multi-device rows' (never fitted on)."""
    cov = ledger["covered"]
    held = error_summary(errors, "heldout")
    multi = cov & (ledger["devices"] > 1)
    report: dict[str, object] = {
        "rows": int(len(ledger)), "sources": int(ledger["source"].nunique()),
        "citations": int(ledger["citation"].nunique()),
        "hardware_types": sorted(ledger["hardware"].unique()),
        "vendors": sorted(ledger["vendor"].unique()),
        "covered": int(cov.sum()), "coverage": round(float(cov.mean()), 3),
        "covered_one_device": int(one_chip(ledger).sum()), "covered_multi_device": int(multi.sum()),
        "rows_by_reason": {k: int(v) for k, v in reason_counts(ledger).items()},
        "calibration_rows": int((errors["split"] == "calibration").sum()) if len(errors) else 0,
        "heldout_rows": held["rows"],
        "heldout_ideal_median": round(held["ideal_median"], 4), "heldout_ideal_p90": round(held["ideal_p90"], 4),
        "heldout_calibrated_median": round(held["calibrated_median"], 4),
        "heldout_calibrated_p90": round(held["calibrated_p90"], 4),
        "calibration_split": {k: round(v, 4) for k, v in error_summary(errors, "calibration").items()},
        "heldout_by_regime": {g: {k: round(v, 4) for k, v in error_summary(e, "heldout").items()}
                              for g, e in errors.groupby("regime")} if len(errors) else {},
        "calibration": {k: {p: round(x, 5) for p, x in v.items()} for k, v in calibration.params.items()},
    }
    if multi_errors is not None:
        report["multi_device"] = {s: {k: round(v, 4) for k, v in error_summary(multi_errors, s).items()}
                                  for s in SPLITS}
    return report


PEER_COLUMNS = ("tool", "claim", "error_value", "error_unit", "error_kind", "what_was_compared", "who_measured",
                "source", "location", "citation")


def load_peers(path: str | None = None) -> pd.DataFrame:
    """Other predictors' published accuracy (``data/predictor_peers.csv``, each claim read in its source)."""
    return read_table(path or "predictor_peers.csv", PEER_COLUMNS, keep_default_na=False)


def fig_predicted_vs_measured(errors: pd.DataFrame, title: str | None = None):
    """Predicted against measured on log-log axes: ideal (hollow) and calibrated (filled), one
    panel per metric family (throughput; times), held-out rows in colour (``errors`` from
    :func:`ledger_errors` or :func:`~cohw_utils.studies.validation.multidevice.multi_device_errors`)."""
    import matplotlib.pyplot as plt

    fams = [("throughput (tokens/s)", errors["metric"].str.startswith("tokens")),
            ("time (ms)", ~errors["metric"].str.startswith("tokens"))]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    for ax, (title, mask) in zip(axes, fams):
        e = errors[mask]
        for split, color in (("calibration", "0.55"), ("heldout", "C3")):
            s = e[e["split"] == split]
            ax.scatter(s["measured"], s["ideal"], facecolors="none", edgecolors=color, s=30,
                       label=f"ideal, {split}")
            ax.scatter(s["measured"], s["calibrated"], color=color, s=18, label=f"calibrated, {split}")
        if not len(e):
            ax.text(0.5, 0.5, "no covered rows of this kind", ha="center", va="center", transform=ax.transAxes)
            ax.set(title=title, xticks=[], yticks=[])
            continue
        if len(e):
            lo = min(e["measured"].min(), e[["ideal", "calibrated"]].min().min()) / 1.5
            hi = max(e["measured"].max(), e[["ideal", "calibrated"]].max().max()) * 1.5
            ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
            ax.plot([lo, hi], [lo * 1.15, hi * 1.15], "k:", lw=0.6)
            ax.plot([lo, hi], [lo / 1.15, hi / 1.15], "k:", lw=0.6)
        ax.set(xscale="log", yscale="log", xlabel=f"measured {title}", ylabel=f"predicted {title}", title=title)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title or "Predicted vs measured, ledger rows one device can cover (dotted: +/-15%)")
    fig.tight_layout()
    return fig
