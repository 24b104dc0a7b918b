"""The foundation's 'Must show' figures and the command line, including bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cohw_utils import cli
from cohw_utils.spine import optable
from cohw_utils import workloads
from cohw_utils.spine.analyze import analyze
from cohw_utils.core.errors import CohwError, UnknownWorkloadError
from cohw_utils.spine.trace import trace


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
    assert analyze("llama-2-70b", "decode", seq_len=8).kv_bytes_per_token == 327_680
    assert analyze("llama-2-7b", "decode", seq_len=8).kv_bytes_per_token == 524_288


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


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cohw_utils", *args], capture_output=True,
                          text=True, timeout=120)


def test_cli_json_on_a_config_path(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 2,
           "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 512,
           "vocab_size": 1000}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    r = run_cli("analyze", str(path), "--seq-len", "64", "--json")
    assert r.returncode == 0, r.stderr
    t = json.loads(r.stdout)
    # GQA: 2 layers x 2 (K and V) x 2 KV heads x head_dim 32 x 2 bytes
    assert t["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 32 * 2
    linear = 2 * (256 * 256 * 2 + 2 * 256 * 64 + 3 * 256 * 512) + 1000 * 256
    assert t["contraction_flops"] == 2 * linear * 64 + 4 * 2 * 64 * 64 * 256
    assert set(t["by_class"]) >= {"contraction", "normalization", "element-wise"}


def test_cli_text_output():
    r = run_cli("analyze", "llama-2-7b", "--phase", "decode", "--seq-len", "128", "--batch", "4")
    assert r.returncode == 0, r.stderr
    assert "llama-2-7b / decode" in r.stdout and "524,288 bytes" in r.stdout
    assert "6,738,415,616" in r.stdout


@pytest.mark.parametrize("args,message", [
    (["analyze", "gpt-17"], "unknown workload 'gpt-17'"),
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
    r = run_cli(*args)
    assert r.returncode == cli.EXIT_BAD_INPUT
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert message in lines[0] and "Traceback" not in r.stderr
