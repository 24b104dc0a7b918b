"""The SW gap list (Chapter 3): formats data, runtime probes, and the report for every proxy.

The report test converts every phase of the registry once (tiny scale, static shapes) and
checks the requirements each workload must carry, with shares recomputed by hand from the op
table."""
from __future__ import annotations

import pandas as pd
import pytest

from cohw_utils.studies.enabling import export, training
from cohw_utils.studies.enabling import gap_report as gaps
from cohw_utils import workloads
from cohw_utils.core.errors import CohwError


# ------------------------------------------------------------------------------ formats
def test_runtime_formats_file_has_sources_and_known_probes():
    df = gaps.runtime_formats()
    assert df["format"].is_unique and len(df) >= 10
    assert (df["source"].str.len() > 20).all(), df[df["source"].str.len() <= 20]
    assert set(df["probe"]) - {""} <= set(gaps.PROBES)
    known = {w.domain for w in workloads.WORKLOADS.values()}
    for domains in df["domains"]:
        assert set(domains.split(";")) <= known, domains
    assert "GPTQ" in " ".join(df["format"]) and "MatMulNBits" in " ".join(df["onnx_ops"])


def test_runtime_formats_bad_file(tmp_path):
    p = tmp_path / "f.csv"
    p.write_text("format,weights\nx,y\n")
    with pytest.raises(CohwError, match="missing column"):
        gaps.runtime_formats(p)
    with pytest.raises(CohwError, match="cannot read"):
        gaps.runtime_formats(tmp_path / "absent.csv")


@pytest.fixture(scope="module")
def formats():
    return gaps.validate_formats()


def test_validate_formats_on_the_pinned_onnxruntime(formats):
    f = formats.set_index("format")
    assert f.loc["fp32", "runs_here"] == "yes" and f.loc["fp32", "rel_err"] < 1e-6
    assert f.loc["fp16", "runs_here"] == "yes" and f.loc["fp16", "rel_err"] < 2e-3   # fp16 unit roundoff 4.9e-4
    assert f.loc["bf16", "runs_here"] == "no" and "MatMul" in f.loc["bf16", "error"]
    assert f.loc["fp8 matmul (e4m3 inputs)", "runs_here"] == "no"
    # int4 weight-only: onnxruntime's contrib MatMulNBits, block-wise 4-bit error on random weights
    assert f.loc["int4 weight-only block-wise", "runs_here"] == "yes"
    assert "com.microsoft.MatMulNBits" in f.loc["int4 weight-only block-wise", "ops_seen"]
    assert f.loc["int4 weight-only block-wise", "rel_err"] < 0.2
    assert f.loc["int8 weight-only block-wise", "rel_err"] < f.loc["int4 weight-only block-wise", "rel_err"]
    assert "MatMulInteger" in f.loc["int8 dynamic (W8A8)", "ops_seen"]
    assert "QLinearMatMul" in f.loc["int8 static QOperator (W8A8)", "ops_seen"]
    # GPTQ: the package's GPTQ repacked as MatMulNBits (float zero points, g_idx) runs, at int4's error
    assert f.loc["GPTQ checkpoint", "runs_here"] == "yes" and 0 < f.loc["GPTQ checkpoint", "rel_err"] < 0.2
    assert "com.microsoft.MatMulNBits" in f.loc["GPTQ checkpoint", "ops_seen"]
    assert f.loc["AWQ checkpoint", "runs_here"] == "no probe"


# ------------------------------------------------------------------------------ runtime probe
def test_node_support_flags_a_bf16_matmul():
    from onnx import TensorProto as TP, helper

    nodes = [helper.make_node("Cast", ["X"], ["Xb"], to=TP.BFLOAT16),
             helper.make_node("MatMul", ["Xb", "Xb"], ["Yb"]),
             helper.make_node("Cast", ["Yb"], ["Y"], to=TP.FLOAT)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TP.FLOAT, [4, 4])],
                          [helper.make_tensor_value_info("Y", TP.FLOAT, [4, 4])])
    sup = gaps.node_support(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))
    by = {(r.op_type, r.input_types): r for r in sup.itertuples()}
    assert by[("MatMul", "bfloat16, bfloat16")].supported is False
    assert "Could not find an implementation for MatMul" in by[("MatMul", "bfloat16, bfloat16")].error
    assert by[("Cast", "float")].supported and by[("Cast", "bfloat16")].supported


# ------------------------------------------------------------------------------ the report, all proxies
@pytest.fixture(scope="module")
def everything(formats):
    convs = export.convert_all(export.plan(), dynamic=False)
    tables: dict = {}
    tried = [training.try_training("vanilla-nerf", "train_step")]  # the others: "not tried" rows
    report = gaps.gap_report(convs, target="onnx-opset18", formats=formats, tables=tables, training=tried)
    return convs, tables, report


def _rows(report, workload, phase):
    return report[(report.workload == workload) & (report.phase == phase)]


def _share(table: pd.DataFrame, packet: str) -> float:
    """FLOP share of one op packet, by hand: its FLOPs over all non-view FLOPs."""
    t = table[table.op_class != "view"]
    mine = t[t.op.str.startswith(packet + ".")]
    return float(mine.flops.fillna(0).sum()) / float(t.flops.fillna(0).sum())


def test_report_covers_every_proxy(everything):
    convs, _, report = everything
    summary = gaps.gap_report_summary(report, convs)
    assert set(summary.workload) == set(workloads.WORKLOADS) - set(export.NOT_IN_DEFAULT_PLAN)
    assert len(summary) == len(export.plan())
    for col in ("flops_share", "bytes_share"):
        s = report[col].dropna()
        assert ((s >= 0) & (s <= 1)).all(), report[~report[col].between(0, 1) & report[col].notna()]
    assert list(report.columns) == gaps.REPORT_COLUMNS


def test_inference_phases_of_transformers_and_cnns_have_no_operator_gaps(everything):
    convs, _, report = everything
    for c in convs:
        if c.workload.startswith(("llama", "sd-", "vit", "resnet")):
            assert c.ok, (c.workload, c.phase, c.failures)
            r = _rows(report, c.workload, c.phase)
            assert not (r.kind.isin(["operator", "conversion", "training"])).any(), r
    # ...but the LLMs' int4 checkpoints need a converter
    q = report[(report.workload == "llama-2-7b") & (report.kind == "quantization")]
    assert q.requirement.str.startswith("GPTQ checkpoint: runs once repacked").any()
    assert q.requirement.str.startswith("AWQ checkpoint: no loader").any()
    assert q.requirement.str.startswith("bf16: does not run").any()


@pytest.mark.parametrize("nerf", ["vanilla-nerf", "nerfacto"])
def test_nerf_render_needs_searchsorted_only(everything, nerf):
    _, tables, report = everything
    ops = _rows(report, nerf, "render")
    ops = ops[ops.kind == "operator"]
    assert list(ops.op) == ["aten.searchsorted"]
    r = ops.iloc[0]
    assert "conversion" in r.sources and "target onnx-opset18" in r.sources
    assert r.flops_share == pytest.approx(_share(tables[(nerf, "render", "fp32")], "aten.searchsorted"), rel=1e-9)
    assert 0 < r.flops_share < 0.01 and "decompose" in r.dirty_fix


def test_a_training_step_that_runs_through_the_joint_graph_is_not_blocked(everything):
    convs, _, report = everything
    r = _rows(report, "vanilla-nerf", "train_step")
    rows = r[r.kind == "training"]
    assert (rows.flops_share == 0.0).all(), rows          # the inference capture fails; the joint graph runs
    assert rows.requirement.str.startswith("forward + backward run on the target").any()
    summary = gaps.gap_report_summary(report, convs).set_index(["workload", "phase"])
    assert summary.loc[("vanilla-nerf", "train_step"), "whole_phase_blocked"] == "no"
    ops = r[r.kind == "operator"]
    bw = ops[ops.op.str.contains("backward")]
    assert len(bw) and bw.dirty_fix.str.contains("joint graph").all()   # lowered on the path that ran


@pytest.mark.parametrize("workload, phase", [("nerfacto", "train_step"), ("dreamfusion-sd", "sds_step")])
def test_training_phases_not_tried_say_so_and_a_failed_attempt_scores_the_backward(everything, workload, phase):
    _, tables, report = everything
    r = _rows(report, workload, phase)
    assert list(r[r.kind == "training"].requirement)[-1] == "training path not tried"
    assert (r[r.kind == "training"].flops_share == 1.0).any()   # the inference capture's failure still blocks
    t = tables[(workload, phase, "fp32")]
    bw = t[(t["pass"] == "backward") & t.costed]
    expected = float(bw.flops.sum()) / float(t[t.costed].flops.sum())
    stop = training.Failure("joint graph", "other", "AssertionError: x")
    att = training.TrainingAttempt(workload, phase, status="failed", failure=stop, failures=[stop])
    kernels = [x for x in training.training_requirements(att, t) if x["requirement"].startswith("backward pass")]
    # the backward roughly doubles the forward of what it trains (NeRF: all of it; DreamFusion: not the frozen UNet)
    assert kernels[0]["flops_share"] == pytest.approx(expected, rel=1e-9) and 0.1 < expected < 0.9


def test_report_works_from_the_exported_graph_alone():
    """No target description: the conversion and the ONNX graph on onnxruntime still give the
    gaps, here a bf16 ViT whose matmuls the CPU provider cannot run."""
    c = export.convert("vit-b-16", "forward", "bf16", dynamic=False)
    table = gaps.trace_tiny_phase("vit-b-16", "forward", "bf16")
    rg = gaps.runtime_gaps(c, table)
    shares = rg.set_index("op")["flops_share"]
    assert shares["aten.addmm"] > 0.5 and "aten.convolution" in shares.index
    assert shares["aten.addmm"] == pytest.approx(_share(table, "aten.addmm"), rel=1e-9)
    report = gaps.gap_report([c], target=None, tables={("vit-b-16", "forward", "bf16"): table})
    assert set(report.kind) == {"conversion", "operator"}
    assert report[report.kind == "operator"].sources.str.contains("exported ONNX graph").all()
    conv_row = report[report.kind == "conversion"].iloc[0]
    assert conv_row.flops_share == 1.0 and "Conv" in conv_row.requirement


def test_write_report_csv_and_markdown(everything, tmp_path):
    _, _, report = everything
    csv, md = gaps.write_report(report, tmp_path / "out" / "gaps", title="T")
    back = pd.read_csv(csv)
    assert len(back) == len(report) and list(back.columns) == gaps.REPORT_COLUMNS
    text = md.read_text()
    assert text.startswith("# T") and "## vanilla-nerf" in text and "| phase | dtype | kind | requirement |" in text
    assert "aten.searchsorted has no path on the target" in text


def test_quantized_variants_of_the_tiny_llm():
    c = export.convert("llama-2-7b", "prefill", dynamic=False)
    q = gaps.quantized_variants(c, repeats=2, warmup=1).set_index("format")
    assert (q.error == "").all(), q.error
    assert q.loc["fp32", "rel_err_out0"] < 1e-5
    assert "MatMulNBits" in q.loc["matmulnbits_int4", "quantized_ops"]
    assert q.loc["matmulnbits_int4", "model_bytes"] < 0.5 * q.loc["fp32", "model_bytes"]
    assert 0 < q.loc["int8_dynamic", "rel_err_out0"] < q.loc["matmulnbits_int4", "rel_err_out0"] < 1
    with pytest.raises(CohwError, match="no ONNX model"):
        gaps.quantized_variants(export.Conversion("x", "y", "fp32", False))
