"""Tests for cohw_utils.workloads.diffusers_config: any diffusers model config.json as a workload.

Full scale on meta from the repo's published configs (SD 1.5 and SDXL UNets, SD3-medium and
FLUX.1-dev transformers, their VAEs) and from class-default configs written to tmp_path (DiT,
PixArt); tiny scale runs on CPU. Numbers are hand-computed in the comments, or published ones
with their source.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from cohw_utils.core.errors import CohwError, ConfigError
from cohw_utils.spine.trace import trace
from cohw_utils.workloads.diffusers_config import (
    SUPPORTED_CLASSES, VAE_SCALE_FACTOR, default_text_tokens, diffusers_workload)
from cohw_utils.workloads.helpers import CONFIG_DIR

warnings.filterwarnings("ignore", category=FutureWarning)

SD15_UNET = CONFIG_DIR / "sd-1.5" / "unet"
SDXL_UNET = CONFIG_DIR / "sdxl-base-1.0" / "unet" / "config.json"
SDXL_VAE = CONFIG_DIR / "sdxl-base-1.0" / "vae"
SD3 = CONFIG_DIR / "sd3-medium" / "transformer"
FLUX = CONFIG_DIR / "flux.1-dev" / "transformer"
FLUX_VAE = CONFIG_DIR / "flux.1-dev" / "vae"


def need(path):
    if not path.exists():
        pytest.skip(f"{path} not in this checkout")
    return path


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def run(built, phase=None):
    ph = built.phases[phase or next(iter(built.phases))]
    args, kw = ph.make_inputs()
    return ph.run(*args, **kw), args, kw


def class_default_config(tmp_path, name, **overrides):
    """A config.json of the class's own defaults (what ``cls.from_config({})`` registers)."""
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, name).from_config({})
    cfg = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    cfg.update(_class_name=name, **overrides)
    path = tmp_path / name / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(cfg))
    return path


# ------------------------------------------------------------------------------ refusals
def test_unknown_class_is_one_line_naming_it_and_the_supported_ones(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"_class_name": "HunyuanDiT2DModel", "num_layers": 40}))
    with pytest.raises(ConfigError) as e:
        diffusers_workload(p)
    msg = str(e.value)
    assert "'HunyuanDiT2DModel'" in msg and "\n" not in msg
    assert all(name in msg for name in SUPPORTED_CLASSES)


def test_pipeline_index_and_non_diffusers_configs_are_refused(tmp_path):
    index = tmp_path / "model_index.json"
    index.write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(ConfigError, match="whole pipeline.*unet/config.json"):
        diffusers_workload(index)
    llm = tmp_path / "config.json"
    llm.write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="no '_class_name'"):
        diffusers_workload(tmp_path)
    with pytest.raises(ConfigError, match="no such file"):
        diffusers_workload(tmp_path / "nope" / "config.json")


def test_bad_sizes_and_text_lengths():
    wl = diffusers_workload(need(SDXL_UNET))
    # SDXL's UNet downsamples twice (3 levels): latent side multiple of 4, image of 4 x 8 = 32
    with pytest.raises(ConfigError, match="multiple of 32"):
        wl.builder(image_size=1000)
    with pytest.raises(ConfigError, match="text_tokens must be a positive integer"):
        wl.builder(text_tokens=0)
    with pytest.raises(ConfigError, match="disagree"):
        wl.builder(seq_len=77, text_tokens=154)
    # SD3-medium: pos_embed_max_size 192 patches of 2 latents of 8 px -> at most 3072 px
    with pytest.raises(ConfigError, match="image_size <= 3072"):
        diffusers_workload(need(SD3)).builder(image_size=4096)
    with pytest.raises(CohwError, match="no option"):
        wl.builder(rays=10)


# ------------------------------------------------------------------------------ workloads
def test_workload_entries():
    unet, flux, vae = diffusers_workload(need(SDXL_UNET)), diffusers_workload(need(FLUX)), diffusers_workload(need(SDXL_VAE))
    assert unet.phases == ("denoise_step",) and unet.library == "diffusers" and unet.default_dtype == torch.float16
    assert flux.default_dtype == torch.bfloat16  # FluxPipeline's example loads bf16
    assert vae.phases == ("vae_decode", "vae_encode")
    assert "Phase" in unet.builder.__doc__ and set(unet.builder.options) == {"image_size", "text_tokens", "seed"}


def test_default_text_lengths_come_from_the_pipelines():
    assert default_text_tokens("UNet2DConditionModel") == 77  # CLIP context (SD 1.5 text encoder config)
    assert default_text_tokens("SD3Transformer2DModel") == 77 + 256  # CLIP + T5 max_sequence_length
    assert default_text_tokens("FluxTransformer2DModel") == 512
    assert default_text_tokens("PixArtTransformer2DModel") == 120
    assert default_text_tokens("DiTTransformer2DModel") is None


def test_sd15_unet_matches_the_sd15_workload():
    from cohw_utils.workloads import build

    b = diffusers_workload(need(SD15_UNET)).builder()
    # sample_size 64 x 8 = 512 px; 860M parameters (Rombach et al. 2022; SDXL paper Table 1)
    assert b.config["image_size"] == (512, 512) and b.config["latent"] == (4, 64, 64)
    assert n_params(b.model) == n_params(build("sd-1.5").model["unet"])
    assert abs(n_params(b.model) / 860e6 - 1) < 0.005
    out, _, kw = run(b)
    assert out.shape == (1, 4, 64, 64) and kw["encoder_hidden_states"].shape == (1, 77, 768)


def test_sdxl_unet_full_scale():
    b = diffusers_workload(need(SDXL_UNET)).builder(batch=2)
    assert abs(n_params(b.model) / 2.6e9 - 1) < 0.02  # SDXL UNet: 2.6B (Podell et al. 2023, Table 1)
    out, _, kw = run(b)
    # sample_size 128 latents -> 1024 px; output = the latent's shape
    assert b.config["image_size"] == (1024, 1024) and out.shape == (2, 4, 128, 128)
    assert kw["encoder_hidden_states"].shape == (2, 77, 2048)
    # text_time: text_embeds = 2816 - 6 time ids x 256 = 1280 wide, time_ids (orig, crop, target) 6
    added = kw["added_cond_kwargs"]
    assert added["text_embeds"].shape == (2, 1280) and added["time_ids"].shape == (2, 6)
    assert b.phases["denoise_step"].units == 2 and b.phases["denoise_step"].unit_name == "step"


def test_text_tokens_and_seq_len_set_the_text_length():
    wl = diffusers_workload(need(SDXL_UNET))
    for kw in ({"text_tokens": 154}, {"seq_len": 154}):
        b = wl.builder(scale="tiny", **kw)
        assert b.config["text_tokens"] == 154
        assert run(b)[2]["encoder_hidden_states"].shape == (1, 154, 32)  # tiny cross_attention_dim 32


def test_unet_conditioning_variants(tmp_path):
    base = json.loads(need(SD15_UNET / "config.json").read_text())
    image = tmp_path / "image" / "config.json"
    image.parent.mkdir()
    image.write_text(json.dumps({**base, "addition_embed_type": "image", "encoder_hid_dim": 1280}))
    with pytest.raises(ConfigError, match="addition_embed_type 'image'.*supported"):
        diffusers_workload(image).builder()  # refused before anything is built
    labels = tmp_path / "labels" / "config.json"
    labels.parent.mkdir()
    labels.write_text(json.dumps({**base, "num_class_embeds": 1000}))  # class labels as the x4 upscaler's noise level
    _, _, kw = run(diffusers_workload(labels).builder())
    assert kw["class_labels"].shape == (1,) and "added_cond_kwargs" not in kw
    out, _, kw = run(diffusers_workload(labels).builder(scale="tiny", device="cpu"))
    assert kw["class_labels"].shape == (1,) and torch.isfinite(out).all()
    timestep = tmp_path / "timestep" / "config.json"
    timestep.parent.mkdir()
    timestep.write_text(json.dumps({**base, "class_embed_type": "timestep"}))
    with pytest.raises(ConfigError, match="tiny scale"):  # no shrunk form of a class-embedding UNet
        diffusers_workload(timestep).builder(scale="tiny")
    assert run(diffusers_workload(timestep).builder())[2]["class_labels"].shape == (1,)


def test_sd3_transformer_full_scale_embedders_by_hand():
    b = diffusers_workload(need(SD3)).builder()
    assert b.config["text_tokens"] == 333 and b.config["image_size"] == (1024, 1024)
    ph = b.phases["denoise_step"]
    args, kw = ph.make_inputs()
    assert kw["encoder_hidden_states"].shape == (1, 333, 4096) and kw["pooled_projections"].shape == (1, 2048)
    with torch.no_grad():
        table = trace(ph.run, *args, model=b.model, phase=ph.name, **kw)
    flops = table.groupby("module").flops.sum()
    # width 24 heads x 64 = 1536. Patch embedding: (128/2)^2 = 4096 patches x (16 ch x 2 x 2) in
    # -> 1536: 2 x 4096 x 64 x 1536 = 805,306,368. Text projection: 2 x 333 x 4096 x 1536 = 4,190,109,696
    assert flops["pos_embed.proj"] == 805_306_368
    assert flops["context_embedder"] == 4_190_109_696
    out = ph.run(*args, **kw)
    assert out.shape == (1, 16, 128, 128)


def test_flux_transformer_full_scale():
    b = diffusers_workload(need(FLUX)).builder()
    assert abs(n_params(b.model) / 12e9 - 1) < 0.01  # "12 billion parameter" (FLUX.1-dev model card)
    out, _, kw = run(b)
    # 1024 px (FluxPipeline default_sample_size 128 x 8) -> 128x128 latents -> 2x2 packed: 64 x 64 = 4096 tokens
    assert kw["hidden_states"].shape == (1, 4096, 64) and out.shape == (1, 4096, 64)
    assert kw["encoder_hidden_states"].shape == (1, 512, 4096) and kw["pooled_projections"].shape == (1, 768)
    assert kw["img_ids"].shape == (4096, 3) and kw["txt_ids"].shape == (512, 3)
    assert kw["guidance"].shape == (1,)  # FLUX.1-dev is guidance-distilled (guidance_embeds)


def test_flux_image_ids_as_the_pipeline_builds_them():
    b = diffusers_workload(need(FLUX)).builder(scale="tiny", device="cpu")
    _, _, kw = run(b)
    # tiny: 64 px -> 8x8 latent -> 4x4 packed tokens; token 5 is row 1, column 1
    assert kw["img_ids"].shape == (16, 3) and kw["img_ids"][5].tolist() == [0.0, 1.0, 1.0]
    assert kw["txt_ids"].abs().sum() == 0


def test_dit_xl2_matches_its_paper(tmp_path):
    # DiTTransformer2DModel's defaults are DiT-XL/2 (28 layers, 16 x 72 = 1152 wide, patch 2,
    # 32x32 latents); DiT learns the variance, so 2 x 4 output channels.
    b = diffusers_workload(class_default_config(tmp_path, "DiTTransformer2DModel", out_channels=8)).builder()
    assert b.config["image_size"] == (256, 256) and b.config["text_tokens"] is None
    # diffusers stores the timestep + class embedder in each of the 28 blocks, DiT once:
    # (256 x 1152 + 1152) + (1152 x 1152 + 1152) + 1001 classes x 1152 = 2,777,472 per copy
    extra = 27 * 2_777_472
    assert abs((n_params(b.model) - extra) / 675e6 - 1) < 0.001  # 675M (Peebles & Xie 2023, Table 4)
    ph = b.phases["denoise_step"]
    args, kw = ph.make_inputs()
    with torch.no_grad():
        table = trace(ph.run, *args, model=b.model, phase=ph.name, **kw)
    # patch embedding: (32/2)^2 = 256 tokens x (4 x 2 x 2) -> 1152: 2 x 256 x 16 x 1152 = 9,437,184 FLOPs
    assert table[table.module == "pos_embed.proj"].flops.sum() == 9_437_184
    # DiT-XL/2 at 256 px: 118.64 Gflops, counted as multiply-adds (Peebles & Xie 2023, Table 4)
    assert abs(table.macs.sum() / 118.64e9 - 1) < 0.005
    assert ph.run(*args, **kw).shape == (1, 8, 32, 32)


def test_pixart_size_conditions(tmp_path):
    cfg = class_default_config(tmp_path, "PixArtTransformer2DModel", caption_channels=4096)
    b = diffusers_workload(cfg).builder()
    out, _, kw = run(b)
    assert b.config["text_tokens"] == 120 and kw["encoder_hidden_states"].shape == (1, 120, 4096)
    # sample_size 128: diffusers turns on the resolution/aspect-ratio conditions PixArtAlphaPipeline passes
    assert kw["added_cond_kwargs"]["resolution"].shape == (1, 2) and kw["added_cond_kwargs"]["aspect_ratio"].shape == (1, 1)
    assert out.shape == (1, 8, 128, 128)  # out_channels 8 (learned variance)


def test_vae_decode_and_encode_full_scale():
    b = diffusers_workload(need(SDXL_VAE)).builder()
    dec, (lat,), _ = run(b, "vae_decode")
    enc, (img,), _ = run(b, "vae_encode")
    # 4 levels -> 2**3 = 8: a 1024 px image is a 4 x 128 x 128 latent
    assert lat.shape == (1, 4, 128, 128) and dec.shape == (1, 3, 1024, 1024)
    assert img.shape == (1, 3, 1024, 1024) and enc.shape == (1, 4, 128, 128)
    ph = b.phases["vae_decode"]
    args, kw = ph.make_inputs()
    with torch.no_grad():
        table = trace(ph.run, *args, model=b.model, phase=ph.name, **kw)
    flops = table.groupby("module").flops.sum()
    # post_quant_conv 1x1, 4 -> 4 at 128^2: 2 x 4 x 4 x 16384 = 524,288
    # decoder.conv_in 3x3, 4 -> 512 at 128^2: 2 x 4 x 9 x 512 x 16384 = 603,979,776
    assert flops["post_quant_conv"] == 524_288 and flops["decoder.conv_in"] == 603_979_776


def test_flux_vae_has_16_latent_channels_and_no_quant_convs():
    b = diffusers_workload(need(FLUX_VAE)).builder()
    dec, (lat,), _ = run(b, "vae_decode")
    assert lat.shape == (1, 16, 128, 128) and dec.shape == (1, 3, 1024, 1024)
    assert not hasattr(b.model, "post_quant_conv") or b.model.post_quant_conv is None


def test_tiny_models_run_on_cpu_reproducibly(tmp_path):
    paths = [need(SDXL_UNET), need(SD3), need(FLUX), need(SDXL_VAE),
             class_default_config(tmp_path, "DiTTransformer2DModel"),
             class_default_config(tmp_path, "PixArtTransformer2DModel", caption_channels=4096)]
    for p in paths:
        wl = diffusers_workload(p)
        for phase in wl.phases:
            a = run(wl.builder(scale="tiny", device="cpu"), phase)[0]
            b = run(wl.builder(scale="tiny", device="cpu"), phase)[0]
            assert torch.isfinite(a).all(), (p, phase)
            torch.testing.assert_close(a, b)  # seeded weights and inputs
    tiny = diffusers_workload(need(SDXL_UNET)).builder(scale="tiny", device="cpu")
    assert tiny.config["image_size"] == (8 * VAE_SCALE_FACTOR,) * 2 and tiny.config["text_tokens"] == 8
