"""An exported graph as a table: one row per op node of a ``torch.export`` program, with the dtypes
and ranks a compiler's partitioner checks.

The op table of :mod:`cohw_utils.spine.trace` records what eager PyTorch *dispatches*; an
accelerator compiler sees something else: the graph ``torch.export`` captures, decomposed to the
core-ATen opset (``ExportedProgram.run_decompositions()``), where ``linear`` is ``permute`` +
``addmm``, attention is ``bmm`` + ``_softmax`` and views are ops in their own right. This module
turns such a program into rows a target's operator-support check can be applied to
(:mod:`cohw_utils.views.npu_target`).

Semantics of :func:`graph_table`, one row per ``call_function`` node whose target is an ATen op
(``operator.getitem``, ``aten._assert_*`` checks and ``aten.sym_size``-style shape queries are
left out: they compute no tensor):

* ``op`` is the overload (``aten.add.Tensor``), ``packet`` the op without it (``aten.add``).
* ``dtypes``: the dtype names (:func:`cohw_utils.core.dtypes.dtype_name`; ``int16`` and others
  spelled as torch does) of every tensor the node reads or writes, ``;``-joined, in order;
  ``value_dtype`` the first *floating* one (the dtype the op computes in), else the first;
  ``index_dtypes`` the integer dtypes of its tensor *inputs* (indices, token ids).
* ``max_rank``: the largest rank among those tensors; ``shape``: the first tensor input's shape
  (the output's for a node without tensor inputs).
* ``folded``: the node depends on no *user input* of the program (only on parameters, buffers
  and constants, or on a user input's *size* only, through a shape query): compiled for one
  static shape, a compiler computes it once, ahead of time (ExecuTorch's
  ``ComputeConstantOpsAOTPass``, a constant-folding pass), so it needs no kernel on the target.
* ``symbolic``: one of its tensors has a symbolic dim (the export kept an axis dynamic); TOSA
  1.0 compilers need static shapes (ExecuTorch's ``SymbolicShapeSupportCheck``), so such a
  graph is compiled once per shape bucket.
* For a node with several outputs only the ones a ``getitem`` reads count (``max_pool2d``'s
  unused int64 indices do not).
* ``int64_user_input``: one of its inputs is an int64 user input (token ids as fed).
* ``pass``: ``"forward"`` for every node of an inference program; in a joint forward+backward
  program (``loss_output=0``), ``"forward"`` for the nodes the loss (that output) depends on and
  ``"backward"`` for the rest (the gradient computation: nodes only the gradients need).

Used by Chapter 3 (SW enabling), section "an accelerator target on the core-ATen graph".
"""
from __future__ import annotations

import operator

import pandas as pd
import torch

from cohw_utils.core.dtypes import dtype_name

GRAPH_COLUMNS = ["node", "op", "packet", "pass", "value_dtype", "dtypes", "index_dtypes", "max_rank", "shape",
                 "folded", "symbolic", "int64_user_input"]


def _dname(dtype: torch.dtype) -> str:
    try:
        return dtype_name(dtype)
    except Exception:  # noqa: BLE001 - int16, complex...: torch's own spelling
        return str(dtype).removeprefix("torch.")


def _tensors(val) -> list:
    if isinstance(val, (list, tuple)):
        return [t for v in val for t in _tensors(v)]
    return [val] if isinstance(val, torch.Tensor) else []


def _is_shape_query(n) -> bool:
    return isinstance(n.target, torch._ops.OpOverload) and n.target.name().startswith("aten::sym_")


def _ancestors_of(nodes) -> set:
    seen, stack = set(), list(nodes)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def graph_table(program, loss_output: int | None = None) -> pd.DataFrame:
    """One row per ATen op node of ``program`` (an ``ExportedProgram``; see the module docstring).

    ``loss_output``: for a joint forward+backward program, the index of the output that is the
    loss; nodes it depends on are ``forward``, the others ``backward``. ``None``: all forward.
    """
    graph = program.graph
    user = set(program.graph_signature.user_inputs)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    user_nodes = {n for n in placeholders if n.name in user}
    # nodes whose *values* depend on a user input are not constant; a shape query (sym_size)
    # carries only a size, which a compile for one static shape fixes
    live: set = set(user_nodes)
    for n in graph.nodes:
        if n.op == "call_function" and not _is_shape_query(n) and any(i in live for i in n.all_input_nodes):
            live.add(n)
    forward = None
    if loss_output is not None:
        out = next(n for n in graph.nodes if n.op == "output")
        outs = out.args[0] if isinstance(out.args[0], (list, tuple)) else [out.args[0]]
        forward = _ancestors_of([outs[loss_output]])
    rows = []
    for n in graph.nodes:
        if n.op != "call_function" or n.target is operator.getitem:
            continue
        if not isinstance(n.target, torch._ops.OpOverload) or n.target.namespace != "aten":
            continue
        name = n.target.name().split("::", 1)[1]  # "add.Tensor" / "mm" (default overload)
        if name.startswith("_assert") or _is_shape_query(n):
            continue
        op = "aten." + (name if "." in name else name + ".default")
        ins = [t for i in n.all_input_nodes for t in _tensors(i.meta.get("val"))]
        val = n.meta.get("val")
        if isinstance(val, (list, tuple)) and n.users and all(u.target is operator.getitem for u in n.users):
            val = [val[u.args[1]] for u in n.users]  # only the outputs something reads
        outs_ = _tensors(val)
        tensors = ins + outs_
        names = [_dname(t.dtype) for t in tensors]
        floating = [_dname(t.dtype) for t in tensors if t.dtype.is_floating_point]
        shape = tuple(int(d) if not isinstance(d, torch.SymInt) else str(d)
                      for d in (ins[0].shape if ins else outs_[0].shape if outs_ else ()))
        rows.append({
            "node": n.name, "op": op, "packet": op.rsplit(".", 1)[0],
            "pass": "forward" if forward is None or n in forward else "backward",
            "value_dtype": floating[0] if floating else (names[0] if names else ""),
            "dtypes": ";".join(dict.fromkeys(names)),
            "index_dtypes": ";".join(dict.fromkeys(_dname(t.dtype) for t in ins
                                                   if not t.dtype.is_floating_point and t.dtype != torch.bool)),
            "max_rank": max((t.dim() for t in tensors), default=0),
            "shape": shape,
            "folded": n not in live,
            "symbolic": any(isinstance(d, torch.SymInt) for t in tensors for d in t.shape),
            "int64_user_input": any(i in user_nodes and any(t.dtype == torch.int64 for t in _tensors(i.meta.get("val")))
                                    for i in n.all_input_nodes),
        })
    return pd.DataFrame(rows, columns=GRAPH_COLUMNS)
