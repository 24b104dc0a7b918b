"""Scores and Pareto fronts of a co-design sweep: which designs no other design beats, per
workload class and for the weighted proxy set.

A design's score in a class is the weighted geometric mean (:func:`weighted_gmean`), over the
class's phases, of its time and its energy *relative to* a reference design (1 = the same,
0.5 = twice as fast or half the energy); its cost is its package area (mm^2).
:func:`pareto_mask` marks the non-dominated points of any table of objectives (all minimised),
:func:`class_scores` scores and marks every design, :func:`choose` picks the fastest within an
area budget, and :func:`design_sensitivity` reads off a factorial grid what each parameter buys
per doubling.

Used by Chapter 5 (the co-design loop).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from cohw_utils.core.errors import CohwError
from cohw_utils.studies.codesign.phases import CLASSES

__all__ = ["pareto_mask", "weighted_gmean", "class_scores", "choose", "design_sensitivity"]


def pareto_mask(points: np.ndarray | pd.DataFrame) -> np.ndarray:
    """Boolean mask of the non-dominated rows of ``points`` (n x k), every column minimised.

    Row i is dominated when some row j is <= it in every column and < in at least one.
    Duplicates of a non-dominated point are all kept. O(n^2 k) with numpy: fine for 10^4 rows.
    """
    x = np.asarray(points, dtype=float)
    if x.ndim != 2:
        raise CohwError(f"pareto_mask needs a 2-D array (points x objectives), got shape {x.shape}")
    if np.isnan(x).any():
        raise CohwError("pareto_mask: NaN objectives; drop or fill them first")
    keep = np.ones(len(x), dtype=bool)
    for i in range(len(x)):
        le = (x <= x[i]).all(axis=1)
        lt = (x < x[i]).any(axis=1)
        if (le & lt).any():
            keep[i] = False
    return keep


def weighted_gmean(values: pd.Series, weights: pd.Series) -> float:
    """Geometric mean of positive ``values`` weighted by ``weights`` (aligned on the index; the
    weights are normalised to sum 1): ``exp(sum(w_i log v_i) / sum(w_i))``."""
    w = weights / weights.sum()
    return float(np.exp((np.log(values) * w).sum()))


def class_scores(results: pd.DataFrame, reference: str, weights: pd.Series | None = None) -> pd.DataFrame:
    """Per design and workload class (and ``weighted proxy set``): the weighted geometric mean
    over the class's phases of time and energy *relative to* ``reference`` (1 = the same, 0.5 =
    twice as fast), with the package area. ``weights`` (phase label -> weight, from
    :func:`phase_weights`) weight the phases; equal weights where None. ``pareto`` marks the
    designs no other design beats in both area and time within the class; ``pareto3`` the same
    with energy as a third objective."""
    ref = results[results["design"] == reference].set_index("phase")
    if ref.empty:
        raise CohwError(f"reference design {reference!r} is not in the results; add it to the sweep")
    r = results.assign(time_rel=results["time_s"] / results["phase"].map(ref["time_s"]),
                       energy_rel=results["energy_J"] / results["phase"].map(ref["energy_J"]))
    w = weights if weights is not None else pd.Series(1.0, index=ref.index)
    r["w"] = r["phase"].map(w).fillna(0.0)
    groups = [("klass", k) for k in r["klass"].unique()] + [(None, "weighted proxy set")]
    rows = []
    area = results.groupby("design")[["package_mm2", "die_mm2"]].first()
    for col, k in groups:
        sub = r if col is None else r[r[col] == k]
        if col is not None and sub["w"].sum() == 0:
            sub = sub.assign(w=1.0)
        sub = sub[sub["w"] > 0]
        piv_t = sub.pivot(index="design", columns="phase", values="time_rel")
        piv_e = sub.pivot(index="design", columns="phase", values="energy_rel")
        ww = sub.groupby("phase")["w"].first().reindex(piv_t.columns)
        lw = ww / ww.sum()
        rows.append(pd.DataFrame({"klass": k, "time_rel": np.exp(np.log(piv_t).mul(lw, axis=1).sum(axis=1)),
                                  "energy_rel": np.exp(np.log(piv_e).mul(lw, axis=1).sum(axis=1))}))
    out = pd.concat(rows).reset_index().rename(columns={"index": "design"})
    out = out.join(area, on="design")
    out["pareto"] = False
    out["pareto3"] = False
    for k, g in out.groupby("klass"):
        out.loc[g.index, "pareto"] = pareto_mask(g[["package_mm2", "time_rel"]].to_numpy())
        out.loc[g.index, "pareto3"] = pareto_mask(g[["package_mm2", "time_rel", "energy_rel"]].to_numpy())
    return out


def choose(scores: pd.DataFrame, budget_mm2: float) -> pd.DataFrame:
    """Per class: the fastest design within the area budget (ties: the cheaper, then the more
    energy-efficient), with its time and energy relative to the reference."""
    fit = scores[scores["package_mm2"] <= budget_mm2 * (1 + 1e-9)]
    if fit.empty:
        raise CohwError(f"no design within {budget_mm2:.0f} mm^2; raise the budget or add cheaper designs")
    best = fit.sort_values(["klass", "time_rel", "package_mm2", "energy_rel"]).groupby("klass", sort=False).head(1)
    order = {k: i for i, k in enumerate((*CLASSES, "weighted proxy set"))}
    return best.assign(_o=best["klass"].map(order)).sort_values("_o").drop(columns="_o").set_index("klass")


def design_sensitivity(scores: pd.DataFrame, params: pd.DataFrame,
                       axes: Sequence[str] = ("tflops16", "hbm_tbs", "hbm_gb", "sram_mb")) -> pd.DataFrame:
    """The sweep's answer to "what does each knob buy?": for every axis of a factorial grid,
    pair each design with its neighbour one step up that axis (all other parameters equal) and
    express the speedup (ratio of ``time_rel``) *per doubling* of the parameter,
    ``speedup ** (1 / log2(step))``, so that grids with uneven steps compare. Columns
    ``<axis>``: the geometric mean over all such pairs of a class (1.0 = the parameter buys
    nothing, 2.0 = time halves with every doubling); ``<axis>_max``: the largest;
    ``<axis>_steps``: how many pairs."""
    s = scores.join(params, on="design")
    out = {}
    for ax in axes:
        others = [c for c in params.columns if c != ax]
        vals = sorted(params[ax].unique())
        if len(vals) < 2:
            continue
        nxt = dict(zip(vals[:-1], vals[1:]))
        lo = s[s[ax].isin(nxt)].copy()
        lo["_up"] = lo[ax].map(nxt)
        hi = s.rename(columns={ax: "_up", "time_rel": "time_hi"})
        m = lo.merge(hi[["klass", "_up", "time_hi", *others]], on=["klass", "_up", *others])
        m["step"] = m["_up"] / m[ax]
        per_doubling = np.log2(m["time_rel"] / m["time_hi"]) / np.log2(m["step"])
        out[ax] = 2.0 ** per_doubling.groupby(m["klass"]).mean()
        out[f"{ax}_max"] = 2.0 ** per_doubling.groupby(m["klass"]).max()
        out[f"{ax}_steps"] = m.groupby("klass").size()
    return pd.DataFrame(out)
