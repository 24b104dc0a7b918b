"""Helpers over an op table: bytes moved, totals, breakdowns by operator class, op and module.

Every function takes an op table from :func:`cohw_utils.spine.trace.trace` and returns numbers or
a small DataFrame; none traces again. ``view`` rows (metadata-only ops) cost nothing and are
left out of op counts. "Bytes moved" = bytes read + bytes written under the unfused-eager
semantics of :mod:`cohw_utils.spine.costs`. FLOPs come in two columns: ``flops`` (attention
counted full, torch's convention) and ``flops_effective`` (causal / sliding-window attention as
a flash kernel computes it; equal to ``flops`` on every other row); every summary here carries
both, so a caller says which it shows.

Used by every chapter that prints an op table's totals or breakdowns (1, 2, 4.3).
"""
from __future__ import annotations

import pandas as pd

from cohw_utils.core.opclasses import OP_CLASSES, VIEW

_SUMS = ["flops", "flops_effective", "macs", "bytes_read", "bytes_written"]


def effective_flops(table: pd.DataFrame) -> pd.Series:
    """Each row's ``flops_effective``; a table without that column, or a costed row left empty
    there (a hand-built table), falls back to its ``flops`` (NaN stays NaN where uncosted)."""
    if "flops_effective" not in table.columns:
        return table["flops"]
    return table["flops_effective"].fillna(table["flops"])


def _with_effective(table: pd.DataFrame) -> pd.DataFrame:
    return table.assign(flops_effective=effective_flops(table))


def bytes_moved(table: pd.DataFrame) -> pd.Series:
    """Bytes each row moves: ``bytes_read + bytes_written`` (the one definition; NaN stays NaN
    for a row with no cost rule). Sum it for a table's total."""
    return table["bytes_read"] + table["bytes_written"]


def with_bytes_moved(table: pd.DataFrame) -> pd.DataFrame:
    """The table with a ``bytes_moved`` column added (see :func:`bytes_moved`)."""
    return table.assign(bytes_moved=bytes_moved(table))


def totals(table: pd.DataFrame) -> dict[str, float]:
    """Whole-table totals: FLOPs (``flops`` as counted and ``flops_effective``), MACs, bytes
    read/written/moved, intensity (of ``flops``), contraction FLOPs both ways, op counts.

    ``uncosted_ops`` counts executed ops with no cost rule (their costs are excluded from the
    sums, and listed by name in ``table.attrs['uncosted']``).
    """
    costed = _with_effective(table[table["costed"]])
    out = {k: int(costed[k].sum()) for k in _SUMS}
    out["bytes_moved"] = out["bytes_read"] + out["bytes_written"]
    out["intensity"] = out["flops"] / out["bytes_moved"] if out["bytes_moved"] else float("nan")
    contraction = costed["op_class"] == "contraction"
    out["contraction_flops"] = int(costed.loc[contraction, "flops"].sum())
    out["contraction_flops_effective"] = int(costed.loc[contraction, "flops_effective"].sum())
    out["ops"] = int((table["op_class"] != VIEW).sum())
    out["uncosted_ops"] = int((~table["costed"]).sum())
    return out


def by_class(table: pd.DataFrame) -> pd.DataFrame:
    """Per operator class: op count, FLOPs (both columns), bytes moved, and each as a % of the
    total."""
    t = _with_effective(table[table["costed"]]).pipe(with_bytes_moved)
    g = t.groupby("op_class").agg(ops=("op", "size"), flops=("flops", "sum"),
                                  flops_effective=("flops_effective", "sum"),
                                  macs=("macs", "sum"), bytes_moved=("bytes_moved", "sum"))
    g = g.reindex([c for c in OP_CLASSES if c in g.index])
    for col in ("flops", "flops_effective", "bytes_moved"):
        total = g[col].sum()
        g[f"{col}_%"] = 100.0 * g[col] / total if total else 0.0
    return g


def by_op(table: pd.DataFrame) -> pd.DataFrame:
    """Unique aten ops with call counts, FLOPs (both columns) and bytes, largest FLOPs first
    (views dropped)."""
    t = _with_effective(table[table["op_class"] != VIEW]).pipe(with_bytes_moved)
    g = t.groupby(["op", "op_class"], dropna=False).agg(
        calls=("op", "size"), flops=("flops", "sum"), flops_effective=("flops_effective", "sum"),
        bytes_moved=("bytes_moved", "sum"))
    return g.sort_values(["flops", "bytes_moved"], ascending=False).reset_index()


def module_prefix(module: str, depth: int | None) -> str:
    """``model.layers.3.mlp.up_proj`` at depth 3 -> ``model.layers.3``."""
    if depth is None or module.startswith("<"):
        return module
    return ".".join(module.split(".")[:depth])


def by_module(table: pd.DataFrame, depth: int | None = None) -> pd.DataFrame:
    """Costs summed per module path (truncated to ``depth`` components), with intensity (of
    ``flops``) and both FLOP columns."""
    t = _with_effective(table[table["costed"]])
    key = t["module"].map(lambda m: module_prefix(m, depth))
    g = t.groupby(key).agg(ops=("op", "size"), flops=("flops", "sum"),
                           flops_effective=("flops_effective", "sum"),
                           bytes_read=("bytes_read", "sum"), bytes_written=("bytes_written", "sum"))
    g["bytes_moved"] = bytes_moved(g)
    g["intensity"] = g["flops"] / g["bytes_moved"].where(g["bytes_moved"] > 0)
    return g


def hotspots(table: pd.DataFrame, by: str = "flops", n: int = 5, depth: int | None = None) -> pd.DataFrame:
    """The ``n`` modules with the largest ``by`` (``flops``, ``flops_effective`` or
    ``bytes_moved``)."""
    if by not in ("flops", "flops_effective", "bytes_moved"):
        raise ValueError(f"hotspots(by={by!r}): use 'flops', 'flops_effective' or 'bytes_moved'")
    return by_module(table, depth).nlargest(n, by)


def analysis_totals(header: dict, table: pd.DataFrame) -> dict:
    """What ``python -m cohw_utils analyze`` prints: ``header`` (the analysis' fields that are not
    the table's: workload, shapes, parameters, the measured cache summary, ``units``...) with the
    table's :func:`totals`, ``flops_per_unit``, the uncosted ops and the :func:`by_class` shares.
    Torch-free, so a cached cost function's table gives the same dict as a trace."""
    t = totals(table)
    units = header.get("units")
    return {**header, **t, "flops_per_unit": t["flops"] / units if units else None,
            "uncosted": dict(table.attrs.get("uncosted", {})),
            "by_class": {cls: {"flops": int(r.flops), "bytes_moved": int(r.bytes_moved),
                               "flops_%": round(float(r["flops_%"]), 3),
                               "bytes_moved_%": round(float(r["bytes_moved_%"]), 3)}
                         for cls, r in by_class(table).iterrows()}}
