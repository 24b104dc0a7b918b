"""The request predictor and its calibration (views.predictor, studies.validation), with numbers
computed by hand."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from cohw_utils.core.errors import CohwError
from cohw_utils.hardware import get_hardware
from cohw_utils.studies.validation import ledger as lg
from cohw_utils.studies.validation.predict import phase_analysis, predict_request
from cohw_utils.views.predictor import (Calibration, apply_weight_format, decode_context, phase_seconds,
                                        request_prediction)

A100 = get_hardware("A100-80GB")
CAL = Calibration({"*": {"compute": 0.6, "bandwidth": 0.8, "fusion": 0.25, "step_overhead_s": 2e-3}})


def _row(op, cls, shapes, read, written=0, flops=0, module_class="Linear", dtype="float16"):
    return {"op": op, "module": "m", "module_class": module_class, "phase": "p", "pass": "forward",
            "op_class": cls, "input_shapes": shapes, "output_shapes": (), "dtype": dtype, "flops": flops,
            "flops_effective": flops, "macs": flops // 2, "bytes_read": read, "bytes_written": written,
            "intensity": np.nan, "costed": True}


def test_weight_formats_rewrite_only_the_linear_weight_operand_by_hand():
    # mm(x [8, 4096], w [4096, 1024]) in fp16: reads 8*4096*2 + 4096*1024*2 bytes
    x, w = 8 * 4096 * 2, 4096 * 1024 * 2
    t = pd.DataFrame([_row("aten.mm.default", "contraction", ((8, 4096), (4096, 1024)), x + w, 8 * 1024 * 2),
                      _row("aten.mul.Tensor", "element-wise", ((8, 4096),), x, x, module_class="LlamaMLP")])
    int8 = apply_weight_format(t, "int8-wo")
    assert int8.loc[0, "bytes_read"] == x + 4096 * 1024 + 1024 * 2  # int8 weights + one fp16 scale per column
    g32 = apply_weight_format(t, "int4-wo-g32")
    assert g32.loc[0, "bytes_read"] == x + 4096 * 1024 / 2 + (4096 // 32) * 1024 * 4
    fp8 = apply_weight_format(t, "fp8")
    assert fp8.loc[0, "bytes_read"] == x / 2 + 4096 * 1024 and fp8.loc[0, "dtype"] == "fp8"
    for f in (int8, g32, fp8):  # the element-wise row is never touched
        assert f.loc[1, "bytes_read"] == x and f.loc[1, "dtype"] == "float16"
    # fp8 KV: a fused-attention row reads K and V at 1 byte (q stays 2 bytes)
    q, kv = (1, 32, 1, 128), (1, 32, 512, 128)
    sd = pd.DataFrame([_row("aten.scaled_dot_product_attention", "contraction", (q, kv, kv), 2 * (4096 + 2 * 2_097_152),
                            module_class="LlamaAttention")])
    assert apply_weight_format(sd, "fp8-kv8").loc[0, "bytes_read"] == 2 * 4096 + 2 * 2_097_152
    assert apply_weight_format(sd, "fp8").loc[0, "bytes_read"] == 2 * (4096 + 2 * 2_097_152)
    with pytest.raises(CohwError, match="unknown weight format 'int3'"):
        apply_weight_format(t, "int3")


def test_phase_seconds_is_the_fit_objective():
    """The fit's fast per-op evaluation equals phase_seconds for the same parameters."""
    rt = lg.row_times(pd.Series({"id": "t", "hardware": "A100-80GB", "batch": 4, "input_len": 64,
                                 "output_len": 32, "metric": "latency_ms", "config": "llama-2-7b",
                                 "format": "fp16"}))
    for cal in (Calibration.ideal(), CAL):
        p = cal.for_vendor("NVIDIA")
        assert lg._step(rt, 0, p) == pytest.approx(phase_seconds(rt.tables[0], A100, cal), rel=1e-9)
        assert lg._step(rt, 1, p) == pytest.approx(phase_seconds(rt.tables[1], A100, cal), rel=1e-9)


def test_batch1_decode_by_hand_llama2_7b_on_a100():
    """Ideal TPOT of Llama-2-7B at batch 1 = (weights + KV read) / bandwidth, within 1%: at batch 1
    every GEMM is memory-bound and activations are megabytes against 13.5 GB of weights."""
    p = predict_request("llama-2-7b", "A100-80GB", batch=1, input_len=128, output_len=129, calibrated=False)
    ctx = decode_context(128, 129)  # 192
    assert ctx == 192
    weights = 6_738_415_616 * 2  # Llama-2-7B parameters (incl. embeddings; the lookup reads 1 row, lm_head all)
    weights -= 32000 * 4096 * 2 - 4096 * 2  # the input embedding reads one row, not the table
    kv = 32 * 2 * 4096 * 2 * (ctx + 1)  # layers x (K, V) x hidden x fp16 x positions attended
    assert p.tpot_s == pytest.approx((weights + kv) / 2039e9, rel=0.01)
    assert p.e2e_s == pytest.approx(p.ttft_s + 128 * p.tpot_s)
    assert p.tokens_per_s == pytest.approx(129 / p.e2e_s)
    c = predict_request("llama-2-7b", "A100-80GB", batch=1, input_len=128, output_len=129, calibration=CAL)
    # calibrated decode: the same weight stream at 80% of spec plus 2 ms per step (GEMMs dominate)
    assert c.tpot_s == pytest.approx((weights + kv) / (0.8 * 2039e9) + 2e-3, rel=0.02)


def test_fit_recovers_known_parameters():
    """Measurements generated from known parameters are fitted back (the fit can find the truth)."""
    truth = {"compute": 0.55, "bandwidth": 0.7, "fusion": 0.3, "step_overhead_s": 4e-3}
    rows = []
    for i, (b, inp, out, metric) in enumerate([(1, 128, 64, "tpot_ms"), (16, 512, 128, "tokens_per_s"),
                                               (1, 2048, 1, "ttft_ms"), (8, 128, 1, "ttft_ms"),
                                               (64, 256, 64, "tokens_per_s"), (1, 1024, 1, "ttft_ms")]):
        row = pd.Series({"id": f"s{i}", "hardware": "H100-SXM", "batch": b, "input_len": inp, "output_len": out,
                         "metric": metric, "config": "llama-2-7b", "format": "fp16", "value": 1.0})
        rt = lg.row_times(row)
        rt.row["value"] = lg.predicted_value(rt, truth)
        rows.append(rt)
    fit = lg.fit_calibration(rows, min_vendor_rows=99).for_vendor("NVIDIA")
    for k, v in truth.items():
        assert fit[k] == pytest.approx(v, rel=0.02, abs=1e-5), k


def test_predict_refuses_bad_input():
    with pytest.raises(CohwError, match="unknown accelerator 'H1000'"):
        predict_request("llama-2-7b", "H1000")
    with pytest.raises(CohwError, match="input_len must be a positive integer"):
        predict_request("llama-2-7b", "H100-SXM", input_len=0)
    with pytest.raises(CohwError, match="exceeds llama-2-7b's max_position_embeddings"):
        predict_request("llama-2-7b", "H100-SXM", input_len=4000, output_len=200)
    with pytest.raises(CohwError, match="does not fit one A100-40GB"):
        predict_request("llama-2-13b", "A100-40GB", batch=64, input_len=1024, output_len=1024, calibrated=False)
    with pytest.raises(CohwError, match="predict times decoder LMs"):
        predict_request("resnet-50", "H100-SXM")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cohw_utils", "predict", *args], capture_output=True, text=True)


def test_cli_predict_json_and_one_line_errors():
    ok = _cli("llama-2-7b", "--hardware", "H100-SXM", "--batch", "2", "--input-len", "64", "--output-len", "16",
              "--ideal", "--json")
    assert ok.returncode == 0, ok.stderr
    d = json.loads(ok.stdout)
    assert d["mode"] == "ideal" and d["batch"] == 2 and d["tokens_per_s"] == pytest.approx(32 / d["e2e_s"])
    for args, msg in ((("llama-2-7b", "--hardware", "nope"), "unknown accelerator 'nope'"),
                      (("llama-2-7b", "--hardware", "H100-SXM", "--batch", "0"), "expected a positive integer"),
                      (("llama-2-70b", "--hardware", "H100-SXM"), "does not fit one H100-SXM"),
                      (("llama-2-7b", "--hardware", "H100-SXM", "--weights", "int3"), "unknown weight format")):
        bad = _cli(*args)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and msg in bad.stderr, bad.stderr


def test_request_prediction_needs_a_decode_table_for_more_than_one_token():
    t = phase_analysis("llama-2-7b", "prefill", 1, 16, "fp16").table
    with pytest.raises(CohwError, match="needs a decode table"):
        request_prediction(t, None, A100, batch=1, input_len=16, output_len=4)
    one = request_prediction(t, None, A100, batch=1, input_len=16, output_len=1)
    assert one.e2e_s == one.ttft_s and one.tpot_s == 0
