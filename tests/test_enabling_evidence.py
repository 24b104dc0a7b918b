"""Chapter 3's evidence beyond one conversion: a training step tried through a joint graph, a
GPTQ layer as onnxruntime's MatMulNBits, parity on another seed and a second size, and an
export with ONNX external data. Real runs on tiny models (seconds each)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cohw_utils.core.errors import CohwError
from cohw_utils.studies.enabling import evidence, export, gptq_probe, training
from cohw_utils.studies.enabling.failures import OTHER, Failure
from cohw_utils.studies.quantization.schemes import QTensor, Scheme


# ------------------------------------------------------------------------------ training
def test_recorded_backward_gives_the_loss_with_the_same_gradient():
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    store: list = []
    with training._record_backward(store):
        (x * 2).sum().backward()
        (x ** 2).backward(torch.tensor([1.0, 0.0, 2.0]))
    assert x.grad is None                                   # nothing back-propagated
    assert float(store[0].detach()) == 12.0
    g, = torch.autograd.grad(store[1], x)                   # d/dx sum(x^2 * [1, 0, 2]) = 2x * [1, 0, 2]
    assert g.tolist() == [2.0, 0.0, 12.0]


def test_vanilla_nerf_training_step_runs_on_onnxruntime_as_a_joint_graph():
    a = training.try_training("vanilla-nerf", "train_step")
    assert a.status == "runs" and a.parity.passed and a.parity.max_rel < 1e-4
    assert a.gradients == 24 and a.parity.outputs == 25     # the loss + 2 fields x 6 linears x (weight, bias)
    assert len(a.random_inputs) == 2                        # the coarse and fine samplers' jitter
    assert [f.stage for f in a.failures] == ["onnx conversion (joint program)"]  # worked around
    t = training.training_table([a])
    assert t.status.iloc[0] == "runs" and "parity" in t.stages_passed.iloc[0]
    with pytest.raises(CohwError, match="not a training phase"):
        training.try_training("vanilla-nerf", "render")


def test_training_requirements_follow_the_attempt():
    import pandas as pd

    table = pd.DataFrame({"pass": ["forward", "backward", "backward"], "costed": [True, True, True],
                          "flops": [10.0, 20.0, 10.0], "bytes_read": [4.0, 2.0, 1.0], "bytes_written": [1.0, 1.0, 1.0]})
    stop = Failure("joint graph", OTHER, "AssertionError: Found a parameter that did not receive a gradient.")
    failed = training.TrainingAttempt("w", "train_step", status="failed", failure=stop, failures=[stop])
    rows = training.training_requirements(failed, table)
    assert rows[0]["flops_share"] == 1.0 and "joint graph" in rows[0]["requirement"]
    assert rows[1]["requirement"].startswith("backward pass kernels")
    assert rows[1]["flops_share"] == pytest.approx(30 / 40) and rows[1]["bytes_share"] == pytest.approx(5 / 10)
    worked = Failure("onnx conversion (joint program)", OTHER, "kept 0 of 3 outputs")
    from cohw_utils.studies.enabling.parity import TOLERANCES, _compare
    ok = training.TrainingAttempt("w", "train_step", status="runs", failures=[worked], gradients=2,
                                  parity=_compare([np.ones(2)], [torch.ones(2)], TOLERANCES["fp32"]))
    rows = training.training_requirements(ok, table)
    assert [r["flops_share"] for r in rows] == [0.0, 0.0] and "match eager" in rows[1]["requirement"]
    assert training.training_requirements(None, table)[0]["requirement"] == "training path not tried"


# ------------------------------------------------------------------------------ GPTQ -> MatMulNBits
def test_pack_matmulnbits_by_hand():
    codes = torch.tensor([list(range(16)) * 2, [15] * 32], dtype=torch.uint8)            # N=2, K=32
    q = QTensor(codes, torch.tensor([[0.5], [2.0]]), torch.tensor([[3.0], [8.0]]), Scheme(4, group_size=32))
    p = gptq_probe.pack_matmulnbits(q, 32)
    assert p["B"].shape == (2, 1, 16) and p["B"].dtype == np.uint8
    assert p["B"][0, 0, 0] == 0x10 and p["B"][0, 0, 1] == 0x32 and p["B"][1, 0, 0] == 0xFF  # low nibble first
    assert p["zero_points"].tolist() == [[3], [8]]                                        # odd count: high nibble 0
    assert p["g_idx"].tolist() == [0] * 32 and p["scales"].tolist() == [[0.5], [2.0]]
    with pytest.raises(CohwError, match="block_size"):
        gptq_probe.pack_matmulnbits(q, 16)
    with pytest.raises(CohwError, match="4-bit asymmetric"):
        gptq_probe.pack_matmulnbits(QTensor(codes.to(torch.int8), q.scale, None, Scheme(4, 32, symmetric=True)), 32)


def test_gptq_layer_runs_as_matmulnbits_with_parity():
    r = gptq_probe.gptq_matmulnbits()
    v = r.variants
    assert list(v.passed) == [True, False, True]    # onnxruntime 1.32 CPU: packed zero points are wrong with g_idx
    assert r.max_rel < 1e-5 and r.g_idx_used         # float zero points + g_idx: parity, and g_idx is read
    assert 0.01 < r.quant_rel < 0.3                  # int4 error against the fp32 weights
    assert r.gptq_error < r.rtn_error                # GPTQ beats round-to-nearest on its calibration inputs
    # B 128*8*16 + scales 128*8*4 + packed zero points 128*4 + g_idx 256*4 bytes
    assert r.packed_bytes == 16384 + 4096 + 512 + 1024 and r.fp32_bytes == 4 * 256 * 128


# ------------------------------------------------------------------------------ parity evidence
@pytest.fixture(scope="module")
def prefill():
    return export.convert("llama-2-7b", "prefill")


def test_parity_on_another_seed_and_a_second_prompt_length(prefill):
    ev = evidence.parity_evidence(prefill, seed=3)
    assert list(ev.check) == ["export example", "another seed (3)", "second prompt length"]
    assert ev.passed.all() and (ev.error == "").all(), ev
    assert ev.inputs.iloc[2] == "seq_len=17"
    bad = export.Conversion("x", "y", "fp32", False)
    with pytest.raises(CohwError, match="no session"):
        evidence.parity_evidence(bad)


def test_large_export_path_with_external_data_on_a_tiny_stand_in():
    r = evidence.large_export("tinyllama-1.1b", scale="tiny")
    assert r.layers == 2 and not r.exceeds_protobuf_limit
    assert r.data_bytes > 0.9 * r.weight_bytes and r.onnx_bytes < r.data_bytes   # weights live beside the graph
    assert [n for n, _ in r.parity] == [32, 17] and all(p.passed for _, p in r.parity)
    assert evidence.PROTOBUF_LIMIT == 2 ** 31
    with pytest.raises(CohwError, match="layers must be"):
        evidence.large_export("tinyllama-1.1b", layers=0)
    assert math.isfinite(r.seconds["session"])
