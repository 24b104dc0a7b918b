"""CommDebugMode against the tracer, FSDP2 and pipelining traced, and ``predict --tp --pp --dp --ep`` (issue 17).

The small model is gloo_run's 4-layer Llama (hidden 512, 8 heads and 8 KV heads, MLP 1408, vocab
2048, fp32). By hand: a decoder layer holds 4 x 512^2 + 3 x 512 x 1408 + 2 x 512 = 3,212,288
parameters; the rest (embedding, LM head, final norm) 2 x 2048 x 512 + 512 = 2,097,664; in all
14,946,816, 59,787,264 bytes in fp32. Every dim 0 is a multiple of 4, so FSDP2 pads nothing at dp=4.
"""
from __future__ import annotations

import json

import pandas as pd
import pytest

from cohw_utils.core.errors import CohwError
from cohw_utils.core.opclasses import COMMUNICATION
from cohw_utils.spine.shard import comm_debug_counts, per_rank_table
from cohw_utils.views import parallel

LAYER, REST = 3_212_288, 2_097_664


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> str:
    from cohw_utils.studies.parallel.gloo_run import write_config

    return str(write_config(tmp_path_factory.mktemp("small-llama")))


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_tracer_collectives_match_comm_debug_mode(small, tp):
    t = per_rank_table(small, "prefill", tp=tp, seq_len=16, comm_debug=True)
    c = comm_debug_counts(t)
    assert c["match"].all(), c[~c["match"]]
    layers = c[c["scope"].str.startswith("model.layers.")]
    # by hand: 2 all-reduces a layer (o_proj, down_proj), 4 layers; 1 all-gather of the logits
    assert sorted(layers["scope"].unique()) == [f"model.layers.{i}" for i in range(4)]
    assert set(zip(layers["collective"], layers["traced"])) == {("all_reduce", 2)}
    total = c[c["scope"] == "total"].set_index("collective")["comm_debug"].to_dict()
    assert total == {"all_reduce": 8, "all_gather_into_tensor": 1}


def test_comm_debug_counts_needs_the_mode(small):
    with pytest.raises(CohwError, match="comm_debug=True"):
        comm_debug_counts(per_rank_table(small, "prefill", tp=2, seq_len=8))


@pytest.fixture(scope="module")
def fsdp4(small) -> pd.DataFrame:
    from cohw_utils.spine.shard_train import fsdp_step_table

    return fsdp_step_table(small, 4, batch=1, seq_len=8)


def test_fsdp2_step_all_gathers_and_reduce_scatters(fsdp4):
    c = parallel.comm_table(fsdp4)
    assert set(c["group_size"]) == {4}
    fw = c[(c["kind"] == "all_gather") & fsdp4.loc[fsdp4["op_class"] == COMMUNICATION, "pass"].eq("forward").to_numpy()]
    # forward: one all-gather per unit (4 layers, then the root), each the unit's fp32 parameters
    assert sorted(fw["comm_bytes"]) == [4 * REST] + [4 * LAYER] * 4
    assert fw["comm_bytes"].sum() == 59_787_264
    # per rank a ring sends (n - 1)/n of the gathered bytes: the parameter bytes x 3/4
    from cohw_utils.views.collectives import bus_bytes
    assert sum(bus_bytes("all_gather", b, 4) for b in fw["comm_bytes"]) == pytest.approx(59_787_264 * 3 / 4)
    bw = c[(c["kind"] == "all_gather") & fsdp4.loc[fsdp4["op_class"] == COMMUNICATION, "pass"].eq("backward").to_numpy()]
    assert sorted(bw["comm_bytes"]) == [4 * LAYER] * 4     # the layers resharded after forward; the root kept
    rs = c[c["kind"] == "reduce_scatter"]
    assert sorted(rs["comm_bytes"]) == [4 * REST] + [4 * LAYER] * 4   # every unit's fp32 gradients, unsharded


def test_fsdp_comm_view_matches_the_trace(fsdp4):
    units = fsdp4.attrs["fsdp"]["units"]
    assert units["model.layers.0"] == 4 * LAYER and units["<root>"] == 4 * REST
    model = parallel.fsdp_comm(units, 4)
    traced = parallel.comm_table(fsdp4).assign(
        **{"pass": fsdp4.loc[fsdp4["op_class"] == COMMUNICATION, "pass"].to_numpy()})
    by = ["pass", "kind"]
    assert traced.groupby(by)["comm_bytes"].sum().to_dict() == model.groupby(by)["comm_bytes"].sum().to_dict()
    assert model["bus_bytes"].sum() == pytest.approx(3 * 59_787_264 * 3 / 4 - 4 * REST * 3 / 4)


def test_fsdp2_at_full_scale_one_layer_stands_for_all():
    """Llama-2-70B in bf16, FSDP2 over 8 ranks, traced with its embedding, first decoder layer and
    LM head at full width. By hand, one layer gathers q, o 8192^2 each, k, v 8192 x 1024 each, gate, up, down 8192 x 28672 each, two norms of 8192 = 855,654,400
    parameters, 1,711,308,800 bytes (every dim 0 a multiple of 8); the root: embedding and head
    32,000 x 8192 each and the final norm = 524,296,192 parameters. The whole model's step: 81
    forward all-gathers (80 layers and the root), 80 backward ones, 81 reduce-scatters."""
    from cohw_utils.spine.shard_train import fsdp_step_table

    t = fsdp_step_table("llama-2-70b", 8, batch=1, seq_len=8, dtype="bf16", layers=1)
    layer, root = 855_654_400 * 2, 524_296_192 * 2
    assert t.attrs["fsdp"]["units"] == {"model.layers.0": layer, "<root>": root}
    assert t.attrs["fsdp"]["layers"] == 1 and t.attrs["fsdp"]["full_layers"] == 80
    whole = parallel.fsdp_whole_model(t).set_index(["pass", "kind"])
    assert whole.loc[("forward", "all_gather")].tolist() == [81, 80 * layer + root]
    assert whole.loc[("backward", "all_gather")].tolist() == [80, 80 * layer]
    assert whole.loc[("backward", "reduce_scatter")].tolist() == [81, 80 * layer + root]
    formula = parallel.fsdp_comm({**{f"layers.{i}": layer for i in range(80)}, "<root>": root}, 8)
    assert formula.groupby(["pass", "kind"])["comm_bytes"].sum().to_dict() == whole["comm_bytes"].to_dict()
    with pytest.raises(CohwError, match="keep 1..80"):
        fsdp_step_table("llama-2-70b", 8, layers=81)


def test_pipeline_stage_at_full_width_sends_one_hidden_state():
    """Stage 1 of Llama-2-70B over 4 stages holds layers 20-39; traced with one of them, it still
    receives and sends one microbatch's hidden state: 1 x 16 tokens x 8192 x 2 bytes (bf16)."""
    from cohw_utils.spine.shard_train import pipeline_stage_table

    t = pipeline_stage_table("llama-2-70b", 4, 1, microbatches=2, batch=2, seq_len=16, dtype="bf16", layers=1)
    p = t.attrs["pipeline"]
    assert (p["first_layer"], p["layers"], p["traced_layers"]) == (20, 20, 1)
    comm = t[t["op_class"] == COMMUNICATION]
    assert list(comm["op"]) == ["c10d.recv_.default", "c10d.send.default"] * 2
    assert set(comm["comm_bytes"]) == {16 * 8192 * 2} == {p["message_bytes"]}
    with pytest.raises(CohwError, match="keep 1..20"):
        pipeline_stage_table("llama-2-70b", 4, 1, layers=21)


def test_fsdp_unit_bytes_pads_dim0():
    from torch import nn

    from cohw_utils.spine.shard_train import fsdp_unit_bytes

    lin = nn.Linear(6, 10, device="meta")   # weight (10, 6) -> 12 rows at dp=4; bias 10 -> 12
    assert fsdp_unit_bytes(lin, 4) == (12 * 6 + 12) * 4


def test_pipeline_stage_sends_and_receives(small):
    from cohw_utils.spine.shard_train import pipeline_stage_table

    msg = 1 * 16 * 512 * 4     # microbatch of 1 x 16 tokens x hidden 512, fp32
    for stage, ops in ((0, ["c10d.send.default"] * 2), (1, ["c10d.recv_.default", "c10d.send.default"] * 2),
                       (3, ["c10d.recv_.default"] * 2)):
        t = pipeline_stage_table(small, 4, stage, microbatches=2, batch=2, seq_len=16)
        comm = t[t["op_class"] == COMMUNICATION]
        assert list(comm["op"]) == ops
        assert set(comm["comm_bytes"]) == {msg} and set(comm["group_size"]) == {2}
        assert t.attrs["pipeline"]["layers"] == 1


def test_pipeline_step_and_bubble():
    assert parallel.pipeline_step_seconds([1.0, 3.0], 1) == (6.0, 0.5)
    step, bubble = parallel.pipeline_step_seconds([1.0, 2.0, 2.0, 1.0], 5)
    assert step == 16.0 and bubble == pytest.approx(3 / 8)


def test_validate_plan_errors():
    from types import SimpleNamespace as C

    llama = C(num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=32)
    moe = C(num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=32, num_local_experts=8,
            num_experts_per_tok=2)
    parallel.validate_plan(llama, tp=8, pp=4, dp=2, batch=4, microbatches=2)
    for cfg, kw, msg in ((llama, dict(tp=16), "8 KV heads"), (llama, dict(pp=33), "more pipeline stages"),
                         (llama, dict(dp=2, batch=1), "batch-1 decode cannot be data-parallel"),
                         (llama, dict(ep=2, batch=2), "no routed experts"), (moe, dict(ep=3, batch=3), "8 routed experts"),
                         (moe, dict(ep=2, tp=2, batch=2), "tp and ep together"), (moe, dict(ep=4, batch=2), "multiple of dp x ep"),
                         (llama, dict(pp=2, batch=3, microbatches=2), "must divide"),
                         (llama, dict(microbatches=2, batch=2), "without a pipeline"), (llama, dict(tp=0), "tp=0")):
        with pytest.raises(CohwError, match=msg):
            parallel.validate_plan(cfg, **kw)


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_expert_parallelism_traced_from_the_models_own_plan(phase):
    """Mixtral-8x7B at ep=8, global batch 16 of 32-token prompts: each rank holds 2 sequences and
    1 of the 8 experts. By hand, per rank: tokens = 2 x 32 (prefill) or 2 (decode); each of the
    32 MoE layers all-to-alls the (8 ranks x 1 expert) int64 counts (64 bytes), then tokens x k=2
    rows of 4096 bf16 out and the same back; its grouped GEMMs run those rows on one expert's
    weights, so 8 ranks do exactly the unsharded grouped-GEMM FLOPs of the whole batch."""
    t = per_rank_table("mixtral-8x7b-v0.1", phase, ep=8, batch=16, seq_len=32)
    tokens = 2 * (32 if phase == "prefill" else 1)
    comm = t[t["op_class"] == COMMUNICATION]
    assert t.attrs["parallel"]["ep"] == 8 and len(comm) == 32 * 3 and set(comm["group_size"]) == {8}
    layer0 = comm[comm["module"] == "model.layers.0.mlp.experts"]
    assert list(layer0["comm_bytes"]) == [64, tokens * 2 * 4096 * 2, tokens * 2 * 4096 * 2]
    grouped = t[t["op"].str.startswith("aten._grouped_mm")]
    assert {s[1][0] for s in grouped["input_shapes"]} == {1}                     # one expert's weights on the rank
    assert {s[0][0] for s in grouped["input_shapes"]} == {tokens * 2}
    whole = per_rank_table("mixtral-8x7b-v0.1", phase, batch=16, seq_len=32)
    whole_grouped = whole[whole["op"].str.startswith("aten._grouped_mm")]
    assert 8 * grouped["flops"].sum() == whole_grouped["flops"].sum()
    with pytest.raises(CohwError, match="divide the model's 8 routed experts"):
        per_rank_table("mixtral-8x7b-v0.1", phase, ep=3, batch=3, seq_len=32)
    with pytest.raises(CohwError, match="publishes no expert-parallel plan"):
        per_rank_table("llama-2-7b", phase, ep=2, batch=2, seq_len=32)


def test_plan_with_tp_only_is_the_tp_curve():
    from cohw_utils.studies.parallel.plans import predict_plan
    from cohw_utils.studies.parallel.scaling import tp_curve

    kw = dict(batch=2, input_len=16, output_len=8, dtype="bf16")
    p = predict_plan("llama-2-7b", "A100-80GB", "nvlink3-a100", tp=2, weight_fmt="bf16", **kw)
    c = tp_curve("llama-2-7b", "A100-80GB", "nvlink3-a100", [2], weight_fmt="bf16", **kw).loc[2]
    d = p.as_dict()
    for key in ("TTFT (ms)", "TPOT (ms)", "tokens/s", "decode comm (ms)"):
        assert d[key] == pytest.approx(c[key], rel=1e-12)
    assert d["pipeline bubble"] == 0 and d["devices"] == 2


def test_predict_command_pipeline_and_data_parallel(capsys):
    from cohw_utils.cli import EXIT_BAD_INPUT, main
    from cohw_utils.views.collectives import collective_time

    args = ["predict", "llama-2-7b", "--hardware", "A100-80GB", "--input-len", "16", "--output-len", "8"]
    assert main(args + ["--tp", "2", "--pp", "2", "--link", "nvlink3-a100", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["devices"] == 4 and d["pipeline bubble"] == pytest.approx(0.5)
    dec = [s for s in d["stages"] if s["phase"] == "decode"]
    assert [s["layers"] for s in dec] == [16, 16]
    assert d["TPOT (ms)"] == pytest.approx(2 * max(s["total (ms)"] for s in dec))   # (1 + 2 - 1) ticks
    c = {(r["phase"], r["stage"], r["kind"]): r for r in d["collectives"]}
    ar = c[("decode", 0, "all_reduce")]
    assert ar["count"] == 32 and ar["bytes each (largest)"] == 4096 * 2          # 16 layers x 2; 1 token x 4096 x bf16
    assert ar["ms in all"] == pytest.approx(32e3 * collective_time("all_reduce", 8192, 2, "nvlink3-a100"))
    assert c[("decode", 0, "send_recv")]["bytes each (largest)"] == 8192
    # dp: two replicas, each at batch 1, double the tokens/s of one at batch 1
    assert main(args + ["--dp", "2", "--batch", "2", "--json"]) == 0
    two = json.loads(capsys.readouterr().out)
    assert main(args + ["--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert two["tokens/s"] == pytest.approx(2 * one["tokens_per_s"], rel=1e-9) and two["devices"] == 2
    moe = ["predict", "mixtral-8x7b-v0.1", "--hardware", "H100-SXM", "--input-len", "16", "--output-len", "8"]
    assert main(moe + ["--ep", "8", "--batch", "8", "--link", "nvlink4-h100", "--json"]) == 0
    e = json.loads(capsys.readouterr().out)
    a2a = {r["phase"]: r for r in e["collectives"] if r["kind"] == "all_to_all"}
    assert e["devices"] == 8 and a2a["decode"]["count"] == 96 and a2a["decode"]["bytes each (largest)"] == 2 * 4096 * 2
    for bad, msg in ((["--dp", "2"], "batch-1 decode"), (["--ep", "2"], "no routed experts"),
                     (["--pp", "64", "--link", "nvlink3-a100"], "more pipeline stages"),
                     (["--pp", "2"], "--link")):
        assert main(args + bad) == EXIT_BAD_INPUT
        assert msg in capsys.readouterr().err
