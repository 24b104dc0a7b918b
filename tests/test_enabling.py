"""Chapter 3's conversion pipeline: flattening, failure classes, parity, decompositions, latency,
offload. Real conversions run on tiny models (a few seconds each, shared through fixtures)."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from cohw_utils.studies.enabling import decompose, export, failures, latency, offload
from cohw_utils.studies.enabling.failures import Failure, classify_failure
from cohw_utils.studies.enabling.flatten import flatten
from cohw_utils.studies.enabling.parity import TOLERANCES, _compare
from cohw_utils.core.errors import CohwError


# ------------------------------------------------------------------------------ flatten
@dataclasses.dataclass
class _Box:
    a: torch.Tensor
    b: torch.Tensor | None
    meta: dict


def test_flatten_round_trips_nested_structures():
    x, y, z = torch.arange(3.0), torch.ones(2, 2), torch.zeros(1)
    obj = ((x, {"k": y, "flag": True}), {"box": _Box(z, None, {"m": x}), "n": 3})
    ts, rebuild = flatten(obj)
    assert [t.shape for t in ts] == [(3,), (2, 2), (1,), (3,)]
    new = [t + 1 for t in ts]
    back = rebuild(new)
    assert back[0][1]["flag"] is True and back[1]["n"] == 3 and back[1]["box"].b is None
    assert torch.equal(back[0][0], x + 1) and torch.equal(back[1]["box"].meta["m"], x + 1)
    assert isinstance(back[1]["box"], _Box)


def test_flatten_round_trips_a_transformers_cache():
    from transformers import DynamicCache

    k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    cache = DynamicCache(ddp_cache_data=[(k, v), (k * 2, v * 2)])
    ts, rebuild = flatten({"cache": cache, "use_cache": True})
    assert len(ts) == 4 and torch.equal(ts[2], k * 2)
    back = rebuild(ts)["cache"]
    assert back.get_seq_length() == 5 and torch.equal(back.layers[1].values, v * 2)


# ------------------------------------------------------------------------------ failure classes
def _chain(outer: str, inner: str) -> Exception:
    try:
        try:
            raise RuntimeError(inner)
        except RuntimeError as e:
            raise ValueError(outer) from e
    except ValueError as e:
        return e


@pytest.mark.parametrize("message, stage, klass, op", [
    ("No ONNX function found for <OpOverload(op='aten.searchsorted', overload='Tensor')>. Failure message: x",
     "onnx conversion", failures.UNSUPPORTED_OP, "aten.searchsorted.Tensor"),
    ("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for MatMul(13) node with name ''",
     "onnxruntime session", failures.UNSUPPORTED_OP, "MatMul"),
    ("Constraints violated (L['ts'][0].size()[0])! You marked it as dynamic but your code specialized it",
     "torch.export (dynamic)", failures.DYNAMIC_SHAPES, ""),
    ("Could not guard on data-dependent expression Eq(u0, 1) (unhinted: Eq(u0, 1))",
     "torch.export", failures.DATA_DEPENDENT, ""),
    ("No ONNX function found for <OpOverload(op='tcnn.hash_encode', overload='default')>",
     "onnx conversion", failures.CUSTOM_KERNEL, "tcnn.hash_encode.default"),
    ("something nobody anticipated", "onnx conversion", failures.OTHER, ""),
])
def test_classify_failure(message, stage, klass, op):
    f = classify_failure(RuntimeError(message), stage)
    assert (f.klass, f.op, f.stage) == (klass, op, stage)
    assert f.key_line and len(f.key_line) <= 220


def test_causes_are_read_through_the_chain():
    f = classify_failure(_chain("wrapper failed", "Could not find an implementation for Conv(11) node"),
                         "onnxruntime session")
    assert f.klass == failures.UNSUPPORTED_OP and f.op == "Conv"


def _raised(fn) -> BaseException:
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return e
    raise AssertionError("expected the call to raise")


def _export(module, *args, **kw):
    return torch.export.export(module, args, strict=False, **kw)


class _Branchy(torch.nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


class _Reshaper(torch.nn.Module):
    def forward(self, x):
        return x.view(4, -1) if x.shape[0] == 8 else x


class _NoGradLoss(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)

    def forward(self, x):
        with torch.no_grad():
            loss = self.lin(x).sum()
        loss.backward()
        return loss


def _bf16_matmul_session():
    from onnx import TensorProto as TP, helper

    nodes = [helper.make_node("Cast", ["X"], ["Xb"], to=TP.BFLOAT16), helper.make_node("MatMul", ["Xb", "Xb"], ["Y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TP.FLOAT, [2, 2])],
                          [helper.make_tensor_value_info("Y", TP.BFLOAT16, [2, 2])])
    export.ort_session(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))


def _custom_op_export():
    if not hasattr(torch.ops.cohw_test, "opaque"):
        torch.library.define("cohw_test::opaque", "(Tensor x) -> Tensor")
        torch.library.impl("cohw_test::opaque", "cpu")(lambda x: x * 3)

    class M(torch.nn.Module):
        def forward(self, x):
            return torch.ops.cohw_test.opaque(x)
    _export(M(), torch.randn(3))


@pytest.mark.parametrize("make, stage, klass, op", [
    (lambda: _export(_Branchy(), torch.randn(3)), "torch.export", failures.DATA_DEPENDENT, ""),
    (lambda: _export(_Reshaper(), torch.randn(8, 2), dynamic_shapes=({0: torch.export.Dim("n")},)),
     "torch.export (dynamic)", failures.DYNAMIC_SHAPES, ""),
    (_custom_op_export, "torch.export", failures.CUSTOM_KERNEL, "cohw_test.opaque.default"),
    (lambda: _NoGradLoss()(torch.randn(2, 3)), "torch.export", failures.AUTOGRAD, ""),
    (_bf16_matmul_session, "onnxruntime session", failures.UNSUPPORTED_OP, "MatMul"),
    (lambda: {}["missing"], "torch.export", failures.OTHER, ""),
])
def test_classify_real_exceptions(make, stage, klass, op):
    """One real exception per class, raised by the library that raises it in the pipeline."""
    f = classify_failure(_raised(make), stage)
    assert (f.klass, f.op) == (klass, op), f
    assert f.key_line and len(f.key_line) <= 220


def test_a_training_step_is_classed_by_its_message_not_by_being_training():
    """The class comes from the message: a data-dependent failure inside a training step is
    data-dependent, and the leaked-gradient message is autograd whatever the stage."""
    e = _raised(lambda: _export(_Branchy(), torch.randn(3)))
    assert classify_failure(e, "torch.export").klass == failures.DATA_DEPENDENT
    leaked = RuntimeError("We found a fake tensor in the exported program constant's list. This typically means ...")
    f = classify_failure(leaked, "onnx conversion")
    assert f.klass == failures.AUTOGRAD and f.key_line.startswith("fake tensor in the exported program constant")


# ------------------------------------------------------------------------------ parity
def test_compare_uses_max_norm_tolerance():
    ref = [torch.tensor([1.0, -2.0, 4.0])]
    tol = TOLERANCES["fp32"]  # 1e-5 + 1e-4 * 4 = 4.1e-4
    p = _compare([np.array([1.0, -2.0, 4.0003])], ref, tol)
    assert p.passed and p.max_abs == pytest.approx(3e-4, rel=1e-3) and p.max_rel == pytest.approx(7.5e-5, rel=1e-3)
    assert not _compare([np.array([1.0, -2.0, 4.001])], ref, tol).passed
    assert not _compare([np.array([1.0, -2.0])], ref, tol).passed                      # shape
    assert not _compare([np.array([1, 3])], [torch.tensor([1, 2])], tol).passed        # integers exact
    assert not _compare([np.array([1.0, np.nan, 4.0])], ref, tol).passed               # NaN where ref is finite


# ------------------------------------------------------------------------------ decomposition
@pytest.mark.parametrize("side", ["left", "right"])
def test_searchsorted_by_comparison_matches_torch(side):
    g = torch.Generator().manual_seed(0)
    seq = torch.sort(torch.rand(3, 17, generator=g), dim=-1).values
    seq[:, 5] = seq[:, 4]  # ties exercise left vs right
    vals = torch.cat([torch.rand(3, 9, generator=g), seq[:, 4:5], seq[:, :1] - 1, seq[:, -1:] + 1], dim=-1)
    ours = decompose.searchsorted_by_comparison(seq, vals, side=side)
    assert torch.equal(ours, torch.searchsorted(seq, vals, side=side))
    assert decompose.searchsorted_by_comparison(seq, vals, out_int32=True, right=side == "right").dtype == torch.int32
    flat = torch.linspace(0, 1, 11)
    assert torch.equal(decompose.searchsorted_by_comparison(flat, vals, side=side),
                       torch.searchsorted(flat, vals, side=side))


# ------------------------------------------------------------------------------ bad input
def test_bad_input_names_the_fix():
    with pytest.raises(CohwError, match="unknown workload"):
        export.convert("llama-9", "prefill")
    with pytest.raises(CohwError, match="no phase 'decode'.*forward"):
        export.convert("vit-b-16", "decode")
    with pytest.raises(CohwError, match="tolerance"):
        export.convert("vit-b-16", "forward", "int8")
    with pytest.raises(CohwError, match="tolerance"):
        export.plan(["vit-b-16"], ["int4"])


def test_plan_keeps_nerfs_in_fp32():
    p = export.plan(["vanilla-nerf", "vit-b-16", "dreamfusion-sd"], ["fp32", "bf16"])
    assert p == [("vanilla-nerf", "render", "fp32"), ("vanilla-nerf", "train_step", "fp32"),
                 ("vit-b-16", "forward", "fp32"), ("vit-b-16", "forward", "bf16"),
                 ("dreamfusion-sd", "sds_step", "fp32")]
    assert len(export.plan()) == 16  # every phase of the registry in fp32


# ------------------------------------------------------------------------------ real conversions
@pytest.fixture(scope="module")
def prefill():
    return export.convert("llama-2-70b", "prefill")


@pytest.fixture(scope="module")
def render():
    return export.convert("vanilla-nerf", "render", dynamic=False)


def test_llm_prefill_converts_with_dynamic_prompt_and_parity(prefill):
    c = prefill
    assert c.ok and c.failures == [] and c.fix == ""
    assert (c.axis, c.dynamic) == ("prompt length", "kept")
    # logits + (K, V) x 2 layers, within fp32 tolerance
    assert c.parity.outputs == 5 and c.parity.passed and c.parity.max_abs < 1e-5
    # the dynamic axis really is dynamic: a 7-token prompt runs through the same session
    ids = torch.randint(0, 512, (1, 7))
    logits = c.session.run(None, {c.session.get_inputs()[0].name: ids.numpy()})[0]
    with torch.no_grad():
        ref = c.built.model(input_ids=ids).logits
    assert logits.shape == (1, 7, 512) and np.abs(logits - ref.numpy()).max() < 1e-4


def test_nerf_render_fails_on_searchsorted_and_decomposition_fixes_it(render):
    c = render
    assert c.status == "failed" and c.failure.stage == "onnx conversion"
    assert c.failure.klass == failures.UNSUPPORTED_OP and c.failure.op == "aten.searchsorted.Tensor"
    assert export.fixable(c)
    f = export.fix(c)
    assert f.ok and f.parity.passed and f.fix == "decompose searchsorted.Tensor"
    assert c.status == "failed"  # the original is left as it was
    rows = export.parity_table([c, f])
    assert list(rows.status) == ["failed", "ok"] and rows.failure_class.iloc[0] == failures.UNSUPPORTED_OP
    with pytest.raises(CohwError, match="no exported program"):
        export.fix(export.Conversion("x", "y", "fp32", False))


def test_training_step_is_an_autograd_finding():
    c = export.convert("vanilla-nerf", "train_step")
    assert c.status == "failed" and c.failure.stage == "torch.export" and c.failure.klass == failures.AUTOGRAD
    assert c.dynamic == "not tried (training step)"
    ft = export.failure_table([c])
    assert list(ft["class"]) == [failures.AUTOGRAD]
    assert ft["key_line"].iloc[0].startswith("fake tensor in the exported program constant")


def test_fp32_only_workload_is_not_applicable_in_bf16():
    c = export.convert("nerfacto", "render", "bf16")
    assert c.status == "n/a" and c.failures == []


def test_latency_rows_have_method_and_spread(prefill):
    rows = latency.latency(prefill, ("eager", "onnxruntime"), repeats=3, warmup=1)
    assert [r["backend"] for r in rows] == ["eager", "onnxruntime"]
    for r in rows:
        assert r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["repeats"] == 3
        assert "median of 3 timed calls" in r["method"] and r["error"] == ""
    assert rows[1]["prepare_s"] == pytest.approx(prefill.export_s + prefill.onnx_s + prefill.session_s)
    with pytest.raises(CohwError, match="unknown backend"):
        latency.latency(prefill, ("tvm",))


def test_offload_moves_the_nerf_fields_and_measures_shares():
    o = offload.offload("vanilla-nerf", "render", repeats=2, warmup=1)
    assert sorted(o.on_target) == ["field_coarse", "field_fine"]
    assert o.parity.passed and 0.95 < o.flops_share <= 1.0 and 0 < o.time_share <= 1.0
    t = offload.offload_table([o])
    assert t.on_target.iloc[0] == "field_coarse, field_fine" and t["parity"].iloc[0] == "pass"


def test_offload_of_a_training_step_keeps_everything_in_pytorch_and_claims_no_parity():
    o = offload.offload("vanilla-nerf", "train_step", repeats=1, warmup=0)
    assert o.on_target == [] and o.flops_share == 0 and o.time_share == 0
    assert o.parity is None and o.timing is None and o.method == offload.NOTHING_OFFLOADED  # no self-comparison
    assert dict(o.kept)["field_coarse"] == "needs autograd"
    assert math.isfinite(o.eager.median)
    t = offload.offload_table([o])
    assert t["parity"].iloc[0] == "n/a (nothing offloaded)" and math.isnan(t["max_abs_err"].iloc[0])


def test_failure_dataclass_is_hashable_for_reports():
    assert len({Failure("s", "other", "x"), Failure("s", "other", "x")}) == 1


def test_validate_phase_names():
    assert export.validate_phase_names("all") == "all"
    assert export.validate_phase_names(["vit-b-16:forward"]) == {"vit-b-16:forward"}
    with pytest.raises(CohwError, match="unknown phase"):
        export.validate_phase_names(["vit-b-16:decode"])


def test_latency_tables_label_fixed_phases_and_pivot_by_backend():
    rows = [{"workload": "w", "phase": "render", "fix": "", "backend": "eager", "median_ms": 2.0, "iqr_ms": 0.1,
             "prepare_s": 0.0},
            {"workload": "w", "phase": "render", "fix": "decompose searchsorted.Tensor", "backend": "onnxruntime",
             "median_ms": 1.0, "iqr_ms": 0.2, "prepare_s": 4.0},
            {"workload": "w", "phase": "render", "fix": "decompose searchsorted.Tensor", "backend": "eager",
             "median_ms": 3.0, "iqr_ms": 0.3, "prepare_s": 0.0},
            {"workload": "v", "phase": "forward", "fix": "", "backend": "compile", "median_ms": 5.0, "iqr_ms": 0.5,
             "prepare_s": 30.0}]
    lat = latency.latency_frame(rows)
    assert list(lat.phase) == ["render", "render (decomposed)", "render (decomposed)", "forward"]
    wide = latency.latency_pivot(lat)
    assert list(wide.index) == [("w", "render"), ("w", "render (decomposed)"), ("v", "forward")]  # first-seen order
    assert list(wide.columns) == [f"{b} {s}" for b in ("eager", "compile", "onnxruntime")
                                  for s in ("median ms", "iqr ms", "prepare s")]
    assert wide.loc[("w", "render (decomposed)"), "onnxruntime prepare s"] == 4.0
    assert wide.loc[("w", "render (decomposed)"), "eager median ms"] == 3.0
    assert math.isnan(wide.loc[("w", "render"), "onnxruntime median ms"])  # not timed there
    assert wide.loc[("v", "forward"), "compile median ms"] == 5.0
