"""Fusion: bytes before and after, the compiled chain, the allocator control, ReLU attention."""
from __future__ import annotations

import pytest
import torch

from cohw_utils.studies.performance import fusion
from cohw_utils.core.errors import CohwError


def test_bytes_before_is_the_unfused_count():
    T, F = 64, 256
    x, b = torch.randn(T, F), torch.randn(F)
    before, kernels = fusion.bytes_before(fusion.bias_gelu, (x, b))
    # add: read x and b, write T*F; gelu: read T*F, write T*F (fp32)
    assert kernels == 2 and before == 4 * (T * F + F + T * F) + 4 * (2 * T * F)


def test_reference_bytes_fused_io_is_inputs_plus_outputs():
    ref = fusion.reference_bytes(smoke=True)
    s = fusion.chain_sizes(smoke=True)
    row = ref.loc["two residual adds"]
    act = 4 * s["tokens"] * s["hidden"]
    assert row["bytes before"] == 6 * act and row["fused I/O bytes"] == 4 * act
    assert row["saved %"] == pytest.approx(100 / 3)
    assert ref.loc["layer norm alone", "eager kernels"] == 1
    assert ref.loc["RMSNorm (LlamaRMSNorm)", "eager kernels"] == 6
    assert (ref["fused I/O bytes"] <= ref["bytes before"]).all()


def test_compiled_chain_is_one_kernel_moving_its_io():
    x, b = torch.randn(32, 128), torch.randn(128)
    compiled, info = fusion.compile_chain(fusion.bias_gelu, (x, b))
    assert info["kernels"] == 1
    assert info["bytes_after"] == info["io_bytes"] == 4 * (32 * 128 + 128 + 32 * 128)
    torch.testing.assert_close(compiled(x, b), fusion.bias_gelu(x, b))


def test_allocator_control_in_process_and_subprocess():
    msg = fusion.set_allocator("retain")
    try:
        assert "mallopt" in msg or "not Linux" in msg
        if "mallopt" in msg:
            assert fusion.allocator_mode() == "retain"
    finally:
        fusion.set_allocator("default")
    assert fusion.allocator_mode() == "default"
    with pytest.raises(CohwError, match="allocator mode"):
        fusion.set_allocator("jemalloc")
    # a fresh process started with the environment variables sees them
    assert fusion.run_in_subprocess("studies.performance.fusion.allocator_mode", allocator="retain") == "retain"
    assert fusion.run_in_subprocess([("studies.performance.fusion.allocator_mode", {}), ("studies.performance.fusion.chain_sizes", {"smoke": True})],
                                    allocator="default") == ["default", fusion.chain_sizes(True)]
    with pytest.raises(CohwError, match="module.function"):
        fusion.run_in_subprocess("os.path.join")


def test_relu_attention_is_relu_over_length():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 4, generator=g) for _ in range(3))
    scores = q @ k.transpose(-1, -2) / 2.0
    torch.testing.assert_close(fusion.attention(q, k, v, "relu"), (torch.relu(scores) / 8) @ v)
    torch.testing.assert_close(fusion.attention(q, k, v, "softmax"), torch.softmax(scores, -1) @ v)
    with pytest.raises(CohwError, match="softmax"):
        fusion.attention(q, k, v, "sigmoid")
    study = fusion.relu_attention_study(batch=1, heads=2, seq=16, head_dim=8, repeats=1, warmup=0)
    assert study.loc["softmax", "rel_l2_change"] == 0 and study.loc["relu", "rel_l2_change"] > 0
    assert study.loc["softmax", "cosine_to_softmax"] == pytest.approx(1.0)
