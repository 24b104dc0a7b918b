"""Tests for cohw_utils.workloads: the registry, the configs' published numbers, every phase.

No network, no GPU: full-scale models are built on torch's meta device (shapes only), tiny ones
run on CPU with seeded random weights.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from cohw_utils import workloads as W
from cohw_utils.core.errors import CohwError, ConfigError, UnknownWorkloadError

warnings.filterwarnings("ignore", category=FutureWarning)  # nerfstudio's torch.cuda.amp decorators

EXPECTED_PHASES = {
    "llama-2-7b": ("prefill", "decode"),
    "llama-2-13b": ("prefill", "decode"),
    "llama-2-70b": ("prefill", "decode"),
    "sd-1.5": ("text_encoder", "unet_step", "vae_decode"),
    "deepseek-v2-lite": ("prefill", "decode"),
    "llava-1.5-7b": ("image_encode", "prefill", "decode"),
    "flux.1-dev": ("denoise_step",),
    "3dgs": ("render", "train_step"),
    "vit-b-16": ("forward",),
    "resnet-50": ("forward",),
    "nerfacto": ("render", "train_step"),
    "vanilla-nerf": ("render", "train_step"),
    "dreamfusion-sd": ("sds_step",),
}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def run_phase(built: W.Built, name: str):
    ph = built.phase(name)
    args, kwargs = ph.make_inputs()
    return ph.run(*args, **kwargs)


def llama_json(path, *, heads=8, kv=None, hidden=128, model_type="llama", **extra):
    cfg = {"model_type": model_type, "hidden_size": hidden, "intermediate_size": 256, "num_hidden_layers": 3,
           "num_attention_heads": heads, "vocab_size": 1000, "max_position_embeddings": 256, **extra}
    if kv is not None:
        cfg["num_key_value_heads"] = kv
    path.write_text(json.dumps(cfg))
    return path


# ------------------------------------------------------------------------------------ registry
def test_registry_names_and_phases():
    assert {name: wl.phases for name, wl in W.WORKLOADS.items()} == EXPECTED_PHASES
    for wl in W.WORKLOADS.values():
        assert wl.source and wl.description and wl.library in {"transformers", "diffusers", "nerfstudio", "gsplat"}
        assert wl.builder.__doc__ and "Phase" in wl.builder.__doc__  # every builder documents its phases


def test_list_workloads_frame():
    df = W.list_workloads()
    assert list(df.columns) == ["name", "domain", "library", "phases", "source"]
    assert list(df["name"]) == list(EXPECTED_PHASES)
    assert df.set_index("name").loc["sd-1.5", "phases"] == "text_encoder, unet_step, vae_decode"


def test_unknown_workload_lists_known_names():
    with pytest.raises(UnknownWorkloadError) as e:
        W.get_workload("gpt-5")
    msg = str(e.value)
    assert msg.startswith("unknown workload 'gpt-5'; known: llama-2-7b, llama-2-13b, llama-2-70b, sd-1.5, ")
    assert "dreamfusion-sd" in msg and msg.endswith("or pass a path to a Hugging Face config.json")
    assert "kept configs: bart-large" in msg and "qwen3-30b-a3b" in msg  # the configs kept in the repo
    assert isinstance(e.value, KeyError) and isinstance(e.value, CohwError)


def test_a_kept_config_is_found_by_its_folder_name():
    wl = W.get_workload("qwen3-30b-a3b")  # data/configs/qwen3-30b-a3b, not a registry name
    assert wl.domain == "llm" and wl.phases == ("prefill", "decode")
    assert W.get_workload("sdxl-base-1.0/unet").library == "diffusers"


def test_missing_config_path_is_unknown_workload(tmp_path):
    with pytest.raises(UnknownWorkloadError, match=r"\(no such file\); known: llama-2-7b"):
        W.get_workload(str(tmp_path / "nope" / "config.json"))
    with pytest.raises(UnknownWorkloadError, match="no config.json in it"):
        W.get_workload(str(tmp_path))


def test_names_are_case_insensitive_and_repr_is_short():
    assert W.get_workload("LLaMA-2-7B") is W.WORKLOADS["llama-2-7b"]
    assert repr(W.build("llama-2-70b")) == ("Built(workload='llama-2-70b', scale='full', device=meta, "
                                            "dtype=torch.float16, params=68,976,648,192, phases=[prefill, decode])")


def test_unknown_phase_scale_option_dtype():
    built = W.build("llama-2-7b", scale="tiny", device="cpu", seq_len=4)
    with pytest.raises(CohwError, match="workload 'llama-2-7b' has no phase 'train'; its phases: prefill, decode"):
        built.phase("train")
    with pytest.raises(CohwError, match="unknown scale 'huge'.*full, tiny"):
        W.build("llama-2-7b", scale="huge")
    with pytest.raises(CohwError, match="has no option 'image_size'; its options: prefill_logits, attn_implementation, cache, seed"):
        W.build("llama-2-7b", image_size=512)
    with pytest.raises(CohwError, match="unknown dtype 'int3'"):
        W.build("llama-2-7b", dtype="int3")
    with pytest.raises(CohwError, match="batch must be a positive integer"):
        W.build("llama-2-7b", batch=0)


def test_default_dtypes():
    assert W.build("llama-2-7b").dtype == torch.float16  # published fp16, on meta
    assert W.build("llama-2-7b", scale="tiny", device="cpu", seq_len=4).dtype == torch.float32  # cpu
    assert W.build("llama-2-7b", dtype="bf16").dtype == torch.bfloat16
    assert W.build("vit-b-16").dtype == torch.float32


# ---------------------------------------------------------------------------- KV cache bytes
@pytest.mark.parametrize("name,expected", [("llama-2-7b", 524_288), ("llama-2-13b", 819_200), ("llama-2-70b", 327_680)])
def test_kv_cache_bytes_per_token_llama2(name, expected):
    cfg = W.load_hf_config(W.CONFIG_DIR / name / "config.json")
    assert W.kv_cache_bytes_per_token(cfg) == expected  # fp16
    assert W.kv_cache_bytes_per_token(cfg, dtype_bytes=4) == 2 * expected
    assert W.kv_cache_bytes_per_token(W.CONFIG_DIR / name / "config.json") == expected  # a path works too


def test_kv_cache_bytes_mha_gqa_mqa_and_head_dim():
    base = {"num_hidden_layers": 2, "num_attention_heads": 8, "hidden_size": 512}
    assert W.kv_cache_bytes_per_token(base) == 2 * 2 * 8 * 64 * 2  # MHA: kv heads absent -> heads
    assert W.kv_cache_bytes_per_token({**base, "num_key_value_heads": 2}) == 2 * 2 * 2 * 64 * 2  # GQA
    assert W.kv_cache_bytes_per_token({**base, "num_key_value_heads": 1}) == 2 * 2 * 1 * 64 * 2  # MQA
    assert W.kv_cache_bytes_per_token({**base, "multi_query": True}) == 2 * 2 * 1 * 64 * 2  # MQA, gpt_bigcode style
    assert W.kv_cache_bytes_per_token({**base, "head_dim": 128}) == 2 * 2 * 8 * 128 * 2  # explicit head_dim wins
    falcon_40b = {**base, "num_kv_heads": 2, "multi_query": True, "new_decoder_architecture": True}
    assert W.kv_cache_bytes_per_token(falcon_40b) == 2 * 2 * 2 * 64 * 2
    with pytest.raises(ConfigError):
        W.kv_cache_bytes_per_token({"hidden_size": 16})


# ------------------------------------------------------------------------------------ Llama-2
def test_repo_configs_are_the_published_values():
    c70 = W.load_hf_config(W.CONFIG_DIR / "llama-2-70b")
    assert type(c70).__name__ == "LlamaConfig"
    assert (c70.hidden_size, c70.num_hidden_layers, c70.num_attention_heads, c70.num_key_value_heads,
            c70.intermediate_size, c70.vocab_size, c70.rms_norm_eps, c70.max_position_embeddings) == \
        (8192, 80, 64, 8, 28672, 32000, 1e-5, 4096)
    assert not hasattr(c70, "_cohw_source")  # provenance keys are stripped before transformers sees them
    c13 = W.load_hf_config(W.CONFIG_DIR / "llama-2-13b")
    assert (c13.hidden_size, c13.num_hidden_layers, c13.num_attention_heads, c13.intermediate_size) == (5120, 40, 40, 13824)


@pytest.mark.parametrize("name,expected", [
    ("llama-2-7b", 6_738_415_616), ("llama-2-13b", 13_015_864_320), ("llama-2-70b", 68_976_648_192)])
def test_llama2_full_params_on_meta(name, expected):
    built = W.build(name)
    assert all(p.device.type == "meta" for p in built.model.parameters())  # nothing allocated
    assert type(built.model).__name__ == "LlamaForCausalLM"
    assert built.model.device.type == "meta" and built.dtype == torch.float16
    assert n_params(built.model) == expected


def test_llama2_70b_prefill_and_decode_on_meta():
    built = W.build("llama-2-70b", batch=2, seq_len=512)
    pre = built.phase("prefill")
    assert (pre.units, pre.unit_name) == (1024, "token")
    out = run_phase(built, "prefill")
    assert out.logits.shape == (2, 512, 32000)  # every position by default
    kv = W.cache_tensors(out.cache)
    assert len(kv) == 80
    assert all(k.shape == v.shape == (2, 8, 512, 128) for k, v in kv)  # GQA: 8 KV heads
    assert kv[0][0].device.type == "meta" and kv[0][0].dtype == torch.float16

    dec = built.phase("decode")
    assert (dec.units, dec.unit_name, dec.backward) == (2, "token", False)
    args, kwargs = dec.make_inputs()
    assert kwargs["input_ids"].shape == (2, 1) and kwargs["cache"].get_seq_length() == 512
    out = dec.run(*args, **kwargs)
    assert out.logits.shape == (2, 1, 32000)
    assert W.cache_tensors(out.cache)[0][0].shape == (2, 8, 513, 128)


def test_prefill_logits_all_by_default_last_on_request():
    built = W.build("llama-2-7b", seq_len=16)
    assert run_phase(built, "prefill").logits.shape == (1, 16, 32000)
    built = W.build("llama-2-7b", seq_len=16, prefill_logits="last")
    assert run_phase(built, "prefill").logits.shape == (1, 1, 32000)


@pytest.mark.parametrize("name,kv_heads", [("llama-2-7b", 4), ("llama-2-13b", 4), ("llama-2-70b", 2)])
def test_llama2_tiny_cpu_cache_shapes(name, kv_heads):
    built = W.build(name, scale="tiny", device="cpu", batch=2, seq_len=8)
    assert type(built.model).__name__ == "LlamaForCausalLM"
    out = run_phase(built, "prefill")
    kv = W.cache_tensors(out.cache)
    assert len(kv) == 2
    assert all(k.shape == v.shape == (2, kv_heads, 8, 16) for k, v in kv)  # (batch, kv_heads, seq, head_dim)
    assert torch.isfinite(out.logits).all()
    step = run_phase(built, "decode")
    assert step.logits.shape == (2, 1, 512) and torch.isfinite(step.logits).all()
    assert W.cache_tensors(step.cache)[0][0].shape == (2, kv_heads, 9, 16)


def test_tiny_weights_are_seeded():
    a = W.build("llama-2-7b", scale="tiny", device="cpu", seq_len=4).model.state_dict()
    b = W.build("llama-2-7b", scale="tiny", device="cpu", seq_len=4).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------- any HF config.json path
@pytest.mark.parametrize("kv,kind", [(None, "MHA"), (2, "GQA"), (1, "MQA")])
def test_hf_config_path_mha_gqa_mqa(tmp_path, kv, kind):
    path = llama_json(tmp_path / "config.json", heads=8, kv=kv)
    wl = W.get_workload(str(path))
    assert wl.phases == ("prefill", "decode") and wl.domain == "llm" and wl.name == str(path)
    kv_heads = kv or 8
    assert W.kv_cache_bytes_per_token(W.load_hf_config(path)) == 2 * 3 * kv_heads * 16 * 2

    full = W.build(str(path), batch=2, seq_len=32)  # the config as written, on meta
    assert n_params(full.model) == n_params(W.build(str(tmp_path), batch=2, seq_len=32).model)  # folder works too
    kv_full = W.cache_tensors(run_phase(full, "prefill").cache)
    assert len(kv_full) == 3 and kv_full[0][0].shape == (2, kv_heads, 32, 16)

    tiny = W.build(str(path), scale="tiny", device="cpu", batch=2, seq_len=8)
    tiny_kv = {"MHA": 4, "GQA": 2, "MQA": 1}[kind]  # tiny keeps the attention kind
    assert W.cache_tensors(run_phase(tiny, "prefill").cache)[0][0].shape == (2, tiny_kv, 8, 16)
    assert torch.isfinite(run_phase(tiny, "decode").logits).all()


def test_hf_config_path_default_dtype_and_repo_config(tmp_path):
    repo_path = W.CONFIG_DIR / "llama-2-13b" / "config.json"
    wl = W.get_workload(repo_path)
    assert wl.default_dtype == torch.float16  # the config's torch_dtype
    assert n_params(W.build(repo_path).model) == 13_015_864_320  # same model as the named workload
    bf16 = llama_json(tmp_path / "bf16.json", torch_dtype="bfloat16")
    assert W.get_workload(str(bf16)).default_dtype == torch.bfloat16
    assert W.build(str(bf16)).dtype == torch.bfloat16


def test_hf_config_path_gpt2(tmp_path):
    path = tmp_path / "gpt2.json"
    path.write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 500,
                                "n_positions": 64}))
    assert W.kv_cache_bytes_per_token(W.load_hf_config(path)) == 2 * 2 * 4 * 16 * 2
    built = W.build(str(path), scale="full", device="cpu", seq_len=8)
    assert type(built.model).__name__ == "GPT2LMHeadModel"
    assert W.cache_tensors(run_phase(built, "prefill").cache)[0][0].shape == (1, 4, 8, 16)


def test_hf_config_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"model_type": "llama", "hidden_size": 64,,}')
    with pytest.raises(ConfigError, match=r"bad\.json: not valid JSON .*line 1.*fix the file"):
        W.load_hf_config(bad)
    with pytest.raises(ConfigError, match="not valid JSON"):
        W.get_workload(str(bad))

    no_type = tmp_path / "no_type.json"
    no_type.write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ConfigError, match=r"no_type\.json: no 'model_type' key; add .*\"model_type\": \"llama\""):
        W.build(str(no_type))

    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"model_type": "llamma"}))
    with pytest.raises(ConfigError, match=r"unknown\.json: unknown model_type 'llamma'"):
        W.load_hf_config(unknown)

    vision = tmp_path / "vit.json"  # a ViT config is a workload now (family "vision"), no longer refused
    vision.write_text(json.dumps({"model_type": "vit"}))
    assert W.get_workload(str(vision)).phases == ("forward",)
    retrieval = tmp_path / "dpr.json"  # a DPR question/context encoder pair: no family builds it
    retrieval.write_text(json.dumps({"model_type": "dpr"}))
    with pytest.raises(ConfigError, match="model_type 'dpr' fits no supported family") as err:
        W.get_workload(str(retrieval))
    assert "\n" not in str(err.value)

    not_obj = tmp_path / "list.json"
    not_obj.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must be a JSON object"):
        W.load_hf_config(not_obj)


# ------------------------------------------------------------------------ Stable Diffusion 1.5
def test_sd15_full_params_and_shapes_on_meta():
    built = W.build("sd-1.5")
    m = built.model
    assert list(m.keys()) == ["text_encoder", "unet", "vae"]
    assert [type(m[k]).__name__ for k in m] == ["CLIPTextModel", "UNet2DConditionModel", "AutoencoderKL"]
    assert n_params(m["unet"]) == 859_520_964
    assert n_params(m["text_encoder"]) == 123_060_480
    assert n_params(m["vae"]) == 83_653_863
    assert list(built.config["unet"].block_out_channels) == [320, 640, 1280, 1280]
    assert run_phase(built, "text_encoder").shape == (2, 77, 768)  # prompt + negative prompt
    unet = built.phase("unet_step")
    (latents, t, emb), _ = unet.make_inputs()
    assert latents.shape == (1, 4, 64, 64) and emb.shape == (2, 77, 768)
    assert unet.run(latents, t, emb).shape == (1, 4, 64, 64)
    assert run_phase(built, "vae_decode").shape == (1, 3, 512, 512)
    assert all(p.units == 1 and p.unit_name == "image" for p in built.phases.values())


def test_sd15_image_size_and_batch():
    built = W.build("sd-1.5", image_size=768, batch=2)
    (latents, _, emb), _ = built.phase("unet_step").make_inputs()
    assert latents.shape == (2, 4, 96, 96) and emb.shape == (4, 77, 768)
    assert run_phase(built, "vae_decode").shape == (2, 3, 768, 768)
    with pytest.raises(CohwError, match="image_size must be a positive multiple of 64"):
        W.build("sd-1.5", image_size=500)


def test_sd15_tiny_cpu():
    built = W.build("sd-1.5", scale="tiny", device="cpu")
    for name in EXPECTED_PHASES["sd-1.5"]:
        out = run_phase(built, name)
        assert torch.isfinite(out).all()
    assert run_phase(built, "vae_decode").shape == (1, 3, 64, 64)  # latent 8x8, still 8x downsampling


# ----------------------------------------------------------------------------------- vision
@pytest.mark.parametrize("name,cls,expected", [
    ("vit-b-16", "ViTForImageClassification", 86_567_656),
    ("resnet-50", "ResNetForImageClassification", 25_557_032)])
def test_vision_full_params_on_meta(name, cls, expected):
    built = W.build(name, batch=4)
    assert type(built.model).__name__ == cls
    assert n_params(built.model) == expected
    ph = built.phase("forward")
    args, kwargs = ph.make_inputs()
    assert kwargs["pixel_values"].shape == (4, 3, 224, 224)
    assert ph.run(*args, **kwargs).shape == (4, 1000)
    assert (ph.units, ph.unit_name) == (4, "image")


def test_vision_image_size_option():
    vit = W.build("vit-b-16", image_size=384)
    assert run_phase(vit, "forward").shape == (1, 1000)
    assert n_params(vit.model) == 86_567_656 + (577 - 197) * 768  # 24x24+1 position embeddings instead of 14x14+1
    assert run_phase(W.build("resnet-50", image_size=288), "forward").shape == (1, 1000)
    with pytest.raises(CohwError, match="multiple of the patch size 16"):
        W.build("vit-b-16", image_size=230)


@pytest.mark.parametrize("name", ["vit-b-16", "resnet-50"])
def test_vision_tiny_cpu(name):
    logits = run_phase(W.build(name, scale="tiny", device="cpu", batch=2), "forward")
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


# ------------------------------------------------------------------------------------- NeRFs
def test_nerfacto_full_on_meta():
    built = W.build("nerfacto")
    assert n_params(built.model) == 19_413_845
    names = dict(built.model.named_modules())
    for sub, cls in [("proposal_networks.0", "HashMLPDensityField"), ("proposal_networks.1", "HashMLPDensityField"),
                     ("proposal_sampler", "ProposalNetworkSampler"), ("field", "NerfactoField"),
                     ("field.mlp_base", "MLPWithHashEncoding"), ("field.mlp_head", "MLP"), ("renderer_rgb", "RGBRenderer"),
                     ("collider", "NearFarCollider")]:
        assert type(names[sub]).__name__ == cls
    # nerfstudio's pure-torch hash grid: 16 levels x 2^19 entries x 2 features
    hash_table = built.model.field.mlp_base.model[0].hash_table
    assert built.model.field.mlp_base.tcnn_encoding is None and hash_table.shape == (16 * 2**19, 2)
    assert built.model.proposal_sampler.num_proposal_samples_per_ray == (256, 96)
    assert built.model.proposal_sampler.num_nerf_samples_per_ray == 48
    render = built.phase("render")
    assert (render.units, render.unit_name) == (4096, "ray")
    out = run_phase(built, "render")
    assert out["rgb"].shape == (4096, 3) and out["rgb"].device.type == "meta"
    assert built.phase("train_step").backward
    assert run_phase(built, "train_step").shape == ()


def test_nerfacto_tiny_cpu_render_and_train():
    built = W.build("nerfacto", scale="tiny", device="cpu")
    out = run_phase(built, "render")
    assert out["rgb"].shape == (256, 3) and torch.isfinite(out["rgb"]).all()
    loss = run_phase(built, "train_step")
    assert torch.isfinite(loss)
    grads = {n: p.grad for n, p in built.model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())  # incl. proposal nets
    assert grads["field.mlp_base.model.0.hash_table"].abs().sum() > 0


def test_nerf_rays_option_and_float32_only():
    built = W.build("nerfacto", scale="tiny", device="cpu", rays=64)
    assert built.phase("render").units == 64 and run_phase(built, "render")["rgb"].shape == (64, 3)
    with pytest.raises(CohwError, match="float32 only"):
        W.build("nerfacto", dtype=torch.float16)


def test_vanilla_nerf_full_on_meta_and_tiny_cpu():
    built = W.build("vanilla-nerf")
    assert n_params(built.model) == 1_093_128  # two NeRFFields of 546,564: 8x256 MLP, skip at 4, 2x128 head
    assert [type(built.model.get_submodule(n)).__name__ for n in ("field_coarse", "field_fine", "sampler_uniform", "sampler_pdf")] \
        == ["NeRFField", "NeRFField", "UniformSampler", "PDFSampler"]
    out = run_phase(built, "render")
    assert out["rgb_fine"].shape == (4096, 3)
    tiny = W.build("vanilla-nerf", scale="tiny", device="cpu")
    assert torch.isfinite(run_phase(tiny, "render")["rgb_fine"]).all()
    assert torch.isfinite(run_phase(tiny, "train_step"))
    assert all(p.grad is not None for p in tiny.model.parameters())


# ----------------------------------------------------------------------------- DreamFusion
def test_dreamfusion_full_on_meta():
    built = W.build("dreamfusion-sd")
    m = built.model
    assert list(m.keys()) == ["nerf", "vae", "unet"]
    assert n_params(m["unet"]) == 859_520_964 and n_params(m["vae"]) == 83_653_863
    assert n_params(m["nerf"]) == 19_413_845 - 100 * 32 - 32 * 64  # nerfacto without the appearance embedding
    ph = built.phase("sds_step")
    assert ph.backward and (ph.units, ph.unit_name) == (1, "step")
    (bundle, emb, t), _ = ph.make_inputs()
    assert bundle.origins.shape == (64 * 64, 3) and emb.shape == (2, 77, 768) and t.shape == (1,)
    loss = ph.run(bundle, emb, t)
    assert loss.shape == () and loss.device.type == "meta"


@pytest.mark.parametrize("mode", ["vae", "interpolate"])
def test_dreamfusion_tiny_cpu_sds_gradient_reaches_the_nerf(mode):
    built = W.build("dreamfusion-sd", scale="tiny", device="cpu", latent_mode=mode)
    loss = run_phase(built, "sds_step")
    assert torch.isfinite(loss)
    nerf_grads = [p.grad for p in built.model["nerf"].parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in nerf_grads)
    assert built.model["nerf"].field.mlp_base.model[0].hash_table.grad.abs().sum() > 0
    # the diffusion model guides but is frozen
    assert all(p.grad is None for k in ("vae", "unet") for p in built.model[k].parameters())
    with pytest.raises(CohwError, match="latent_mode must be"):
        W.build("dreamfusion-sd", scale="tiny", device="cpu", latent_mode="pixels")
