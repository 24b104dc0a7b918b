"""The exercise self-checks pass right answers and explain wrong ones."""
from __future__ import annotations

import pytest

from cohw_utils import exercises as ex
from cohw_utils.errors import CohwError


def test_compare_hints_common_mistakes():
    assert ex.compare(100, 100, "x")
    assert ex.compare(101, 100, "x", rel_tol=0.02)
    v = ex.compare(50, 100, "FLOPs")
    assert not v and "MACs" in v.message
    v = ex.compare(800, 100, "bytes")
    assert not v and "bits instead of bytes" in v.message
    v = ex.compare(130, 100, "y")
    assert not v and "1.3x" in v.message
    assert not ex.compare("many", 100, "z")
    assert repr(ex.compare(1, 1, "w")).startswith("correct")


def test_kv_bytes_check():
    assert ex.check_kv_bytes_per_token("llama-2-70b", 327_680)
    v = ex.check_kv_bytes_per_token("llama-2-70b", 163_840)  # forgot V
    assert not v and "K and V" in v.message
    v = ex.check_kv_bytes_per_token("llama-2-70b", 2_621_440)  # MHA: 64 heads instead of 8
    assert not v and "8x" in v.message


def test_decode_flops_check_explains_the_rule_of_thumb():
    from cohw_utils.analyze import analyze

    a = analyze("llama-2-7b", "decode", seq_len=4096)  # attention over 4096 tokens: +16%
    assert ex.check_decode_flops_per_token("llama-2-7b", a.totals()["flops"])
    v = ex.check_decode_flops_per_token("llama-2-7b", 2 * a.parameters)
    assert not v and "embeddings do no FLOPs" in v.message


def test_capstone_reference_and_check():
    ref = ex.capstone_reference()
    assert ref["parameters"] == 46_702_792_704
    assert ref["kv_bytes_per_token"] == 2 * 32 * 8 * 128 * 2  # bf16, 8 KV heads
    assert 12.5e9 < ref["active_parameters"] < 13.5e9     # ~12.9B active of 46.7B
    assert ex.check_capstone({"kv_bytes_per_token": 131_072, "parameters": 46.7e9})
    v = ex.check_capstone({"active_parameters": 46.7e9})
    assert not v and "active_parameters" in v.message
    with pytest.raises(CohwError, match="checkable"):
        ex.check_capstone({"speed": 1})
