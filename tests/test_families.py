"""Tests for cohw_utils.workloads.families (and the builders in hf_families): any Hugging Face config
path becomes a workload with the phases of its family.

Small configs are written into ``tmp_path`` and run for real on cpu; the published configs under
``data/configs/`` are built at full scale on meta. Parameter counts are computed by hand from each
architecture's layer shapes, in the comments.
"""
from __future__ import annotations

import json
import sys
import types
import warnings

import pytest
import torch

from cohw_utils import workloads as W
from cohw_utils.core.errors import ConfigError
from cohw_utils.core.params import count_parameters
from cohw_utils.workloads.families import FAMILIES, config_workload, model_family

warnings.filterwarnings("ignore", category=FutureWarning)

CONFIGS = W.CONFIG_DIR


def published(name):
    """Skip where the published config (added with issue 15) is not in this checkout."""
    return pytest.mark.skipif(not (CONFIGS / name / "config.json").is_file(), reason=f"no data/configs/{name}")


def write(tmp_path, name, cfg) -> str:
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps(cfg))
    return str(p)


def run(built, phase):
    ph = built.phase(phase)
    args, kwargs = ph.make_inputs()
    return ph.run(*args, **kwargs)


def run_all(built):
    return {name: run(built, name) for name in built.phases}


SMALL = {
    "llama": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "vocab_size": 100, "max_position_embeddings": 64},
    # D=64, expand 2 (ED=128), state N=16, conv K=4, time_step_rank ceil(64/16)=4, V=100, 2 layers
    "mamba": {"model_type": "mamba", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 100, "state_size": 16,
              "expand": 2, "conv_kernel": 4, "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0},
    # 4 layers, attention where i % 2 == 1 (layers 1 and 3), Mamba elsewhere; one expert (no MoE)
    "jamba": {"model_type": "jamba", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "attn_layer_period": 2,
              "attn_layer_offset": 1, "num_experts": 1, "num_experts_per_tok": 1, "expert_layer_period": 1,
              "expert_layer_offset": 0, "mamba_d_state": 8, "mamba_dt_rank": 4, "use_mamba_kernels": False,
              "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    "bart": {"model_type": "bart", "d_model": 32, "encoder_layers": 1, "decoder_layers": 1,
             "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
             "vocab_size": 100, "max_position_embeddings": 64, "pad_token_id": 1, "bos_token_id": 0,
             "eos_token_id": 2, "decoder_start_token_id": 2, "forced_eos_token_id": 2},
    "whisper": {"model_type": "whisper", "d_model": 32, "encoder_layers": 1, "decoder_layers": 1,
                "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 64,
                "decoder_ffn_dim": 64, "vocab_size": 100, "num_mel_bins": 8, "max_source_positions": 16,
                "max_target_positions": 32, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
                "decoder_start_token_id": 3, "begin_suppress_tokens": None, "suppress_tokens": None},
    "bert": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 64, "vocab_size": 100, "max_position_embeddings": 64, "type_vocab_size": 2},
    "vit": {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
            "intermediate_size": 64, "image_size": 32, "patch_size": 8, "num_labels": 10},
    "clip": {"model_type": "clip", "projection_dim": 16,
             "text_config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
                             "intermediate_size": 64, "vocab_size": 100, "max_position_embeddings": 16},
             "vision_config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
                               "intermediate_size": 64, "image_size": 32, "patch_size": 8}},
    # CLIP vision tower 32 px / patch 8 = 16 patches (+CLS, dropped by the "default" feature strategy)
    "llava": {"model_type": "llava", "image_token_id": 110, "vision_feature_layer": -2,
              "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
              "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "intermediate_size": 64, "image_size": 32,
                                "patch_size": 8, "projection_dim": 16},
              "text_config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                              "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 120,
                              "max_position_embeddings": 128, "pad_token_id": 0, "bos_token_id": 1,
                              "eos_token_id": 2}},
}

EXPECTED = {  # family, domain, phases
    "llama": ("causal-lm", "llm", ("prefill", "decode")),
    "mamba": ("ssm", "llm", ("prefill", "decode")),
    "jamba": ("hybrid", "llm", ("prefill", "decode")),
    "bart": ("seq2seq", "seq2seq", ("encode", "decode")),
    "whisper": ("speech-seq2seq", "speech", ("encode", "decode")),
    "bert": ("encoder", "encoder", ("forward",)),
    "vit": ("vision", "vision", ("forward",)),
    "clip": ("dual-encoder", "multimodal", ("image_encode", "text_encode")),
    "llava": ("vision-language", "multimodal", ("image_encode", "prefill", "decode")),
}


# ------------------------------------------------------------------------------ classification
@pytest.mark.parametrize("name", list(SMALL))
def test_family_domain_phases_of_each_config(tmp_path, name):
    path = write(tmp_path, name, SMALL[name])
    family, domain, phases = EXPECTED[name]
    assert model_family(path) == family
    assert model_family(SMALL[name]) == family  # a dict works too
    wl = W.get_workload(path)
    assert (wl.domain, wl.phases, wl.name, wl.library) == (domain, phases, path, "transformers")
    if family != "causal-lm":  # the causal-LM description stays llm.py's ("decoder LM ...")
        assert wl.description.startswith(f"{family} '{name}'") and "phases " + ", ".join(phases) in wl.description


def test_every_family_is_covered():
    assert {f for f, _, _ in EXPECTED.values()} == set(FAMILIES)


def test_families_from_transformers_defaults(tmp_path):
    """Families of configs with transformers' default values (written as the config classes make them)."""
    from transformers import CONFIG_MAPPING

    expected = {"t5": "seq2seq", "mbart": "seq2seq", "pegasus": "seq2seq", "roberta": "encoder",
                "deberta-v2": "encoder", "swin": "vision", "convnext": "vision", "resnet": "vision",
                "siglip": "dual-encoder", "mamba2": "ssm", "falcon_mamba": "ssm", "rwkv": "ssm",
                "zamba2": "hybrid", "falcon_h1": "hybrid", "qwen3_next": "hybrid", "mistral": "causal-lm",
                "gemma2": "causal-lm", "bert": "encoder", "clip": "dual-encoder"}
    assert {mt: model_family(CONFIG_MAPPING[mt]()) for mt in expected} == expected


def test_hybrid_layer_counts_in_description(tmp_path):
    wl = W.get_workload(write(tmp_path, "jamba", SMALL["jamba"]))
    # layers i = 0..3 with i % attn_layer_period(2) == attn_layer_offset(1): 1 and 3 attention, 0 and 2 Mamba
    assert "2 layers with recurrent state, 2 with attention" in wl.description

@published("mamba-2.8b")
def test_ssm_description_of_published_mamba():
    assert "64 layers with recurrent state" in W.get_workload(CONFIGS / "mamba-2.8b").description


def test_no_family_is_one_line_error(tmp_path):
    path = write(tmp_path, "dpr", {"model_type": "dpr"})  # a retriever: only a bare AutoModel class
    with pytest.raises(ConfigError) as e:
        W.get_workload(path)
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    assert msg.startswith(f"{path}: model_type 'dpr' fits no supported family; supported: causal-lm, ssm")
    assert all(f in msg for f in FAMILIES)
    with pytest.raises(ConfigError, match="fits no supported family"):
        W.build(path)


def test_tiny_scale_refused_for_new_families(tmp_path):
    path = write(tmp_path, "bart", SMALL["bart"])
    with pytest.raises(ConfigError, match="tiny scale not available for family 'seq2seq'; use scale='full' on meta"):
        W.build(path, scale="tiny", device="cpu")


# ---------------------------------------------------------------------------- running the phases
def test_ssm_mamba_params_and_phases(tmp_path):
    built = W.build(write(tmp_path, "mamba", SMALL["mamba"]), device="cpu", batch=2, seq_len=8)
    # embedding 100*64 = 6,400 (tied lm_head); per layer: RMSNorm 64, in_proj 64*256 = 16,384,
    # conv1d 128*4 + 128 = 640, x_proj 128*(4 + 2*16) = 4,608, dt_proj 4*128 + 128 = 640,
    # A_log 128*16 = 2,048, D 128, out_proj 128*64 = 8,192 -> 32,704; 2 layers + final norm 64
    assert type(built.model).__name__ == "MambaForCausalLM"
    assert count_parameters(built.model) == 6_400 + 2 * 32_704 + 64 == 71_872
    out = run_all(built)
    assert out["decode"].logits.shape == (2, 1, 100) and torch.isfinite(out["decode"].logits).all()


def test_hybrid_jamba_runs_every_phase_on_meta(tmp_path):
    built = W.build(write(tmp_path, "jamba", SMALL["jamba"]), batch=2, seq_len=16)
    assert type(built.model).__name__ == "JambaForCausalLM"
    mixers = [type(layer).__name__ for layer in built.model.model.layers]
    assert mixers == ["JambaMambaDecoderLayer", "JambaAttentionDecoderLayer"] * 2
    assert run(built, "prefill").logits.shape == (2, 16, 100)
    assert run(built, "decode").logits.shape == (2, 1, 100)


def bart_params(d, ffn, vocab, max_pos, enc_layers, dec_layers):
    """BART by hand: shared embedding (tied to both embed_tokens and lm_head); learned positions of
    max_pos + 2 rows (offset 2); attention = 4 projections of d*d + d; LayerNorms 2d; FFN
    d*ffn + ffn + ffn*d + d; encoder layer = self-attn + 2 LN + FFN, decoder layer adds cross-attn + 1 LN;
    a layernorm_embedding on each side."""
    attn, ln, mlp = 4 * (d * d + d), 2 * d, d * ffn + ffn + ffn * d + d
    enc = (max_pos + 2) * d + enc_layers * (attn + 2 * ln + mlp) + ln
    dec = (max_pos + 2) * d + dec_layers * (2 * attn + 3 * ln + mlp) + ln
    return vocab * d + enc + dec


def test_seq2seq_bart_params_shapes_and_cache(tmp_path):
    built = W.build(write(tmp_path, "bart", SMALL["bart"]), device="cpu", batch=2, seq_len=12, target_len=5)
    # 3,200 + (2,112 + 8,544 + 64) + (2,112 + 12,832 + 64) = 28,928
    assert count_parameters(built.model) == bart_params(32, 64, 100, 64, 1, 1) == 28_928
    assert run(built, "encode").last_hidden_state.shape == (2, 12, 32)
    step = built.phase("decode")
    args, kwargs = step.make_inputs()
    assert kwargs["cache"].get_seq_length() == 5 and kwargs["decoder_input_ids"].shape == (2, 1)
    out = step.run(*args, **kwargs)
    assert out.logits.shape == (2, 1, 100) and kwargs["cache"].get_seq_length() == 6
    assert (built.phase("encode").units, step.units) == (24, 2)


@published("bart-large")
def test_seq2seq_published_bart_large_on_meta():
    built = W.build(CONFIGS / "bart-large", batch=1, seq_len=32)
    # d 1024, FFN 4096, vocab 50265, 1024 positions, 12 + 12 layers
    assert count_parameters(built.model) == bart_params(1024, 4096, 50265, 1024, 12, 12) == 406_291_456
    out = run_all(built)
    assert out["encode"].last_hidden_state.shape == (1, 32, 1024) and out["decode"].logits.shape == (1, 1, 50265)


def test_speech_whisper_encode_shape_and_limits(tmp_path):
    path = write(tmp_path, "whisper", SMALL["whisper"])
    built = W.build(path, device="cpu", batch=2)
    args, kwargs = built.phase("encode").make_inputs()
    assert kwargs["input_features"].shape == (2, 8, 32)  # (batch, num_mel_bins, 2 * max_source_positions)
    # two convolutions, the second of stride 2: 32 mel frames -> 16 = max_source_positions positions
    assert built.phase("encode").run(*args, **kwargs).last_hidden_state.shape == (2, 16, 32)
    assert built.phase("encode").units == 2 * 16
    args, kwargs = built.phase("decode").make_inputs()
    assert kwargs["cache"].get_seq_length() == 31  # default: max_target_positions (32) - 1, room for the step
    assert built.phase("decode").run(*args, **kwargs).logits.shape == (2, 1, 100)
    with pytest.raises(ConfigError, match=r"seq_len 32 exceeds what max_target_positions allows \(31\)"):
        W.build(path, seq_len=32)


def test_encoder_bert_params_and_default_length(tmp_path):
    built = W.build(write(tmp_path, "bert", SMALL["bert"]), device="cpu", batch=2)
    # embeddings 100*32 + 64*32 + 2*32 + LN 64 = 5,376; layer: 4*(32*32+32) + 64 + (32*64+64) + (64*32+32) + 64
    # = 8,544, two of them; pooler 32*32 + 32 = 1,056
    assert type(built.model).__name__ == "BertModel"
    assert count_parameters(built.model) == 5_376 + 2 * 8_544 + 1_056 == 23_520
    _, kwargs = built.phase("forward").make_inputs()
    assert kwargs["input_ids"].shape == (2, 64)  # default seq_len: max_position_embeddings (64) < 512
    assert built.phase("forward").run(**kwargs).last_hidden_state.shape == (2, 64, 32)
    meta = W.build(CONFIGS / "bert-base", batch=1)
    assert run(meta, "forward").last_hidden_state.shape == (1, 512, 768) and meta.phase("forward").units == 512


def test_vision_vit_params_and_logits(tmp_path):
    built = W.build(write(tmp_path, "vit", SMALL["vit"]), device="cpu", batch=3)
    # patch conv 3*8*8*32 + 32 = 6,176; CLS 32; positions (16 + 1)*32 = 544; one layer 8,544;
    # final LN 64; classifier 32*10 + 10 = 330
    assert count_parameters(built.model) == 6_176 + 32 + 544 + 8_544 + 64 + 330 == 15_690
    assert run(built, "forward").logits.shape == (3, 10) and built.phase("forward").units == 3


def test_dual_encoder_clip(tmp_path):
    built = W.build(write(tmp_path, "clip", SMALL["clip"]), device="cpu", batch=2)
    out = run_all(built)
    assert out["image_encode"].pooler_output.shape == (2, 16)  # projection_dim
    assert out["text_encode"].pooler_output.shape == (2, 16)
    assert built.phase("text_encode").units == 2 * 16  # default seq_len: text max_position_embeddings 16

@published("clip-vit-large-patch14")
def test_dual_encoder_published_clip_on_meta():
    meta = W.build(CONFIGS / "clip-vit-large-patch14")
    _, kw = meta.phase("text_encode").make_inputs()
    assert kw["input_ids"].shape == (1, 77)
    assert run(meta, "image_encode").pooler_output.shape == (1, meta.config.projection_dim)


def test_vision_language_llava_small_on_cpu(tmp_path):
    built = W.build(write(tmp_path, "llava", SMALL["llava"]), device="cpu", batch=2, seq_len=8)
    n_img = (32 // 8) ** 2  # 16 patches; the CLS token is dropped ("default" strategy)
    assert run(built, "image_encode").pooler_output[0].shape == (n_img, 32)
    _, kw = built.phase("prefill").make_inputs()
    ids = kw["input_ids"]
    assert ids.shape == (2, n_img + 8) and (ids[:, :n_img] == 110).all() and (ids[:, n_img:] != 110).all()
    assert kw["pixel_values"].shape == (2, 3, 32, 32)
    assert built.phase("prefill").units == 2 * (16 + 8)
    assert built.phase("prefill").run(**kw).logits.shape == (2, 24, 120)
    _, kw = built.phase("decode").make_inputs()
    assert kw["cache"].get_seq_length() == n_img + 8
    assert torch.isfinite(built.phase("decode").run(**kw).logits).all()


@published("llava-1.5-7b")
def test_vision_language_published_llava_on_meta():
    built = W.build(CONFIGS / "llava-1.5-7b", seq_len=32, prefill_logits="last")
    # CLIP ViT-L/14 at 336 px: (336/14)^2 = 24^2 = 576 image tokens per image
    assert built.phase("prefill").units == 576 + 32
    assert run(built, "prefill").logits.shape[:2] == (1, 1)  # logits_to_keep=1: the last position only
    assert count_parameters(built.model) > 7e9  # a 7B LM behind the tower (decode runs in the small test)


@published("mamba-2.8b")
def test_ssm_published_mamba_params_on_meta():
    built = W.build(CONFIGS / "mamba-2.8b", seq_len=16)
    # D 2560, ED 5120, N 16, K 4, dt_rank 160, V 50280, 64 layers: per layer 2,560 + 26,214,400 + 25,600
    # + 983,040 + 824,320 + 81,920 + 5,120 + 13,107,200 = 41,244,160
    assert count_parameters(built.model) == 50280 * 2560 + 64 * 41_244_160 + 2560 == 2_768_345_600
    assert run(built, "decode").logits.shape[:2] == (1, 1)


# --------------------------------------------------------------------------- dispatch and errors
def test_causal_lm_unchanged(tmp_path):
    path = write(tmp_path, "llama", SMALL["llama"])
    wl = config_workload(path)
    assert wl.description.startswith("decoder LM 'llama'") and wl.default_dtype == torch.float16
    assert W.build(path, batch=1, seq_len=8).model.__class__.__name__ == "LlamaForCausalLM"


def test_diffusers_config_goes_to_diffusers_workload(tmp_path, monkeypatch):
    path = write(tmp_path, "unet", {"_class_name": "UNet2DConditionModel", "sample_size": 64})
    fake = types.ModuleType("cohw_utils.workloads.diffusers_config")
    fake.diffusers_workload = lambda p: ("diffusers", str(p))
    monkeypatch.setitem(sys.modules, "cohw_utils.workloads.diffusers_config", fake)
    assert model_family(path) == "diffusers"
    assert W.get_workload(path) == ("diffusers", path)
    monkeypatch.setitem(sys.modules, "cohw_utils.workloads.diffusers_config", None)  # import fails
    with pytest.raises(ConfigError, match=r"a diffusers config \(_class_name\), but this checkout has no"):
        W.get_workload(path)


def test_unsupported_vision_language_is_one_line(tmp_path):
    from transformers import CONFIG_MAPPING

    path = write(tmp_path, "qwen2_vl", CONFIG_MAPPING["qwen2_vl"]().to_dict())
    assert model_family(path) == "vision-language"
    with pytest.raises(ConfigError) as e:
        W.build(path)
    assert "\n" not in str(e.value) and "only LLaVA-style" in str(e.value)


def test_meta_value_read_becomes_config_error(tmp_path):
    # BART's fp16 encoder layers check their output for inf with .any(): a value meta does not have
    built = W.build(write(tmp_path, "bart", SMALL["bart"]), dtype="fp16", seq_len=8)
    with pytest.raises(ConfigError, match="reads tensor values, which the meta device does not have") as e:
        run(built, "encode")
    assert "\n" not in str(e.value)
