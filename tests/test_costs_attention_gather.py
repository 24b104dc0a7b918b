"""Counting semantics of issue 15: causal/window-effective attention FLOPs, and gathers and
scatters at sector granularity. Every expected number is computed by hand in the test."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers

from cohw_utils import workloads
from cohw_utils.core.errors import ConfigError, HardwareError
from cohw_utils.hardware import get_hardware, load_hardware
from cohw_utils.hardware.specs import DEFAULT_SECTOR_BYTES
from cohw_utils.spine import costs, optable
from cohw_utils.spine.trace import trace

META = torch.device("meta")
SDPA = "aten.scaled_dot_product_attention"


def attention_rows(table):
    return table[table.op == SDPA]


def _causal_lm(config, seq_len: int):
    """A transformers causal LM on meta, traced over one prefill of ``seq_len`` tokens."""
    config._attn_implementation = "sdpa"
    with META:
        model = transformers.AutoModelForCausalLM.from_config(config)
    ids = torch.zeros(1, seq_len, dtype=torch.long, device=META)
    with torch.no_grad():
        return trace(lambda: model(input_ids=ids, use_cache=True), model=model, phase="prefill")


# ---------------------------------------------------------------------------- attention
@pytest.fixture(scope="module")
def llama_7b():
    return workloads.build("llama-2-7b", seq_len=2048)


def _trace_phase(built, name):
    ph = built.phase(name)
    args, kwargs = ph.make_inputs()
    return trace(ph.run, *args, model=built.model, phase=name, **kwargs)


def test_llama_7b_prefill_causal_is_half_plus_a_diagonal(llama_7b):
    t = _trace_phase(llama_7b, "prefill")
    att = attention_rows(t)
    assert len(att) == 32  # one fused row per layer
    # per layer: 4 * B * H * Tq * Tk * D = 4 * 1 * 32 * 2048 * 2048 * 128 (counted full)
    assert (att.flops == 4 * 32 * 2048 * 2048 * 128).all()
    # causal prefill: query p attends p + 1 keys, sum = 2048 * 2049 / 2 of 2048^2, i.e.
    # effective = counted * (2048 + 1) / (2 * 2048) = 4 * 32 * 128 * 2048 * 2049 / 2, exactly
    assert (att.flops_effective == 4 * 32 * 128 * 2048 * 2049 // 2).all()
    assert (att.flops_effective * 2 * 2048 == att.flops * 2049).all()
    rest = t[t.op != SDPA]
    assert (rest.flops_effective == rest.flops).all()  # only attention rows differ
    tot = optable.totals(t)
    saved = 32 * (4 * 32 * 2048 * 2048 * 128 - 4 * 32 * 128 * 2048 * 2049 // 2)
    assert tot["flops"] - tot["flops_effective"] == saved
    assert tot["contraction_flops"] - tot["contraction_flops_effective"] == saved
    cls = optable.by_class(t)
    assert cls.loc["contraction", "flops"] - cls.loc["contraction", "flops_effective"] == saved
    ops = optable.by_op(t).set_index("op")
    assert ops.loc[SDPA, "flops_effective"] == 32 * 4 * 32 * 128 * 2048 * 2049 // 2
    mods = optable.by_module(t, depth=3)
    assert mods.loc["model.layers.0", "flops"] - mods.loc["model.layers.0", "flops_effective"] == saved // 32


def test_llama_7b_decode_effective_equals_counted(llama_7b):
    t = _trace_phase(llama_7b, "decode")
    att = attention_rows(t)
    assert len(att) == 32
    # Tq = 1, the query at the last position attends every key: nothing masked
    assert (att.flops_effective == att.flops).all() and (att.flops > 0).all()


def test_sliding_window_mistral_by_hand():
    # Mistral-7B geometry (hidden 4096, 32 heads of 128, 8 KV heads), 2 layers, window 512
    cfg = transformers.MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                                     num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                     sliding_window=512, max_position_embeddings=4096)
    t = _causal_lm(cfg, 2048)
    att = attention_rows(t)
    assert len(att) == 2
    assert (att.flops == 4 * 32 * 2048 * 2048 * 128).all()
    # query p attends min(p + 1, 512) keys: 1 + ... + 512 = 512 * 513 / 2 = 131328 for the first
    # 512 queries, then 512 each for the other 1536: 786432; sum 917760 keys
    keys = 512 * 513 // 2 + (2048 - 512) * 512
    assert keys == 917760
    assert (att.flops_effective == 4 * 32 * 128 * keys).all()  # 15,036,579,840 per layer


def test_sliding_and_full_layers_of_one_model_qwen2():
    # Qwen2 sets module.sliding_window per layer: layer 0 full attention, layer 1 a 256 window
    cfg = transformers.Qwen2Config(hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                                   num_attention_heads=16, num_key_value_heads=2, vocab_size=1000,
                                   use_sliding_window=True, sliding_window=256, max_window_layers=1)
    assert cfg.layer_types == ["full_attention", "sliding_attention"]
    t = _causal_lm(cfg, 1024)
    att = attention_rows(t).set_index("module")
    full = 4 * 16 * 64 * (1024 * 1025 // 2)               # causal: 524,800 keys
    window = 4 * 16 * 64 * (256 * 257 // 2 + 768 * 256)   # 32,896 + 196,608 = 229,504 keys
    assert att.loc["model.layers.0.self_attn", "flops_effective"] == full
    assert att.loc["model.layers.1.self_attn", "flops_effective"] == window


def test_bert_is_not_causal():
    cfg = transformers.BertConfig(num_hidden_layers=2)   # BERT-base geometry: 12 heads of 64
    cfg._attn_implementation = "sdpa"
    with META:
        model = transformers.BertModel(cfg)
    ids = torch.zeros(1, 128, dtype=torch.long, device=META)
    with torch.no_grad():
        t = trace(lambda: model(input_ids=ids), model=model)
    att = attention_rows(t)
    assert len(att) == 2 and (att.flops == 4 * 12 * 128 * 128 * 64).all()
    assert (att.flops_effective == att.flops).all()


def test_whisper_encoder_full_decoder_causal_cross_full():
    cfg = transformers.WhisperConfig(encoder_layers=1, decoder_layers=1, d_model=384,
                                     encoder_attention_heads=6, decoder_attention_heads=6,
                                     num_mel_bins=80, max_source_positions=1500)
    cfg._attn_implementation = "sdpa"
    with META:
        model = transformers.WhisperModel(cfg)
    feats = torch.zeros(1, 80, 3000, device=META)
    dec = torch.zeros(1, 16, dtype=torch.long, device=META)
    with torch.no_grad():
        t = trace(lambda: model(input_features=feats, decoder_input_ids=dec, use_cache=True), model=model)
    att = attention_rows(t).set_index("module")
    enc = att.loc["encoder.layers.0.self_attn"]
    assert enc.flops == 4 * 6 * 1500 * 1500 * 64 and enc.flops_effective == enc.flops
    self_ = att.loc["decoder.layers.0.self_attn"]
    assert self_.flops_effective == 4 * 6 * 64 * (16 * 17 // 2)  # causal over 16 tokens
    cross = att.loc["decoder.layers.0.encoder_attn"]
    assert cross.flops == 4 * 6 * 16 * 1500 * 64 and cross.flops_effective == cross.flops


class _Attn(nn.Module):
    """A bare attention module calling SDPA with an explicit mask, as transformers does."""

    def __init__(self, **attrs):
        super().__init__()
        for k, v in attrs.items():
            setattr(self, k, v)

    def forward(self, q, k, mask):
        return F.scaled_dot_product_attention(q, k, k, attn_mask=mask)


def test_module_attributes_decide_a_masked_call():
    q = torch.empty(1, 2, 8, 16, device=META)     # chunked prefill: 8 queries over 32 keys
    k = torch.empty(1, 2, 32, 16, device=META)
    mask = torch.empty(1, 1, 8, 32, dtype=torch.bool, device=META)
    counted = 4 * 2 * 8 * 32 * 16
    for mod, keys in [
        (_Attn(), 8 * 32),                                   # no is_causal attribute: not causal
        (_Attn(is_causal=False), 8 * 32),
        (_Attn(is_causal=True), sum(range(25, 33))),         # positions 24..31 attend 25..32 keys
        (_Attn(is_causal=True, sliding_window=10), 8 * 10),  # each of them capped at 10
    ]:
        r = trace(mod, q, k, mask, model=mod).iloc[0]
        assert r.flops == counted and r.flops_effective == 4 * 2 * 16 * keys, mod.__dict__
    # one decode token with its 4 query heads packed into the query dim (mask query dim 1)
    packed = _Attn(is_causal=True, sliding_window=20)
    qp = torch.empty(1, 2, 4, 16, device=META)
    r = trace(packed, qp, k, torch.empty(1, 1, 1, 32, device=META), model=packed).iloc[0]
    assert r.flops_effective == 4 * 2 * 16 * 4 * 20  # every row is the token at position 31


def test_is_causal_flag_and_closed_forms():
    q = torch.empty(2, 4, 64, 32, device=META)
    r = trace(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True)).iloc[0]
    assert r.flops == 4 * 2 * 4 * 64 * 64 * 32 and r.flops_effective == 4 * 2 * 4 * 32 * (64 * 65 // 2)
    # torch's is_causal with Tq < Tk aligns at the first key: query i attends i + 1 keys
    assert costs.attended_keys(4, 10, True, aligned="start") == 1 + 2 + 3 + 4
    assert costs.attended_keys(4, 10, True) == 7 + 8 + 9 + 10          # positions 6..9
    assert costs.attended_keys(4, 10, True, window=8) == 7 + 8 + 8 + 8
    assert costs.attended_keys(4, 10, False) == 40
    assert costs.attended_keys(1, 4096, True, window=4096) == 4096      # decode: all keys
    with pytest.raises(ValueError, match="aligned"):
        costs.attended_keys(1, 2, True, aligned="middle")


def test_real_cpu_kernels_forward_and_backward():
    # off meta the dispatched kernel is aten._scaled_dot_product_flash_attention_for_cpu; its
    # is_causal argument decides, in forward and in backward
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 8, requires_grad=True) for _ in range(3))
    t = trace(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward())
    fwd = t[t.op == "aten._scaled_dot_product_flash_attention_for_cpu.default"].iloc[0]
    bwd = t[t.op == "aten._scaled_dot_product_flash_attention_for_cpu_backward.default"].iloc[0]
    assert fwd.flops == 4 * 2 * 16 * 16 * 8
    # 16 * 17 / 2 = 136 of 256 scores: effective = counted * 136 / 256
    assert fwd.flops_effective == fwd.flops * 136 // 256
    assert bwd.flops > fwd.flops and bwd.flops_effective == bwd.flops * 136 // 256
    # with an explicit mask the calling module decides (here: causal, window 4)
    mod = _Attn(is_causal=True, sliding_window=4)
    mask = torch.ones(1, 1, 16, 16, dtype=torch.bool)
    r = trace(mod, q.detach(), k.detach(), mask, model=mod)
    r = r[r.op_class == "contraction"].iloc[0]
    # queries 0..15 attend 1, 2, 3, 4, 4, ... keys: 10 + 12 * 4 = 58
    assert r.flops_effective == 4 * 2 * 8 * 58


# ---------------------------------------------------------------------------- gathers
def test_embedding_rows_multiple_of_the_sector_are_not_rounded():
    table = torch.empty(1000, 64, device=META)           # rows of 64 fp32 = 256 B = 8 sectors
    ids = torch.empty(2, 16, dtype=torch.long, device=META)
    for sector in (32, 64):
        r = trace(lambda: F.embedding(ids, table), sector_bytes=sector).iloc[0]
        assert r.op == "aten.embedding.default" and r.flops == 0
        assert r.bytes_read == 32 * 256 + 32 * 8          # 32 rows + 32 int64 indices
        assert r.bytes_written == 32 * 256


def test_gather_of_single_elements_reads_a_sector_each():
    src = torch.empty(100, 50, device=META)
    idx = torch.empty(100, 3, dtype=torch.long, device=META)
    r = trace(lambda: torch.gather(src, 1, idx)).iloc[0]
    assert r.bytes_read == 300 * 32 + 300 * 8            # 300 fp32 fetched as 32 B sectors + indices
    assert r.bytes_written == 300 * 4
    r64 = trace(lambda: torch.gather(src, 1, idx), sector_bytes=64).iloc[0]
    assert r64.bytes_read == 300 * 64 + 300 * 8


def test_hash_grid_lookup_8_bytes_moves_32():
    # nerfacto's torch hash encoding: table[(N, 8 corners, L levels)] of 2 features per entry
    table = torch.empty(2**19 * 16, 2, device=META)                  # fp32: 8 B per entry
    idx = torch.empty(4096, 8, 16, dtype=torch.long, device=META)
    r = trace(lambda: table[idx]).iloc[0]
    assert r.op == "aten.index.Tensor"
    n = 4096 * 8 * 16
    assert r.bytes_read == n * 32 + n * 8 and r.bytes_written == n * 8
    half = table.to(torch.float16)                                   # 4 B per entry: still 32
    r = trace(lambda: half[idx]).iloc[0]
    assert r.bytes_read == n * 32 + n * 8
    # rows of a 3D source: x[:, idx] fetches runs of the trailing dim (16 fp32 = 64 B)
    x = torch.empty(3, 100, 16, device=META)
    rows = torch.empty(10, dtype=torch.long, device=META)
    t = trace(lambda: x[:, rows])
    r = t[t.op == "aten.index.Tensor"].iloc[0]
    assert r.bytes_read == 3 * 10 * 64 + 10 * 8


# ---------------------------------------------------------------------------- scatters
def test_index_copy_of_one_position_writes_one_token():
    cache = torch.empty(2, 4, 16, 64, dtype=torch.bfloat16, device=META)   # (B, H, T, D)
    token = torch.empty(2, 4, 1, 64, dtype=torch.bfloat16, device=META)
    pos = torch.empty(1, dtype=torch.long, device=META)
    r = trace(lambda: cache.index_copy_(2, pos, token)).iloc[0]
    assert r.op == "aten.index_copy_.default"
    # one token's K: 2 * 4 * 64 bf16 = 1024 B read (+ 8 B index) and written; not the 16 KiB cache
    assert r.bytes_read == 1024 + 8 and r.bytes_written == 1024
    small = torch.empty(2, 4, 16, 8, dtype=torch.float16, device=META)     # rows of 16 B
    tok = torch.empty(2, 4, 1, 8, dtype=torch.float16, device=META)
    for sector, written in ((32, 8 * 32), (64, 8 * 64)):                  # 8 rows, each a sector
        r = trace(lambda: small.index_copy_(2, pos, tok), sector_bytes=sector).iloc[0]
        assert r.bytes_written == written and r.bytes_read == 128 + 8
    # the same write as a slice assignment (copy_ into a view): only the region
    t = trace(lambda: cache[:, :, 3:4].copy_(token))
    c = t[t.op == "aten.copy_.default"].iloc[0]
    assert c.bytes_read == 1024 and c.bytes_written == 1024


def test_static_cache_update_costs_one_token_of_k_and_v():
    cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                                   num_hidden_layers=1, intermediate_size=512)
    cache = transformers.StaticCache(config=cfg, max_cache_len=128)
    prompt = torch.empty(1, 2, 10, 64, dtype=torch.bfloat16, device=META)
    cache.update(prompt, prompt, 0)                     # allocate and fill, outside the trace
    k = torch.empty(1, 2, 1, 64, dtype=torch.bfloat16, device=META)
    t = trace(lambda: cache.update(k, k, 0))
    ic = t[t.op == "aten.index_copy_.default"]
    assert len(ic) == 2                                 # keys and values
    # each: 2 KV heads * 64 * 2 B = 256 B of the new token + an int64 position
    assert (ic.bytes_read == 256 + 8).all() and (ic.bytes_written == 256).all()


def test_scatter_add_counts_its_adds_and_copies_the_destination():
    dst = torch.empty(10, device=META)
    idx = torch.empty(4, dtype=torch.long, device=META)
    src = torch.empty(4, device=META)
    r = trace(lambda: dst.scatter_add(0, idx, src)).iloc[0]
    assert r.flops == 4 and r.op_class == "data movement"
    # out of place: copy dst (40 B read, 40 B written); index 32 B + src 16 B read; 4 sectors
    # read-modified-written: 4 * 32
    assert r.bytes_read == 40 + 32 + 16 + 4 * 32 and r.bytes_written == 40 + 4 * 32
    r = trace(lambda: dst.scatter_add(0, idx, src), sector_bytes=64).iloc[0]
    assert r.bytes_read == 40 + 32 + 16 + 4 * 64 and r.bytes_written == 40 + 4 * 64
    r = trace(lambda: dst.scatter_add_(0, idx, src)).iloc[0]       # in place: no copy
    assert r.flops == 4 and r.bytes_read == 32 + 16 + 4 * 32 and r.bytes_written == 4 * 32
    r = trace(lambda: dst.scatter_(0, idx, src)).iloc[0]           # overwrite: no adds, no RMW
    assert r.flops == 0 and r.bytes_read == 32 + 16 and r.bytes_written == 4 * 32


def test_index_put_accumulate_and_index_add():
    x = torch.empty(10, 8, device=META)                 # rows of 8 fp32 = 32 B
    idx = torch.empty(3, dtype=torch.long, device=META)
    v = torch.empty(3, 8, device=META)
    r = trace(lambda: x.index_put_((idx,), v, accumulate=True)).iloc[0]
    # 24 adds; reads index 24 B + values 96 B + the 3 rows (96 B); writes the 3 rows
    assert r.flops == 24 and r.bytes_read == 24 + 96 + 96 and r.bytes_written == 96
    r = trace(lambda: x.index_put_((idx,), v)).iloc[0]
    assert r.flops == 0 and r.bytes_read == 24 + 96 and r.bytes_written == 96
    r = trace(lambda: x.index_add(0, idx, v)).iloc[0]   # out of place: + copy of x (320 B)
    assert r.flops == 24 and r.bytes_read == 320 + 24 + 96 + 96 and r.bytes_written == 320 + 96


def test_embedding_backward_scatters_rows():
    table = nn.Embedding(100, 16)                       # rows of 64 B
    ids = torch.randint(0, 100, (5,))
    t = trace(lambda: table(ids).backward(torch.ones(5, 16)))
    r = t[t.op == "aten.embedding_dense_backward.default"].iloc[0]
    # 5 rows of 16 added (80 FLOPs); reads grad 320 B + ids 40 B + 5 rows; writes the zeroed
    # 100 x 16 gradient (6400 B) + 5 rows
    assert r.flops == 80 and r.bytes_read == 320 + 40 + 5 * 64 and r.bytes_written == 6400 + 5 * 64


def test_sector_bytes_is_validated_and_recorded():
    x = torch.empty(4, device=META)
    assert trace(lambda: x + 1).attrs["sector_bytes"] == DEFAULT_SECTOR_BYTES == 32
    for bad in (0, -32, 32.0, True, "32"):
        with pytest.raises(ConfigError, match="sector_bytes"):
            trace(lambda: x + 1, sector_bytes=bad)


# ---------------------------------------------------------------------------- hardware field
def test_hardware_sector_bytes(tmp_path: Path):
    assert get_hardware("H100-SXM").sector_bytes == 32 and get_hardware("MI300X").sector_bytes == 32
    assert all(hw.sector_bytes == 32 for hw in load_hardware().values())
    src = Path(costs.__file__).resolve().parents[1] / "data" / "hardware.csv"
    rows = list(csv.DictReader(src.open()))

    def write(value: str | None) -> Path:
        out = tmp_path / f"hw{len(list(tmp_path.iterdir()))}.csv"
        fields = [f for f in rows[0] if value is not None or f != "sector_bytes"]
        with out.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows([{**r, "sector_bytes": value if i == 0 else r["sector_bytes"]}
                         for i, r in enumerate(rows)])
        return out

    first = rows[0]["name"]
    assert load_hardware(write("64"))[first].sector_bytes == 64
    assert load_hardware(write(""))[first].sector_bytes == 32      # empty cell: the default
    assert load_hardware(write(None))[first].sector_bytes == 32    # no column at all
    with pytest.raises(HardwareError, match="sector_bytes.*positive whole number"):
        load_hardware(write("12.5"))
