"""Requirements roll-up (Chapter 5): what binds each proxy phase, which hardware feature helps it
most, what software it still lacks, merged into one prioritised table a team can adopt.

Inputs, all computed elsewhere:

* **Binding resource**: :func:`cohw_utils.studies.codesign.sweep.evaluate_designs` of a base design (the resource
  whose bound ops take most of the phase's time).
* **Hardware features**: :func:`cohw_utils.studies.codesign.what_if.feature_gains` (each feature alone on the
  base design; modelled speedup and energy ratio per phase).
* **Software gaps**, from the enabling chapter's data: :func:`cohw_utils.views.target_coverage.missing_ops`
  of each phase's op table against a target stack (default ``onnx-opset18``, the ops an
  inference export can lower). Forward ops the target lacks are one requirement each; a phase
  that runs a backward pass needs a training runtime (its backward ops are folded into that
  one requirement). A hardware weight format only helps if the runtime can run it: for each
  format feature that ranks, the format row of :func:`cohw_utils.studies.enabling.gap_report.runtime_formats`
  (Chapter 3's quantization formats) is attached when :mod:`cohw_utils.studies.enabling.gap_report` is importable;
  otherwise a plain row says the format needs a runtime path. :data:`SOURCES` records which of
  these were available.

Priority: one scale for both kinds, **the weighted share of the proxy set the requirement
affects** (phase weights from Chapter 1's ranking, :func:`cohw_utils.studies.codesign.proxy_phases.phase_weights`):

* a hardware feature scores ``sum_p w_p * (1 - 1 / speedup_p)``: the share of weighted proxy
  time it saves (counted only where the speedup exceeds ``min_gain``);
* a software gap scores ``sum_p w_p`` over the phases it blocks: a phase that cannot run on the
  target gets nothing from any hardware, so its whole weight counts;
* a format requirement scores what its hardware feature scores (it is that feature's
  prerequisite).

Tiers: ``P0`` score >= 0.10, ``P1`` >= 0.02, ``P2`` below (a stated convention, not a law).
"""
from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cohw_utils.core.errors import CohwError

__all__ = ["SOURCES", "available_sources", "bindings", "best_features", "software_gaps", "per_workload",
           "rollup", "write_csv", "TIERS"]

TIERS = ((0.10, "P0"), (0.02, "P1"), (0.0, "P2"))
#: Feature -> the weight format it needs the runtime to run (and the runtime_formats.csv row).
FORMAT_FEATURES = {"int4 weights": ("int4", "int4 weight-only block-wise")}


def available_sources() -> dict[str, bool]:
    """Which software-gap sources import here: ``targets`` (Chapter 2's target descriptions)
    and ``gaps`` (Chapter 3's gap list and runtime formats)."""
    out = {}
    for key, mod in (("targets", "cohw_utils.views.target_coverage"),
                     ("gaps", "cohw_utils.studies.enabling.gap_report")):
        try:
            importlib.import_module(mod)
            out[key] = True
        except Exception:  # noqa: BLE001 - any import failure means "not available"
            out[key] = False
    return out


#: What :func:`software_gaps` / :func:`rollup` found importable (filled on first use).
SOURCES: dict[str, bool] = {}


def bindings(results: pd.DataFrame, weights: pd.Series | None = None) -> pd.DataFrame:
    """One row per phase of a single design's :func:`~cohw_utils.studies.codesign.sweep.evaluate_designs` results:
    class, binding resource, its time share, utilizations, time per unit, fits, weight."""
    if results["design"].nunique() != 1:
        raise CohwError("bindings needs the results of one design; filter results[results.design == name]")
    r = results.set_index("phase")
    share = np.array([r.loc[p, f"share_{b}"] for p, b in zip(r.index, r["binding"])])
    out = pd.DataFrame({"klass": r["klass"], "binding": r["binding"], "binding_share": share,
                        "util_compute": r["util_compute"], "util_memory": r["util_memory"],
                        "time_per_unit_s": r["time_per_unit_s"], "unit": r["unit"], "fits": r["fits"],
                        "variant": r["variant"]})
    if weights is not None:
        out["weight"] = out.index.map(weights).fillna(0.0)
    return out


def best_features(gains: pd.DataFrame, min_gain: float = 1.02) -> pd.DataFrame:
    """Per phase: the feature with the largest modelled speedup, its speedup and energy ratio,
    and the runner-up; ``none`` where no feature beats ``min_gain``."""
    rows = []
    for ph, g in gains.groupby("phase", sort=False):
        g = g.sort_values(["speedup", "energy_ratio"], ascending=[False, True])
        top = g.iloc[0]
        second = g.iloc[1] if len(g) > 1 else None
        ok = top["speedup"] >= min_gain
        rows.append({"phase": ph, "best_feature": top["feature"] if ok else "none",
                     "speedup": float(top["speedup"]) if ok else 1.0,
                     "energy_ratio": float(top["energy_ratio"]) if ok else 1.0,
                     "runner_up": (f"{second['feature']} ({second['speedup']:.2f}x)"
                                   if second is not None and second["speedup"] >= min_gain else "-")})
    return pd.DataFrame(rows).set_index("phase")


def software_gaps(phases: Sequence[Any], target: str = "onnx-opset18") -> pd.DataFrame:
    """Software requirements per phase from the target description (see module docstring).

    Columns: ``phase``, ``workload``, ``requirement``, ``kind`` (``operator`` / ``training``),
    ``op``, ``flops_share``, ``bytes_share`` (of the phase, from ``targets.missing_ops``),
    ``evidence``. Empty when :mod:`cohw_utils.views.target_coverage` is not importable (``SOURCES`` says so).
    """
    SOURCES.update(available_sources())
    cols = ["phase", "workload", "requirement", "kind", "op", "flops_share", "bytes_share", "evidence"]
    if not SOURCES.get("targets"):
        return pd.DataFrame(columns=cols)
    from cohw_utils.views import target_coverage as targets

    tgt = targets.load_target(target)
    rows = []
    for p in phases:
        m = targets.missing_ops(p.table, tgt)
        backward = m[m["passes"] == "backward"]
        fwd = m[m["passes"] != "backward"]
        has_bw = bool((p.table["pass"] == "backward").any())
        if has_bw:
            bw = p.table[(p.table["pass"] == "backward") & p.table["costed"]]
            tot = p.table[p.table["costed"]]
            fs = float(bw["flops"].sum()) / float(tot["flops"].sum() or 1)
            moved = lambda t: float((t["bytes_read"] + t["bytes_written"]).sum())  # noqa: E731
            bs = moved(bw) / (moved(tot) or 1.0)
            rows.append({"phase": p.label, "workload": p.workload,
                         "requirement": f"training runtime on {tgt.name}: autograd, backward kernels, optimizer",
                         "kind": "training", "op": "", "flops_share": fs, "bytes_share": bs,
                         "evidence": f"{len(backward)} backward op packets absent from {tgt.name} "
                                     f"({', '.join(o.removeprefix('aten.') for o in backward['op'][:3])}"
                                     f"{' ...' if len(backward) > 3 else ''})"})
        for _, r in fwd.iterrows():
            rows.append({"phase": p.label, "workload": p.workload,
                         "requirement": f"{r['op']} on {tgt.name} (lowering or kernel)", "kind": "operator",
                         "op": r["op"], "flops_share": float(r["flops_share"]), "bytes_share": float(r["bytes_share"]),
                         "evidence": f"targets.missing_ops: {r['calls']} calls ({r['passes']})"})
    return pd.DataFrame(rows, columns=cols)


def per_workload(binding: pd.DataFrame, best: pd.DataFrame, sw: pd.DataFrame) -> pd.DataFrame:
    """The per-phase view: binding resource, best hardware feature with its modelled gain, and
    the software gaps (requirements joined), one row per phase."""
    gaps = sw.groupby("phase")["requirement"].agg(lambda r: "; ".join(dict.fromkeys(x.split(" on ")[0] for x in r)))
    out = binding[["klass", "binding", "binding_share", "util_compute", "util_memory"]].join(
        best[["best_feature", "speedup", "energy_ratio", "runner_up"]])
    out["software_gaps"] = out.index.map(gaps).fillna("none found")
    if "weight" in binding.columns:
        out["weight"] = binding["weight"]
    return out


def _tier(score: float) -> str:
    return next(t for lo, t in TIERS if score >= lo)


def _format_rows(hw: pd.DataFrame) -> list[dict]:
    rows = []
    formats = None
    if not SOURCES:
        SOURCES.update(available_sources())
    if SOURCES.get("gaps"):
        from cohw_utils.studies.enabling import gap_report as gaps

        try:
            formats = gaps.runtime_formats().set_index("format")
        except Exception:  # noqa: BLE001 - a broken data file must not break the roll-up
            formats = None
    for _, r in hw.iterrows():
        if r["requirement"] not in FORMAT_FEATURES:
            continue
        fmt, row_name = FORMAT_FEATURES[r["requirement"]]
        if formats is not None and row_name in formats.index:
            f = formats.loc[row_name]
            ev = (f"runtime_formats.csv '{row_name}': {f['onnx_ops']}; produced by {f['how_produced']}; "
                  f"source: {f['source'].split(';')[0]}")
        else:
            ev = "cohw_utils.studies.enabling.gap_report not importable: no runtime-format evidence; the format needs a runtime path"
        rows.append({"kind": "software", "requirement": f"runtime and exporter path for {fmt} weights "
                     f"(enables '{r['requirement']}')", "affects": r["affects"], "modelled_gain": r["modelled_gain"],
                     "score": r["score"], "evidence": ev})
    return rows


def rollup(best: pd.DataFrame, gains: pd.DataFrame, sw: pd.DataFrame, weights: pd.Series,
           min_gain: float = 1.02, top_features: int | None = None) -> pd.DataFrame:
    """The prioritised requirements table for the whole proxy set (see the module docstring for
    the score). Hardware rows: every feature that is some phase's best, or scores at least
    0.02; software rows: every gap, and the runtime format each ranked format feature needs.

    Columns: ``priority`` (P0/P1/P2), ``kind`` (hardware / software), ``requirement``,
    ``affects`` (the phases, grouped by workload), ``modelled_gain``, ``score``, ``evidence``."""
    w = weights.astype(float)
    if abs(w.sum() - 1) > 1e-6:
        w = w / w.sum()

    def affects(phases: Sequence[str]) -> str:
        by: dict[str, dict[str, int]] = {}
        for p in phases:
            wl, rest = (p.split(":", 1) + [""])[:2]
            kind = rest.split(" ")[0]
            by.setdefault(wl, {}).setdefault(kind, 0)
            by[wl][kind] += 1
        return "; ".join(f"{wl} ({', '.join(k + (f' x{n}' if n > 1 else '') for k, n in v.items())})"
                         for wl, v in by.items())

    hw_rows = []
    best_set = set(best["best_feature"])
    for feat, g in gains.groupby("feature", sort=False):
        g = g[g["speedup"] >= min_gain]
        if g.empty:
            continue
        score = float((g["phase"].map(w).fillna(0) * (1 - 1 / g["speedup"])).sum())
        if feat not in best_set and score < 0.02:
            continue
        top = g.sort_values("speedup", ascending=False).head(3)
        gain = ", ".join(f"{p} {s:.2f}x" for p, s in zip(top["phase"], top["speedup"]))
        hw_rows.append({"kind": "hardware", "requirement": feat, "affects": affects(list(g["phase"])),
                        "modelled_gain": f"best {gain}; energy "
                                         f"x{np.exp(np.log(g['energy_ratio']).mean()):.2f} (geo-mean)",
                        "score": score,
                        "evidence": f"what_if.feature_gains: best feature for "
                                    f"{int((best['best_feature'] == feat).sum())} of {len(best)} phases"})
    hw = pd.DataFrame(hw_rows)
    if top_features is not None and len(hw):
        hw = hw.sort_values("score", ascending=False).head(top_features)
    sw_rows = []
    for req, g in sw.groupby("requirement", sort=False):
        phases = list(dict.fromkeys(g["phase"]))
        score = float(sum(w.get(p, 0.0) for p in phases))
        kind = g["kind"].iloc[0]
        share = f"up to {100 * g['flops_share'].max():.2g}% of FLOPs, {100 * g['bytes_share'].max():.2g}% of bytes"
        sw_rows.append({"kind": "software", "requirement": req, "affects": affects(phases),
                        "modelled_gain": f"unblocks {len(phases)} phase(s) ({kind}; {share})", "score": score,
                        "evidence": g["evidence"].iloc[0]})
    rows = hw_rows if top_features is None else hw.to_dict("records")
    rows = list(rows) + sw_rows + (_format_rows(hw) if len(hw) else [])
    out = pd.DataFrame(rows, columns=["kind", "requirement", "affects", "modelled_gain", "score", "evidence"])
    out = out.sort_values(["score", "kind"], ascending=[False, True]).reset_index(drop=True)
    out.insert(0, "priority", out["score"].map(_tier))
    out.index = pd.RangeIndex(1, len(out) + 1, name="rank")
    return out


def write_csv(table: pd.DataFrame, path: str | Path) -> Path:
    """Write a requirements table to ``path`` (folders created); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(p)
    return p
