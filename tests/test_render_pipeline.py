"""NeRF pipeline stages from module paths; vanilla NeRF's MLP FLOPs by hand."""
from __future__ import annotations

import warnings

import pytest
from matplotlib.figure import Figure

from cohw_utils.studies.architecture import inventory
from cohw_utils.studies.architecture import render_pipeline as rp
from cohw_utils.hardware import get_hardware

warnings.filterwarnings("ignore", category=FutureWarning)  # nerfstudio's torch.cuda.amp decorators

H100 = get_hardware("H100-SXM")


def test_stage_of():
    assert rp.stage_of("collider") == ("ray generation", "")
    assert rp.stage_of("proposal_sampler.pdf_sampler") == ("sampling", "")
    assert rp.stage_of("sampler_uniform") == ("sampling", "")
    assert rp.stage_of("proposal_networks.0.mlp_base.0", "HashEncoding") == ("proposal field query", "encoding")
    assert rp.stage_of("proposal_networks.1.mlp_base.1.layers.0", "Linear") == ("proposal field query", "MLP")
    assert rp.stage_of("field.mlp_base.model.0", "HashEncoding") == ("field query", "encoding")
    assert rp.stage_of("field_fine.position_encoding", "NeRFEncoding") == ("field query", "encoding")
    assert rp.stage_of("field.mlp_head.layers.2", "Linear") == ("field query", "MLP")
    assert rp.stage_of("<root>", "NerfactoRenderer") == ("rendering", "")
    assert rp.stage_of("renderer_rgb", "RGBRenderer") == ("rendering", "")
    assert rp.stage_of("<global>") == ("loss & other", "")
    # inside the text-to-3D step
    assert rp.stage_of("nerf", "NerfactoRenderer") == ("rendering", "")
    assert rp.stage_of("nerf.field.mlp_head.layers.0", "Linear") == ("field query", "MLP")
    assert rp.stage_of("vae.encoder.conv_in") == ("VAE encoder", "")
    assert rp.stage_of("unet.up_blocks.0") == ("UNet guidance", "")


@pytest.fixture(scope="module")
def vanilla():
    return rp.nerf_pipeline("vanilla-nerf", H100, rays=256)


def test_vanilla_stages_sum_to_the_phase_and_mlp_flops_by_hand(vanilla):
    rays = 256
    render = vanilla.loc["render"]
    assert render["flops_%"].sum() == pytest.approx(100)
    stages = set(render.index.get_level_values("stage"))
    assert stages >= {"ray generation", "sampling", "field query", "rendering"}
    # base MLP per sample: 63->256, six 256->256, 319->256 (the skip at layer 4)
    macs_base = 63 * 256 + 6 * 256 * 256 + (256 + 63) * 256
    table = inventory.trace_phase("vanilla-nerf", "render", rays=rays)
    lt = inventory.layer_table(table, H100)
    assert lt.loc["field_coarse.mlp_base.layers.*", "flops"] == 2 * rays * 64 * macs_base
    # nerfstudio's PDFSampler merges its 129 new bin edges with the 65 coarse edges: 193 fine samples
    assert lt.loc["field_fine.mlp_base.layers.*", "flops"] == 2 * rays * (129 + 65 - 1) * macs_base
    mlp = render.loc[("forward", "field query", "MLP")]
    assert mlp["bound"] == "compute" and mlp["flops_%"] > 99
    enc = render.loc[("forward", "field query", "encoding")]
    assert enc["bound"] == "memory"
    # training: the backward pass has no encoding (no parameters, no grad) and about 2x the MLP FLOPs
    train = vanilla.loc["train_step"]
    assert ("backward", "field query", "encoding") not in train.index
    ratio = train.loc[("backward", "field query", "MLP"), "flops"] / train.loc[("forward", "field query", "MLP"), "flops"]
    assert 1.9 < ratio < 2.0


def test_nerfacto_is_memory_bound_in_its_hash_grids():
    pipe = rp.nerf_pipeline("nerfacto", H100, rays=256)
    render = pipe.loc["render"]
    for stage in ("proposal field query", "field query"):
        assert render.loc[("forward", stage, "encoding"), "bound"] == "memory"
    # the hash grids move most of the bytes; the MLPs do most of the FLOPs
    enc_bytes = render.xs("encoding", level="component")["bytes_%"].sum()
    assert enc_bytes > 50
    assert render.loc[("forward", "field query", "MLP"), "flops_%"] > 50
    assert isinstance(rp.fig_pipeline_bars(pipe, "nerfacto"), Figure)


# ------------------------------------------------------------------ render + compute on two units
def test_list_schedule_hand_computed():
    chain = [("R", 1.0), ("M", 2.0), ("R", 1.0)]
    assert rp.list_schedule(chain, 1)["makespan_s"] == pytest.approx(4.0)      # one chunk: serial
    # two chunks (0.5, 1, 0.5 each): R1a 0-0.5, Ma 0.5-1.5, R1b 0.5-1, Mb 1.5-2.5, R2a 1.5-2, R2b 2.5-3
    r = rp.list_schedule(chain, 2)
    assert r["makespan_s"] == pytest.approx(3.0) and r["serial_s"] == 4.0
    assert r["busy_R_s"] == 2.0 and r["busy_M_s"] == 2.0
    # many chunks approach the busier unit's total plus one chunk's fill and drain
    assert rp.list_schedule(chain, 100)["makespan_s"] == pytest.approx(2.0 + 0.02, abs=1e-9)


def test_list_schedule_bad_input():
    from cohw_utils.core.errors import CohwError
    with pytest.raises(CohwError, match="chunks must be a positive integer"):
        rp.list_schedule([("R", 1.0)], 0)
    with pytest.raises(CohwError, match="at least one task"):
        rp.list_schedule([], 2)


def test_two_unit_schedule_of_vanilla_nerf_render():
    hw = get_hardware("H100-SXM")
    pipe = rp.nerf_pipeline("vanilla-nerf", hw, rays=256)
    chain = rp.unit_chain(pipe, "render")
    assert [u for u, _ in chain][:2] != [chain[0][0]] * 2                # alternating units, merged runs
    assert sum(t for _, t in chain) == pytest.approx(pipe.loc["render"]["time_s"].sum())
    s = rp.two_unit_schedule(pipe, hw, chunks=(1, 8))
    assert s.loc[1, "speedup"] == pytest.approx(1.0)                     # no chunks, no overlap
    assert 1.0 < s.loc[8, "speedup"] <= s.loc[8, "serial_s"] / s.loc[8, "bound_s"] + 1e-9
