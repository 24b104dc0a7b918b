"""NeRF workloads from nerfstudio's real components: :class:`NerfactoRenderer` (hash grid,
proposal sampling) and :class:`VanillaNeRFRenderer` (positional encoding, coarse + fine MLPs),
wired as nerfstudio's ``NerfactoModel`` and ``NeRFModel`` wire them, with ``render`` and
``train_step`` phases on random rays.

``nerfacto`` and ``vanilla-nerf`` are the NeRF proxies of Chapters 1-5; Chapter 2's render
pipeline (:mod:`cohw_utils.studies.architecture.render_pipeline`) names stages after these
renderers' submodules, and :mod:`cohw_utils.workloads.dreamfusion` renders with
:class:`NerfactoRenderer`. Both classes are re-exported by :mod:`cohw_utils.workloads`.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
from torch import nn

from cohw_utils.core.errors import CohwError
from cohw_utils.workloads.base import Built, Phase, Workload
from cohw_utils.workloads.helpers import _construct, _generator, _randint, _randn, _repo_json

DEFAULT_RAYS = {"full": 4096, "tiny": 256}


def _check_float32(wl: Workload, dtype: torch.dtype) -> None:
    if dtype != torch.float32:
        raise CohwError(
            f"workload '{wl.name}' runs in float32 only (nerfstudio's fields and samplers are "
            f"written for it), got {dtype}; pass dtype='float32' or leave dtype unset"
        )


@functools.lru_cache(maxsize=1)
def _ns() -> SimpleNamespace:
    """nerfstudio imports, done once and only when a NeRF workload is built."""
    import warnings

    with warnings.catch_warnings():
        # nerfstudio decorates trunc_exp with the deprecated torch.cuda.amp.custom_fwd, and its
        # utils import viser, which imports deprecated websockets modules
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        from nerfstudio.cameras.rays import RayBundle
        from nerfstudio.field_components.encodings import NeRFEncoding
        from nerfstudio.field_components.field_heads import FieldHeadNames
        from nerfstudio.field_components.spatial_distortions import SceneContraction
        from nerfstudio.fields.density_fields import HashMLPDensityField
        from nerfstudio.fields.nerfacto_field import NerfactoField
        from nerfstudio.fields.vanilla_nerf_field import NeRFField
        from nerfstudio.model_components.losses import MSELoss, distortion_loss, interlevel_loss
        from nerfstudio.model_components.ray_samplers import (
            PDFSampler, ProposalNetworkSampler, UniformSampler)
        from nerfstudio.model_components.renderers import (
            AccumulationRenderer, DepthRenderer, RGBRenderer)
        from nerfstudio.model_components.scene_colliders import NearFarCollider
    return SimpleNamespace(**{k: v for k, v in locals().items() if k != "warnings"})


class NerfactoRenderer(nn.Module):
    """nerfstudio's Nerfacto, wired as ``NerfactoModel.populate_modules``/``get_outputs`` wire it,
    from the real components, without the parts that need a dataset or downloads (camera
    optimizer, PSNR/SSIM/LPIPS metrics, viewer callbacks). Submodule names follow
    ``NerfactoModel``: ``collider``, ``proposal_networks.{0,1}``, ``proposal_sampler``, ``field``
    (``field.mlp_base`` hash grid + MLP, ``field.mlp_head`` colour MLP), ``renderer_*``.

    ``forward(ray_bundle)``: near/far collider -> proposal sampling (uniform-then-PDF resampling
    through the proposal density nets) -> NerfactoField query of the final samples -> volume
    rendering of RGB, accumulation and depth. Returns a dict as ``get_outputs`` does.
    """

    def __init__(self, cfg: dict):
        super().__init__()
        ns = _ns()
        self.cfg = dict(cfg)
        contraction = None if cfg["disable_scene_contraction"] else ns.SceneContraction(order=float("inf"))
        aabb = torch.tensor(cfg["aabb"], dtype=torch.float32)
        app_dim = cfg["appearance_embed_dim"] if cfg["use_appearance_embedding"] else 0
        impl = cfg["implementation"]
        self.field = ns.NerfactoField(
            aabb, hidden_dim=cfg["hidden_dim"], num_levels=cfg["num_levels"], max_res=cfg["max_res"],
            base_res=cfg["base_res"], features_per_level=cfg["features_per_level"],
            log2_hashmap_size=cfg["log2_hashmap_size"], hidden_dim_color=cfg["hidden_dim_color"],
            hidden_dim_transient=cfg["hidden_dim_transient"], spatial_distortion=contraction,
            num_images=cfg["num_train_images"], use_pred_normals=cfg["predict_normals"],
            use_average_appearance_embedding=cfg["use_average_appearance_embedding"],
            appearance_embedding_dim=app_dim, average_init_density=cfg["average_init_density"],
            implementation=impl,
        )
        n_prop = cfg["num_proposal_iterations"]
        args_list = cfg["proposal_net_args_list"]
        nets = [ns.HashMLPDensityField(aabb, spatial_distortion=contraction, **args_list[min(i, len(args_list) - 1)],
                                       average_init_density=cfg["average_init_density"], implementation=impl)
                for i in range(1 if cfg["use_same_proposal_network"] else n_prop)]
        self.proposal_networks = nn.ModuleList(nets)
        self.density_fns = [nets[min(i, len(nets) - 1)].density_fn for i in range(n_prop)]
        initial = None
        if cfg["proposal_initial_sampler"] == "uniform":
            initial = ns.UniformSampler(single_jitter=cfg["use_single_jitter"])
        self.proposal_sampler = ns.ProposalNetworkSampler(
            num_nerf_samples_per_ray=cfg["num_nerf_samples_per_ray"],
            num_proposal_samples_per_ray=tuple(cfg["num_proposal_samples_per_ray"]),
            num_proposal_network_iterations=n_prop, single_jitter=cfg["use_single_jitter"],
            update_sched=lambda step: 1, initial_sampler=initial,
        )
        self.collider = ns.NearFarCollider(near_plane=cfg["near_plane"], far_plane=cfg["far_plane"])
        self.renderer_rgb = ns.RGBRenderer(background_color=cfg["background_color"])
        self.renderer_accumulation = ns.AccumulationRenderer()
        self.renderer_depth = ns.DepthRenderer(method="median")
        self.renderer_expected_depth = ns.DepthRenderer(method="expected")
        self.rgb_loss = ns.MSELoss()

    def forward(self, ray_bundle):
        ns = _ns()
        ray_bundle = self.collider(ray_bundle)
        ray_samples, weights_list, ray_samples_list = self.proposal_sampler(ray_bundle, density_fns=self.density_fns)
        field_outputs = self.field.forward(ray_samples, compute_normals=self.cfg["predict_normals"])
        weights = ray_samples.get_weights(field_outputs[ns.FieldHeadNames.DENSITY])
        weights_list.append(weights)
        ray_samples_list.append(ray_samples)
        rgb = self.renderer_rgb(rgb=field_outputs[ns.FieldHeadNames.RGB], weights=weights)
        with torch.no_grad():
            depth = self.renderer_depth(weights=weights, ray_samples=ray_samples)
        outputs = {
            "rgb": rgb,
            "accumulation": self.renderer_accumulation(weights=weights),
            "depth": depth,
            "expected_depth": self.renderer_expected_depth(weights=weights, ray_samples=ray_samples),
        }
        if self.training:
            outputs["weights_list"] = weights_list
            outputs["ray_samples_list"] = ray_samples_list
        for i in range(self.cfg["num_proposal_iterations"]):
            outputs[f"prop_depth_{i}"] = self.renderer_depth(weights=weights_list[i], ray_samples=ray_samples_list[i])
        return outputs

    def loss(self, outputs: dict, target_rgb: torch.Tensor) -> torch.Tensor:
        """``NerfactoModel.get_loss_dict`` in training: RGB MSE + interlevel (proposal) loss +
        distortion loss, with the config's multipliers."""
        return self.rgb_loss(target_rgb, outputs["rgb"]) + self.proposal_losses(outputs)

    def proposal_losses(self, outputs: dict) -> torch.Tensor:
        """Interlevel loss (the only loss that trains the proposal nets) + distortion loss."""
        ns = _ns()
        wl, rsl = outputs["weights_list"], outputs["ray_samples_list"]
        return (self.cfg["interlevel_loss_mult"] * ns.interlevel_loss(wl, rsl)
                + self.cfg["distortion_loss_mult"] * ns.distortion_loss(wl, rsl))


class VanillaNeRFRenderer(nn.Module):
    """nerfstudio's vanilla NeRF (Mildenhall et al. 2020), wired as ``NeRFModel.get_outputs`` wires
    it, from the real components: ``collider`` -> ``sampler_uniform`` (coarse samples) ->
    ``field_coarse`` (NeRFField: positional encoding, 8x256 MLP with a skip at layer 4, RGB head)
    -> ``renderer_*`` -> ``sampler_pdf`` (importance samples from the coarse weights, plus the
    coarse ones) -> ``field_fine`` -> ``renderer_*``. No metrics modules (they need torchvision).
    """

    def __init__(self, cfg: dict):
        super().__init__()
        ns = _ns()
        self.cfg = dict(cfg)
        pos = ns.NeRFEncoding(**cfg["position_encoding"])
        dirs = ns.NeRFEncoding(**cfg["direction_encoding"])
        field_args = dict(base_mlp_num_layers=cfg["base_mlp_num_layers"], base_mlp_layer_width=cfg["base_mlp_layer_width"],
                          head_mlp_num_layers=cfg["head_mlp_num_layers"], head_mlp_layer_width=cfg["head_mlp_layer_width"],
                          skip_connections=tuple(cfg["skip_connections"]))
        self.collider = ns.NearFarCollider(near_plane=cfg["near_plane"], far_plane=cfg["far_plane"])
        self.field_coarse = ns.NeRFField(position_encoding=pos, direction_encoding=dirs, **field_args)
        self.field_fine = ns.NeRFField(position_encoding=pos, direction_encoding=dirs, **field_args)
        self.sampler_uniform = ns.UniformSampler(num_samples=cfg["num_coarse_samples"])
        self.sampler_pdf = ns.PDFSampler(num_samples=cfg["num_importance_samples"])
        self.renderer_rgb = ns.RGBRenderer(background_color=cfg["background_color"])
        self.renderer_accumulation = ns.AccumulationRenderer()
        self.renderer_depth = ns.DepthRenderer()
        self.rgb_loss = ns.MSELoss()

    def forward(self, ray_bundle):
        ns = _ns()
        D, RGB = ns.FieldHeadNames.DENSITY, ns.FieldHeadNames.RGB
        ray_bundle = self.collider(ray_bundle)
        samples_uniform = self.sampler_uniform(ray_bundle)
        coarse = self.field_coarse.forward(samples_uniform)
        weights_coarse = samples_uniform.get_weights(coarse[D])
        rgb_coarse = self.renderer_rgb(rgb=coarse[RGB], weights=weights_coarse)
        acc_coarse = self.renderer_accumulation(weights_coarse)
        depth_coarse = self.renderer_depth(weights_coarse, samples_uniform)
        samples_pdf = self.sampler_pdf(ray_bundle, samples_uniform, weights_coarse)
        fine = self.field_fine.forward(samples_pdf)
        weights_fine = samples_pdf.get_weights(fine[D])
        return {
            "rgb_coarse": rgb_coarse,
            "rgb_fine": self.renderer_rgb(rgb=fine[RGB], weights=weights_fine),
            "accumulation_coarse": acc_coarse,
            "accumulation_fine": self.renderer_accumulation(weights_fine),
            "depth_coarse": depth_coarse,
            "depth_fine": self.renderer_depth(weights_fine, samples_pdf),
        }

    def loss(self, outputs: dict, target_rgb: torch.Tensor) -> torch.Tensor:
        """``NeRFModel.get_loss_dict``: coarse + fine RGB MSE (coefficients 1.0)."""
        return self.rgb_loss(target_rgb, outputs["rgb_coarse"]) + self.rgb_loss(target_rgb, outputs["rgb_fine"])


_TINY_NERFACTO = dict(num_levels=4, log2_hashmap_size=12, max_res=128, hidden_dim=16, hidden_dim_color=16,
                      appearance_embed_dim=8, num_proposal_samples_per_ray=[32, 16], num_nerf_samples_per_ray=8,
                      proposal_net_args_list=[
                          {"hidden_dim": 8, "log2_hashmap_size": 10, "num_levels": 2, "max_res": 32, "use_linear": False},
                          {"hidden_dim": 8, "log2_hashmap_size": 10, "num_levels": 2, "max_res": 64, "use_linear": False}])
_TINY_VANILLA = dict(num_coarse_samples=16, num_importance_samples=16, base_mlp_num_layers=3,
                     base_mlp_layer_width=32, head_mlp_num_layers=1, head_mlp_layer_width=16, skip_connections=[1],
                     position_encoding={"in_dim": 3, "num_frequencies": 4, "min_freq_exp": 0.0, "max_freq_exp": 3.0, "include_input": True},
                     direction_encoding={"in_dim": 3, "num_frequencies": 2, "min_freq_exp": 0.0, "max_freq_exp": 1.0, "include_input": True})


def _nerf_config(name: str, scale: str, overrides: dict | None = None) -> dict:
    cfg = _repo_json(name, "config.json")
    if scale == "tiny":
        cfg.update(_TINY_NERFACTO if name == "nerfacto" else _TINY_VANILLA)
    cfg.update(overrides or {})
    return cfg


def _random_rays(n: int, radius: float, num_images: int, device, gen):
    """``n`` rays from cameras on a sphere of ``radius`` towards points near the scene centre."""
    ns = _ns()
    fn = torch.nn.functional
    origins = fn.normalize(_randn((n, 3), device, torch.float32, gen), dim=-1) * radius
    targets = 0.25 * _randn((n, 3), device, torch.float32, gen)
    directions = fn.normalize(targets - origins, dim=-1)
    return ns.RayBundle(
        origins=origins, directions=directions,
        pixel_area=torch.full((n, 1), 1e-6, device=device),
        camera_indices=_randint(max(num_images, 1), (n, 1), device, gen),
    )


def _nerf_phases(model: nn.Module, cfg: dict, device, rays: int, seed: int, num_images: int) -> dict[str, Phase]:
    radius = cfg["camera_radius"]

    def render_inputs():
        return (_random_rays(rays, radius, num_images, device, _generator(device, seed + 1)),), {}

    def render(ray_bundle):
        model.eval()
        with torch.no_grad():
            return model(ray_bundle)

    def train_inputs():
        gen = _generator(device, seed + 2)
        bundle = _random_rays(rays, radius, num_images, device, gen)
        target = torch.rand(rays, 3, device=device, generator=gen)
        return (bundle, target), {}

    def train_step(ray_bundle, target_rgb):
        model.train()
        loss = model.loss(model(ray_bundle), target_rgb)
        loss.backward()
        return loss.detach()

    return {
        "render": Phase("render", render_inputs, render, rays, "ray",
                        description=f"volume-render {rays} rays, no grad"),
        "train_step": Phase("train_step", train_inputs, train_step, rays, "ray", backward=True,
                            description=f"forward + loss + backward on a batch of {rays} rays"),
    }


def _build_nerfacto(wl, scale, device, dtype, batch, seq_len, *, rays=None, seed=0):
    """Nerfacto (nerfstudio) from ``NerfactoModelConfig`` defaults: a 16-level hash grid
    (2 features/level, 2^19 entries per level, resolutions 16..2048) + 2x64 MLP density/feature
    net, SH-encoded directions, a 3x64 colour MLP, a 32-d appearance embedding (100 train images),
    two 5-level proposal hash-grid density nets (2^17 entries, max res 128 and 256) feeding a
    ProposalNetworkSampler of 256 -> 96 -> 48 samples per ray, scene contraction, volume
    rendering. nerfstudio's pure-torch hash encoding is used (not tiny-cuda-nn). Root module:
    :class:`NerfactoRenderer`. Tiny: 4 hash levels of 2^12, 32 -> 16 -> 8 samples, 256 rays.

    ``rays`` (default 4096 full, 256 tiny; ``batch`` is unused) random rays from cameras on the
    unit sphere looking at the scene centre. Phases: ``render`` (eval mode, no grad) and
    ``train_step`` (train mode: forward, RGB MSE to random target colours + interlevel and
    distortion losses, backward into the hash tables and MLPs). A train step is a proposal-net
    update step (nerfstudio updates them every 1..5 steps) with annealing at its steady value.
    Float32 only. Works on meta and on cpu (full scale: a few seconds per render on 2 cores).
    """
    _check_float32(wl, dtype)
    _ns()  # import nerfstudio outside the device context
    cfg = _nerf_config("nerfacto", scale)
    rays = rays or DEFAULT_RAYS[scale]
    model = _construct(device, seed, lambda: NerfactoRenderer(cfg)).to(dtype)
    phases = _nerf_phases(model, cfg, device, rays, seed, cfg["num_train_images"])
    return Built(wl, scale, device, dtype, model, cfg, phases)


def _build_vanilla_nerf(wl, scale, device, dtype, batch, seq_len, *, rays=None, seed=0):
    """Vanilla NeRF (nerfstudio ``NeRFModel`` components, ``VanillaModelConfig`` defaults): two
    NeRFFields (coarse and fine), each positional encoding (10 frequencies for position, 4 for
    direction) -> 8x256 ReLU MLP with a skip at layer 4 -> density head, and a 2x128 head -> RGB;
    64 uniform coarse samples, 128 PDF importance samples (the fine field sees 193: nerfstudio's
    PDF sampler merges 129 new bin edges with the 65 coarse ones), white
    background, near 2 / far 6 (Blender). Root module: :class:`VanillaNeRFRenderer`. Tiny: 3x32 MLP (skip at layer 1),
    16 + 16 samples, 256 rays.

    ``rays`` (default 4096 full, 256 tiny; ``batch`` is unused) random rays from cameras at radius
    4 looking at the scene centre. Phases: ``render`` (no grad) and ``train_step`` (forward, coarse
    + fine RGB MSE to random targets, backward). Float32 only; works on meta and on cpu.
    """
    _check_float32(wl, dtype)
    _ns()  # import nerfstudio outside the device context
    cfg = _nerf_config("vanilla-nerf", scale)
    rays = rays or DEFAULT_RAYS[scale]
    model = _construct(device, seed, lambda: VanillaNeRFRenderer(cfg)).to(dtype)
    phases = _nerf_phases(model, cfg, device, rays, seed, 1)
    return Built(wl, scale, device, dtype, model, cfg, phases)
