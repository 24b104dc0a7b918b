"""Model FLOPs of a training step (PaLM's formula, the tracer) and Megatron-LM's Table 1 predicted per rank."""
from __future__ import annotations

import math

import pytest
import torch

from cohw_utils.core.errors import CohwError
from cohw_utils.studies.parallel import megatron as mg
from cohw_utils.studies.parallel import training as tr
from cohw_utils.views.collectives import collective_time

TINY = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 10, "max_position_embeddings": 64}


def test_palm_formula_by_hand():
    # N = 1000, L = 2, H = 4, Q = 8, T = 16: 6 x 1000 + 12 x 2 x 4 x 8 x 16 = 6000 + 12288
    assert tr.model_flops_per_token(1000, 2, 4, 8, 16) == 18288
    # recomputation: selective adds the forward attention 4LHQT = 4096; full adds 2N too
    assert tr.hardware_flops_per_token(1000, 2, 4, 8, 16, "none") == 18288
    assert tr.hardware_flops_per_token(1000, 2, 4, 8, 16, "selective") == 6000 + 16384
    assert tr.hardware_flops_per_token(1000, 2, 4, 8, 16, "full") == 8000 + 16384
    assert tr.mfu(1000, 1e6, 1e10) == pytest.approx(0.1)


def test_bad_input_is_named():
    with pytest.raises(CohwError, match="recompute"):
        tr.hardware_flops_per_token(1, 1, 1, 1, 1, "some")
    with pytest.raises(CohwError, match="seq_len"):
        tr.model_flops_per_token(1, 1, 1, 1, 0)
    with pytest.raises(CohwError, match="peak_flops"):
        tr.mfu(1.0, 1.0, -1.0)


@pytest.mark.parametrize("tied", [False, True])
def test_model_parameters_leave_out_the_lookup_only(tied):
    from transformers import AutoModelForCausalLM

    cfg = tr._hf_config({**TINY, "tie_word_embeddings": tied})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    # q,k,v,o 4 x 16 x 16 = 1024; gate/up/down 3 x 16 x 32 = 1536; norms 16 + 16 + 16 = 48; head 10 x 16 = 160.
    # Untied: the 160-element input table is left out; tied: the one table is the head's weight, kept once.
    assert tr.model_parameters(model) == 1024 + 1536 + 48 + 160
    assert tr.transformer_shape(model.config) == {"layers": 1, "heads": 2, "head_dim": 8}


def test_tracer_counts_the_formula_less_the_norm_gains():
    check = tr.flops_check(TINY, batch=2, seq_len=8)
    assert check["tokens"] == 16
    # the formula over-counts exactly 6 FLOPs per token for each norm gain (48 of them here)
    assert check["norm_bias_params"] == 48
    assert check["formula"] - check["traced_contraction"] == pytest.approx(6 * 48 * 16, abs=0.5)
    # the rest of the traced work (softmax, norms, element-wise) is 7.5% at hidden 16 (an element-wise
    # op costs O(h) per token, a GEMM O(h^2)); at hidden 512 it is 0.2% (next test)
    assert 1.0 < check["total_ratio"] < 1.10
    assert set(check["non_contraction"]) <= {"normalization", "element-wise", "data movement", "other"}


def test_tracer_matches_the_formula_on_the_measured_model():
    from cohw_utils.studies.parallel.gloo_run import SMALL_LLAMA

    check = tr.flops_check(SMALL_LLAMA, batch=4, seq_len=128)
    # N = 4 x (4 x 512^2 + 3 x 512 x 1408) + 2 x 4 x 512 + 512 (norms) + 2048 x 512 (head)
    assert check["n_params"] == 4 * (4 * 512**2 + 3 * 512 * 1408) + 9 * 512 + 2048 * 512
    assert check["contraction_ratio"] == pytest.approx(1.0, abs=1e-3)
    assert check["total_ratio"] == pytest.approx(1.0, abs=0.01)


def test_a_measured_step_is_consistent():
    run = tr.measure_train_step({"num_hidden_layers": 1}, batch=1, seq_len=16, repeats=1, warmup=0, peak_flops=1e11)
    assert run.tokens_per_s == pytest.approx(16 / run.timing.median)
    assert run.mfu == pytest.approx(run.tokens_per_s * run.model_flops_per_token / 1e11)
    lo, hi = run.mfu_range
    assert lo <= run.mfu <= hi
    assert run.traced_flops_per_token > run.model_flops_per_token * 0.99
    with pytest.raises(CohwError, match="fp32 or bf16"):
        tr.measure_train_step(dtype="int8")


def test_megatron_equations_by_hand():
    # B=1, s=2, l=1, h=6, V=0: 96 x 2 x 36 x (1 + 2/36) = 6912 + 384
    assert mg.megatron_flops(1, 2, 1, 6, 0) == pytest.approx(7296)
    # without the recomputed pass: 3 x (24 x 2 x 36 + 4 x 4 x 6) = 5472 = 3/4 of it when V = 0
    assert mg.megatron_model_flops(1, 2, 1, 6, 0) == pytest.approx(5472)
    # the logits are not recomputed: 6BshV in both
    assert mg.megatron_flops(1, 2, 1, 6, 10) - mg.megatron_flops(1, 2, 1, 6, 0) == pytest.approx(6 * 2 * 6 * 10)
    assert mg.megatron_model_flops(1, 2, 1, 6, 10) - mg.megatron_model_flops(1, 2, 1, 6, 0) == pytest.approx(720)


def test_table1_as_printed_is_consistent():
    t = mg.load_table1()
    assert len(t) == 10
    for _, r in t.iterrows():
        # Eq. (2) gives the printed parameter count; per-GPU x GPUs gives the aggregate; 312 TFLOP/s the %
        assert mg.megatron_params(int(r["layers"]), int(r["hidden"]), 51200, 2048) / 1e9 == pytest.approx(r["params_b"], abs=0.06)
        assert r["tflops_per_gpu"] * r["gpus"] / 1e3 == pytest.approx(r["aggregate_pflops"], rel=0.01)
        assert abs(100 * r["tflops_per_gpu"] / 312 - r["pct_of_peak"]) < 1
    assert t.loc[t["params_b"] == 1008.0, "tflops_per_gpu"].item() == 163


def test_predicted_row_parts_are_the_stated_model():
    t = mg.load_table1()
    row = t.iloc[0]  # 1.7B: t = p = 1, d = 32, batch 512 -> 16 microbatches of 1
    pred = mg.predict_row(row)
    assert (pred["d"], pred["microbatches"], pred["bubble"]) == (32, 16, 0.0)
    # the traced GEMMs, counted as Eq. (3) counts them, are Eq. (3) (biases add < 0.1%)
    assert pred["traced / Eq. 3 FLOPs"] == pytest.approx(1.0, abs=2e-3)
    grads = 2 * mg.megatron_params(24, 2304, 51200, 2048)
    by_hand = 2 * 31 * mg.SELENE_IB.latency_s + 2 * 31 / 32 * grads / 25e9
    assert pred["dp all-reduce (s)"] == pytest.approx(by_hand)
    assert pred["dp all-reduce (s)"] == pytest.approx(collective_time("all_reduce", grads, 32, mg.SELENE_IB))
    parts = ("compute (s)", "tp comm (s)", "p2p (s)", "dp all-reduce (s)", "optimizer (s)")
    assert pred["step (s)"] == pytest.approx(sum(pred[k] for k in parts))
    F = mg.megatron_flops(512, 2048, 24, 2304, 51200)
    assert pred["predicted TFLOP/s per GPU"] == pytest.approx(F / 32 / pred["step (s)"] / 1e12)


def test_a_pipelined_row_has_its_bubble_and_sends():
    row = mg.load_table1().iloc[4]  # 39.1B: t = 8, p = 2, 512 GPUs -> d = 32, 1536 / 32 = 48 microbatches
    pred = mg.predict_row(row)
    assert pred["microbatches"] == 48
    assert pred["bubble"] == pytest.approx(1 / 49)
    send = collective_time("send_recv", 2048 * 8192 * 2 / 8, 2, mg.SELENE_IB)
    assert pred["p2p (s)"] == pytest.approx(2 * send * 49)
    assert pred["tp comm (s)"] > 0
    with pytest.raises(CohwError, match="divide"):
        mg.predict_row(row, microbatch=5)


def test_comparison_holds_published_and_predicted_mfu():
    rows = mg.load_table1().iloc[[0]]
    cmp = mg.compare_table1(rows)
    r = cmp.iloc[0]
    assert r["published TFLOP/s per GPU"] == 137
    assert r["error"] == pytest.approx(r["predicted TFLOP/s per GPU"] / 137 - 1)
    frac = mg.megatron_model_flops(512, 2048, 24, 2304, 51200) / mg.megatron_flops(512, 2048, 24, 2304, 51200)
    assert r["published MFU"] == pytest.approx(137e12 * frac / 312e12)
    assert math.isfinite(r["predicted MFU"])
