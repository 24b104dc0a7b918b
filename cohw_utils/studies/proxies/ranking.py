"""Rank proxy workloads by explicit, weighted, editable criteria (Chapter 1).

Criteria, each scored in [0, 1] before weighting:

* ``trend``  - editorial judgement 1..5 (``data/proxy_criteria.csv``, with rationale and
  source), mapped to (score - 1) / 4. Edit the file or pass your own table.
* ``demand`` - likewise.
* ``novelty`` - computed: the share of the workload's distinct operator types (aten op
  packets, views and tensor creation excluded) that a *baseline* stack does not run. The
  baseline is the op set of the classic vision proxies (ResNet-50 and ViT-B/16), standing for
  "what today's inference stack already supports".
* ``memory_bound`` - computed: the share of the workload's roofline time (on a reference
  accelerator, :mod:`cohw_utils.views.roofline`) spent in memory-bound ops. High means the workload
  stresses bandwidth; low means it stresses FLOP/s. Weight it by how much your next design
  is about memory.

score = sum(weight_c * criterion_c) / sum(weight_c). Weights must be non-negative and not
all zero.
"""
from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from cohw_utils.spine.costs import VIEW
from cohw_utils.core.errors import CohwError
from cohw_utils.core.data import DATA_DIR

CRITERIA = ("trend", "demand", "novelty", "memory_bound")
DEFAULT_WEIGHTS: dict[str, float] = {"trend": 0.3, "demand": 0.3, "novelty": 0.2, "memory_bound": 0.2}
BASELINE = ("resnet-50", "vit-b-16")


def load_judgements(path: str | None = None) -> pd.DataFrame:
    """The editorial trend/demand scores (1..5) with rationale and source, indexed by workload."""
    src = path or DATA_DIR / "proxy_criteria.csv"
    df = pd.read_csv(src).set_index("workload")
    for col in ("trend", "demand"):
        bad = df[~df[col].between(1, 5)]
        if len(bad):
            raise CohwError(f"{src}: '{col}' must be 1..5; fix rows {', '.join(bad.index)}")
    return df


def op_set(table: pd.DataFrame) -> set[str]:
    """Distinct op packets (``aten.add.Tensor`` -> ``aten.add``) that compute or move data.

    Views (metadata only) and tensor creation (ops with no tensor input) are left out.
    """
    creation = table["input_shapes"].map(len) == 0
    ops = table.loc[(table["op_class"] != VIEW) & ~creation, "op"]
    return {op.rsplit(".", 1)[0] if op.count(".") >= 2 else op for op in ops}


def novelty(op_sets: Mapping[str, set[str]], baseline: tuple[str, ...] = BASELINE) -> pd.Series:
    """Share of each workload's distinct ops absent from the union of the baseline's ops."""
    missing = [b for b in baseline if b not in op_sets]
    if missing:
        raise CohwError(f"novelty needs the baseline workloads' op sets; missing: {', '.join(missing)}")
    base = set().union(*(op_sets[b] for b in baseline))
    return pd.Series({w: len(s - base) / len(s) if s else 0.0 for w, s in op_sets.items()},
                     name="novelty")


def novel_ops(op_sets: Mapping[str, set[str]], baseline: tuple[str, ...] = BASELINE) -> dict[str, list[str]]:
    """Per workload, the sorted ops the baseline stack does not run (what :func:`novelty` counts)."""
    novelty(op_sets, baseline)  # same validation
    base = set().union(*(op_sets[b] for b in baseline))
    return {w: sorted(s - base) for w, s in op_sets.items()}


def validate_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """Validate criterion weights: known names, non-negative, not all zero."""
    unknown = set(weights) - set(CRITERIA)
    if unknown:
        raise CohwError(f"unknown criteria {sorted(unknown)}; use {list(CRITERIA)}")
    w = {c: float(weights.get(c, 0.0)) for c in CRITERIA}
    if any(v < 0 for v in w.values()) or sum(w.values()) == 0:
        raise CohwError(f"weights must be >= 0 and not all zero, got {w}")
    return w


def rank(features: pd.DataFrame, weights: Mapping[str, float] = DEFAULT_WEIGHTS) -> pd.DataFrame:
    """Score and rank workloads.

    ``features`` is indexed by workload with columns ``trend`` and ``demand`` (1..5) and
    ``novelty`` and ``memory_bound`` (0..1). Returns the normalised criteria, the weighted
    ``score``, the ``rank`` (1 = highest priority) and a one-line ``reasoning`` per workload.
    """
    w = validate_weights(weights)
    missing = [c for c in CRITERIA if c not in features.columns]
    if missing:
        raise CohwError(f"features lack criteria columns {missing}")
    norm = pd.DataFrame(index=features.index)
    norm["trend"] = (features["trend"] - 1) / 4
    norm["demand"] = (features["demand"] - 1) / 4
    norm["novelty"] = features["novelty"].astype(float)
    norm["memory_bound"] = features["memory_bound"].astype(float)
    total = sum(w.values())
    contrib = norm.mul(pd.Series(w)) / total
    out = norm.copy()
    out["score"] = contrib.sum(axis=1)
    out["rank"] = out["score"].rank(ascending=False, method="min").astype(int)

    def reason(name: str) -> str:
        parts = sorted(((contrib.loc[name, c], c) for c in CRITERIA if w[c] > 0), reverse=True)
        top = ", ".join(f"{c} {norm.loc[name, c]:.2f} (x{w[c] / total:.2f} = {v:.2f})" for v, c in parts)
        return f"score {out.loc[name, 'score']:.2f}: {top}"

    out["reasoning"] = [reason(n) for n in out.index]
    return out.sort_values("score", ascending=False)
