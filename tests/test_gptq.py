"""GPTQ: the hand-computed OBQ update, agreement with a slow reference, lazy batches, and
lower output error than round-to-nearest."""
from __future__ import annotations

import pytest
import torch

from cohw_utils.core.errors import CohwError
from cohw_utils.studies.quantization.gptq import gptq_lm, gptq_quantize, obq_reference
from cohw_utils.studies.quantization.blocks import block_linears
from cohw_utils.studies.quantization.schemes import Scheme, quantize_rtn, scheme


def _correlated_h(k: int, n: int = 2000, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g, dtype=dtype) / 4 + torch.eye(k, dtype=dtype)
    x = torch.randn(n, k, generator=g, dtype=dtype) @ mix * torch.linspace(0.2, 3, k, dtype=dtype)
    return x.T @ x / n


def test_hand_computed_obq_update_flips_a_rounding():
    # Symmetric int8 with exact (fp32) scales: column 2 holds the row's largest weight, so
    # scale = 1.27 / 127 = 0.01. H couples columns 0 and 1 (positively correlated inputs).
    sch = Scheme(8, None, symmetric=True, scale_bits=32)
    w = torch.tensor([[0.014, 0.0249, 1.27]], dtype=torch.float64)
    H = torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    r = gptq_quantize(w, H, sch, percdamp=0.0)
    # By hand: H^-1 = [[2/3, -1/3, 0], [-1/3, 2/3, 0], [0, 0, 1]].
    # Column 0: q0 = 0.01 (code 1), error 0.004; OBS update of column 1:
    #   w1 -= (w0 - q0) / Hinv00 * Hinv01 = 0.0249 + 0.004 / (2/3) * (1/3) = 0.0269 -> code 3,
    # where round-to-nearest gives code 2. Column 2 is decoupled (Hinv02 = 0): code 127.
    assert r.qtensor.scale.item() == pytest.approx(0.01, rel=1e-6)
    assert r.qtensor.codes.tolist() == [[1, 3, 127]]
    assert quantize_rtn(w, sch).codes.tolist() == [[1, 2, 127]]
    # Output errors dW H dW^T: GPTQ dW = (0.004, -0.0051, 0), RTN dW = (0.004, 0.0049, 0).
    assert r.error == pytest.approx(2 * 0.004**2 + 2 * 0.0051**2 - 2 * 0.004 * 0.0051, rel=1e-4)  # 4.322e-5
    assert r.rtn_error == pytest.approx(2 * 0.004**2 + 2 * 0.0049**2 + 2 * 0.004 * 0.0049, rel=1e-4)  # 1.1922e-4


@pytest.mark.parametrize("blocksize", [1, 5, 128])
def test_cholesky_lazy_batch_gptq_matches_explicit_inverse_obq(blocksize):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 16, generator=g, dtype=torch.float64)
    H = _correlated_h(16)
    sch = Scheme(4, None, symmetric=False, scale_bits=32)
    r = gptq_quantize(w, H, sch, blocksize=blocksize, percdamp=0.01)
    ref = obq_reference(w, H, sch, percdamp=0.01)
    assert torch.allclose(r.dequantized, ref, atol=1e-6)  # same codes; scales stored in fp32


def test_lazy_batches_do_not_change_grouped_results():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 64, generator=g, dtype=torch.float64)
    H = _correlated_h(64, seed=3)
    sch = scheme(4, 16)
    a = gptq_quantize(w, H, sch, blocksize=16)
    b = gptq_quantize(w, H, sch, blocksize=64)
    assert torch.equal(a.qtensor.codes, b.qtensor.codes)


@pytest.mark.parametrize("sch", [scheme(4), scheme(4, 32), scheme(8)], ids=lambda s: s.name)
def test_gptq_beats_rtn_on_layer_output_error(sch):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(64, 128, generator=g) * 0.05
    H = _correlated_h(128, n=4096, seed=5)
    r = gptq_quantize(w, H, sch)
    assert r.error < 0.9 * r.rtn_error
    # every dequantized weight is on the grid: codes within range and error within the grid span
    assert r.qtensor.codes.min() >= sch.qmin and r.qtensor.codes.max() <= sch.qmax
    if sch.group_size is None:
        ra = gptq_quantize(w, H, sch, act_order=True)
        assert ra.error < r.error  # quantizing large-H_ii columns first helps here


def test_bad_inputs_raise_clear_errors():
    w = torch.randn(4, 8)
    with pytest.raises(CohwError, match="need w"):
        gptq_quantize(w, torch.eye(4), scheme(4))
    with pytest.raises(CohwError, match="act_order"):
        gptq_quantize(w, torch.eye(8), scheme(4, 4), act_order=True)
    with pytest.raises(CohwError, match="group size"):
        gptq_quantize(w, torch.eye(8), scheme(4, 3))


def test_gptq_lm_quantizes_every_block_linear_sequentially():
    from cohw_utils.studies.quantization.tinylm import TinyLMConfig, make_model

    model = make_model(TinyLMConfig(vocab_size=320, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=2))
    calib = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    sch = scheme(4, 32)
    weights, info = gptq_lm(model, calib, sch, batch=2)
    lins = block_linears(model)
    assert list(weights) == list(lins) and len(weights) == 14
    for name, q in weights.items():
        assert torch.allclose(lins[name].weight, q.dequantize(), atol=1e-6)
    errs = info["layer_errors"]
    assert sum(e["gptq_error"] for e in errs) < sum(e["rtn_error"] for e in errs)
    assert info["calibration_tokens"] == 128
