"""Tests for cohw_utils.workloads.splatting: the 3dgs workload (gsplat's projection and SH, this
module's tile binning and compositing).

Hand-computed numbers: parameter counts (N x (3 + 4 + 3 + 1 + 3 (d+1)^2)), the full-scale tile grid
and per-tile list length, the compositing of two Gaussians on one pixel, and the rasterizer's
GEMM FLOPs; the tiled render is checked against a per-pixel reference written here.
"""
from __future__ import annotations

import math

import pytest
import torch

from cohw_utils.core.errors import CohwError
from cohw_utils.spine.trace import trace
from cohw_utils.workloads.splatting import ALPHA_MAX, ALPHA_MIN, SH_C0, SPLAT_WORKLOAD, T_MIN, TILE_SIZE

W = SPLAT_WORKLOAD


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_workload_entry():
    assert (W.name, W.domain, W.library, W.phases) == ("3dgs", "neural rendering", "gsplat", ("render", "train_step"))
    assert W.default_dtype == torch.float32 and "Kerbl" in W.source
    assert "Phase" in W.builder.__doc__
    assert {"gaussians", "width", "height", "sh_degree", "tiles_per_gaussian", "gaussians_per_tile"} <= set(W.builder.options)


def test_parameter_counts():
    # SH degree 3: 3 (mean) + 4 (quat) + 3 (scale) + 1 (opacity) + 3 x 16 (SH) = 59 floats per Gaussian
    assert n_params(W.builder(scale="tiny", device="meta").model) == 512 * 59  # 30,208
    assert n_params(W.builder(scale="full", device="meta").model) == 1_790_000 * 59  # 105,610,000
    # SH degree 0: 11 + 3 x 1 = 14 floats
    assert n_params(W.builder(scale="tiny", device="meta", sh_degree=0, gaussians=100).model) == 1400
    names = dict(W.builder(scale="tiny", device="meta").model.splats.items())
    assert {k: tuple(v.shape) for k, v in names.items()} == {
        "means": (512, 3), "scales": (512, 3), "quats": (512, 4), "opacities": (512,), "sh0": (512, 1, 3),
        "shN": (512, 15, 3)}


def test_full_scale_render_on_meta_counts_the_stated_pairs():
    built = W.builder(scale="full", device="meta")
    c = built.config
    # 1920/16 = 120 tile columns, ceil(1080/16) = ceil(67.5) = 68 rows -> 8160 tiles
    assert (c["tiles"], c["tiles_per_gaussian"]) == (8160, 4)
    # 1.79M Gaussians x 4 tiles = 7,160,000 pairs; / 8160 tiles = 877.45 -> 878 per tile
    assert c["gaussians_per_tile"] == 878
    ph = built.phase("render")
    args, kw = ph.make_inputs()
    colors, alpha = ph.run(*args, **kw)
    assert colors.shape == (1, 1080, 1920, 3) and alpha.shape == (1, 1080, 1920, 1)
    with torch.no_grad():
        table = trace(ph.run, *args, model=built.model, phase="render", **kw)
    sort = table[table.op == "aten.sort.default"]
    assert sort.module.tolist() == ["binning"] and sort.input_shapes.iloc[0] == ((7_160_000,),)
    exp = table[(table.module == "rasterizer") & (table.op == "aten.exp.default")]
    assert exp.output_shapes.iloc[0] == ((8160, 256, 878),)  # tiles x pixels per tile x list length
    bmm = table[(table.module == "rasterizer") & (table.op == "aten.bmm.default")]
    # weights (8160, 256, 878) @ colours (8160, 878, 3): 2 x 8160 x 256 x 878 x 3 = 11,004,641,280 FLOPs
    assert bmm.flops.sum() == 11_004_641_280
    assert set(table.module) >= {"projection", "sh", "binning", "rasterizer"}


def _two_gaussians(opacity: float):
    """Two Gaussians on the centre (8.5, 8.5) of pixel (8, 8) of a 16x16 image: red at depth 2 in
    front of green at depth 3 (focal 16, principal point 8: x = 0.5 z / 16 puts u at 8.5)."""
    built = W.builder(scale="tiny", device="cpu", gaussians=2, width=16, height=16, sh_degree=0)
    s = built.model.splats
    with torch.no_grad():
        s["means"].copy_(torch.tensor([[0.5 * 2 / 16, 0.5 * 2 / 16, -1.0], [0.5 * 3 / 16, 0.5 * 3 / 16, 0.0]]))
        s["scales"].fill_(math.log(0.01))
        s["quats"].copy_(torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]]))
        s["opacities"].fill_(math.log(opacity / (1 - opacity)))
        s["sh0"].copy_(((torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]) - 0.5) / SH_C0)[:, None, :])
    ph = built.phase("render")
    args, kw = ph.make_inputs()
    colors, alpha = ph.run(*args, **kw)
    return colors[0, 8, 8], alpha[0, 8, 8, 0]


def test_compositing_two_gaussians_by_hand():
    # alpha 0.5 each: red 0.5 x T=1; green 0.5 x T=(1 - 0.5) = 0.25; accumulated 0.5 + 0.25 = 0.75
    rgb, acc = _two_gaussians(0.5)
    assert rgb.tolist() == pytest.approx([0.5, 0.25, 0.0], abs=1e-5)
    assert acc.item() == pytest.approx(0.75, abs=1e-5)


def test_compositing_stops_at_the_kernels_transmittance_floor():
    # opacity 0.9999 -> alpha clamped to 0.999; after red T = 0.001 > 1e-4 (kept); green would
    # leave T = 1e-6 <= 1e-4, so the kernel stops before it: rgb = (0.999, 0, 0), alpha 0.999
    assert (ALPHA_MAX, T_MIN) == (0.999, 1e-4)
    rgb, acc = _two_gaussians(0.9999)
    assert rgb.tolist() == pytest.approx([0.999, 0.0, 0.0], abs=1e-5)
    assert acc.item() == pytest.approx(0.999, abs=1e-5)


def _per_pixel_reference(model, viewmats, Ks):
    """Every pixel composites every visible Gaussian in depth order (no tiles), with the kernel's rules."""
    s = model.splats
    radii, means2d, depths, conics = model.projection(s["means"], s["quats"], torch.exp(s["scales"]), viewmats, Ks,
                                                      model.width, model.height)
    colors = model.sh(s["means"], torch.cat([s["sh0"], s["shN"]], dim=1), viewmats)
    opac = torch.sigmoid(s["opacities"])
    ys, xs = torch.meshgrid(torch.arange(model.height) + 0.5, torch.arange(model.width) + 0.5, indexing="ij")
    out = []
    for c in range(viewmats.shape[0]):
        visible = (radii[c] > 0).all(-1)
        order = torch.argsort(torch.where(visible, depths[c], math.inf))[: int(visible.sum())]
        xy, con, col, op = means2d[c, order], conics[c, order], colors[c, order], opac[order]
        dx = xy[None, None, :, 0] - xs[..., None]
        dy = xy[None, None, :, 1] - ys[..., None]
        sigma = 0.5 * (con[:, 0] * dx ** 2 + con[:, 2] * dy ** 2) + con[:, 1] * dx * dy
        alpha = torch.clamp_max(op * torch.exp(-sigma), ALPHA_MAX)
        alpha = torch.where((sigma >= 0) & (alpha >= ALPHA_MIN), alpha, 0.0)
        t_after = torch.cumprod(1 - alpha, -1)
        t_before = torch.cat([torch.ones_like(t_after[..., :1]), t_after[..., :-1]], -1)
        w = torch.where(t_after > T_MIN, alpha * t_before, 0.0)
        out.append(w @ col)
    return torch.stack(out)


def test_tiled_render_equals_per_pixel_reference():
    built = W.builder(scale="tiny", device="cpu", batch=2, gaussians=64, width=40, height=24)
    assert built.config["tiles"] == 3 * 2  # ceil(40/16) x ceil(24/16): edge tiles are cropped
    ph = built.phase("render")
    args, kw = ph.make_inputs()
    colors, alpha = ph.run(*args, **kw)
    with torch.no_grad():
        ref = _per_pixel_reference(built.model, *args)
    assert colors.shape == ref.shape == (2, 24, 40, 3)
    assert alpha.max() > 0.5  # the scene is in view: not a comparison of two black images
    torch.testing.assert_close(colors, ref, atol=1e-5, rtol=1e-4)


def test_truncated_lists_drop_the_farthest_gaussians():
    # one entry per tile: each pixel sees only its tile's nearest Gaussian, so at most its alpha
    full = W.builder(scale="tiny", device="cpu", gaussians=64, width=32, height=32)
    short = W.builder(scale="tiny", device="cpu", gaussians=64, width=32, height=32, gaussians_per_tile=1)
    a_full = full.phase("render").run(*full.phase("render").make_inputs()[0])[1]
    a_short = short.phase("render").run(*short.phase("render").make_inputs()[0])[1]
    assert (a_short <= ALPHA_MAX + 1e-6).all() and a_full.max() > a_short.max()


def test_train_step_reaches_every_parameter():
    built = W.builder(scale="tiny", device="cpu", gaussians=128, width=32, height=32)
    ph = built.phase("train_step")
    assert ph.backward
    args, kw = ph.make_inputs()
    loss = ph.run(*args, **kw)
    assert torch.isfinite(loss) and 0 < loss.item() < 1  # L1 of [0,1] colours
    for name, p in built.model.splats.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_train_step_traces_on_meta():
    built = W.builder(scale="tiny", device="meta")
    ph = built.phase("train_step")
    args, kw = ph.make_inputs()
    table = trace(ph.run, *args, model=built.model, phase="train_step", **kw)
    assert {"forward", "backward"} <= set(table["pass"])


@pytest.mark.parametrize("kw, needle", [
    ({"dtype": "float16"}, "float32 only"),
    ({"sh_degree": 5}, "sh_degree"),
    ({"gaussians": 0}, "gaussians"),
    ({"width": -1}, "width"),
])
def test_bad_options_one_line(kw, needle):
    with pytest.raises(CohwError) as e:
        W.builder(scale="tiny", device="meta", **kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_tile_size_is_gsplats_default():
    import inspect

    from gsplat.rendering import rasterization

    assert inspect.signature(rasterization).parameters["tile_size"].default == TILE_SIZE == 16
