"""Accelerator targets with dtype and shape limits, checked node by node on a core-ATen graph.

:mod:`cohw_utils.views.target_coverage` treats a target as a set of op packets. A real NPU
compiler says more: an op is supported *in some dtypes* and *up to some shapes*. The targets
here are rows of ``cohw_utils/data/targets/targets.csv`` whose op file also has the columns
``dtypes`` (``;``-separated dtype names the op runs in), ``index_dtypes`` (what an integer
index operand may be), ``max_rank``, ``max_dim`` (largest size of any non-batch dim, blank for
none) and ``shape_limits`` (the source's stated limits in words, including the ones not
checked here). The shipped ones (``tosa-1.0-fp``, ``ethos-u55``) are read from ExecuTorch's Arm
backend by ``tools/derive_tosa_targets.py``; ``cohw_utils/data/targets/README.md`` says how.

Semantics of :func:`node_verdicts` (one verdict per row of a
:func:`cohw_utils.spine.graph_table.graph_table`), first match wins:

1. ``folded``: the node depends on no user input; the compiler computes it ahead of time.
2. ``missing op``: its packet is not on the target.
3. ``missing in dtype``: some tensor it reads or writes has a dtype outside the op's
   ``dtypes`` and ``index_dtypes`` (``dtype`` names the first such one). An op on the list but
   not in the dtype the model runs is missing *in that dtype*.
4. ``shape limit``: a tensor's rank exceeds ``max_rank``, or a non-batch dim of its first
   input exceeds ``max_dim``.
5. ``supported``.

``quantize="int8"`` (or ``"int16"``) asks what is left after full-integer post-training
quantization, as ExecuTorch's Arm quantizer does it for an integer-only NPU: every floating
tensor becomes that integer type (weights and activations; the int32 bias and accumulator are
the op's business), and int64 values an op produces are narrowed to int32 (the INT flow's
``ConvertInt64OutputOpsToInt32Pass``); an int64 *user input* (token ids as fed) stays int64.
Whether the quantized model is accurate enough is not asked here (Chapter 4.2b measures that).

Not checked per node: symbolic shapes. Both shipped targets are TOSA 1.0, which needs static
shapes (ExecuTorch's ``SymbolicShapeSupportCheck``): a graph exported with a dynamic axis is
compiled once per shape (the ``symbolic`` column of the graph table counts such nodes).

Used by Chapter 3 (SW enabling), section "an accelerator target on the core-ATen graph", and
Chapter 2's new-operator section (the target's op list).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd

from cohw_utils.core.errors import CohwError
from cohw_utils.views import target_coverage

LIMIT_COLUMNS = ("dtypes", "index_dtypes", "max_rank", "max_dim", "shape_limits")
STATUSES = ("folded", "missing op", "missing in dtype", "shape limit", "supported")
GAP_COLUMNS = ["op", "status", "dtype", "calls", "passes", "reason"]
QUANTIZE = ("int8", "int16")


@dataclass(frozen=True)
class OpRule:
    """What the target accepts for one op packet."""

    dtypes: frozenset[str]
    index_dtypes: frozenset[str] = frozenset()
    max_rank: int | None = None
    max_dim: int | None = None
    shape_limits: str = ""


@dataclass(frozen=True)
class NpuTarget:
    """A target with per-op limits: its index row (name, description, source, notes) and rules."""

    name: str
    description: str
    source: str
    rules: Mapping[str, OpRule]
    notes: str = ""

    @property
    def ops(self) -> frozenset[str]:
        return frozenset(self.rules)


def _split(cell: str) -> frozenset[str]:
    return frozenset(s.strip() for s in str(cell).split(";") if s.strip())


def _int_or_none(cell) -> int | None:
    s = str(cell).strip()
    return int(float(s)) if s else None


def list_npu_targets() -> list[str]:
    """The shipped targets whose op file carries dtype and shape limits."""
    out = []
    for name in target_coverage.list_targets():
        if set(LIMIT_COLUMNS) <= set(target_coverage.target_ops_table(name).columns):
            out.append(name)
    return out


def load_npu_target(name: str) -> NpuTarget:
    """The target called ``name``; one without limit columns (the ONNX op set) raises a
    :class:`~cohw_utils.core.errors.CohwError` naming the ones that have them."""
    base = target_coverage.load_target(name)
    table = target_coverage.target_ops_table(base.name)
    if not set(LIMIT_COLUMNS) <= set(table.columns):
        raise CohwError(f"target {base.name!r} lists op packets only (no {', '.join(LIMIT_COLUMNS)} columns); "
                        f"targets with dtype and shape limits: {', '.join(list_npu_targets())}")
    rules = {}
    for r in table.itertuples(index=False):
        dts = _split(r.dtypes)
        if not dts:
            raise CohwError(f"target {base.name!r}: op {r.op} lists no dtypes; fill its 'dtypes' column")
        rules[r.op] = OpRule(dts, _split(r.index_dtypes), _int_or_none(r.max_rank), _int_or_none(r.max_dim),
                             str(r.shape_limits))
    return NpuTarget(base.name, base.description, base.source, rules, base.notes)


def _as_target(target: NpuTarget | str) -> NpuTarget:
    return target if isinstance(target, NpuTarget) else load_npu_target(target)


def _quantized(dtypes: list[str], quantize: str | None) -> list[str]:
    """Floating -> ``quantize``, int64 -> int32 (op outputs; the caller adds back a user's int64)."""
    if quantize is None:
        return dtypes
    return [quantize if d.startswith(("fp", "bf")) or d == "tf32" else "int32" if d == "int64" else d
            for d in dtypes]


def _verdict(row, target: NpuTarget, quantize: str | None) -> tuple[str, str, str]:
    if row.folded:
        return "folded", "", "computed ahead of time (no user input reaches it)"
    rule = target.rules.get(row.packet)
    if rule is None:
        return "missing op", row.value_dtype, f"{row.packet} is not on {target.name}"
    dts = _quantized([d for d in str(row.dtypes).split(";") if d], quantize)
    if quantize is not None and row.int64_user_input:
        dts.append("int64")  # an int64 user input stays int64
    allowed = rule.dtypes | rule.index_dtypes
    bad = [d for d in dict.fromkeys(dts) if d not in allowed]
    if bad:
        return "missing in dtype", bad[0], f"{bad[0]} not in {'/'.join(sorted(allowed))}"
    if rule.max_rank is not None and row.max_rank > rule.max_rank:
        return "shape limit", "", f"rank {row.max_rank} > {rule.max_rank}"
    if rule.max_dim is not None:
        big = [d for d in tuple(row.shape)[1:] if isinstance(d, int) and d > rule.max_dim]
        if big:
            return "shape limit", "", f"dim {big[0]} > {rule.max_dim} (shape {tuple(row.shape)})"
    return "supported", "", ""


def node_verdicts(graph: pd.DataFrame, target: NpuTarget | str, quantize: str | None = None) -> pd.DataFrame:
    """``graph`` (a :func:`~cohw_utils.spine.graph_table.graph_table`) with ``status``, ``dtype``
    (the offending one, for ``missing in dtype``; else the node's value dtype for a missing op)
    and ``reason`` columns (module docstring)."""
    if quantize is not None and quantize not in QUANTIZE:
        raise CohwError(f"quantize={quantize!r}: use None or one of {', '.join(QUANTIZE)}")
    tgt = _as_target(target)
    out = graph.copy()
    verdicts = [_verdict(r, tgt, quantize) for r in graph.itertuples(index=False)]
    out["status"] = [v[0] for v in verdicts]
    out["dtype"] = [v[1] for v in verdicts]
    out["reason"] = [v[2] for v in verdicts]
    return out


def npu_missing(graph: pd.DataFrame, target: NpuTarget | str, quantize: str | None = None) -> pd.DataFrame:
    """One row per (op packet, status, dtype) the target does not run: ``calls``, ``passes``
    (``forward``, ``backward`` or ``forward+backward``) and the first ``reason``. Ordered by
    status (missing op, in dtype, shape), then calls."""
    s = node_verdicts(graph, target, quantize)
    s = s[s["status"].isin(["missing op", "missing in dtype", "shape limit"])]
    if s.empty:
        return pd.DataFrame(columns=GAP_COLUMNS)
    g = s.groupby(["packet", "status", "dtype"], sort=False).agg(
        calls=("node", "size"),
        passes=("pass", lambda p: "+".join(x for x in ("forward", "backward") if x in set(p))),
        reason=("reason", "first")).reset_index().rename(columns={"packet": "op"})
    g["k"] = g["status"].map({st: i for i, st in enumerate(STATUSES)})
    g = g.sort_values(["k", "calls", "op"], ascending=[True, False, True]).drop(columns="k")
    return g[GAP_COLUMNS].reset_index(drop=True)


def _fmt(m: pd.DataFrame, status: str) -> str:
    rows = m[m["status"] == status]
    if status == "missing in dtype":
        return ", ".join(f"{o.removeprefix('aten.')}[{d}]" for o, d in zip(rows["op"], rows["dtype"]))
    if status == "shape limit":
        return ", ".join(f"{o.removeprefix('aten.')} ({r})" for o, r in zip(rows["op"], rows["reason"]))
    return ", ".join(dict.fromkeys(o.removeprefix("aten.") for o in rows["op"]))


def npu_gap_summary(graphs: Mapping[str, pd.DataFrame], target: NpuTarget | str,
                    quantize: str | None = None) -> pd.DataFrame:
    """One row per graph (key e.g. ``"vit-b-16:forward:fp32"``): node counts, the share of the
    non-folded nodes the target runs, and the missing ops, ops missing in a dtype (``op[dtype]``)
    and shape-limit violations."""
    tgt = _as_target(target)
    rows = []
    for key, graph in graphs.items():
        s = node_verdicts(graph, tgt, quantize)
        m = npu_missing(graph, tgt, quantize)
        live = s[s["status"] != "folded"]
        rows.append({"graph": key, "nodes": len(s), "folded": int((s["status"] == "folded").sum()),
                     "supported_%": 100 * float((live["status"] == "supported").mean()) if len(live) else 100.0,
                     "missing_ops": _fmt(m, "missing op"), "missing_in_dtype": _fmt(m, "missing in dtype"),
                     "shape_limit": _fmt(m, "shape limit")})
    return pd.DataFrame(rows).set_index("graph")
