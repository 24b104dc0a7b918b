"""The SW gap list: what a target software stack lacks to run each proxy, and how much of the
work each gap blocks, as a table an engineering team can take.

Three sources of evidence, combined per (workload, phase, dtype):

1. **The conversion itself** (:mod:`cohw_utils.studies.enabling.export`): the stage that stopped it and its
   classified failure (an aten op with no ONNX lowering, a training step, a dynamic axis that
   export specialised, an exporter crash); for a training step, what broke on the path that
   could hold it, a joint forward+backward graph (:mod:`cohw_utils.studies.enabling.training`),
   or that it ran there.
2. **The exported ONNX graph, on the runtime**: :func:`node_support` builds a one-node model
   for every distinct (domain, op type, input types) in the graph and asks onnxruntime's CPU
   provider for a session; a node type it rejects is a runtime gap. Each node is traced back
   to the aten op it came from (the exporter's ``pkg.torch.onnx.fx_node`` metadata). This needs
   nothing but the exported model.
3. **A target description** (Chapter 2's :mod:`cohw_utils.views.target_coverage`, e.g. ``onnx-opset18``:
   the aten ops the exporter can lower): the aten ops of the phase's op table that the target
   does not list.

Every gap is scored the same way, with :func:`cohw_utils.views.target_coverage.missing_ops` on the phase's
op table (tiny scale, traced on CPU in the conversion's dtype): ``flops_share`` and
``bytes_share`` are the fractions of the phase's FLOPs and bytes (non-view ops) carried by
*all calls* of the aten op packets in question; a whole-phase blocker (a failed export, a
training step) blocks 1.0. An ONNX node maps to the aten packet in its metadata; composite
aten ops that dispatch to other ops in eager execution (``linear`` -> ``addmm``/``mm``,
``layer_norm`` -> ``native_layer_norm``...) are mapped through :data:`DISPATCH_ALIASES`.

Quantization: ``data/runtime_formats.csv`` lists the weight/activation formats with the
operators onnxruntime uses for them and sources; :func:`validate_formats` verifies each row on
the installed onnxruntime CPU provider with a small MatMul model (64x32 weights) quantized
by onnxruntime's own tools (for the GPTQ row: by the package's GPTQ, repacked into MatMulNBits,
:mod:`cohw_utils.studies.enabling.gptq_probe`), and reports whether it runs and its max-norm relative error
against fp32. Formats relevant to a workload's domain that do not run (or have no loader)
become requirement rows.

Used by Chapter 3 (SW enabling), section "the SW gap list", and Chapter 5's requirements roll-up
(:mod:`cohw_utils.studies.codesign.requirements` reads :func:`runtime_formats`).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
import torch

from cohw_utils import workloads
from cohw_utils.core.data import DATA_DIR, read_table
from cohw_utils.core.errors import CohwError
from cohw_utils.spine.trace import trace
from cohw_utils.studies.enabling.decompose import DECOMPOSITIONS
from cohw_utils.studies.enabling.export import Conversion, _feeds, build_phase, ort_session
from cohw_utils.studies.enabling.failures import (AUTOGRAD, CUSTOM_KERNEL, DATA_DEPENDENT, DYNAMIC_SHAPES, OTHER,
                                                  UNSUPPORTED_OP, classify_failure)
from cohw_utils.studies.enabling.flatten import _interface, flatten
from cohw_utils.studies.enabling.parity import _run_reference
from cohw_utils.studies.enabling.training import TrainingAttempt, training_requirements
from cohw_utils.views.target_coverage import Target, load_target, missing_ops, op_packet

DATA = DATA_DIR
FORMATS_CSV = DATA / "runtime_formats.csv"
_FORMAT_COLUMNS = ("format", "weights", "activations", "onnx_ops", "how_produced", "probe", "domains",
                   "source", "notes")
REPORT_COLUMNS = ["workload", "phase", "dtype", "kind", "requirement", "op", "flops_share", "bytes_share",
                  "sources", "evidence", "dirty_fix"]

# Composite aten ops as the exporter keeps them -> the packets eager execution dispatches to
# (what the op table records). Only ops whose ONNX lowering may be missing on a runtime.
DISPATCH_ALIASES: dict[str, tuple[str, ...]] = {
    "aten.linear": ("aten.addmm", "aten.mm", "aten.bmm"),
    "aten.matmul": ("aten.mm", "aten.bmm"),
    "aten.conv1d": ("aten.convolution",), "aten.conv2d": ("aten.convolution",),
    "aten.conv3d": ("aten.convolution",),
    "aten.layer_norm": ("aten.native_layer_norm",), "aten.group_norm": ("aten.native_group_norm",),
    "aten.batch_norm": ("aten._native_batch_norm_legit_no_training", "aten.native_batch_norm"),
    "aten.scaled_dot_product_attention": ("aten._scaled_dot_product_flash_attention_for_cpu",
                                          "aten._scaled_dot_product_efficient_attention",
                                          "aten._scaled_dot_product_flash_attention",
                                          "aten.scaled_dot_product_attention"),
    "aten.softmax": ("aten._softmax",), "aten.log_softmax": ("aten._log_softmax",),
    "aten.upsample_bilinear2d": ("aten.upsample_bilinear2d",),
}


def _missing(table: pd.DataFrame, packets: set[str]) -> pd.DataFrame:
    """:func:`cohw_utils.views.target_coverage.missing_ops` for a target that lacks exactly ``packets``."""
    present = {op_packet(o) for o in table["op"]}
    tgt = Target("gaps", "every op of the table but the gaps", "cohw_utils.studies.enabling.gap_report", frozenset(present - packets))
    return missing_ops(table, tgt)


# --------------------------------------------------------------------------------------------
# Tracing a phase (the op table every share is a fraction of)
# --------------------------------------------------------------------------------------------
def trace_tiny_phase(workload: str, phase: str, dtype: str = "fp32", **options: Any) -> pd.DataFrame:
    """Op table of one tiny phase on CPU, built as :func:`cohw_utils.studies.enabling.export.build_phase`
    builds it (so shapes match the conversion); training phases are traced with their backward."""
    built, ph = build_phase(workload, phase, dtype, **options)
    args, kwargs = ph.make_inputs()
    torch.manual_seed(0)
    if ph.backward:
        return trace(ph.run, *args, model=built.model, phase=phase, **kwargs)
    with torch.no_grad():
        return trace(ph.run, *args, model=built.model, phase=phase, **kwargs)


# --------------------------------------------------------------------------------------------
# The exported graph on the runtime
# --------------------------------------------------------------------------------------------
_FX_TARGET = re.compile(r"target=torch\.ops\.(\w+)\.(\w+)")


def _aten_of(node) -> str:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.fx_node":
            m = _FX_TARGET.search(p.value)
            if m:
                return f"{m.group(1)}.{m.group(2)}"
    return ""


def _value_types(model) -> dict[str, int]:
    import onnx

    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - the exporter's own value_info is used as is
        pass
    g = model.graph
    types = {t.name: t.data_type for t in g.initializer}
    for v in list(g.input) + list(g.value_info) + list(g.output):
        if v.type.HasField("tensor_type"):
            types[v.name] = v.type.tensor_type.elem_type
    return types


@functools.lru_cache(maxsize=4096)
def _probe_node(domain: str, op_type: str, in_types: tuple[int, ...], out_types: tuple[int, ...],
                attrs: bytes, opsets: tuple[tuple[str, int], ...], provider: str) -> str:
    """'' when ``provider`` creates a session for this one node, else the error's key line."""
    import onnx
    from onnx import helper

    node = onnx.NodeProto()
    node.ParseFromString(attrs)
    ins = [f"i{k}" if t else "" for k, t in enumerate(in_types)]
    outs = [f"o{k}" for k in range(len(out_types))]
    del node.input[:], node.output[:]
    node.input.extend(ins)
    node.output.extend(outs)
    node.name = "probe"
    graph = helper.make_graph(
        [node], "probe",
        [helper.make_tensor_value_info(n, t, None) for n, t in zip(ins, in_types) if n],
        [helper.make_tensor_value_info(n, t or onnx.TensorProto.FLOAT, None) for n, t in zip(outs, out_types)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    try:
        ort_session(model, (provider,))
    except Exception as e:  # noqa: BLE001
        return classify_failure(e, "onnxruntime session").key_line
    return ""


def node_support(model, provider: str = "CPUExecutionProvider") -> pd.DataFrame:
    """One row per distinct (domain, op type, input types) of an ONNX model: how many nodes,
    the aten ops they came from, and whether ``provider`` accepts such a node (``error`` is the
    session error's key line when not). Nodes inside functions are not descended into."""
    import onnx

    types = _value_types(model)
    opsets = tuple(sorted((o.domain, o.version) for o in model.opset_import))
    groups: dict[tuple, dict] = {}
    for node in model.graph.node:
        in_types = tuple(types.get(n, 0) if n else 0 for n in node.input)
        out_types = tuple(types.get(n, 0) for n in node.output)
        key = (node.domain, node.op_type, in_types)
        g = groups.setdefault(key, {"nodes": 0, "aten": set(), "out": out_types, "proto": node})
        g["nodes"] += 1
        a = _aten_of(node)
        if a:
            g["aten"].add(a)
    rows = []
    for (domain, op_type, in_types), g in groups.items():
        proto = onnx.NodeProto()
        proto.CopyFrom(g["proto"])
        del proto.metadata_props[:]
        err = _probe_node(domain, op_type, in_types, g["out"], proto.SerializeToString(), opsets, provider)
        names = [onnx.TensorProto.DataType.Name(t).lower() if t else "-" for t in in_types]
        rows.append({"domain": domain or "ai.onnx", "op_type": op_type, "input_types": ", ".join(names),
                     "nodes": g["nodes"], "aten_ops": ", ".join(sorted(g["aten"])),
                     "supported": not err, "error": err})
    return pd.DataFrame(rows, columns=["domain", "op_type", "input_types", "nodes", "aten_ops", "supported", "error"])


def runtime_gaps(conv: Conversion, table: pd.DataFrame,
                 provider: str = "CPUExecutionProvider") -> pd.DataFrame:
    """Ops of the exported graph that ``provider`` cannot run, as aten packets with their
    shares of ``table`` (columns of ``missing_ops`` plus ``onnx_ops`` and ``error``). Empty when
    the conversion produced no ONNX model or everything runs."""
    cols = ["op", "calls", "flops", "flops_share", "bytes_moved", "bytes_share", "passes", "onnx_ops", "error"]
    if conv.onnx_model is None:
        return pd.DataFrame(columns=cols)
    sup = node_support(conv.onnx_model, provider)
    bad = sup[~sup["supported"]]
    if bad.empty:
        return pd.DataFrame(columns=cols)
    present = {op_packet(o) for o in table["op"]}
    packet_nodes: dict[str, list[str]] = {}
    packet_err: dict[str, str] = {}
    for _, r in bad.iterrows():
        for aten in (r["aten_ops"].split(", ") if r["aten_ops"] else ["(no aten origin)"]):
            p = op_packet(aten) if aten.count(".") >= 2 else aten
            targets = [p] if p in present else [a for a in DISPATCH_ALIASES.get(p, ()) if a in present] or [p]
            for t in targets:
                packet_nodes.setdefault(t, []).append(f"{r['op_type']}({r['input_types']})")
                packet_err.setdefault(t, r["error"])
    m = _missing(table, set(packet_nodes))
    extra = [p for p in packet_nodes if p not in set(m["op"])]
    if extra:  # views in the op table carry 0; ops eager never ran (no row) have an unknown share
        share = [0.0 if p in present else math.nan for p in extra]
        m = pd.concat([m, pd.DataFrame({"op": extra, "calls": 0, "flops": 0, "flops_share": share,
                                        "bytes_moved": 0, "bytes_share": share, "passes": ""})],
                      ignore_index=True)
    m["onnx_ops"] = m["op"].map(lambda p: "; ".join(sorted(set(packet_nodes.get(p, [])))))
    m["error"] = m["op"].map(packet_err)
    return m[cols]


# --------------------------------------------------------------------------------------------
# Quantization formats
# --------------------------------------------------------------------------------------------
def runtime_formats(path: str | Path | None = None) -> pd.DataFrame:
    """``data/runtime_formats.csv``: one row per weight/activation format, with the ONNX
    operators onnxruntime uses for it, how a model gets there, the probe that checks it here,
    the workload domains it matters for (``;``-separated) and sources."""
    p = Path(path).resolve() if path else FORMATS_CSV
    df = read_table(p, required=_FORMAT_COLUMNS, dtype=str, keep_default_na=False)
    unknown = sorted(set(df["probe"]) - set(PROBES) - {""})
    if unknown:
        raise CohwError(f"{p}: unknown probe(s) {unknown}; known: {', '.join(PROBES)}")
    return df


_RNG_W = np.random.default_rng(7).standard_normal((64, 32)).astype(np.float32)
_RNG_X = np.random.default_rng(8).standard_normal((4, 64)).astype(np.float32)


def _matmul_model(opset: int = 18, cast_to: int | None = None):
    import onnx
    from onnx import TensorProto as TP, helper, numpy_helper

    nodes = [helper.make_node("MatMul", ["X", "W"], ["Y"])]
    if cast_to is not None:
        nodes = [helper.make_node("Cast", ["X"], ["Xc"], to=cast_to), helper.make_node("Cast", ["W"], ["Wc"], to=cast_to),
                 helper.make_node("MatMul", ["Xc", "Wc"], ["Yc"]), helper.make_node("Cast", ["Yc"], ["Y"], to=TP.FLOAT)]
    g = helper.make_graph(nodes, "matmul", [helper.make_tensor_value_info("X", TP.FLOAT, [4, 64])],
                          [helper.make_tensor_value_info("Y", TP.FLOAT, [4, 32])], [numpy_helper.from_array(_RNG_W, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = min(m.ir_version, onnx.IR_VERSION)
    return m


class _Reader:
    """Calibration data for onnxruntime's static quantizer (a CalibrationDataReader)."""

    def __init__(self):
        rng = np.random.default_rng(9)
        self.batches = [{"X": rng.standard_normal((4, 64)).astype(np.float32)} for _ in range(4)]

    def get_next(self):
        return self.batches.pop() if self.batches else None

    def rewind(self):  # pragma: no cover - onnxruntime calls it for some calibrators
        pass


@contextlib.contextmanager
def _quiet_quant():
    """onnxruntime's quantizers log advice and per-node progress on the root logger."""
    names = ("", "onnxruntime", "onnxruntime.quantization", "onnxruntime.quantization.matmul_nbits_quantizer")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _via_files(fn: Callable[[str, str], None], model):
    import onnx

    with tempfile.TemporaryDirectory() as d:
        src, dst = f"{d}/in.onnx", f"{d}/out.onnx"
        onnx.save(model, src)
        fn(src, dst)
        return onnx.load(dst)


def _probe_dynamic(model):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    return _via_files(lambda s, d: quantize_dynamic(s, d, weight_type=QuantType.QInt8), model)


def _probe_static(fmt: str, weight: str = "QInt8", activation: str = "QUInt8"):
    def make(model):
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        return _via_files(lambda s, d: quantize_static(
            s, d, _Reader(), quant_format=getattr(QuantFormat, fmt), weight_type=getattr(QuantType, weight),
            activation_type=getattr(QuantType, activation)), model)
    return make


def _probe_nbits(bits: int):
    def make(model):
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer)

        q = MatMulNBitsQuantizer(model, algo_config=DefaultWeightOnlyQuantConfig(
            block_size=32, is_symmetric=True, bits=bits))
        q.process()
        return q.model.model
    return make


def _fp8_weights(_model):
    from onnx import TensorProto as TP, helper, numpy_helper

    w8 = helper.make_tensor("W8", TP.FLOAT8E4M3FN, _RNG_W.shape, _RNG_W.flatten().tolist())
    nodes = [helper.make_node("DequantizeLinear", ["W8", "s"], ["Wd"]), helper.make_node("MatMul", ["X", "Wd"], ["Y"])]
    g = helper.make_graph(nodes, "fp8w", [helper.make_tensor_value_info("X", TP.FLOAT, [4, 64])],
                          [helper.make_tensor_value_info("Y", TP.FLOAT, [4, 32])],
                          [w8, numpy_helper.from_array(np.array(1.0, np.float32), "s")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def _gptq_weights(_model):
    """The probe's 64x32 weights quantized by the package's GPTQ (int4, groups of 32, calibrated
    on the probe's input distribution) and repacked as MatMulNBits with float zero points and
    g_idx (:mod:`cohw_utils.studies.enabling.gptq_probe`: the repack that matches on this runtime)."""
    from cohw_utils.studies.enabling.gptq_probe import matmulnbits_model, pack_matmulnbits
    from cohw_utils.studies.quantization.gptq import gptq_quantize
    from cohw_utils.studies.quantization.schemes import Scheme

    w = torch.from_numpy(_RNG_W.T.copy())                       # (out 32, in 64)
    calib = torch.from_numpy(np.random.default_rng(9).standard_normal((256, 64)).astype(np.float32)).double()
    q = gptq_quantize(w, calib.T @ calib / calib.shape[0], Scheme(4, group_size=32)).qtensor
    packed = {**pack_matmulnbits(q, 32), "zero_float": q.zero.numpy().astype(np.float32)}
    model = matmulnbits_model(64, 32, 32, packed, zero_points="float", g_idx="initializer")
    model.graph.input[0].name, model.graph.node[0].input[0] = "X", "X"
    return model


def _probes() -> dict[str, tuple[int, Callable]]:
    from onnx import TensorProto as TP

    return {
        "matmul_fp32": (18, lambda m: m),
        "matmul_fp16": (18, lambda m: _matmul_model(18, TP.FLOAT16)),
        "matmul_bf16": (18, lambda m: _matmul_model(18, TP.BFLOAT16)),
        "matmul_fp8": (21, lambda m: _matmul_model(21, TP.FLOAT8E4M3FN)),
        "dq_fp8_weights": (21, _fp8_weights),
        "int8_dynamic": (18, _probe_dynamic),
        "int8_static_qoperator": (18, _probe_static("QOperator")),
        "int8_static_qdq": (18, _probe_static("QDQ")),
        "matmulnbits_int4": (18, _probe_nbits(4)),
        "matmulnbits_int8": (18, _probe_nbits(8)),
        "int4_qdq": (21, _probe_static("QDQ", "QInt4", "QUInt16")),
        "gptq_matmulnbits": (18, _gptq_weights),
    }


PROBES = tuple(_probes())


def validate_formats(formats: pd.DataFrame | None = None, provider: str = "CPUExecutionProvider") -> pd.DataFrame:
    """Run each format's probe on ``provider``: a 4x64 @ 64x32 MatMul model put into that
    format (by onnxruntime's own quantizers where it has one), executed, and compared with the
    fp32 product. Adds ``runs_here`` ("yes"/"no"/"no probe"), ``rel_err`` (max|y - y_fp32| /
    max|y_fp32|), ``ops_seen`` (the quantized graph's operators) and ``error``."""
    import onnxruntime as ort

    df = (runtime_formats() if formats is None else formats).copy()
    probes = _probes()
    ref = _RNG_X @ _RNG_W
    runs, errs, ops, msgs = [], [], [], []
    with _quiet_quant():
        _run_probes(df["probe"], probes, provider, ref, runs, errs, ops, msgs)
    df["runs_here"], df["rel_err"], df["ops_seen"], df["error"] = runs, errs, ops, msgs
    df.attrs["provider"] = provider
    df.attrs["onnxruntime"] = ort.__version__
    return df


def _run_probes(names, probes, provider, ref, runs, errs, ops, msgs) -> None:
    for name in names:
        if not name:
            runs.append("no probe"), errs.append(math.nan), ops.append(""), msgs.append("")
            continue
        opset, make = probes[name]
        try:
            model = make(_matmul_model(opset))
            ops.append(", ".join(sorted({(f"{n.domain}." if n.domain else "") + n.op_type for n in model.graph.node})))
            sess = ort_session(model, (provider,))
            y = sess.run(None, {"X": _RNG_X})[0]
            runs.append("yes"), errs.append(float(np.abs(y - ref).max() / np.abs(ref).max())), msgs.append("")
        except Exception as e:  # noqa: BLE001 - a format that does not run is the finding
            if len(ops) < len(runs) + 1:
                ops.append("")
            runs.append("no"), errs.append(math.nan)
            msgs.append(classify_failure(e, "onnxruntime session").key_line)


def quantized_variants(conv: Conversion, probes: Iterable[str] = ("int8_dynamic", "matmulnbits_int4"),
                       repeats: int = 10, warmup: int = 2) -> pd.DataFrame:
    """Apply format probes' quantizers to a converted phase's ONNX model and run it: model
    bytes, the quantized operators, max-norm relative error of the first output vs eager fp32
    and onnxruntime latency (:func:`cohw_utils.spine.measure.time_callable`). The fp32 graph is the
    first row. Random tiny weights quantize worse than trained ones: read the error as "runs
    and computes the right thing", not as a model-quality figure."""
    import onnx

    from cohw_utils.spine.measure import time_callable

    if conv.onnx_model is None or conv.phase_obj is None:
        raise CohwError(f"{conv.workload}:{conv.phase} has no ONNX model ({conv.status}); quantize a converted phase")
    table = _probes()
    ph = conv.phase_obj
    ref = _run_reference(ph)
    args, kwargs = ph.make_inputs()
    feeds_ts = _interface(flatten((args, kwargs))[0])
    rows = []
    for name in ("fp32", *probes):
        model = onnx.ModelProto()
        model.CopyFrom(conv.onnx_model)
        row = {"format": name, "model_bytes": 0, "quantized_ops": "", "rel_err_out0": math.nan,
               "median_ms": math.nan, "iqr_ms": math.nan, "error": ""}
        try:
            if name != "fp32":
                with _quiet_quant():
                    model = table[name][1](model)
            row["model_bytes"] = model.ByteSize()
            row["quantized_ops"] = ", ".join(sorted({n.op_type for n in model.graph.node}
                                                    & {"MatMulNBits", "MatMulInteger", "DynamicQuantizeLinear",
                                                       "QLinearMatMul", "QLinearConv", "DequantizeLinear"}))
            sess = ort_session(model)
            feeds = _feeds(sess, feeds_ts)
            out = sess.run(None, feeds)[0]
            r = ref[0].numpy()
            row["rel_err_out0"] = float(np.abs(out - r).max() / np.abs(r).max())
            t = time_callable(lambda: sess.run(None, feeds), repeats, warmup)
            row["median_ms"], row["iqr_ms"] = t.median * 1e3, t.iqr * 1e3
        except Exception as e:  # noqa: BLE001
            row["error"] = classify_failure(e, "quantize").key_line
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------
_FIX = {
    UNSUPPORTED_OP: "decompose the op into supported ones (decompose.DECOMPOSITIONS) or implement a kernel",
    AUTOGRAD: "needs a training runtime (backward graph + optimizer); meanwhile keep the step in PyTorch "
              "and offload no-grad parts (offload.offload)",
    DYNAMIC_SHAPES: "export one graph per size bucket (pad to buckets) or rewrite the size-dependent code",
    DATA_DEPENDENT: "rewrite the data-dependent branch with torch.cond / masking, or split the graph there",
    CUSTOM_KERNEL: "register the op with a fake (meta) kernel and an ONNX lowering, or a custom runtime op",
    OTHER: "work around the tool (e.g. optimize=False) and report upstream",
}


def requirements(conv: Conversion, table: pd.DataFrame | None, target: Any = None,
                 provider: str = "CPUExecutionProvider", attempt: TrainingAttempt | None = None) -> list[dict]:
    """The requirement rows of one conversion (see :func:`gap_report`); ``attempt``: the
    phase's :func:`~cohw_utils.studies.enabling.training.try_training` result, for a training phase."""
    rows: list[dict] = []
    base = {"workload": conv.workload, "phase": conv.phase, "dtype": conv.dtype}

    def add(kind, requirement, op="", f=math.nan, b=math.nan, sources="", evidence="", fix=""):
        rows.append({**base, "kind": kind, "requirement": requirement, "op": op, "flops_share": f,
                     "bytes_share": b, "sources": sources, "evidence": evidence, "dirty_fix": fix})

    if conv.status == "n/a":
        return rows
    ops: dict[str, dict] = {}  # aten packet -> merged operator row

    def op_row(packet, source, evidence, f, b, fix):
        r = ops.setdefault(packet, {"sources": [], "evidence": [], "f": f, "b": b, "fix": fix})
        r["sources"].append(source)
        r["evidence"].append(evidence)
        if r["f"] != r["f"]:
            r["f"], r["b"] = f, b

    share = (lambda p: _missing(table, {p}).iloc[0] if table is not None and p in {op_packet(o) for o in table["op"]}
             else None)
    f = conv.failure if conv.status == "failed" else None
    if f is not None and f.klass == UNSUPPORTED_OP and f.op.startswith("aten."):
        s = share(op_packet(f.op))
        op_row(op_packet(f.op), "conversion", f"{f.stage}: {f.key_line}",
               s["flops_share"] if s is not None else math.nan, s["bytes_share"] if s is not None else math.nan,
               _FIX[f.klass])
    elif f is not None:
        kind = "training" if f.klass == AUTOGRAD else "conversion"
        what = ("autograd: the inference capture cannot hold the step's loss.backward()"
                if f.klass == AUTOGRAD else f"{f.klass} at {f.stage}" + (f" ({f.op})" if f.op else ""))
        held = kind == "training" and attempt is not None and attempt.runs  # the joint-graph path holds it
        add(kind, what, f.op if f.op.startswith("aten.") else "", 0.0 if held else 1.0, 0.0 if held else 1.0,
            "conversion", f.key_line, "train through the joint graph (training.try_training)" if held else _FIX[f.klass])
    if conv.backward:
        rows += [{**base, **r} for r in training_requirements(attempt, table)]
    for ff in conv.failures:
        if ff.stage == "torch.export (dynamic)":
            add("dynamic shapes", f"{conv.axis} axis: {ff.klass}", "", math.nan, math.nan, "conversion",
                ff.key_line, _FIX[DYNAMIC_SHAPES])
        elif ff.stage == "onnx optimizer":
            add("tooling", f"exporter's ONNX optimizer fails ({ff.klass})", "", 0.0, 0.0, "conversion",
                ff.key_line, "optimize=False (applied)")
    if table is not None:
        for _, r in runtime_gaps(conv, table, provider).iterrows():
            op_row(r["op"], f"exported ONNX graph on onnxruntime {provider}", f"{r['onnx_ops']}: {r['error']}",
                   r["flops_share"], r["bytes_share"], "cast to a supported dtype around the op, or add the kernel")
        if target is not None:
            decomposable = {op_packet(str(k)) for k in DECOMPOSITIONS}
            for _, r in missing_ops(table, target).iterrows():
                if ("backward" in r["op"] or r["passes"] == "backward") and attempt is not None and attempt.runs:
                    fix = "lowered by the joint graph's core-ATen decomposition (training.try_training)"
                elif "backward" in r["op"] or r["passes"] == "backward":
                    fix = _FIX[AUTOGRAD]
                elif r["op"] in decomposable:
                    fix = "decompose (decompose.DECOMPOSITIONS)"
                else:
                    fix = "decompose or lower the op"
                op_row(r["op"], f"target {target.name}", f"{r['calls']} calls ({r['passes']})",
                       r["flops_share"], r["bytes_share"], fix)
    for packet, r in ops.items():
        add("operator", f"{packet} has no path on the target", packet, r["f"], r["b"],
            "; ".join(dict.fromkeys(r["sources"])), " | ".join(dict.fromkeys(r["evidence"])), r["fix"])
    return rows


def _format_rows(names: Iterable[str], formats: pd.DataFrame, provider: str) -> list[dict]:
    """Quantization requirement rows, once per workload (phase "(all)")."""
    rows = []
    for name in names:
        domain = workloads.get_workload(name).domain
        for _, r in formats.iterrows():
            runs = r.get("runs_here", "no probe")
            repack = "repack" in r["onnx_ops"]   # a checkpoint format: runs only once converted
            if domain not in r["domains"].split(";") or (runs == "yes" and not repack):
                continue
            status = {"no probe": "no loader", "yes": "runs once repacked (no loader for the file)"}.get(runs, "does not run")
            rows.append({"workload": name, "phase": "(all)", "dtype": "-", "kind": "quantization",
                         "requirement": f"{r['format']}: {status} on onnxruntime {provider}", "op": "",
                         "flops_share": math.nan, "bytes_share": math.nan, "sources": r["source"],
                         "evidence": r.get("error", "") or (f"probe {r['probe']}: rel err {r['rel_err']:.2g}; "
                                                            if runs == "yes" else "") + r["notes"],
                         "dirty_fix": r["how_produced"]})
    return rows


def gap_report(convs: Iterable[Conversion], target: Any = "onnx-opset18",
               formats: pd.DataFrame | None = None, tables: dict | None = None,
               provider: str = "CPUExecutionProvider",
               training: Iterable[TrainingAttempt] | None = None) -> pd.DataFrame:
    """The SW requirements list: one row per (workload, phase, dtype, requirement).

    ``kind`` is one of ``conversion`` (a blocker of the whole phase), ``training``,
    ``operator`` (an aten op with no path on the target: evidence merged from the conversion,
    the exported graph on the runtime and the ``target`` description), ``dynamic shapes``,
    ``tooling`` and ``quantization`` (a format the domain needs that the runtime does not run
    or load; pass ``formats=validate_formats()``). ``target``: a :class:`~cohw_utils.views.target_coverage.Target`,
    its name, or None to work from the conversion and exported graph alone. ``tables``
    (``{(workload, phase, dtype): op table}``) saves re-tracing. ``training``: the
    :func:`~cohw_utils.studies.enabling.training.try_training` results of the training phases;
    their rows say what broke on that path (or that it ran); a training phase without one gets
    a "not tried" row.
    """
    tgt = None
    if target is not None:
        tgt = load_target(target) if isinstance(target, str) else target
    rows: list[dict] = []
    tables = {} if tables is None else tables
    convs = list(convs)
    attempts = {(a.workload, a.phase): a for a in (training or ())}
    for c in convs:
        if c.status == "n/a":
            continue
        key = (c.workload, c.phase, c.dtype)
        if key not in tables:
            tables[key] = trace_tiny_phase(c.workload, c.phase, c.dtype)
        rows += requirements(c, tables[key], tgt, provider, attempts.get((c.workload, c.phase)))
    if formats is not None:
        rows += _format_rows(dict.fromkeys(c.workload for c in convs if c.status != "n/a"), formats, provider)
    df = pd.DataFrame(rows, columns=REPORT_COLUMNS)
    order = {"conversion": 0, "training": 1, "operator": 2, "dynamic shapes": 3, "tooling": 4, "quantization": 5}
    df = df.assign(_k=df["kind"].map(order), _f=-df["flops_share"].fillna(-1))
    return df.sort_values(["workload", "phase", "dtype", "_k", "_f"]).drop(columns=["_k", "_f"]).reset_index(drop=True)


def gap_report_summary(report: pd.DataFrame, convs: Iterable[Conversion]) -> pd.DataFrame:
    """One row per converted (workload, phase, dtype): conversion status, whether a blocker
    stops the whole phase, whether training is needed, the missing aten ops and the FLOP and
    byte shares they carry (what a fallback would leave off the target), and the workload's
    quantization gaps."""
    quant = report[report.kind == "quantization"].groupby("workload")["requirement"].agg(
        lambda r: ", ".join(x.split(":")[0] for x in r))
    rows = []
    for c in convs:
        if c.status == "n/a":
            continue
        g = report[(report.workload == c.workload) & (report.phase == c.phase) & (report.dtype == c.dtype)]
        ops = g[g.kind == "operator"]
        blocked = g[g.kind.isin(["conversion", "training"]) & (g.flops_share == 1.0)]
        rows.append({
            "workload": c.workload, "phase": c.phase, "dtype": c.dtype, "converted": c.status,
            "whole_phase_blocked": "yes" if len(blocked) else "no",
            "training": "yes" if (g.kind == "training").any() else "no",
            "missing_ops": len(ops),
            "missing_ops_flops_%": 100 * float(ops["flops_share"].fillna(0).sum()),
            "missing_ops_bytes_%": 100 * float(ops["bytes_share"].fillna(0).sum()),
            "top_missing": ", ".join(o.removeprefix("aten.") for o in ops["op"][:4]) + (" ..." if len(ops) > 4 else ""),
            "quantization_gaps": quant.get(c.workload, "-"),
        })
    return pd.DataFrame(rows)


def write_report(report: pd.DataFrame, stem: str | Path, title: str = "SW gap list") -> list[Path]:
    """Write the report as ``<stem>.csv`` and ``<stem>.md`` (a Markdown table per workload,
    shares in %). Returns the two paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv, md = stem.with_suffix(".csv"), stem.with_suffix(".md")
    report.to_csv(csv, index=False)
    lines = [f"# {title}", "", "Shares are of the phase's FLOPs / bytes (tiny-scale op table); "
             "1.0 = the whole phase is blocked.", ""]
    for wl, g in report.groupby("workload", sort=False):
        lines += [f"## {wl}", ""]
        t = g.drop(columns=["workload"]).copy()
        for col in ("flops_share", "bytes_share"):
            t[col] = t[col].map(lambda v: "" if v != v else f"{100 * v:.1f}%")
        t = t.fillna("").astype(str).map(lambda s: s.replace("|", "/").replace("\n", " "))
        lines.append("| " + " | ".join(t.columns) + " |")
        lines.append("|" + "---|" * len(t.columns))
        lines += ["| " + " | ".join(row) + " |" for row in t.itertuples(index=False)]
        lines.append("")
    md.write_text("\n".join(lines))
    return [csv, md]
