"""Each proxy phase as the core-ATen graph an accelerator compiler partitions, forward and backward,
and the accelerator-target gap table beside the ONNX one.

* **Inference phases**: the program :func:`cohw_utils.studies.enabling.export.convert` exported
  (tiny scale, CPU, the conversion's dtype; floating inputs cross as float32 and are cast inside),
  decomposed with ``ExportedProgram.run_decompositions()`` (torch's default table: the core-ATen
  opset, which ExecuTorch's ``to_edge`` starts from).
* **Training phases**: the joint forward+backward program: the step captured with its
  ``loss.backward()`` recorded, not run (:class:`cohw_utils.studies.enabling.training._LossModule`),
  then ``torch.export.experimental._export_forward_backward`` (AOT autograd, decomposed to core
  ATen). Parameters that eager backward leaves without a gradient are frozen first, as
  :func:`~cohw_utils.studies.enabling.training.try_training` does. Nodes the loss needs are
  ``forward``, the rest ``backward`` (:func:`cohw_utils.spine.graph_table.graph_table`).

:func:`accelerator_gap_table` puts, per phase, what the ONNX target lacks on the *eager* op table
(:func:`cohw_utils.views.target_coverage.missing_ops`: dispatched ops against the exporter's
registry) beside what each NPU target lacks on the *core-ATen graph*, by dtype
(:func:`cohw_utils.views.npu_target.npu_missing`), as run and after int8 quantization.

Used by Chapter 3 (SW enabling), section "an accelerator target on the core-ATen graph".
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd
import torch

from cohw_utils.core.errors import CohwError
from cohw_utils.spine.graph_table import graph_table
from cohw_utils.studies.enabling.export import Conversion, _quiet, build_phase
from cohw_utils.studies.enabling.flatten import _interface, flatten
from cohw_utils.studies.enabling.training import _LossModule
from cohw_utils.views import npu_target, target_coverage

__all__ = ["inference_graph", "training_graph", "phase_graphs", "accelerator_gap_table"]


def inference_graph(conv: Conversion) -> pd.DataFrame | None:
    """The core-ATen graph table of a conversion's exported program (``None`` if export failed
    or the conversion dropped it, ``keep=False``)."""
    if conv.exported is None:
        return None
    with _quiet():
        return graph_table(conv.exported.run_decompositions())


def training_graph(workload: str, phase: str, seed: int = 0, **options: Any) -> pd.DataFrame:
    """The joint forward+backward core-ATen graph table of a training phase (module docstring)."""
    from torch.export.experimental import _export_forward_backward

    built, ph = build_phase(workload, phase, "fp32", **options)
    if not ph.backward:
        raise CohwError(f"{workload}:{phase} is not a training phase; use inference_graph(export.convert(...))")
    built.model.zero_grad(set_to_none=True)
    a0, k0 = ph.make_inputs()
    torch.manual_seed(seed)
    ph.run(*a0, **k0)
    frozen = [p for p in built.model.parameters() if p.requires_grad and p.grad is None]
    built.model.zero_grad(set_to_none=True)
    for p in frozen:  # the joint pass wants a gradient for every trainable parameter
        p.requires_grad_(False)
    try:
        args, kwargs = ph.make_inputs()
        ts, rebuild = flatten((args, kwargs))
        torch.manual_seed(seed)
        with _quiet():
            ep = torch.export.export(_LossModule(built.model, ph.run, rebuild), tuple(_interface(ts)), strict=False)
            joint = _export_forward_backward(ep)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return graph_table(joint, loss_output=0)


def phase_graphs(convs: Iterable[Conversion]) -> dict[str, pd.DataFrame]:
    """``"workload:phase:dtype"`` -> core-ATen graph table for every conversion: its exported
    program for an inference phase, the joint graph for an fp32 training phase. A phase whose
    capture fails here is left out (the conversion table says why)."""
    out = {}
    for c in convs:
        key = f"{c.workload}:{c.phase}:{c.dtype}"
        if c.backward and c.dtype == "fp32":
            try:
                out[key] = training_graph(c.workload, c.phase)
            except Exception:  # noqa: BLE001 - training.try_training reports what broke
                continue
        elif not c.backward:
            g = inference_graph(c)
            if g is not None:
                out[key] = g
    return out


def _names(ops: Iterable[str]) -> str:
    return ", ".join(dict.fromkeys(o.removeprefix("aten.") for o in ops)) or "-"


def accelerator_gap_table(graphs: Mapping[str, pd.DataFrame], eager: Mapping[str, pd.DataFrame],
                          npu_targets: Iterable[str], onnx: str = "onnx-opset18",
                          quantize: Mapping[str, str | None] | None = None) -> pd.DataFrame:
    """One row per graph key (``"workload:phase:dtype"``): the ONNX target's missing ops on the
    eager op table ``eager[key]`` beside, for each NPU target, the ops it lacks on the core-ATen
    graph (``<target>: missing op``), those present but not in the dtype the graph runs
    (``<target>: missing in dtype``, as ``op[dtype]``) and shape-limit violations.
    ``quantize`` maps a target name to ``"int8"`` to judge it after int8 quantization."""
    quantize = dict(quantize or {})
    rows = []
    for key, graph in graphs.items():
        wl, ph, dt = key.split(":")
        row: dict[str, Any] = {"workload": wl, "phase": ph, "dtype": dt,
                               "graph_nodes": len(graph), "backward_nodes": int((graph["pass"] == "backward").sum()),
                               "folded_nodes": int(graph["folded"].sum()),
                               "symbolic_nodes": int((graph["symbolic"] & ~graph["folded"]).sum())}
        row[f"{onnx}: missing (eager ops)"] = (_names(target_coverage.missing_ops(eager[key], onnx)["op"])
                                              if key in eager else "not traced")
        for name in npu_targets:
            q = quantize.get(name)
            label = f"{name}{' (' + q + ')' if q else ''}"
            m = npu_target.npu_missing(graph, name, q)
            row[f"{label}: missing op"] = _names(m.loc[m["status"] == "missing op", "op"])
            dm = m[m["status"] == "missing in dtype"]
            row[f"{label}: missing in dtype"] = ", ".join(
                f"{o.removeprefix('aten.')}[{d}]" for o, d in zip(dm["op"], dm["dtype"])) or "-"
            row[f"{label}: shape limit"] = _names(m.loc[m["status"] == "shape limit", "op"])
        rows.append(row)
    return pd.DataFrame(rows)

