"""Target software stacks as data: which aten ops a stack supports, and what a workload needs beyond it.

A *target* is the set of aten op packets (``"aten.mm"``, ``"aten.native_layer_norm"``: the op
name without its overload) that a software stack can run. Targets live in
``cohw_utils/data/targets/``: ``targets.csv`` is the index (``name, file, description, source, citation,
notes``) and each target's file lists its ops, one row per op packet, with ``via`` (how the
stack covers it) and ``evidence`` (the function, decomposition or rule that says so). See
``cohw_utils/data/targets/README.md`` for the shipped targets and how each was derived.

Semantics of the comparison (:func:`missing_ops`, :func:`coverage`):

* An op table row is *covered* when its op packet is in ``target.ops``. The packet of
  ``aten.add.Tensor`` is ``aten.add``; the tracer's fused-attention row
  ``aten.scaled_dot_product_attention`` is its own packet.
* ``view`` rows (metadata-only ops: view, transpose, expand, detach...) are left out: a
  compiler resolves them into layouts and they move no data, so they are neither gaps nor
  coverage. Everything else counts, tensor creation included (``zeros``, ``arange``...).
* FLOPs and bytes are the op table's (see :mod:`cohw_utils.spine.costs`); uncosted rows count as
  calls with zero FLOPs and bytes. Shares are fractions (0..1) of the table's totals over the
  non-view rows.

Used by Chapters 2 (new operators) and 3 (SW gaps).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cohw_utils.spine.costs import VIEW
from cohw_utils.core.errors import CohwError
from cohw_utils.core.data import DATA_DIR, read_table
from cohw_utils.spine import optable

TARGET_DIR = DATA_DIR / "targets"
_INDEX = "targets.csv"
_INDEX_COLUMNS = ("name", "file", "description", "source", "notes")
_OP_COLUMNS = ("op", "via", "evidence")
MISSING_COLUMNS = ["op", "calls", "flops", "flops_share", "bytes_moved", "bytes_share", "passes"]


@dataclass(frozen=True)
class Target:
    """A software stack: its name, what it is, where the op list comes from, and the op packets."""

    name: str
    description: str
    source: str
    ops: frozenset[str]  # aten op packets like "aten.mm", "aten.native_layer_norm"
    notes: str = ""


# ------------------------------------------------------------------------------------ loading
def _index() -> pd.DataFrame:
    return read_table(TARGET_DIR / _INDEX, required=_INDEX_COLUMNS, dtype=str, keep_default_na=False)


def list_targets() -> list[str]:
    """Names of the shipped targets (rows of ``data/targets/targets.csv``)."""
    return list(_index()["name"])


def _row(name: str) -> pd.Series:
    idx = _index()
    hit = idx[idx["name"].str.lower() == str(name).strip().lower()]
    if hit.empty:
        raise CohwError(f"unknown target {name!r}; known targets: {', '.join(idx['name'])}")
    return hit.iloc[0]


def target_ops_table(name: str) -> pd.DataFrame:
    """A target's op list as shipped: one row per op packet with ``via`` and ``evidence``."""
    row = _row(name)
    path = TARGET_DIR / row["file"]
    df = read_table(path, required=_OP_COLUMNS, dtype=str, keep_default_na=False)
    bad = df[~df["op"].str.startswith("aten.") | (df["op"].str.count(r"\.") != 1)]
    if len(bad):
        raise CohwError(f"{path}: op packets must look like 'aten.mm'; fix rows {list(bad['op'][:5])}")
    return df


def load_target(name: str) -> Target:
    """The target called ``name`` (case-insensitive); an unknown name raises a
    :class:`~cohw_utils.core.errors.CohwError` listing the known ones."""
    row = _row(name)
    ops = frozenset(target_ops_table(row["name"])["op"])
    return Target(name=row["name"], description=row["description"], source=row["source"],
                  ops=ops, notes=row["notes"])


def _as_target(target: Target | str) -> Target:
    return target if isinstance(target, Target) else load_target(target)


# ------------------------------------------------------------------------------------ views
def op_packet(op: str) -> str:
    """``aten.add.Tensor`` -> ``aten.add``; ``aten.scaled_dot_product_attention`` stays as is."""
    return op.rsplit(".", 1)[0] if op.count(".") >= 2 else op


def _non_view(table: pd.DataFrame) -> pd.DataFrame:
    t = table[table["op_class"] != VIEW]
    return t.assign(packet=t["op"].map(op_packet),
                    bytes_moved=optable.bytes_moved(t).fillna(0),
                    flops_=t["flops"].fillna(0))


def missing_ops(table: pd.DataFrame, target: Target | str) -> pd.DataFrame:
    """One row per op packet of ``table`` that ``target`` lacks.

    Columns: ``op`` (packet), ``calls``, ``flops``, ``flops_share`` and ``bytes_moved``,
    ``bytes_share`` (fractions of the table's non-view totals), ``passes`` (``"forward"``,
    ``"backward"`` or ``"forward+backward"``). Sorted by ``flops_share``, then ``bytes_share``,
    largest first. Empty (with these columns) when the target covers everything.
    """
    tgt = _as_target(target)
    t = _non_view(table)
    total_f, total_b = float(t["flops_"].sum()), float(t["bytes_moved"].sum())
    gap = t[~t["packet"].isin(tgt.ops)]
    if gap.empty:
        return pd.DataFrame(columns=MISSING_COLUMNS)
    g = gap.groupby("packet").agg(calls=("op", "size"), flops=("flops_", "sum"),
                                  bytes_moved=("bytes_moved", "sum"),
                                  passes=("pass", lambda s: "+".join(p for p in ("forward", "backward")
                                                                      if p in set(s))))
    g["flops_share"] = g["flops"] / total_f if total_f else 0.0
    g["bytes_share"] = g["bytes_moved"] / total_b if total_b else 0.0
    g = g.reset_index().rename(columns={"packet": "op"})
    g["flops"] = g["flops"].astype("int64")
    g["bytes_moved"] = g["bytes_moved"].astype("int64")
    g = g.sort_values(["flops_share", "bytes_share", "op"], ascending=[False, False, True])
    return g[MISSING_COLUMNS].reset_index(drop=True)


def coverage(table: pd.DataFrame, target: Target | str) -> dict[str, float]:
    """What ``target`` covers of ``table`` (non-view rows).

    Returns ``flops_share``, ``bytes_share``, ``calls_share`` (fractions 0..1 covered; 1.0 for
    an empty table), ``unique_ops`` (distinct op packets) and ``missing_ops`` (how many of those
    the target lacks).
    """
    tgt = _as_target(target)
    t = _non_view(table)
    cov = t["packet"].isin(tgt.ops)

    def share(col: pd.Series) -> float:
        total = float(col.sum())
        return float(col[cov].sum()) / total if total else 1.0

    packets = set(t["packet"])
    return {
        "flops_share": share(t["flops_"]),
        "bytes_share": share(t["bytes_moved"]),
        "calls_share": float(cov.mean()) if len(t) else 1.0,
        "unique_ops": len(packets),
        "missing_ops": len(packets - tgt.ops),
    }


def gap_summary(tables: Mapping[str, pd.DataFrame], target: Target | str, top: int = 8) -> pd.DataFrame:
    """One row per entry of ``tables`` (e.g. ``"nerfacto:render"``): coverage shares, how many
    op packets are missing, the FLOP/byte share they carry, and the ``top`` missing ops by
    FLOPs then bytes."""
    tgt = _as_target(target)
    rows = []
    for key, table in tables.items():
        c = coverage(table, tgt)
        m = missing_ops(table, tgt)
        names = [o.removeprefix("aten.") for o in m["op"][:top]]
        rows.append({
            "workload": key, "unique_ops": c["unique_ops"], "missing_ops": c["missing_ops"],
            "missing_flops_%": 100 * (1 - c["flops_share"]),
            "missing_bytes_%": 100 * (1 - c["bytes_share"]),
            "missing_calls_%": 100 * (1 - c["calls_share"]),
            "missing": ", ".join(names) + (" ..." if len(m) > top else ""),
        })
    return pd.DataFrame(rows).set_index("workload")


# ------------------------------------------------------------------------------------ derivation
def derive_onnx_export_ops() -> pd.DataFrame:
    """Derive the ``onnx-opset18`` target from the installed exporter (slow: about 10 s).

    The op list of ``torch.onnx.export(..., dynamo=True)``: the exporter's registry
    (``ONNXRegistry.from_torchlib()``: onnxscript's torch_lib plus torch's own lowerings, ONNX
    opset 18) gives the packets it lowers ``direct``ly to ONNX functions; packets without a
    lowering that the exporter first rewrites with one of torch's aten-to-aten decompositions
    (``create_onnx_friendly_decomposition_table``) are ``decomposition``; in-place packets
    ``x_`` whose out-of-place ``x`` is covered are ``functionalization`` (``torch.export``
    replaces in-place ops by out-of-place ones before lowering). Packets whose name contains
    ``backward`` are left out whatever their route: the target is an *inference* stack and
    ONNX's standard domain has no gradient operators. Written by ``python -m cohw_utils.views.target_coverage``.
    """
    import logging
    import re

    import torch
    from torch.onnx._internal.exporter import _decomp, _registration

    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    reg = _registration.ONNXRegistry.from_torchlib()
    rows: dict[str, tuple[str, str]] = {}
    for key, metas in reg.functions.items():
        if not (isinstance(key, str) and key.startswith("aten::")):
            continue
        packet = "aten." + key.split("::", 1)[1].split(".", 1)[0]
        fn = getattr(metas[0].onnx_function, "name", str(metas[0].onnx_function))
        prev = rows.get(packet, ("direct", ""))[1]
        rows[packet] = ("direct", ", ".join(sorted(set(filter(None, prev.split(", "))) | {fn})))
    table = _decomp.create_onnx_friendly_decomposition_table(set(_decomp.get_onnx_implemented_overloads(reg)))
    decomposed: dict[str, set[str]] = {}
    for overload in table:
        packet = str(getattr(overload, "_overloadpacket", overload))
        if packet.startswith("aten.") and packet not in rows:
            decomposed.setdefault(packet, set()).add(str(overload).rsplit(".", 1)[-1])
    for packet, overloads in decomposed.items():
        rows[packet] = ("decomposition", f"torch decomposition of {packet}.{{{', '.join(sorted(overloads))}}}")
    covered = set(rows)
    for name in torch._C._dispatch_get_all_op_names():
        if not name.startswith("aten::"):
            continue
        base = name.split("::", 1)[1].split(".", 1)[0]
        packet = "aten." + base
        if base.endswith("_") and not base.endswith("__") and packet not in covered:
            out_of_place = "aten." + base[:-1]
            if out_of_place in covered:
                rows[packet] = ("functionalization", f"in-place form of {out_of_place}")
    df = pd.DataFrame([(op, via, ev) for op, (via, ev) in rows.items()], columns=list(_OP_COLUMNS))
    df = df[~df["op"].map(lambda o: bool(re.search("backward", o)))]
    order = {"direct": 0, "decomposition": 1, "functionalization": 2}
    return (df.assign(k=df["via"].map(order)).sort_values(["k", "op"]).drop(columns="k")
            .reset_index(drop=True))


def _write_onnx_target() -> Path:  # pragma: no cover - run by hand when torch/onnxscript change
    df = derive_onnx_export_ops()
    path = TARGET_DIR / "onnx-opset18.csv"
    df.to_csv(path, index=False)
    return path


if __name__ == "__main__":  # pragma: no cover
    print(f"wrote {_write_onnx_target()}")
