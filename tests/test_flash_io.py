"""FlashAttention IO: the math path and tiled-kernel byte counts by hand, their scaling with
the on-chip memory, bad input, and a small measured comparison (its structure, not its speed)."""
from __future__ import annotations

import pytest
import torch

from cohw_utils.core.errors import CohwError
from cohw_utils.studies.performance import flash_io as fio


def test_math_path_bytes_by_hand():
    # N=4, d=2, fp32: reads Q,K (2Nd=16) + S (N^2=16) + P and V (16+8) = 56 elements;
    # writes S, P (2 x 16) + O (8) = 40 elements; x 4 bytes
    m = fio.math_io(4, 2, dtype="fp32")
    assert (m.reads, m.writes, m.total) == (224, 160, 384)
    assert fio.math_io(4, 2, heads=3, batch=2, dtype="bf16").total == 6 * 2 * (56 + 40)


def test_flash_bytes_by_hand_in_both_loop_orders():
    # N=8, d=2, fp32, 64 B on chip = 16 elements -> blocks of 16 // (4 x 2) = 2 rows, 4 passes
    q = fio.flash_io(8, 2, dtype="fp32", sram_bytes=64)
    assert (q.block_rows, q.passes) == (2, 4)
    assert q.reads == 4 * (8 * 2 + 2 * 8 * 2 * 4)       # Q once + K,V once per query block
    assert q.writes == 4 * 8 * 2 + 4 * 8                 # O once + fp32 logsumexp
    kv = fio.flash_io(8, 2, dtype="fp32", sram_bytes=64, loop_order="kv_outer")
    assert (kv.block_rows, kv.block_cols, kv.passes) == (2, 2, 4)   # Algorithm 1: B_c = ceil(M/4d), B_r = min(B_c, d)
    assert kv.reads == 4 * 2 * 16 + 4 * (4 * 2 * 16 + 4 * 2 * 8)   # K,V once; per K/V block: Q, O and l, m
    assert kv.writes == 4 * (4 * 16 + 4 * 2 * 8)                   # per K/V block: O and l, m


@pytest.mark.parametrize("order", fio.LOOP_ORDERS)
def test_flash_bytes_fall_as_the_on_chip_memory_grows(order):
    sizes = [2**k for k in range(10, 22)]                # 1 KiB .. 2 MiB
    totals = [fio.flash_io(4096, 64, 8, 1, "fp16", s, order).total for s in sizes]
    assert all(b <= a for a, b in zip(totals, totals[1:])) and totals[-1] < totals[0] / 10
    assert totals[-1] < fio.math_io(4096, 64, 8, 1, "fp16").total            # and below the math path
    # one block covering the sequence: every input read once, the output written once
    whole = fio.flash_io(256, 64, dtype="fp16", sram_bytes=2 * 4 * 64 * 256, loop_order="q_outer")
    assert whole.passes == 1 and whole.reads == 2 * 3 * 256 * 64


def test_io_table_rows_and_ratio():
    t = fio.io_table([512, 2048], head_dim=64, heads=2, dtype="fp16", sram_bytes=fio.A100_SRAM_BYTES)
    assert list(t.index) == [512, 2048]
    assert t.loc[512, "math_MB"] == pytest.approx(fio.math_io(512, 64, 2, 1, "fp16").total / 1e6)
    assert t.loc[2048, "ratio"] == pytest.approx(t.loc[2048, "math_MB"] / t.loc[2048, "flash_MB"])
    assert t.loc[2048, "ratio"] > t.loc[512, "ratio"]     # the N^2 terms grow faster than the flash passes


def test_bad_input_raises():
    with pytest.raises(CohwError, match="seq_len must be a positive integer"):
        fio.math_io(0, 64)
    with pytest.raises(CohwError, match="head_dim"):
        fio.flash_io(128, 64.0)
    with pytest.raises(CohwError, match="fewer than the 4 x head_dim"):
        fio.flash_io(128, 64, dtype="fp16", sram_bytes=256)
    with pytest.raises(CohwError, match="sram_bytes must be a positive"):
        fio.flash_io(128, 64, sram_bytes=-1)
    with pytest.raises(CohwError, match="loop_order"):
        fio.flash_io(128, 64, loop_order="diagonal")
    with pytest.raises(CohwError):
        fio.math_io(128, 64, dtype="fp7")


def test_materialized_bytes_sees_the_score_matrix():
    q, k, v = (torch.randn(1, 2, 64, 8) for _ in range(3))
    out = fio.materialized_bytes(lambda: q @ k.transpose(-1, -2))
    assert out["allocated"] == 2 * 64 * 64 * 4 and out["peak_live"] == out["allocated"]
    m = fio.measure_sdpa((64,), head_dim=8, heads=2, repeats=1, warmup=0)
    r = m.loc[64]
    assert r["math_alloc_MiB"] * 2**20 >= 2 * (2 * 64 * 64 * 4)    # S and P, at least
    assert r["flash_alloc_MiB"] * 2**20 < 2 * 64 * 64 * 4          # no N^2 buffer: O and the logsumexp
    assert r["flash_ops"] == 1 and r["max_abs_diff"] < 1e-5
    assert r["speedup"] == pytest.approx(r["math_ms"] / r["flash_ms"])
