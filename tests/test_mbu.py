"""MBU: bytes per token by hand, the published numbers through our formula, the decode bound,
and a decode measurement on a tiny random model (bandwidth faked: it is not what is tested)."""
from __future__ import annotations

import json

import pytest
import torch

from cohw_utils.studies.performance import mbu
from cohw_utils import workloads
from cohw_utils.core.errors import CohwError
from cohw_utils.hardware import get_hardware

LLAMA7B_PARAMS = 6_738_415_616
EMBEDDING = 32_000 * 4096


def test_weights_read_per_token():
    model = workloads.build("llama-2-7b").model           # meta, fp16
    assert mbu.weight_bytes_read(model) == 2 * (LLAMA7B_PARAMS - EMBEDDING)   # the lm_head is not tied
    assert mbu.weight_bytes_read(model, 1) == LLAMA7B_PARAMS - EMBEDDING
    tied = torch.nn.Module()
    emb = torch.nn.Embedding(10, 4)
    tied.get_output_embeddings = lambda: emb             # an output head sharing the table reads all of it
    tied.emb = emb
    assert mbu.weight_bytes_read(tied) == 10 * 4 * 4


def test_decode_bytes_and_mbu_by_hand():
    d = mbu.decode_bytes(1000, 10, context=99, batch=2)
    assert d == {"weights": 1000.0, "kv_cache": 2 * 10 * 100.0, "total": 3000.0}
    assert mbu.mbu(50, 3000, 1e6) == pytest.approx(0.15)
    with pytest.raises(CohwError):
        mbu.mbu(1, 1, 0)


def test_published_numbers_through_our_formula():
    t = mbu.published_mbu().set_index(["model", "dtype"])
    base = t.loc[("Llama-2-7B", "bf16")]
    # gpt-fast: 104.9 tok/s on an A100-80GB; its own bandwidth figure is 1397.31 GB/s = 68.5% of 2039
    assert base["their_MBU_%"] == pytest.approx(100 * 1397.31 / 2039)
    assert 67 < base["our_MBU_%"] < 70
    assert base["our_bytes_per_token_GB"] == pytest.approx((2 * (LLAMA7B_PARAMS - EMBEDDING) + 524_288 * 129) / 1e9)
    assert 60 < t.loc[("Llama-2-70B", "int8"), "our_MBU_%"] < 70
    pub = mbu.load_published()
    kv = pub[(pub.metric == "kv_cache") & (pub.model == "Llama-2-70B")].set_index("batch")["value"]
    per_token = workloads.kv_cache_bytes_per_token(workloads.CONFIG_DIR / "llama-2-70b", 2)
    for batch, gib in kv.items():                          # Databricks' Table 3, at 1024 tokens
        assert per_token * 1024 * batch / 2**30 == pytest.approx(gib, rel=0.01)


def test_decode_bound():
    a100 = get_hardware("A100-80GB")
    b = mbu.decode_bound("llama-2-7b", a100, batch=1, context=2048)
    bytes_ = 2 * (LLAMA7B_PARAMS - EMBEDDING) + 524_288 * 2049
    assert b["bytes"] == bytes_ and b["bound"] == "memory" and b["fits"]
    assert b["tokens_per_s"] == pytest.approx(2039e9 / bytes_)      # ~143 tok/s: gpt-fast's 104.9 is 73% of it
    assert not mbu.decode_bound("llama-2-70b", a100)["fits"]         # 138 GB of fp16 weights
    t = mbu.decode_bound_table(chips=[a100, get_hardware("H100-SXM")], batches=(1, 64))
    assert len(t) == 3 * 2 * 2
    per_seq = t.set_index(["workload", "hardware", "batch"])["per_sequence_tokens_per_s"]
    assert per_seq[("llama-2-7b", "H100-SXM", 64)] < per_seq[("llama-2-7b", "H100-SXM", 1)]


def _tiny_config(tmp_path):
    cfg = json.loads(mbu.MBU_CONFIG.read_text())
    cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=256)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def test_random_llm_and_decode_run(tmp_path, monkeypatch):
    path = _tiny_config(tmp_path)
    model = mbu.build_random_llm(path, "fp32")
    assert torch.isfinite(model.model.rotary_emb.inv_freq).all()       # rebuilt after to_empty
    fake = {"read_bw": 10e9, "mem_bw": 8e9, "mem_bw_write_allocate": 12e9, "array_bytes": 2**26, "reason": None,
            "kernels": {"read": {"bytes_per_call": 2e8, "seconds": [0.02, 0.04],
                                 "bytes_per_s": {"best": 10e9, "median": 7.5e9, "min": 5e9, "max": 10e9}}}}
    monkeypatch.setattr(mbu.probe, "measure_bandwidth", lambda llc, quick=False: fake)
    run = mbu.mbu_benchmark(path, "fp32", prompt_len=8, new_tokens=4, gemv=False)
    assert run.new_tokens == 4 and run.timing.repeats == 4 and run.prompt_len == 10   # 2 warm-up tokens
    kv = 2 * 2 * 2 * 16 * 4                                             # K,V x layers x kv heads x head_dim x fp32
    w = mbu.weight_bytes_read(model)
    assert run.kv_bytes_per_token == kv
    assert run.bytes_per_token == pytest.approx(w + kv * (10 + 1.5 + 1))   # mean context 11.5, +1 written
    # the denominator is the read kernel (2e8 B in 0.02 s = 10 GB/s), not copy/add
    assert run.bw_before.best == 10e9 and run.bw_before.median == 7.5e9 and run.bw_before.min == 5e9
    assert run.bw_before.others == {mbu.COPY_STREAM: 8e9, mbu.COPY_WRITE_ALLOCATE: 12e9}
    s = run.summary()
    assert s["MBU_vs_before_best_%"] == pytest.approx(100 * run.achieved_bw / 10e9)
    assert s["MBU_vs_copy_before_%"] == pytest.approx(100 * run.achieved_bw / 8e9)     # beside it, labelled
    assert s["MBU_vs_copy_write_allocate_before_%"] == pytest.approx(100 * run.achieved_bw / 12e9)
    assert s["read_bw_before_GBps"] == 10.0 and s["copy_bw_before_GBps"] == 8.0
    assert s["tokens_per_s"] == pytest.approx(1 / run.timing.median)
    assert "copy/add (STREAM bytes) 8.0 GB/s" in run.bw_before.describe()
    monkeypatch.setattr(mbu.probe, "measure_bandwidth",
                        lambda llc, quick=False: {"read_bw": None, "reason": "cannot allocate", "kernels": {}})
    with pytest.raises(CohwError, match="read bandwidth: cannot allocate"):
        mbu.bandwidth_now(quick=True)
    monkeypatch.setattr(mbu.probe, "measure_bandwidth", lambda llc, quick=False: fake)
    with pytest.raises(CohwError):
        mbu.measure_decode(model, prompt_len=0)
    before = torch.get_num_threads()
    one = mbu.mbu_benchmark(path, "fp32", prompt_len=4, new_tokens=2, model=model, threads=1, gemv=False)
    assert one.extra["threads"] == 1 and torch.get_num_threads() == before   # set for the run, then restored
    with pytest.raises(CohwError, match="threads"):
        mbu.mbu_benchmark(path, "fp32", model=model, threads=0)


def test_gemv_ceiling(monkeypatch):
    monkeypatch.setattr(mbu.probe, "detect_llc", lambda: (2**20, "test"))
    g = mbu.measure_gemv_bandwidth("bf16", quick=True, repeats=3)
    assert g.array_bytes == 64 * 2**20 and g.calls == 3 and "bf16 GEMV" in g.kind
    assert g.min <= g.median <= g.best == g.max > 0


def test_gpu_capture_absent_is_none(tmp_path):
    assert mbu.gpu_mbu_capture(tmp_path / "nothing.json") is None
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(CohwError, match="capture_gpu_mbu"):
        mbu.gpu_mbu_capture(bad)


def test_compiled_decode_matches_eager_tokens_and_counts_the_static_cache(tmp_path):
    """The gpt-fast-style step generates the same greedy tokens as eager decoding, and its KV
    bytes are counted at the static cache's full length (its attention reads every slot)."""
    path = _tiny_config(tmp_path)
    model = mbu.build_random_llm(path, "fp32")
    eager = mbu.measure_decode(model, prompt_len=6, new_tokens=3, warmup=1)
    comp = mbu.measure_decode(model, prompt_len=6, new_tokens=3, warmup=1, compiled=True)
    assert eager.extra["mode"] == "eager" and comp.extra["mode"] == "compiled"
    assert comp.extra["compile_s"] > 0
    assert comp.extra["tokens"] == eager.extra["tokens"] and len(comp.extra["tokens"]) == 4
    kv, w = comp.kv_bytes_per_token, mbu.weight_bytes_read(model)
    assert comp.bytes_per_token == pytest.approx(w + kv * (6 + 1 + 3))   # 10 slots, every step
    assert eager.bytes_per_token < comp.bytes_per_token
    again = mbu.measure_decode(model, prompt_len=6, new_tokens=3, warmup=1, compiled=True)  # a second run compiles anew
    assert again.extra["tokens"] == comp.extra["tokens"]
    with pytest.raises(CohwError, match="warmup"):
        mbu.measure_decode(model, prompt_len=6, new_tokens=3, warmup=0, compiled=True)


def test_decode_roofline_points_sit_under_the_bandwidth_roof_at_batch_one():
    h100 = get_hardware("H100-SXM")
    pts = mbu.decode_roofline_points([h100], "llama-2-7b", batches=(1, 256), context=2048)["H100-SXM"]
    assert list(pts["label"]) == ["b=1", "b=256"]
    one, many = pts.iloc[0], pts.iloc[1]
    assert 0.5 < one["intensity"] < 2.0                      # ~2 FLOPs per 2-byte weight read
    assert one["attainable"] == pytest.approx(h100.mem_bw * one["intensity"])
    assert many["intensity"] > 10 * one["intensity"]


def test_mbu_bars_rows_and_kinds():
    class Run:
        model, dtype = "tiny", "bf16"

        def mbu(self):
            return 0.5

        def mbu_vs(self, other):
            return 0.4 if other == mbu.COPY_STREAM else float("nan")

    published = mbu.published_mbu()
    pub = mbu.load_published()
    reported = pub[pub["metric"] == "mbu"]
    bars = mbu.mbu_bars({"eager": Run()}, None, published, reported)
    assert list(bars.columns) == ["label", "mbu_pct", "kind"]
    assert len(bars) == 2 + 2 * len(published) + len(reported)
    assert bars.iloc[0]["mbu_pct"] == 50.0 and bars.iloc[0]["kind"] == "measured"
    assert bars.iloc[1]["mbu_pct"] == 40.0 and "copy/add" in bars.iloc[1]["label"]
    assert set(bars["kind"]) == {"measured", "measured vs copy/add", "ours on published", "published"}
