"""Architecture views: operator inventory, layers and bound-ness by hand, datatypes, SD scaling."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn as nn
from matplotlib.figure import Figure

from cohw_utils.studies.architecture import inventory
from cohw_utils.spine.trace import trace
from cohw_utils.hardware import Hardware, get_hardware

# A made-up chip with round numbers: fp32 ridge = 1e10 / 1e9 = 10 FLOP/B.
CHIP = Hardware(name="toy", vendor="-", year=None, mem_bw=1e9, mem_bytes=8e9, llc_bytes=None,
                tdp_w=None, source="test", peak_flops={"fp32": 1e10, "bf16": 1e11})

MM_FLOPS = 2 * 128 * 64 * 64                   # one (128 x 64) @ (64 x 64)
MM_BYTES = 4 * (128 * 64 + 64 * 64 + 128 * 64)  # read x and W, write y: intensity 12.8
RELU_FLOPS, RELU_BYTES = 128 * 64, 4 * 2 * 128 * 64  # intensity 0.125


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 64, bias=False)
        self.act = nn.ReLU()
        self.down = nn.Linear(64, 64, bias=False)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


@pytest.fixture(scope="module")
def toy_table():
    torch.manual_seed(0)
    m = Toy()
    with torch.no_grad():
        return trace(m, torch.randn(128, 64), model=m)


def test_layer_name():
    assert inventory.layer_name("model.layers.3.mlp.up_proj") == "model.layers.*.mlp.up_proj"
    assert inventory.layer_name("model.layers.3.mlp.up_proj", depth=3) == "model.layers.*"
    assert inventory.layer_name("model.layers.3.mlp", depth=3, collapse=False) == "model.layers.3"
    assert inventory.layer_name("<root>") == "<root>"


def test_op_inventory_and_class_shares_by_hand(toy_table):
    inv = inventory.op_inventory(toy_table).set_index("op")
    assert inv.loc["aten.mm", "calls"] == 4 and inv.loc["aten.mm", "flops"] == 4 * MM_FLOPS
    total = 4 * MM_FLOPS + 2 * RELU_FLOPS
    assert inv.loc["aten.mm", "flops_%"] == pytest.approx(100 * 4 * MM_FLOPS / total)
    assert inv.loc["aten.relu", "bytes_moved"] == 2 * RELU_BYTES
    assert "aten.t" not in inv.index  # views are not operators of the inventory
    cs = inventory.class_shares({"toy": toy_table})
    assert cs.loc["toy", ("unique ops", "")] == 2
    assert cs.loc["toy", ("FLOPs %", "contraction")] == pytest.approx(100 * 4 * MM_FLOPS / total)
    assert cs.loc["toy", ("bytes %", "element-wise")] == pytest.approx(
        100 * 2 * RELU_BYTES / (4 * MM_BYTES + 2 * RELU_BYTES))


def test_layers_bound_against_the_ridge_point(toy_table):
    lt = inventory.layer_table(toy_table, CHIP)
    assert list(lt.index[:2]) == ["blocks.*.down", "blocks.*.up"] or list(lt.index[:2]) == ["blocks.*.up", "blocks.*.down"]
    up, act = lt.loc["blocks.*.up"], lt.loc["blocks.*.act"]
    assert up["instances"] == 2 and up["flops"] == 2 * MM_FLOPS and up["bytes_moved"] == 2 * MM_BYTES
    assert up["intensity"] == pytest.approx(12.8) and up["ridge"] == pytest.approx(10)
    assert up["bound"] == "compute" and up["work"] == "contraction" and up["dtype"] == "fp32"
    assert act["intensity"] == pytest.approx(0.125) and act["bound"] == "memory" and act["work"] == "vector"
    # roofline time: mm at max(FLOPs/1e10, bytes/1e9), relu at bytes/1e9
    assert up["time_s"] == pytest.approx(2 * max(MM_FLOPS / 1e10, MM_BYTES / 1e9))
    assert act["time_s"] == pytest.approx(2 * RELU_BYTES / 1e9)
    assert lt["time_%"].sum() == pytest.approx(100)
    # depth=1 puts everything in one block type
    assert inventory.layer_table(toy_table, CHIP, depth=1).index.tolist() == ["blocks"]


def test_hotspots_shape(toy_table):
    h = inventory.layer_hotspots(toy_table, CHIP, n=2)
    assert list(h.index.get_level_values("by")) == ["FLOPs", "FLOPs", "bytes", "bytes"]
    assert set(h.loc["FLOPs", "layer"]) == {"blocks.*.up", "blocks.*.down"}
    assert "blocks.*.act" not in set(h["layer"])
    assert set(h.columns) >= {"intensity", "ridge", "bound", "time_%"}


def test_call_path_attribution_of_shared_modules_and_backward():
    shared = nn.Linear(4, 4)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
            self.b = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
            self.first = shared
            self.c = nn.Sequential(shared, nn.ReLU())  # the same Linear under a second path

        def forward(self, x):
            return self.a(x).sum() + self.b(x).sum() + self.c(x).sum()

    net = Net()

    def step(x):
        net(x).backward()

    t = trace(step, torch.randn(16, 4), model=net)
    fw = t[(t["pass"] == "forward") & (t.op_class != "view")]
    # the shared Linear called through c is named c.0, not by its canonical path "first"
    assert set(fw.loc[fw.op == "aten.addmm.default", "module"]) == {"a.0", "a.2", "b.0", "b.2", "c.0"}
    assert (fw.loc[fw.module == "c.0", "module_class"] == "Linear").all()
    bw = t[(t["pass"] == "backward") & (t.op == "aten.threshold_backward.default")]
    # each ReLU's backward stays with its own network (plain ModuleTracker charges a.1's to b.0)
    assert sorted(bw["module"]) == ["a.1", "b.1", "c.1"]
    mm_bw = t[(t["pass"] == "backward") & (t.op == "aten.mm.default")]
    assert {"a.0", "a.2", "b.0", "b.2"} <= set(mm_bw["module"])


def test_dtype_view_and_weight_footprint():
    lin = nn.Linear(32, 32).to(torch.bfloat16)

    def f(x):
        return lin(x.to(torch.bfloat16)).float().softmax(-1)

    t = trace(f, torch.randn(4, 32), model=lin)
    dv = inventory.dtype_view(t)
    assert {("forward", "bf16"), ("forward", "fp32")} <= set(dv.index)
    assert "contraction" in dv.loc[("forward", "bf16"), "op classes"]
    assert dv["flops_%"].sum() == pytest.approx(100)
    fp = inventory.weight_footprint({"m": 10**9}, hardware=[CHIP])
    assert fp.loc["m", ["fp32", "bf16", "fp16", "int8", "int4"]].tolist() == [4.0, 2.0, 2.0, 1.0, 0.5]
    assert fp.loc["m", "fits toy at"] == "fp32"  # 4 GB <= 8 GB
    assert inventory.weight_footprint({"big": 10**10}, hardware=[CHIP]).loc["big", "fits toy at"] == "int4"


def _sd_attention_flops(size: int, cfg_batch: int = 2, ctx: int = 77) -> int:
    """SD 1.5 UNet attention FLOPs by hand: 4 x B x Tq x Tk x C per attention call (all heads).

    Transformer blocks at the three upper levels (channels 320, 640, 1280): 2 in the down path
    and 3 in the up path each; 1 in the mid block (1280 channels, 1/8 of the latent side).
    Each has a self-attention (Tk = Tq) and a cross-attention (Tk = 77 text tokens).
    """
    lat = size // 8
    total = 0
    for level, ch in enumerate((320, 640, 1280)):
        t = (lat >> level) ** 2
        total += 5 * 4 * cfg_batch * t * (t + ctx) * ch
    t = (lat >> 3) ** 2
    return total + 4 * cfg_batch * t * (t + ctx) * 1280


def test_sd_attention_flops_by_hand_and_quadratic_growth():
    s = inventory.component_scaling(image_sizes=(512, 1024), phases=("unet_step",), unfused=False)
    by = s.set_index("image_size")
    assert _sd_attention_flops(512) == 252_104_540_160
    assert by.loc[512, "attention_flops"] == _sd_attention_flops(512)
    assert by.loc[1024, "attention_flops"] == _sd_attention_flops(1024)
    # 4x the latent tokens: self-attention grows 16x, the rest ~4x, so the attention share rises
    assert by.loc[1024, "attention_%"] > 2 * by.loc[512, "attention_%"]
    assert by.loc[512, "latent"] == "64x64"


def test_generation_totals():
    s = pd.DataFrame({"image_size": [512] * 3, "component": ["text_encoder", "unet_step", "vae_decode"],
                      "flops": [1, 10, 100], "bytes_moved": [2, 20, 200]})
    g = inventory.generation_totals(s, steps=50)
    assert g.loc[512, "flops"] == 1 + 500 + 100 and g.loc[512, "bytes_moved"] == 2 + 1000 + 200
    assert g.loc[512, "unet_step FLOPs %"] == pytest.approx(100 * 500 / 601)


def test_llama_hotspots_on_h100_are_structural():
    t = inventory.trace_phase("llama-2-7b", "decode", seq_len=256)
    h = inventory.layer_hotspots(t, get_hardware("H100-SXM"))
    assert (h["bound"] == "memory").all()                     # decode: every hotspot waits on memory
    assert h.loc[("FLOPs", 1), "layer"].startswith("model.layers.*.mlp.")
    p = inventory.layer_table(inventory.trace_phase("llama-2-7b", "prefill", seq_len=2048), get_hardware("H100-SXM"))
    assert p.loc["model.layers.*.mlp.down_proj", "bound"] == "compute"
    assert p.loc["model.layers.*.input_layernorm", "bound"] == "memory"


def test_figures(toy_table):
    cs = inventory.class_shares({"toy": toy_table, "toy2": toy_table})
    for fig in (inventory.fig_class_bars(cs), inventory.fig_class_pies(toy_table, "toy"),
                inventory.fig_layer_bars(toy_table, depth=2, title="toy")):
        assert isinstance(fig, Figure)
    s = pd.DataFrame({"image_size": [512, 768], "component": ["unet_step"] * 2, "flops": [1, 2],
                      "bytes_moved": [1, 2], "attention_flops": [0, 1], "peak_activation": [1, 3]})
    assert isinstance(inventory.fig_scaling(s), Figure)


def test_weight_footprint_names_the_widest_format_that_fits():
    from cohw_utils.hardware import get_hardware
    from cohw_utils.studies.architecture.inventory import weight_footprint
    # 30e9 parameters: 120 GB fp32, 60 GB bf16, 30 GB int8, 15 GB int4; usable = 90% of nominal
    df = weight_footprint({"m": 30_000_000_000}, hardware=[get_hardware("A100-40GB"), get_hardware("H100-SXM")])
    assert df.loc["m", "fp32"] == 120 and df.loc["m", "int4"] == 15
    assert df.loc["m", "fits A100-40GB at"] == "int8"   # 36 GB usable: bf16's 60 GB does not fit
    assert df.loc["m", "fits H100-SXM at"] == "bf16"    # 72 GB usable: the first listed that fits
    huge = weight_footprint({"x": 200_000_000_000}, hardware=[get_hardware("A100-40GB")])
    assert huge.loc["x", "fits A100-40GB at"] == "-"    # 100 GB even in int4
