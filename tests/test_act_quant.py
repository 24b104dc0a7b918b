"""Activation quantization (W8A8, SmoothQuant, FP8): the rounding, SmoothQuant's migration, the methods."""
from __future__ import annotations

import math

import pytest
import torch

from cohw_utils.core.errors import CohwError
from cohw_utils.studies.quantization import activation as act
from cohw_utils.studies.quantization import methods
from cohw_utils.studies.quantization.tinylm import TinyLMConfig, make_model, window_nll


def _tiny_model(layers=2):
    return make_model(TinyLMConfig(vocab_size=320, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=layers, num_attention_heads=2))


def test_int8_per_token_by_hand():
    # amax 2.54 -> scale 0.02; -1.0 -> code -50; 0.061 -> 3.05 -> code 3 -> 0.06
    x = torch.tensor([[2.54, -1.0, 0.061], [0.0, 0.0, 0.0]], dtype=torch.float64)
    out = act.fake_int8_per_token(x)
    assert torch.allclose(out[0], torch.tensor([2.54, -1.0, 0.06], dtype=torch.float64), atol=1e-12)
    assert torch.equal(out[1], x[1])                       # an all-zero token stays zero (no 0/0)


def test_fp8_per_tensor_rounding_by_hand():
    t = torch.tensor([1.0, 0.4])
    # e4m3: scale 1/448; 0.4 * 448 = 179.2, between 176 and 192 (step 16 in [128, 256)) -> 176
    assert act.fake_fp8(t, "e4m3").tolist() == pytest.approx([1.0, 176 / 448])
    # e5m2: scale 1/57344; 0.4 * 57344 = 22937.6, between 20480 and 24576 (step 4096) -> 24576
    assert act.fake_fp8(t, "e5m2").tolist() == pytest.approx([1.0, 24576 / 57344])
    assert act.fp8_max("e4m3") == 448 and act.fp8_max("e5m2") == 57344
    with pytest.raises(CohwError, match="unknown fp8 format"):
        act.fake_fp8(t, "e3m4")


def test_fp8_weight_bytes():
    codes, s = act.fp8_per_tensor(torch.randn(4, 8), "e4m3")
    w = act.FP8Weight(codes, s, "e4m3")
    assert w.nbytes == 32 + 4 and w.bits_per_weight == 9.0 and w.shape == (4, 8)


def test_act_quant_linear_rounds_its_input_then_multiplies():
    lin = torch.nn.Linear(3, 2, bias=True)
    q = act.ActQuantLinear(lin, "int8-token")
    x = torch.tensor([[2.54, -1.0, 0.061]])
    expected = torch.nn.functional.linear(torch.tensor([[2.54, -1.0, 0.06]]), lin.weight, lin.bias)
    assert torch.allclose(q(x), expected, atol=1e-6)
    with pytest.raises(CohwError, match="unknown activation format"):
        act.ActQuantLinear(lin, "int4-token")


def test_outlier_ratio_by_hand():
    m = {"model.layers.0.self_attn.q_proj": torch.tensor([1.0, 2.0, 3.0, 40.0]),
         "model.layers.0.self_attn.k_proj": torch.tensor([1.0, 2.0, 3.0, 40.0]),   # same input: listed once
         "model.layers.0.mlp.down_proj": torch.tensor([1.0, 1.0, 1.0, 1.0])}
    t = act.activation_outliers(m)
    assert list(t["input of"]) == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]
    assert list(t["max/median"]) == [20.0, 1.0]            # torch's median of 4 values is the lower one, 2


def test_smoothquant_keeps_the_function_and_balances_maxima():
    torch.manual_seed(0)
    model = _tiny_model().eval()
    ids = torch.randint(0, 320, (4, 16))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    amax = act.activation_maxima(model, ids)
    scales = act.smooth_lm(model, amax, alpha=0.5)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-4)       # x/s times s*W: same function
    assert set(scales) == {f"model.layers.{i}.{p}" for i in range(2) for p in
                           ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")}
    # alpha = 0.5: s = sqrt(max|X| / max|W|), so afterwards max|X_j| = max|W_j| = sqrt(max|X| max|W|)
    amax2 = act.activation_maxima(model, ids)
    attn = model.model.layers[0].self_attn
    w_max = torch.stack([attn.q_proj.weight.abs().amax(0), attn.k_proj.weight.abs().amax(0),
                         attn.v_proj.weight.abs().amax(0)]).amax(0)
    assert torch.allclose(amax2["model.layers.0.self_attn.q_proj"], w_max, rtol=1e-4)
    with pytest.raises(CohwError, match="alpha"):
        act.smooth_lm(model, amax, alpha=1.5)


def test_activation_methods_parse_quantize_and_count_bytes():
    model = _tiny_model()
    ids = torch.randint(0, 320, (4, 16))
    for name in methods.ACT_METHODS:
        assert methods.parse_method(name).quantizes_activations
    with pytest.raises(CohwError, match="needs calibration"):
        methods.quantize_lm(model, "smoothquant-w8a8")
    w8 = methods.quantize_lm(model, "w8a8")
    rtn = methods.quantize_lm(model, "rtn-int8")
    assert w8.weight_bytes() == rtn.weight_bytes()            # same int8 per-channel weights
    assert all(isinstance(m, act.ActQuantLinear) for m in methods.block_linears(w8.model).values())
    fp8 = methods.quantize_lm(model, "fp8-e4m3")
    n = fp8.linear_params()
    assert fp8.linear_bytes() == n + 4 * 14                    # 1 byte per weight + one fp32 scale per matrix
    sq = methods.quantize_lm(model, "smoothquant-w8a8", calib=ids)
    assert sq.info["alpha"] == 0.5 and len(sq.info["smooth_scale"]) == 10
    # fake-quant W8A8 moves perplexity a little on a random model; finite, within a few percent
    base = window_nll(model, ids)
    for q in (w8, fp8, sq):
        d = float((window_nll(q.model, ids) - base).mean())
        assert math.isfinite(d) and abs(d) < 0.05
    km, used = w8.kernel_model()
    assert list(used.values()) == [14] and "emulation" in next(iter(used))


def test_weight_bit_floor_picks_the_narrowest_format_within_the_upper_bound():
    import pandas as pd

    from cohw_utils.studies.quantization.results import weight_bit_floor

    t = pd.DataFrame({"method": ["fp32", "rtn-int8", "w8a8", "rtn-int4-g128", "gptq-int4-g128", "gptq-int3-g128"],
                      "bits_per_weight": [32, 8.05, 8.05, 4.156, 4.156, 3.156],
                      "delta_pct": [0, 0.01, 0.2, 0.4, 0.3, 1.2],
                      "delta_pct_hi": [0, 0.05, 0.4, 0.95, 0.6, 1.6]})
    f = weight_bit_floor(t, 1.0)
    # int3 fails (upper bound 1.6% > 1%); two int4 g128 pass at 4.156 bits: the tighter bound wins; w8a8 is not weight-only
    assert (f["method"], f["bits"], f["bits_per_weight"]) == ("gptq-int4-g128", 4, 4.156)
    assert f["passed"] == ["gptq-int4-g128", "rtn-int4-g128", "rtn-int8", "fp32"]
    assert f["narrowest_tested"] == "gptq-int3-g128" and not f["bounded_by_table"]
    f2 = weight_bit_floor(t, 2.0)
    assert f2["method"] == "gptq-int3-g128" and f2["bounded_by_table"]   # nothing narrower was measured
    assert weight_bit_floor(t, 0.0)["bits"] == 32                 # only fp32 itself is within 0%
    with pytest.raises(CohwError, match="tolerance_pct"):
        weight_bit_floor(t, -1)


def test_phases_reads_the_measured_llm_floor(tmp_path):
    import json

    from cohw_utils.studies.codesign import phases

    assert phases.measured_weight_floor(tmp_path / "absent.json") is None
    p = tmp_path / "floors.json"
    p.write_text(json.dumps({"llm": {"bits": 3}}))
    assert phases.measured_weight_floor(p)["llm"]["bits"] == 3
    p.write_text(json.dumps({"llm": {"bits": "four"}}))
    with pytest.raises(CohwError, match="llm.bits"):
        phases.measured_weight_floor(p)
    # the floors in use: the LLM one measured when the file exists, every other domain cited
    assert phases.WEIGHT_BITS_FLOOR.keys() == phases.CITED_WEIGHT_BITS_FLOOR.keys()
    for d, bits in phases.WEIGHT_BITS_FLOOR.items():
        if d != "llm":
            assert bits == phases.CITED_WEIGHT_BITS_FLOOR[d] and phases.WEIGHT_BITS_FLOOR_SOURCE[d].startswith("cited")
    rec = phases.measured_weight_floor()
    if rec is not None:
        assert phases.WEIGHT_BITS_FLOOR["llm"] == rec["llm"]["bits"]
        assert phases.WEIGHT_BITS_FLOOR_SOURCE["llm"].startswith("measured: " + rec["llm"]["method"])
