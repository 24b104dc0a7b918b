"""DreamFusion-style text-to-3D (score distillation sampling, as ashawkey/stable-dreamfusion
implements it): a :class:`~cohw_utils.workloads.nerf.NerfactoRenderer` rendered from random
cameras, guided by Stable Diffusion 1.5's VAE and UNet, with one ``sds_step`` phase that
backpropagates into the NeRF.

``dreamfusion-sd`` is the text-to-3D proxy of Chapters 1-3 (proxy set, architecture, enabling);
it combines :mod:`cohw_utils.workloads.nerf` and :mod:`cohw_utils.workloads.diffusion`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from cohw_utils.core.errors import CohwError
from cohw_utils.workloads.base import Built, Phase
from cohw_utils.workloads.diffusion import _sd_parts, _vae_scale
from cohw_utils.workloads.helpers import _construct, _generator, _randn, _repo_json
from cohw_utils.workloads.nerf import NerfactoRenderer, _nerf_config, _ns


def _camera_rays(batch: int, height: int, width: int, df: dict, device, seed: int):
    """Rays of ``batch`` pinhole cameras looking at the origin, radius and vertical field of view
    drawn from stable-dreamfusion's ranges (drawn on CPU, so meta works too)."""
    ns = _ns()
    fn = torch.nn.functional
    g = torch.Generator().manual_seed(seed)
    r = torch.empty(batch).uniform_(*df["radius_range"], generator=g)
    fovy = torch.deg2rad(torch.empty(batch).uniform_(*df["fovy_range"], generator=g))
    theta = torch.empty(batch).uniform_(math.radians(45), math.radians(105), generator=g)  # polar angle
    phi = torch.empty(batch).uniform_(0, 2 * math.pi, generator=g)
    centres = torch.stack([r * torch.sin(theta) * torch.sin(phi), r * torch.cos(theta),
                           r * torch.sin(theta) * torch.cos(phi)], dim=-1)
    forward = fn.normalize(-centres, dim=-1)
    up = torch.tensor([0.0, 1.0, 0.0]).expand_as(forward)
    right = fn.normalize(torch.cross(forward, up, dim=-1), dim=-1)
    true_up = torch.cross(right, forward, dim=-1)
    ys = torch.linspace(1, -1, height)
    xs = torch.linspace(-1, 1, width) * (width / height)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    tan = torch.tan(fovy / 2)[:, None, None, None]
    dirs = (forward[:, None, None] + tan * (xx[None, ..., None] * right[:, None, None]
                                             + yy[None, ..., None] * true_up[:, None, None]))
    dirs = fn.normalize(dirs, dim=-1).reshape(-1, 3)
    origins = centres[:, None, None].expand(batch, height, width, 3).reshape(-1, 3)
    pixel_area = ((2 * torch.tan(fovy / 2) / height) ** 2)[:, None].expand(batch, height * width).reshape(-1, 1)
    return ns.RayBundle(origins=origins.to(device), directions=dirs.to(device),
                        pixel_area=pixel_area.contiguous().to(device),
                        camera_indices=torch.zeros(batch * height * width, 1, dtype=torch.long, device=device))


def _build_dreamfusion(wl, scale, device, dtype, batch, seq_len, *, latent_mode=None, guidance_scale=None,
                       render_size=None, seed=0):
    """DreamFusion-style text-to-3D step (Poole et al. 2022), as ashawkey/stable-dreamfusion
    implements score distillation sampling (SDS) with Stable Diffusion: root module
    ``nn.ModuleDict(nerf=NerfactoRenderer, vae=AutoencoderKL, unet=UNet2DConditionModel)``, the
    NeRF from nerfacto's config (appearance embedding off: there are no training images) and the
    VAE/UNet from SD 1.5's configs (frozen: ``requires_grad_(False)``). The text encoder is not
    part of the step: stable-dreamfusion encodes the prompt once, so the step takes (random)
    text embeddings.

    Phase ``sds_step`` (backward=True; units: 1 step of ``batch`` views):

    * inputs: a RayBundle of ``batch`` cameras x render_size^2 pixels (64x64 default full,
      16x16 tiny; radius in [1, 1.5], fovy in [40, 70] degrees), text embeddings
      (2*batch, 77, width) ordered [negative, prompt], and a timestep per view drawn from
      [0.02, 0.98] * 1000.
    * run: render the views with the NeRF in train mode (with grad) -> latents, by
      ``latent_mode="vae"`` (default, stable-dreamfusion's main path: bilinear upsample of the
      render to the VAE's image size, 512 at full scale, and ``vae.encode(...).latent_dist.sample()
      * scaling_factor`` with grad through the encoder) or ``latent_mode="interpolate"``
      (stable-dreamfusion's latent mode: RGB + opacity bilinearly resized to the 64x64 latent,
      * 2 - 1) -> under no_grad: add noise at t (DDIM scheduler ``add_noise`` with SD 1.5's betas),
      UNet on the CFG batch of 2*batch, ``eps_hat = uncond + guidance_scale*(cond - uncond)``
      (guidance 100) -> ``grad = w(t) * (eps_hat - noise)`` with ``w(t) = 1 - alphas_cumprod[t]``
      -> ``loss = (grad * latents).sum()`` (stable-dreamfusion's form: its gradient with respect
      to the latents is exactly ``grad``) plus nerfacto's interlevel and distortion losses on the
      proposal weights (as nerfstudio's own DreamFusion, Generfacto, adds them: without them the
      proposal nets get no gradient) -> ``loss.backward()``, which backpropagates the SDS gradient
      through the VAE encoder (in "vae" mode) and the volume renderer into the NeRF's hash grids
      and MLPs.

    ``dtype`` is the Stable Diffusion parts' dtype (fp16 by default on meta/GPU, fp32 on CPU);
    the NeRF always runs in float32, as in stable-dreamfusion's mixed precision. Full scale is
    meant for meta (it runs on cpu too, slowly); tiny runs on cpu in about a second.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    _ns()  # import nerfstudio outside the device context
    df = _repo_json("dreamfusion-sd", "config.json")
    latent_mode = latent_mode or df["latent_mode"]
    if latent_mode not in ("vae", "interpolate"):
        raise CohwError(f"latent_mode must be 'vae' or 'interpolate', got {latent_mode!r}")
    guidance_scale = df["guidance_scale"] if guidance_scale is None else guidance_scale
    render_size = render_size or (df["render_height"] if scale == "full" else 16)
    nerf_cfg = _nerf_config("nerfacto", scale, {"use_appearance_embedding": False})
    te_cfg, unet_cfg, vae_cfg = _sd_parts(scale)
    lat_mult = _vae_scale(vae_cfg)
    lat = unet_cfg["sample_size"]
    image_size = lat * lat_mult

    def make():
        return nn.ModuleDict({
            "nerf": NerfactoRenderer(nerf_cfg),
            "vae": AutoencoderKL.from_config(vae_cfg),
            "unet": UNet2DConditionModel.from_config(unet_cfg),
        })

    model = _construct(device, seed, make)
    for part in ("vae", "unet"):  # nn.Module.to: diffusers' own .to() warns about casting
        nn.Module.to(model[part], dtype).requires_grad_(False).eval()
    nerf, vae, unet = model["nerf"], model["vae"], model["unet"]
    scheduler = DDIMScheduler.from_config(_repo_json("sd-1.5", "scheduler", "scheduler_config.json"))
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    n_train = scheduler.config.num_train_timesteps
    t_min, t_max = int(n_train * df["t_range"][0]), int(n_train * df["t_range"][1])
    scaling = vae.config.scaling_factor
    ctx, width = te_cfg.max_position_embeddings, te_cfg.hidden_size
    H = W = render_size

    def inputs():
        bundle = _camera_rays(batch, H, W, df, device, seed + 1)
        gen = _generator(device, seed + 2)
        emb = _randn((2 * batch, ctx, width), device, dtype, gen)
        t = torch.randint(t_min, t_max + 1, (batch,), generator=torch.Generator().manual_seed(seed + 3)).to(device)
        return (bundle, emb, t), {}

    def sds_step(ray_bundle, text_embeddings, t):
        fn = torch.nn.functional
        nerf.train()
        out = nerf(ray_bundle)
        rgb = out["rgb"].reshape(batch, H, W, 3).permute(0, 3, 1, 2)
        if latent_mode == "vae":
            img = fn.interpolate(rgb, (image_size, image_size), mode="bilinear", align_corners=False)
            latents = vae.encode((2 * img - 1).to(dtype)).latent_dist.sample() * scaling
        else:
            acc = out["accumulation"].reshape(batch, H, W, 1).permute(0, 3, 1, 2)
            x = torch.cat([rgb, acc], dim=1)
            latents = (fn.interpolate(x, (lat, lat), mode="bilinear", align_corners=False) * 2 - 1).to(dtype)
        with torch.no_grad():
            noise = torch.randn_like(latents)
            noisy = scheduler.add_noise(latents, noise, t)
            eps = unet(torch.cat([noisy] * 2), torch.cat([t] * 2), encoder_hidden_states=text_embeddings).sample
            uncond, cond = eps.chunk(2)
            eps_hat = uncond + guidance_scale * (cond - uncond)
            w = (1 - alphas_cumprod[t]).to(latents.dtype)[:, None, None, None]
            grad = torch.nan_to_num(w * (eps_hat - noise))
        loss = (grad * latents).sum() + nerf.proposal_losses(out)
        loss.backward()
        return loss.detach()

    phases = {"sds_step": Phase(
        "sds_step", inputs, sds_step, 1, "step", backward=True,
        description=(f"score distillation: render {batch}x{H}x{W} rays, {latent_mode} -> {lat}x{lat} latent, "
                     f"UNet with CFG batch {2 * batch} (no grad), SDS gradient back into the NeRF"))}
    config = {"dreamfusion": df, "nerf": nerf_cfg, "unet": unet.config, "vae": vae.config,
              "latent_mode": latent_mode, "guidance_scale": guidance_scale, "render_size": render_size}
    return Built(wl, scale, device, dtype, model, config, phases)
