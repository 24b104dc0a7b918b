"""`analyze` and the command line (``python -m cohw_utils analyze``), including bad input.

The CLI runs in-process (``cli.main``); each distinct command line is traced once per session
(:func:`run_cli` caches its output), full scale on ``meta``.
"""
from __future__ import annotations

import functools
import io
import json
import math
import re
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cohw_utils import cli
from cohw_utils.spine import optable
from cohw_utils import workloads
from cohw_utils.spine.analyze import analyze
from cohw_utils.core.errors import CohwError, UnknownWorkloadError
from cohw_utils.spine.trace import trace

CONFIGS = Path(cli.__file__).parent / "data" / "configs"
GEMMA = CONFIGS / "gemma-3-1b-it"
MAMBA = CONFIGS / "mamba-2.8b"
FLUX = CONFIGS / "flux.1-dev" / "transformer"
QWEN_MOE = CONFIGS / "qwen3-30b-a3b"


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


# ------------------------------------------------------------------------------- analyze()
def test_llama2_13b_prefill_contraction_flops_exact():
    a = analyze("llama-2-13b", "prefill", seq_len=512)
    cfg = workloads.build("llama-2-13b").config
    h, L, T, ffn, vocab = cfg.hidden_size, cfg.num_hidden_layers, 512, cfg.intermediate_size, cfg.vocab_size
    linear_params = L * (4 * h * h + 3 * h * ffn) + vocab * h  # projections + lm_head
    expected = 2 * linear_params * T + 4 * L * T * T * h
    assert expected == 13_374_796_595_200
    assert a.totals()["contraction_flops"] == expected
    assert a.parameters == 13_015_864_320 and a.kv_bytes_per_token == 819_200
    assert a.table.attrs["uncosted"] == {}


def test_kv_cache_per_token_fp16():
    # 80 layers x 2 (K, V) x 8 KV heads x head_dim 128 x 2 bytes
    assert analyze("llama-2-70b", "decode", seq_len=8).kv_bytes_per_token == 80 * 2 * 8 * 128 * 2 == 327_680


def test_sd15_unet_step_matches_flop_counter_mode():
    built = workloads.build("sd-1.5")  # 512x512 image: 64x64 latent
    phase = built.phase("unet_step")
    args, kwargs = phase.make_inputs()
    with torch.no_grad():
        table = trace(phase.run, *args, model=built.model, phase="unet_step", **kwargs)
        with FlopCounterMode(display=False) as fc:
            phase.run(*args, **kwargs)
    ours = optable.totals(table)["contraction_flops"]
    assert ours == fc.get_total_flops() > 1e12


def test_decode_reads_the_weights_and_the_cache():
    a = analyze("llama-2-7b", "decode", seq_len=1024)
    t = a.totals()
    # decode touches every weight once; bytes moved exceed the weights (cache, activations)
    assert t["bytes_read"] > a.weight_bytes
    assert t["intensity"] < 5  # memory-bound on any accelerator in the hardware data


def test_analyze_bad_input():
    with pytest.raises(UnknownWorkloadError, match="known: .*llama-2-7b"):
        analyze("llama-3-8b")
    with pytest.raises(CohwError, match="phases"):
        analyze("llama-2-7b", "train")
    with pytest.raises(CohwError, match="unknown dtype 'fp13'"):
        analyze("llama-2-7b", dtype="fp13")
    with pytest.raises(CohwError, match="batch"):
        analyze("llama-2-7b", batch=0)


# ------------------------------------------------------------------------------ the CLI
@functools.lru_cache(maxsize=None)
def run_cli(*args: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``cli.main(args)``, in-process, cached per command line."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli.main(list(args))
    return rc, out.getvalue(), err.getvalue()


def ok(*args: str) -> str:
    rc, out, err = run_cli(*args)
    assert rc == 0, err
    return out


def ok_json(*args: str) -> dict:
    return json.loads(ok(*args, "--json"))


def line_starting(out: str, start: str) -> str:
    lines = [ln for ln in out.splitlines() if ln.strip().startswith(start)]
    assert len(lines) == 1, f"expected one line starting {start!r} in:\n{out}"
    return lines[0]


def flop_lines(out: str) -> tuple[int, int]:
    """The numbers on the two labelled FLOP lines (torch convention, effective)."""
    def number(label: str) -> int:
        rest = line_starting(out, label)[len("  " + label):]
        return int(rest.split()[0].replace(",", ""))
    return number(cli.FLOPS_LABEL), number(cli.FLOPS_EFFECTIVE_LABEL)


LLAMA_DECODE = ("analyze", "llama-2-7b", "--phase", "decode", "--seq-len", "128", "--batch", "4")


def test_cli_llama2_7b_decode_text():
    out = ok(*LLAMA_DECODE)
    cfg = _config(CONFIGS / "llama-2-7b")
    assert "llama-2-7b / decode" in out and "6,738,415,616" in out
    assert "FLOPs (torch convention: attention counted full)" in out
    assert "FLOPs (effective: causal/window attention as a flash kernel computes)" in out
    flops, eff = flop_lines(out)
    t = ok_json(*LLAMA_DECODE)
    assert (flops, eff) == (t["flops"], t["flops_effective"])
    assert eff == flops  # one decode query attends every cached key: nothing is masked
    # fp16 (the config's torch_dtype): 32 layers x 2 (K, V) x 32 KV heads x head_dim 128 x 2 bytes
    per_token = cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * (
        cfg["hidden_size"] // cfg["num_attention_heads"]) * 2
    assert per_token == 524_288
    full = line_starting(out, "full attention")
    assert "32 layers" in full and "window none" in full
    assert "524,288 bytes/token (framework = serving)" in full
    # after one decode step on a 128-token prompt the cache covers 129 tokens, for 4 sequences
    assert per_token * 129 * 4 == 270_532_608
    assert "270,532,608 bytes at context" in full
    total = line_starting(out, "total")
    assert "524,288 bytes/token (serving: the number the analyses use)" in total
    assert "active parameters" in out and "(all: no routed experts)" in out


def test_cli_gemma3_prefill_sliding_and_full_lines():
    cfg = _config(GEMMA)
    L, kv, hd, W = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["sliding_window"]
    pattern, H, T = cfg["sliding_window_pattern"], cfg["num_attention_heads"], 1024
    assert (L, kv, hd, W, pattern, H) == (26, 1, 256, 512, 6, 4)
    # every 6th layer (index 5, 11, 17, 23) is full attention, the other 22 slide over 512 tokens
    n_full = sum((i + 1) % pattern == 0 for i in range(L))
    n_slide = L - n_full
    assert (n_full, n_slide) == (4, 22)
    per_layer = 2 * kv * hd * 2  # K and V, 1 KV head x 256, bf16: 1,024 bytes per token per layer
    out = ok("analyze", str(GEMMA), "--seq-len", str(T))
    full = line_starting(out, "full attention")
    assert f"{n_full} layers" in full and f"{n_full * per_layer:,} bytes/token" in full  # 4,096
    assert f"{n_full * per_layer * T:,} bytes at context" in full  # 4,194,304
    slide = line_starting(out, f"sliding window ({W})")
    assert f"{n_slide} layers" in slide and f"window {W} tokens" in slide
    assert f"{n_slide * per_layer:,} bytes/token" in slide  # 22,528
    assert f"{n_slide * per_layer * W:,} bytes at context" in slide  # capped at W: 11,534,336
    assert f"{L * per_layer:,} bytes/token (serving" in line_starting(out, "total")  # 26,624
    # effective FLOPs: attention FLOPs per layer are 4 * H * D per (query, key) pair; a causal
    # layer attends T(T+1)/2 of the T^2 pairs, a sliding one sum_p min(p, W) = W(W+1)/2 + (T-W)W
    flops, eff = flop_lines(out)
    saved = 4 * H * hd * (n_full * (T * T - T * (T + 1) // 2) + n_slide * (T * T - (W * (W + 1) // 2 + (T - W) * W)))
    assert saved == 67_614_277_632
    assert flops - eff == saved
    t = ok_json("analyze", str(GEMMA), "--seq-len", str(T))
    assert t["contraction_flops"] - t["contraction_flops_effective"] == saved


def test_cli_mamba_recurrent_state_no_bytes_per_token():
    cfg = _config(MAMBA)
    out = ok("analyze", str(MAMBA), "--seq-len", "8")
    line = line_starting(out, "recurrent state")
    assert f"{cfg['num_hidden_layers']} layers" in line and "0 bytes/token" in line
    # per layer: conv state (intermediate x conv_kernel) + SSM state (intermediate x state_size),
    # fp32 (the config's torch_dtype): (5120 x 4 + 5120 x 16) x 4 bytes = 409,600; x 64 layers
    state = cfg["num_hidden_layers"] * cfg["intermediate_size"] * (cfg["conv_kernel"] + cfg["state_size"]) * 4
    assert state == 26_214_400
    assert f"{state:,} constant bytes/sequence" in line
    assert "0 bytes/token (serving: the number the analyses use)" in line_starting(out, "total")
    assert "full attention" not in out and "sliding window" not in out


def test_cli_diffusers_flux_transformer_has_no_cache_block():
    out = ok("analyze", str(FLUX), "--seq-len", "16")
    assert "/ denoise_step" in out
    assert "cache (" not in out and "bytes/token" not in out and "KV cache" not in out
    flops, eff = flop_lines(out)
    assert flops == eff > 1e12  # Flux's joint attention is bidirectional: nothing masked


def test_cli_moe_active_parameters():
    cfg = _config(QWEN_MOE)
    t = ok_json("analyze", str(QWEN_MOE), "--phase", "decode", "--seq-len", "8")
    # every layer is MoE (decoder_sparse_step 1, no mlp_only_layers); a token uses k = 8 of the
    # E = 128 experts, each a SwiGLU MLP of 3 x hidden x moe_intermediate weights
    assert cfg["decoder_sparse_step"] == 1 and cfg["mlp_only_layers"] == []
    idle = cfg["num_hidden_layers"] * (cfg["num_experts"] - cfg["num_experts_per_tok"]) * 3 \
        * cfg["hidden_size"] * cfg["moe_intermediate_size"]
    assert t["active_parameters"] == t["parameters"] - idle == 3_353_032_704
    # 48 layers x 2 x 4 KV heads x 128 x 2 bytes (bf16)
    assert t["kv_cache_bytes_per_token"] == 48 * 2 * 4 * 128 * 2 == 98_304


def test_cli_json_has_the_fields():
    t = ok_json(*LLAMA_DECODE)
    for key in ("flops", "flops_effective", "contraction_flops", "contraction_flops_effective",
                "active_parameters", "parameters", "kv_cache_bytes_per_token", "cache", "by_class"):
        assert key in t, key
    c = t["cache"]
    for key in ("kv_bytes_per_token", "framework_bytes_per_token", "serving_bytes_per_token",
                "state_bytes", "by_type", "used", "notes"):
        assert key in c, key
    assert c["used"] == "serving"
    assert c["by_type"]["full attention"]["serving_bytes_per_token"] == 524_288
    assert t["active_parameters"] == t["parameters"] == 6_738_415_616
    flux = ok_json("analyze", str(FLUX), "--seq-len", "16")
    assert flux["cache"] is None and flux["kv_cache_bytes_per_token"] is None


def test_jsonable_strict():
    raw = {"a": np.int64(3), "b": (1, np.float32(0.5)), "c": float("nan"), 4: None,
           "d": {"e": torch.tensor(7)}, "f": torch.float16, "g": True}
    clean = cli._jsonable(raw)
    assert json.loads(json.dumps(clean, allow_nan=False)) == {
        "a": 3, "b": [1, 0.5], "c": None, "4": None, "d": {"e": 7}, "f": "torch.float16", "g": True}
    assert type(clean["a"]) is int


def test_cache_block_says_when_framework_and_serving_differ():
    # an MLA-like report (hand-made): transformers holds per-head K/V, a serving engine the latent
    summary = {"class": "DynamicCache", "used": "serving", "context": 10, "batch": 1, "layers": 2,
               "kv_bytes_per_token": 2304, "framework_bytes_per_token": 8192,
               "serving_bytes_per_token": 2304, "bytes_per_token_at_context": 2304, "state_bytes": 0,
               "framework_bytes_at_context": 81920, "serving_bytes_at_context": 23040,
               "by_type": {"full attention": {"layers": 2, "window": None, "framework_bytes_per_token": 8192,
                                              "serving_bytes_per_token": 2304, "constant_bytes": 0,
                                              "framework_bytes_at_context": 81920,
                                              "serving_bytes_at_context": 23040}},
               "notes": []}
    lines = cli._cache_lines(summary, {"batch": 1})
    full = next(ln for ln in lines if ln.strip().startswith("full attention"))
    assert "framework 8,192 / serving 2,304 bytes/token (framework != serving)" in full
    assert "framework 81,920 / serving 23,040 bytes at context" in full
    total = next(ln for ln in lines if ln.strip().startswith("total"))
    assert "2,304 bytes/token (serving: the number the analyses use)" in total
    assert "framework != serving: transformers holds 8,192, a serving engine stores 2,304" in total


def test_cli_json_on_a_config_path(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 2,
           "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 512,
           "vocab_size": 1000}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    t = ok_json("analyze", str(path), "--seq-len", "64")
    # GQA: 2 layers x 2 (K and V) x 2 KV heads x head_dim 32 x 2 bytes
    assert t["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 32 * 2
    linear = 2 * (256 * 256 * 2 + 2 * 256 * 64 + 3 * 256 * 512) + 1000 * 256
    assert t["contraction_flops"] == 2 * linear * 64 + 4 * 2 * 64 * 64 * 256
    # causal prefill: the two attention matmuls (4 x T x T x hidden per layer) drop to T(T+1)/2 pairs
    assert t["contraction_flops"] - t["contraction_flops_effective"] == 4 * 2 * 256 * (64 * 64 - 64 * 65 // 2)
    assert set(t["by_class"]) >= {"contraction", "normalization", "element-wise"}
    assert math.isfinite(t["intensity"])


@pytest.mark.parametrize("args,message", [
    (["analyze", "gpt-17"], "unknown workload 'gpt-17'"),
    (["analyze", "NOFILE"], "no such file"),
    (["analyze", "llama-2-7b", "--batch", "0"], "expected a positive integer"),
    (["analyze", "llama-2-7b", "--batch", "two"], "expected a positive integer, got 'two'"),
    (["analyze", "llama-2-7b", "--dtype", "fp13"], "unknown dtype 'fp13'"),
    (["analyze", "llama-2-7b", "--phase", "render"], "render"),
    (["analyze", "llama-2-7b", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["analyze", "MALFORMED"], "not valid JSON"),
])
def test_cli_bad_input_one_clear_line(tmp_path, args, message):
    if args[-1] == "MALFORMED":
        bad = tmp_path / "config.json"
        bad.write_text("{'model_type': llama,}")
        args = ["analyze", str(bad)]
    elif args[-1] == "NOFILE":
        args = ["analyze", str(tmp_path / "no-such-model" / "config.json")]
    rc, out, err = run_cli(*args)
    assert rc == cli.EXIT_BAD_INPUT and out == ""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert message in lines[0] and "Traceback" not in err


def test_python_dash_m_bad_path_exits_2(tmp_path):
    missing = tmp_path / "missing" / "config.json"
    r = subprocess.run([sys.executable, "-m", "cohw_utils", "analyze", str(missing)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and re.search(r"unknown workload '.*missing.*' \(no such file\)", lines[0]), r.stderr
