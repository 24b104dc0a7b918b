"""Stable Diffusion 1.5 (diffusers ``UNet2DConditionModel`` and ``AutoencoderKL``, transformers'
``CLIPTextModel``) from runwayml/stable-diffusion-v1-5's configs, with ``text_encoder``,
``unet_step`` and ``vae_decode`` phases; also the SD 1.5 parts (configs, latent scale) that
:mod:`cohw_utils.workloads.dreamfusion` reuses.

``sd-1.5`` is the diffusion proxy of Chapters 1-5 (proxy set, architecture, enabling, latency and
fusion, energy, the co-design loop).
"""
from __future__ import annotations

import torch
from torch import nn

from cohw_utils.core.errors import CohwError
from cohw_utils.workloads.base import Built, Phase
from cohw_utils.workloads.helpers import _construct, _generator, _no_grad, _randint, _randn, _repo_json


_TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=1000, projection_dim=32)
_TINY_UNET = dict(block_out_channels=[32, 64], layers_per_block=1, cross_attention_dim=32,
                  attention_head_dim=2, norm_num_groups=8, sample_size=8,
                  down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
_TINY_VAE = dict(block_out_channels=[8, 16, 32, 32], layers_per_block=1, norm_num_groups=4, sample_size=64)


def _sd_parts(scale):
    """Configs of SD 1.5's text encoder (CLIPTextConfig), UNet and VAE (dicts), maybe shrunk."""
    from transformers import CLIPTextConfig

    te = _repo_json("sd-1.5", "text_encoder", "config.json")
    unet = _repo_json("sd-1.5", "unet", "config.json")
    vae = _repo_json("sd-1.5", "vae", "config.json")
    if scale == "tiny":
        te.update(_TINY_CLIP)
        unet.update(_TINY_UNET)
        vae.update(_TINY_VAE)
        unet["cross_attention_dim"] = te["hidden_size"]
    return CLIPTextConfig.from_dict(te), unet, vae


def _vae_scale(vae_cfg: dict) -> int:
    return 2 ** (len(vae_cfg["block_out_channels"]) - 1)


def _unet_multiple(unet_cfg: dict) -> int:
    return 2 ** (len(unet_cfg["down_block_types"]) - 1)


def _check_image_size(image_size, unet_cfg, vae_cfg) -> int:
    need = _vae_scale(vae_cfg) * _unet_multiple(unet_cfg)
    if not isinstance(image_size, int) or image_size < need or image_size % need:
        raise CohwError(f"image_size must be a positive multiple of {need} for this UNet/VAE, got {image_size!r}")
    return image_size


def _build_sd15(wl, scale, device, dtype, batch, seq_len, *, image_size=None, guidance_scale=7.5, seed=0):
    """Stable Diffusion 1.5: ``CLIPTextModel`` (openai/clip-vit-large-patch14 text tower),
    ``UNet2DConditionModel`` and ``AutoencoderKL`` from runwayml/stable-diffusion-v1-5's configs.
    Root module: ``nn.ModuleDict(text_encoder=..., unet=..., vae=...)``; config: dict of the three.

    ``image_size`` (default 512 full, 64 tiny) sets the latent to image_size/8 (64x64 at 512;
    768 and 1024 work too). ``seq_len`` is ignored: CLIP's context is fixed at 77 tokens.
    Tiny: 2-layer CLIP of width 32, a 2-level UNet (32, 64 channels), a 4-level VAE (8..32
    channels, still 8x downsampling).

    Phases, all under no_grad, one unit = one generated image (``batch`` images):

    * ``text_encoder``: ``input_ids`` (2*batch, 77): the prompt and the empty negative prompt for
      classifier-free guidance, as the pipeline encodes them.
    * ``unet_step``: one denoising step: ``latents`` (batch, 4, h, w), timestep ``t`` and
      ``encoder_hidden_states`` (2*batch, 77, 768); ``run`` concatenates the latents twice (CFG
      batch 2*batch), runs the UNet and combines ``uncond + guidance_scale*(cond - uncond)``.
      The scheduler update itself (a few elementwise ops) is not included. A 50-step generation is
      50 of these.
    * ``vae_decode``: ``AutoencoderKL.decode`` (decoder only) of (batch, 4, h, w) latents scaled by
      1/scaling_factor, to (batch, 3, image_size, image_size).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    te_cfg, unet_cfg, vae_cfg = _sd_parts(scale)
    lat_mult = _vae_scale(vae_cfg)
    image_size = _check_image_size(image_size or unet_cfg["sample_size"] * lat_mult, unet_cfg, vae_cfg)
    lat = image_size // lat_mult

    def make():
        return nn.ModuleDict({
            "text_encoder": CLIPTextModel(te_cfg),
            "unet": UNet2DConditionModel.from_config(unet_cfg),
            "vae": AutoencoderKL.from_config(vae_cfg),
        })

    model = _construct(device, seed, make).to(dtype).eval()
    text_encoder, unet, vae = model["text_encoder"], model["unet"], model["vae"]
    ctx, vocab, width = te_cfg.max_position_embeddings, te_cfg.vocab_size, te_cfg.hidden_size
    lat_ch = unet.config.in_channels
    scaling = vae.config.scaling_factor

    def te_inputs():
        gen = _generator(device, seed + 1)
        return (_randint(vocab, (2 * batch, ctx), device, gen),), {}

    def te_run(input_ids):
        return text_encoder(input_ids).last_hidden_state

    def unet_inputs():
        gen = _generator(device, seed + 2)
        latents = _randn((batch, lat_ch, lat, lat), device, dtype, gen)
        t = torch.tensor(500, device=device)
        emb = _randn((2 * batch, ctx, width), device, dtype, gen)
        return (latents, t, emb), {}

    def unet_run(latents, t, encoder_hidden_states):
        x = torch.cat([latents] * 2)
        eps = unet(x, t, encoder_hidden_states=encoder_hidden_states).sample
        uncond, cond = eps.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def vae_inputs():
        gen = _generator(device, seed + 3)
        return (_randn((batch, vae.config.latent_channels, lat, lat), device, dtype, gen),), {}

    def vae_run(latents):
        return vae.decode(latents / scaling).sample

    phases = {
        "text_encoder": Phase("text_encoder", te_inputs, _no_grad(te_run), batch, "image",
                              description=f"CLIP text encoder, {2 * batch} sequences of {ctx} tokens (prompt + negative)"),
        "unet_step": Phase("unet_step", unet_inputs, _no_grad(unet_run), batch, "image",
                           description=f"one UNet denoising step, latent {lat}x{lat}, CFG batch {2 * batch}"),
        "vae_decode": Phase("vae_decode", vae_inputs, _no_grad(vae_run), batch, "image",
                            description=f"VAE decoder, latent {lat}x{lat} -> image {image_size}x{image_size}"),
    }
    config = {"text_encoder": te_cfg, "unet": unet.config, "vae": vae.config, "image_size": image_size,
              "image_size_multiple": _vae_scale(vae_cfg) * _unet_multiple(unet_cfg)}
    return Built(wl, scale, device, dtype, model, config, phases)
