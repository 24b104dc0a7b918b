"""3D Gaussian splatting (Kerbl et al., SIGGRAPH 2023) as gsplat renders it: the ``3dgs`` workload
(:data:`SPLAT_WORKLOAD`), with ``render`` and ``train_step`` phases, and its renderer
:class:`SplatRenderer`.

The render is gsplat's pipeline in four stages, each a submodule so op tables break down by stage:

* ``projection``: 3D covariances from quaternions and scales, then the EWA projection to 2D
  means, conics, depths and screen radii: gsplat's own pure-torch reference
  (``gsplat.cuda._torch_impl._quat_scale_to_covar_preci`` and ``_fully_fused_projection``);
* ``sh``: view-dependent colour from degree-``sh_degree`` spherical harmonics
  (``gsplat.cuda._torch_impl._spherical_harmonics``), ``clamp_min(. + 0.5, 0)`` as
  ``gsplat.rasterization`` does;
* ``binning``: each Gaussian's 16x16-pixel tile rectangle, one 64-bit key (tile id << 32 | depth
  bits) per Gaussian-tile pair, one sort of all keys, per-tile ranges;
* ``rasterizer``: front-to-back alpha compositing of each tile's depth-sorted list for the tile's
  256 pixels, with the CUDA kernel's rules (alpha = min(0.999, opacity * exp(-sigma)), skip
  alpha < 1/255 or sigma < 0, stop a pixel once its transmittance would fall to 1e-4).

``binning`` and ``rasterizer`` are written here, vectorised over tiles, because gsplat 1.5.3 has
no torch version that runs on ``meta`` or at scale: its ``_isect_tiles`` loops over every Gaussian
and tile in Python with ``.item()``, and its ``_rasterize_to_pixels`` calls the CUDA kernel
``rasterize_to_indices_in_range``. Shapes must not depend on data (``meta`` has none), so each
Gaussian emits exactly ``tiles_per_gaussian`` key slots (unused slots get a sentinel tile and
sort last) and each tile composites exactly ``gaussians_per_tile`` entries of its list (padded or
truncated): the op table then counts the work of a frame with that many pairs, spread evenly
over the tiles, without early termination (an upper bound on what the kernel evaluates).

``3dgs`` is the neural-rendering proxy of Chapter 1's modernised proxy set (the render-and-compute
case beside the NeRFs), and Chapter 2 compares its stages with the NeRF render pipeline.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

from cohw_utils.core.errors import CohwError
from cohw_utils.workloads.base import Built, Phase, Workload, _workload
from cohw_utils.workloads.helpers import _construct, _generator

# Gaussians in a trained scene: 1.79M, gsplat 1.5's 30k-step fit of Mip-NeRF 360 "kitchen", the
# median of the seven scenes it reports (1.21M counter .. 6.26M bicycle; gsplat
# docs/source/tests/eval.rst, "Number of GSs").
DEFAULT_GAUSSIANS = {"full": 1_790_000, "tiny": 512}
# 1920x1080: the resolution Kerbl et al. 2023 claim real-time (>= 30 fps) rendering at (abstract).
DEFAULT_SIZE = {"full": (1920, 1080), "tiny": (64, 48)}
# Average tiles a Gaussian's 3-sigma rectangle touches: an assumption of this proxy, not a
# published figure (most Gaussians of a trained scene are a few pixels wide and touch 1-4 tiles,
# a few large ones touch many). Rasterization and sort work scale linearly with it: it is a knob.
DEFAULT_TILES_PER_GAUSSIAN = 4
TILE_SIZE = 16  # gsplat.rasterization's default tile_size (and Kerbl et al.'s 16x16 tiles)
# The constants of gsplat's CUDA rasterizer (RasterizeToPixels3DGSFwd.cu, Common.h)
ALPHA_MAX, ALPHA_MIN, T_MIN = 0.999, 1.0 / 255.0, 1e-4
SH_C0 = 0.28209479177387814  # Y_0^0; gsplat's rgb_to_sh is (rgb - 0.5) / SH_C0
FOCAL_PER_WIDTH = 1.0  # focal length = image width: a 53-degree horizontal field of view
CAMERA_DISTANCE = 3.0  # cameras 3 units from the centre of the [-1, 1]^3 scene, looking at it


@functools.lru_cache(maxsize=1)
def _gs():
    """gsplat's pure-torch stages, imported once and only when a splatting workload is built."""
    from gsplat.cuda import _torch_impl

    return _torch_impl


class _Projection(nn.Module):
    """EWA projection of the 3D Gaussians into each camera (gsplat's torch reference)."""

    def forward(self, means, quats, scales, viewmats, Ks, width: int, height: int):
        gs = _gs()
        covars, _ = gs._quat_scale_to_covar_preci(quats, scales, compute_covar=True, compute_preci=False)
        radii, means2d, depths, conics, _ = gs._fully_fused_projection(means, covars, viewmats, Ks, width, height)
        return radii, means2d, depths, conics  # [C,N,2] int, [C,N,2], [C,N], [C,N,3]


class _SphericalHarmonics(nn.Module):
    """RGB per camera and Gaussian from the SH coefficients, as ``gsplat.rasterization`` does."""

    def __init__(self, degree: int):
        super().__init__()
        self.degree = degree

    def forward(self, means, coeffs, viewmats):
        # gsplat takes torch.inverse(viewmats)[..., :3, 3]; for a rigid world-to-camera matrix
        # [R | t] that is -R^T t (same value, and an op the cost rules know)
        R, t = viewmats[..., :3, :3], viewmats[..., :3, 3]
        campos = -(R.transpose(-1, -2) @ t[..., None])[..., 0]  # [C, 3]
        dirs = means[None, :, :] - campos[:, None, :]  # [C, N, 3]
        shs = coeffs[None].expand(dirs.shape[0], *coeffs.shape)  # [C, N, K, 3]
        return torch.clamp_min(_gs()._spherical_harmonics(self.degree, dirs, shs) + 0.5, 0.0)


class _TileBinning(nn.Module):
    """Gaussian-tile pairs, sorted by (image, tile, depth) as gsplat's isect_tiles + radix sort do.

    Written here (gsplat's torch ``_isect_tiles`` is a Python loop with ``.item()``): each
    Gaussian's tile rectangle is gsplat's (floor/ceil of (mean -/+ radius) / tile, clamped to
    the grid); it emits ``slots`` pairs, row-major over its rectangle; slots beyond the
    rectangle (or of a culled Gaussian) get the sentinel tile ``C * tiles`` and sort last.
    Returns ``flatten_ids`` (index into C*N of each sorted pair) and ``offsets`` (C*tiles + 1
    start positions).
    """

    def __init__(self, tiles_x: int, tiles_y: int, slots: int):
        super().__init__()
        self.tiles_x, self.tiles_y, self.slots = tiles_x, tiles_y, slots

    def forward(self, means2d, radii, depths):
        means2d, depths = means2d.detach(), depths.detach()  # integer work: no gradient flows (as in gsplat)
        C, N = depths.shape
        tx, ty, dev = self.tiles_x, self.tiles_y, depths.device
        rad = radii.to(means2d.dtype)
        lo = torch.floor((means2d - rad) / TILE_SIZE).long()
        hi = torch.ceil((means2d + rad) / TILE_SIZE).long()
        limit = torch.tensor([tx, ty], device=dev)
        lo = torch.minimum(lo.clamp_min(0), limit)
        hi = torch.minimum(hi.clamp_min(0), limit)
        rect = hi - lo  # [C, N, 2] tiles in x and y
        count = rect[..., 0] * rect[..., 1] * (radii > 0).all(dim=-1)  # [C, N]
        j = torch.arange(self.slots, device=dev)
        w = rect[..., 0].clamp_min(1)[..., None]
        tile_x = lo[..., 0, None] + j % w
        tile_y = lo[..., 1, None] + j // w
        image = torch.arange(C, device=dev)[:, None, None]
        tile = (image * ty + tile_y) * tx + tile_x  # [C, N, slots]
        tile = torch.where(j < count[..., None], tile, C * tx * ty)
        depth_bits = depths.float().contiguous().view(torch.int32).long() & 0xFFFFFFFF  # order-preserving for depth > 0
        keys = (tile << 32) | depth_bits[..., None]
        sorted_keys, order = torch.sort(keys.reshape(-1))
        gauss = (image * N + torch.arange(N, device=dev)[None, :, None]).expand(C, N, self.slots)
        flatten_ids = gauss.reshape(-1)[order]
        offsets = torch.searchsorted(sorted_keys >> 32, torch.arange(C * tx * ty + 1, device=dev))
        return flatten_ids, offsets


class _TileRasterizer(nn.Module):
    """Front-to-back alpha compositing of each tile's first ``per_tile`` sorted Gaussians.

    Written here (gsplat's torch ``_rasterize_to_pixels`` calls a CUDA kernel): one dense
    (tiles, 256 pixels, per_tile) evaluation, with the CUDA kernel's rules: pixel centres at
    +0.5, sigma = 0.5 (a dx^2 + c dy^2) + b dx dy, alpha = min(0.999, opacity exp(-sigma)),
    entries with sigma < 0 or alpha < 1/255 skipped, a pixel's compositing stopped before the
    Gaussian that would take its transmittance to <= 1e-4. Returns colours [C, H, W, 3] and
    accumulated alpha [C, H, W, 1] (no background: black).
    """

    def __init__(self, tiles_x: int, tiles_y: int, per_tile: int, width: int, height: int):
        super().__init__()
        self.tiles_x, self.tiles_y, self.per_tile = tiles_x, tiles_y, per_tile
        self.width, self.height = width, height

    def forward(self, means2d, conics, colors, opacities, flatten_ids, offsets):
        C = means2d.shape[0]
        tx, ty, K, dev = self.tiles_x, self.tiles_y, self.per_tile, means2d.device
        n_tiles = C * tx * ty
        idx = offsets[:-1, None] + torch.arange(K, device=dev)  # [T, K] positions in the sorted pairs
        listed = idx < offsets[1:, None]
        g = flatten_ids[idx.clamp_max(flatten_ids.shape[0] - 1)]  # [T, K] Gaussian (C*N index)
        xy = means2d.reshape(-1, 2)[g]  # [T, K, 2]
        con = conics.reshape(-1, 3)[g]
        op = opacities.reshape(-1)[g]
        rgb = colors.reshape(-1, colors.shape[-1])[g]  # [T, K, 3]
        t = torch.arange(n_tiles, device=dev)
        local = torch.arange(TILE_SIZE * TILE_SIZE, device=dev)
        px = ((t % tx)[:, None] * TILE_SIZE + local % TILE_SIZE + 0.5).to(xy.dtype)  # [T, 256]
        py = (((t // tx) % ty)[:, None] * TILE_SIZE + local // TILE_SIZE + 0.5).to(xy.dtype)
        dx = xy[:, None, :, 0] - px[:, :, None]  # [T, 256, K]
        dy = xy[:, None, :, 1] - py[:, :, None]
        sigma = 0.5 * (con[:, None, :, 0] * dx * dx + con[:, None, :, 2] * dy * dy) + con[:, None, :, 1] * dx * dy
        alpha = torch.clamp_max(op[:, None, :] * torch.exp(-sigma), ALPHA_MAX)
        alpha = torch.where(listed[:, None, :] & (sigma >= 0) & (alpha >= ALPHA_MIN), alpha, 0.0)
        trans_after = torch.cumprod(1.0 - alpha, dim=-1)  # T after each entry
        trans_before = torch.cat([torch.ones_like(trans_after[..., :1]), trans_after[..., :-1]], dim=-1)
        weight = torch.where(trans_after > T_MIN, alpha * trans_before, 0.0)  # monotone: the kernel's "done"
        pix = torch.bmm(weight, rgb)  # [T, 256, 3]
        acc = weight.sum(dim=-1, keepdim=True)  # 1 - final transmittance
        side = TILE_SIZE

        def image(x):  # [C*ty*tx, 256, ch] -> [C, H, W, ch]
            x = x.reshape(C, ty, tx, side, side, -1).permute(0, 1, 3, 2, 4, 5)
            return x.reshape(C, ty * side, tx * side, -1)[:, : self.height, : self.width]

        return image(pix), image(acc)


class SplatRenderer(nn.Module):
    """N 3D Gaussians and gsplat's render pipeline.

    Parameters (``splats``, an ``nn.ParameterDict`` named as gsplat's trainer names them):
    ``means`` [N, 3], ``scales`` [N, 3] (log), ``quats`` [N, 4], ``opacities`` [N] (logit),
    ``sh0`` [N, 1, 3] and ``shN`` [N, (d+1)^2 - 1, 3]: 11 + 3 (d+1)^2 floats per Gaussian, 59 at
    SH degree 3. Initialised as gsplat's ``simple_trainer.create_splats_with_optimizers`` does
    for a random scene: means uniform in [-1, 1]^3, random colours in ``sh0``, ``shN`` zero,
    quaternions ``rand``, opacity 0.1, scale the mean spacing (8/N)^(1/3) of N points in the cube
    (gsplat: the mean distance to the 3 nearest neighbours).

    ``forward(viewmats [C,4,4], Ks [C,3,3])`` -> (colours [C, H, W, 3], alpha [C, H, W, 1]).
    """

    def __init__(self, gaussians: int, sh_degree: int, width: int, height: int, tiles_per_gaussian: int,
                 gaussians_per_tile: int):
        super().__init__()
        n = gaussians
        rgb = torch.rand(n, 3)
        spacing = (8.0 / n) ** (1.0 / 3.0)
        self.splats = nn.ParameterDict({
            "means": nn.Parameter(torch.rand(n, 3) * 2 - 1),
            "scales": nn.Parameter(torch.full((n, 3), math.log(spacing))),
            "quats": nn.Parameter(torch.rand(n, 4)),
            "opacities": nn.Parameter(torch.full((n,), math.log(0.1 / 0.9))),
            "sh0": nn.Parameter(((rgb - 0.5) / SH_C0)[:, None, :]),
            "shN": nn.Parameter(torch.zeros(n, (sh_degree + 1) ** 2 - 1, 3)),
        })
        self.width, self.height, self.sh_degree = width, height, sh_degree
        tiles_x, tiles_y = -(-width // TILE_SIZE), -(-height // TILE_SIZE)
        self.projection = _Projection()
        self.sh = _SphericalHarmonics(sh_degree)
        self.binning = _TileBinning(tiles_x, tiles_y, tiles_per_gaussian)
        self.rasterizer = _TileRasterizer(tiles_x, tiles_y, gaussians_per_tile, width, height)

    def forward(self, viewmats, Ks):
        s = self.splats
        # raw quaternions: gsplat's _quat_to_rotmat normalises them (as its CUDA kernel does)
        radii, means2d, depths, conics = self.projection(s["means"], s["quats"], torch.exp(s["scales"]), viewmats,
                                                         Ks, self.width, self.height)
        colors = self.sh(s["means"], torch.cat([s["sh0"], s["shN"]], dim=1), viewmats)
        opacities = torch.sigmoid(s["opacities"])[None].expand(viewmats.shape[0], -1)
        flatten_ids, offsets = self.binning(means2d, radii, depths)
        return self.rasterizer(means2d, conics, colors, opacities, flatten_ids, offsets)


def _cameras(views: int, width: int, height: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``views`` pinhole cameras on the -z side of the scene, CAMERA_DISTANCE away, looking down +z,
    0.1 apart along x; focal FOCAL_PER_WIDTH x width, principal point at the image centre."""
    viewmats = torch.eye(4, device=device).repeat(views, 1, 1)
    viewmats[:, 0, 3] = -0.1 * torch.arange(views, device=device)
    viewmats[:, 2, 3] = CAMERA_DISTANCE
    f = FOCAL_PER_WIDTH * width
    K = torch.tensor([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]], device=device)
    return viewmats, K.repeat(views, 1, 1)


def _positive(name: str, v) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise CohwError(f"{name} must be a positive integer, got {v!r}")
    return v


def _build_gsplat(wl, scale, device, dtype, batch, seq_len, *, gaussians=None, width=None, height=None,
                  sh_degree=3, tiles_per_gaussian=None, gaussians_per_tile=None, seed=0):
    """3D Gaussian splatting: :class:`SplatRenderer` (root module) holding ``gaussians`` Gaussians
    (default 1.79M full, a trained Mip-NeRF 360 scene; 512 tiny) rendered into ``width`` x
    ``height`` images (default 1920x1080 full, 64x48 tiny) with SH degree ``sh_degree`` (0-4;
    3DGS uses 3). ``batch`` = cameras rendered per run; ``seq_len`` is unused.

    ``tiles_per_gaussian`` (pairs each Gaussian emits; default 4 full, an assumption, and every
    tile of the image tiny) and ``gaussians_per_tile`` (entries each tile composites; default
    ceil(gaussians x tiles_per_gaussian / tiles per image), the even spread of the pairs) fix the
    shapes of binning and rasterization. The render is exact when no Gaussian touches more tiles
    than its slots and no tile lists more Gaussians than it composites, which the tiny defaults
    guarantee (gaussians_per_tile = gaussians). Full scale materialises (tiles x 256 x
    gaussians_per_tile) intermediates: trace it on ``meta``. Float32 only; config: dict of the
    sizes.

    Phases, one unit = one rendered image (``batch`` per run):

    * ``render``: no grad; projection, SH colours, binning and sort, rasterization of ``batch``
      views; returns (colours [B, H, W, 3], alpha [B, H, W, 1]).
    * ``train_step``: the render with autograd, an L1 loss to random target images and its
      backward into every Gaussian parameter (3DGS's loss adds 0.2 x D-SSIM, not included; the
      backward is autograd's through the torch stages, not gsplat's fused CUDA backward).
    """
    if dtype != torch.float32:
        raise CohwError(f"workload '{wl.name}' runs in float32 only (gsplat's rasterizer is float32), got {dtype}; "
                        "pass dtype='float32' or leave dtype unset")
    n = _positive("gaussians", gaussians if gaussians is not None else DEFAULT_GAUSSIANS[scale])
    width = _positive("width", width if width is not None else DEFAULT_SIZE[scale][0])
    height = _positive("height", height if height is not None else DEFAULT_SIZE[scale][1])
    if not isinstance(sh_degree, int) or not 0 <= sh_degree <= 4:
        raise CohwError(f"sh_degree must be 0, 1, 2, 3 or 4 (gsplat evaluates up to degree 4), got {sh_degree!r}")
    tiles = -(-width // TILE_SIZE) * -(-height // TILE_SIZE)
    if tiles_per_gaussian is None:
        tiles_per_gaussian = tiles if scale == "tiny" else DEFAULT_TILES_PER_GAUSSIAN
    tiles_per_gaussian = _positive("tiles_per_gaussian", tiles_per_gaussian)
    if gaussians_per_tile is None:
        gaussians_per_tile = n if scale == "tiny" else -(-n * tiles_per_gaussian // tiles)
    gaussians_per_tile = _positive("gaussians_per_tile", gaussians_per_tile)
    _gs()  # import gsplat outside the device context
    model = _construct(device, seed, lambda: SplatRenderer(n, sh_degree, width, height, tiles_per_gaussian,
                                                           gaussians_per_tile))

    def render_inputs():
        return _cameras(batch, width, height, device), {}

    def render(viewmats, Ks):
        with torch.no_grad():
            return model(viewmats, Ks)

    def train_inputs():
        viewmats, Ks = _cameras(batch, width, height, device)
        gen = _generator(device, seed + 1)
        target = torch.rand(batch, height, width, 3, device=device, generator=gen)
        return (viewmats, Ks, target), {}

    def train_step(viewmats, Ks, target):
        colors, _ = model(viewmats, Ks)
        loss = (colors - target).abs().mean()
        loss.backward()
        return loss.detach()

    pairs = f"{tiles_per_gaussian} tiles/Gaussian, {gaussians_per_tile} Gaussians/tile"
    phases = {
        "render": Phase("render", render_inputs, render, batch, "image",
                        description=f"render {n:,} Gaussians (SH {sh_degree}) into {batch} x {width}x{height}; {pairs}"),
        "train_step": Phase("train_step", train_inputs, train_step, batch, "image", backward=True,
                            description=f"render + L1 loss + backward, {batch} x {width}x{height}; {pairs}"),
    }
    config = {"gaussians": n, "width": width, "height": height, "sh_degree": sh_degree, "tile_size": TILE_SIZE,
              "tiles": tiles, "tiles_per_gaussian": tiles_per_gaussian, "gaussians_per_tile": gaussians_per_tile}
    return Built(wl, scale, device, dtype, model, config, phases)


SPLAT_WORKLOAD: Workload = _workload(
    "3dgs", "neural rendering",
    "3D Gaussian splatting: 1.79M Gaussians (SH degree 3) rendered at 1920x1080 through gsplat's "
    "projection, SH, tile sort and alpha compositing",
    "Kerbl et al., 3D Gaussian Splatting for Real-Time Radiance Field Rendering, SIGGRAPH 2023 (arXiv:2308.04079); "
    "gsplat 1.5.3 (https://github.com/nerfstudio-project/gsplat): gsplat.cuda._torch_impl projection and SH",
    "gsplat", ("render", "train_step"), torch.float32, _build_gsplat,
)
