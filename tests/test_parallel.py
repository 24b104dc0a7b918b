"""Sharded per-rank op tables (cohw_utils.spine.shard) and the parallel view (cohw_utils.views.parallel).

Hand-computed expectations: Llama-2-70B (hidden 8192, 80 layers, 64 heads, 8 KV heads, vocab
32000, fp16) under TP=8 all-reduces B x T x 8192 x 2 bytes twice per layer; its per-rank GEMM
FLOPs are exactly 1/8 of the unsharded model's.
"""
from __future__ import annotations

import math

import pandas as pd
import pytest

from cohw_utils.core.opclasses import COMMUNICATION, CONTRACTION
from cohw_utils.spine.shard import ShardError, per_rank_table, stage_layers
from cohw_utils.views import parallel


@pytest.fixture(scope="module")
def tables70b() -> dict[str, pd.DataFrame]:
    return {
        "full": per_rank_table("llama-2-70b", "prefill", tp=1, batch=1, seq_len=512),
        "tp8": per_rank_table("llama-2-70b", "prefill", tp=8, batch=1, seq_len=512),
        "tp8-decode": per_rank_table("llama-2-70b", "decode", tp=8, batch=8, seq_len=1024),
    }


def _contraction(t: pd.DataFrame) -> int:
    return int(t.loc[t["op_class"] == CONTRACTION, "flops"].sum())


def test_tp8_per_rank_flops_are_an_eighth(tables70b):
    full, tp8 = _contraction(tables70b["full"]), _contraction(tables70b["tp8"])
    assert tp8 * 8 == pytest.approx(full, rel=0.01)
    assert tp8 * 8 == full  # every GEMM and attention head splits evenly: exact


def test_tp8_all_reduce_bytes_per_layer(tables70b):
    for key, tokens in (("tp8", 1 * 512), ("tp8-decode", 8 * 1)):
        t = tables70b[key]
        comm = t[t["op_class"] == COMMUNICATION]
        ar = comm[comm["op"].str.startswith("_c10d_functional.all_reduce")]
        assert len(ar) == 2 * 80  # after attention's o_proj and the MLP's down_proj, every layer
        assert set(ar["comm_bytes"]) == {tokens * 8192 * 2}
        assert set(ar["group_size"]) == {8}
        # the LM head is column-parallel with its logits gathered: one all-gather of the logits
        ag = comm[comm["op"].str.contains("all_gather")]
        assert len(ag) == 1 and ag["comm_bytes"].iloc[0] == tokens * 32000 * 2
    assert tables70b["full"]["op_class"].eq(COMMUNICATION).sum() == 0
    assert math.isnan(tables70b["tp8"].loc[tables70b["tp8"]["op_class"] == CONTRACTION, "comm_bytes"].iloc[0])


def test_tp8_local_shapes(tables70b):
    t = tables70b["tp8"]
    q = t[(t["module"] == "model.layers.0.self_attn.q_proj") & (t["op"] == "aten.mm.default")]
    assert q["input_shapes"].iloc[0] == ((512, 8192), (8192, 1024))  # 64 heads / 8 = 8 heads of 128
    k = t[(t["module"] == "model.layers.0.self_attn.k_proj") & (t["op"] == "aten.mm.default")]
    assert k["input_shapes"].iloc[0] == ((512, 8192), (8192, 128))  # 8 KV heads / 8 = 1


def test_pipeline_stages_split_layers_and_send_hidden_states(tables70b):
    assert [len(stage_layers(80, 3, s)) for s in range(3)] == [27, 27, 26]
    assert list(stage_layers(80, 4, 1)) == list(range(20, 40))
    stages = [per_rank_table("llama-2-70b", "prefill", pp=4, stage=s, batch=1, seq_len=512) for s in range(4)]
    assert sum(_contraction(t) for t in stages) == _contraction(tables70b["full"])
    hidden_bytes = 512 * 8192 * 2
    ops = [sorted(t.loc[t["op_class"] == COMMUNICATION, "op"]) for t in stages]
    assert ops == [["c10d.send.default"], ["c10d.recv_.default", "c10d.send.default"],
                   ["c10d.recv_.default", "c10d.send.default"], ["c10d.recv_.default"]]
    assert {b for t in stages for b in t.loc[t["op_class"] == COMMUNICATION, "comm_bytes"]} == {hidden_bytes}
    assert stages[1].attrs["parallel"]["first_layer"] == 20


def test_bad_plans_say_what_to_change():
    with pytest.raises(ShardError, match="8 KV heads"):
        per_rank_table("llama-2-70b", "decode", tp=16, seq_len=64)
    with pytest.raises(ShardError, match="tp=0"):
        per_rank_table("llama-2-70b", tp=0)
    with pytest.raises(ShardError, match="stage"):
        stage_layers(80, 4, 4)
    with pytest.raises(ShardError, match="more stages"):
        stage_layers(2, 4, 0)


def test_zero_stages_hand_computed():
    # 7.5 B parameters over 64 data-parallel ranks, mixed-precision Adam (2 + 2 + 12 bytes)
    p = 7.5e9
    assert parallel.training_state_bytes(p, 64, 0)["total"] == pytest.approx(120e9)
    assert parallel.training_state_bytes(p, 64, 1)["total"] == pytest.approx(30e9 + 90e9 / 64)
    assert parallel.training_state_bytes(p, 64, 2)["total"] == pytest.approx(15e9 + 105e9 / 64)
    assert parallel.training_state_bytes(p, 64, 3)["total"] == pytest.approx(120e9 / 64)
    with pytest.raises(Exception, match="ZeRO stages"):
        parallel.training_state_bytes(p, 64, 4)


def test_activation_bytes_korthikanti():
    # GPT-3 175B layer: s=2048, b=1, h=12288, a=96, t=8: 5as/(ht) = 10, so sbh (10 + 3 + 10) = 23 sbh
    sbh = 2048 * 12288
    assert parallel.activation_bytes(2048, 1, 12288, 96, tp=8, mode="tp") == pytest.approx(23 * sbh)
    assert parallel.activation_bytes(2048, 1, 12288, 96, tp=8, mode="tp+sp") == pytest.approx(sbh / 8 * 114)
    assert parallel.activation_bytes(2048, 1, 12288, 96, tp=8, mode="selective+sp") == pytest.approx(34 * sbh / 8)
    assert parallel.activation_bytes(2048, 1, 12288, 96, layers=96, mode="full") == pytest.approx(2 * sbh * 96)
    with pytest.raises(Exception, match="mode"):
        parallel.activation_bytes(1, 1, 1, 1, mode="sometimes")


def test_pipeline_bubble_and_kv_per_rank():
    assert parallel.pipeline_bubble(4, 1) == pytest.approx(3 / 4)
    assert parallel.pipeline_bubble(4, 13) == pytest.approx(3 / 16)
    assert parallel.pipeline_bubble(1, 8) == 0
    # Llama-2-70B's KV: 80 layers x 8 KV heads x 128 x 2 (K, V) x 2 bytes = 327,680 B per token
    assert parallel.kv_bytes_per_rank(327_680, 4096, tp=8) == 327_680 * 4096 / 8


def test_rank_seconds_adds_or_overlaps_the_collectives(tables70b):
    from cohw_utils.hardware import get_hardware
    from cohw_utils.hardware.interconnects import get_interconnect
    from cohw_utils.views.collectives import collective_time

    hw, link = get_hardware("H100-SXM"), get_interconnect("nvlink4-h100")
    t = tables70b["tp8-decode"]
    serial = parallel.rank_seconds(t, hw, link)
    # by hand: 160 all-reduces of 8 x 8192 x 2 bytes and one all-gather of 8 x 32000 x 2, over 8 ranks
    by_hand = 160 * (14 * 2e-6 + 1.75 * 131072 / 450e9) + (7 * 2e-6 + 0.875 * 512000 / 450e9)
    assert serial.comm_s == pytest.approx(by_hand, rel=1e-9)
    assert serial.comm_s == pytest.approx(160 * collective_time("all_reduce", 131072, 8, link)
                                          + collective_time("all_gather", 512000, 8, link), rel=1e-12)
    assert serial.total_s == pytest.approx(serial.compute_s + serial.comm_s)
    overlapped = parallel.rank_seconds(t, hw, link, overlap=True)
    assert overlapped.total_s == pytest.approx(max(serial.compute_s, serial.comm_s))
    with pytest.raises(Exception, match="link="):
        parallel.rank_seconds(t, hw)


def test_host_link_fit_recovers_a_known_link():
    from cohw_utils.studies.parallel.host_check import ddp_buckets, fit_link

    sizes = [4096 * 4**k for k in range(7)]
    seconds = [2 * 50e-6 + s / 2e9 for s in sizes]          # 2 ranks: 2 steps of 50 us, S / B at 2 GB/s
    link = fit_link("all_reduce", sizes, seconds, n=2, name="synthetic")
    assert link.latency_s == pytest.approx(50e-6, rel=1e-6) and link.bw_per_dir == pytest.approx(2e9, rel=1e-6)
    mib = 2**20
    assert ddp_buckets(60 * mib, 25 * mib) == [mib, 25 * mib, 25 * mib, 9 * mib]
    assert ddp_buckets(mib // 2, 25 * mib) == [mib // 2]


def test_predict_command_takes_a_tensor_parallel_degree(capsys):
    import json

    from cohw_utils.cli import EXIT_BAD_INPUT, main

    assert main(["predict", "llama-2-7b", "--hardware", "A100-80GB", "--tp", "2"]) == EXIT_BAD_INPUT
    assert "--link" in capsys.readouterr().err
    assert main(["predict", "llama-2-7b", "--hardware", "A100-80GB", "--tp", "2", "--link", "nvlink3-a100",
                 "--input-len", "16", "--output-len", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tp"] == 2 and out["decode comm (ms)"] > 0 and out["tokens/s per device"] == pytest.approx(out["tokens/s"] / 2)


def test_a_c10d_collective_reads_its_group_size_from_the_process_group_object():
    import torch
    import torch.distributed as dist
    from cohw_utils.spine.shard import collective_rows, fake_world
    from cohw_utils.spine.trace import trace

    with fake_world(4):
        x = torch.ones(8, 8)
        table = trace(lambda: dist.all_reduce(x), phase="x")   # c10d.allreduce_ passes a ScriptObject group
    rows = collective_rows(table)
    assert table.attrs["collectives"][0]["group_size"] == 4
    assert rows.loc[rows.op.str.startswith("c10d.allreduce_"), "group_size"].tolist() == [4]
