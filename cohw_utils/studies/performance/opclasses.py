"""Operator classes measured: FLOPs against runtime per class, after Ivanov et al. (MLSys 2021).

Ivanov et al. ("Data Movement Is All You Need") split a BERT-large encoder layer's operators
into *tensor contractions*, *statistical normalizations* and *element-wise* operators, and
found that in PyTorch the contractions do 99.80% of the FLOPs but take only 61.0% of the
runtime, normalizations 0.17% / 25.5%, element-wise 0.03% / 13.5% (their Table 1, training
one layer, batch 8, sequence 512, on a V100). The table is a data file
(``data/ivanov2021_bert.csv``, :func:`ivanov_table`).

Here the op table's ``op_class`` column (:mod:`cohw_utils.spine.costs`) plays the role of their
classes: ``contraction`` = tensor contraction, ``normalization`` = statistical normalization
(layer norm, softmax, group norm, and RMSNorm's pieces, which the tracer classes as
normalization), ``element-wise`` = element-wise (bias adds outside GEMMs, dropout, GELU/SiLU,
residual adds, scaling; reductions outside norms, such as bias gradients, also land here).
Two classes of ours have no row in the paper: ``data movement`` (copies, concatenations,
layout changes; the paper fuses layout transformations into its operators) and ``other``
(tensor creation such as ``empty_like``). Views do no work and are dropped.

Runtime per class comes from :func:`cohw_utils.spine.measure.profile_ops` (torch.profiler events
joined to op-table rows, median over repeats); the class's share is the sum of its rows'
times over the sum of all rows' times. The profiler adds a few microseconds per event, so a
workload whose ops take only microseconds (a decode step) shows overhead in its short ops.

Blocks measured (each built from the real library class and a config in this repo):

* :func:`bert_layer`: ``transformers.BertLayer`` with ``data/configs/bert-large/config.json``
  (hidden 1024, 16 heads, FFN 4096), eager attention (explicit QK^T, softmax, PV, as the
  paper's PyTorch baseline), train mode (dropout on), forward + backward from a random
  output gradient (parameter gradients are reset to ``None`` before each step, so no
  gradient accumulation ops appear).
* :func:`llama_slice`: Llama-2-7B's config cut to one decoder layer (vocabulary shrunk to
  2,048, which changes only the embedding gather and the LM head), built through
  :func:`cohw_utils.workloads.build`, prefill or one decode step; :func:`layer_only` keeps
  the rows of ``model.layers.0``.
* :func:`unet_block`: diffusers' ``CrossAttnDownBlock2D``, SD 1.5's first down block (320
  channels, 2 ResNet + 2 transformer layers, 8 heads, cross-attention to 77 x 768 text states,
  stride-2 downsample), with the classifier-free-guidance batch of 2, forward only.

Used by Chapter 4.3 (bandwidth-bound operators).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from cohw_utils.spine.costs import CONTRACTION, DATA_MOVEMENT, ELEMENTWISE, NORMALIZATION, OTHER, VIEW
from cohw_utils.core.errors import CohwError
from cohw_utils.spine.optable import module_prefix
from cohw_utils.core.data import DATA_DIR
from cohw_utils.spine import optable

DATA = DATA_DIR
CONFIGS = DATA / "configs"

#: our op_class -> the row of Ivanov et al.'s Table 1 it is compared with
PAPER_CLASS = {CONTRACTION: "tensor contraction", NORMALIZATION: "statistical normalization",
               ELEMENTWISE: "element-wise"}
CLASS_ORDER = (CONTRACTION, NORMALIZATION, ELEMENTWISE, DATA_MOVEMENT, OTHER)


@dataclass
class Block:
    """A model piece ready to profile: ``run(*args, **kwargs)`` on ``make_inputs()``."""

    name: str
    model: torch.nn.Module
    make_inputs: Callable[[], tuple[tuple, dict]]
    run: Callable[..., Any]
    description: str
    layer_prefix: str | None = None  # module prefix of the layer itself (None: the whole model)


def _generator(device: str, seed: int) -> torch.Generator | None:
    """A seeded generator on ``device``; None on meta (no data to seed)."""
    if torch.device(device).type == "meta":
        return None
    return torch.Generator(device=device).manual_seed(seed)


def _check_size(**sizes: int) -> None:
    for k, v in sizes.items():
        if not isinstance(v, int) or v < 1:
            raise CohwError(f"{k} must be a positive integer, got {v!r}")


# ------------------------------------------------------------------------------ the blocks
def bert_config(**overrides: Any):
    """BERT-large's config (``data/configs/bert-large/config.json``) with eager attention."""
    from transformers import BertConfig

    data = {k: v for k, v in json.loads((CONFIGS / "bert-large" / "config.json").read_text()).items()
            if not k.startswith("_cohw")}
    data.update(overrides)
    cfg = BertConfig.from_dict(data)
    cfg._attn_implementation = "eager"
    return cfg


def bert_layer(batch: int = 8, seq_len: int = 512, train: bool = True, device: str = "cpu",
               dtype: torch.dtype = torch.float32, seed: int = 0) -> Block:
    """One BERT-large encoder layer (see the module docstring). ``train=False``: eval-mode
    forward only, under no_grad."""
    _check_size(batch=batch, seq_len=seq_len)
    from transformers.models.bert.modeling_bert import BertLayer

    cfg = bert_config()
    torch.manual_seed(seed)
    with torch.device(device):
        layer = BertLayer(cfg).to(dtype)
    layer.train(train)
    hidden = cfg.hidden_size

    def make_inputs():
        gen = _generator(device, seed + 1)
        x = torch.randn(batch, seq_len, hidden, device=device, dtype=dtype, generator=gen)
        if not train:
            return (x,), {}
        grad = torch.randn(batch, seq_len, hidden, device=device, dtype=dtype, generator=gen)
        return (x.requires_grad_(True), grad), {}

    def step(x, grad=None):
        if not train:
            with torch.no_grad():
                return layer(x)
        for p in layer.parameters():
            p.grad = None
        x.grad = None
        out = layer(x)
        out.backward(grad)
        return out

    what = "training step (forward + backward)" if train else "inference forward"
    return Block("bert-large layer", layer, make_inputs, step,
                 f"BERT-large encoder layer, {what}, batch {batch}, sequence {seq_len}, {str(dtype).removeprefix('torch.')}")


def slice_config(base: str = "llama-2-7b", layers: int = 1, vocab_size: int = 2048,
                 **overrides: Any) -> Path:
    """A Hugging Face config.json derived from a registry config (``base``) with ``layers``
    decoder layers, a small vocabulary and any other ``overrides``, written to a temporary
    folder; pass the path to :func:`cohw_utils.workloads.build`."""
    src = CONFIGS / base / "config.json"
    if not src.exists():
        raise CohwError(f"no config for '{base}' under {CONFIGS}; use a folder name such as llama-2-7b")
    _check_size(layers=layers, vocab_size=vocab_size)
    data = json.loads(src.read_text())
    data.update(num_hidden_layers=layers, vocab_size=vocab_size, **overrides)
    data["_cohw_source"] = f"{data.get('_cohw_source', base)}; cut to {layers} layer(s), vocab {vocab_size}, overrides {overrides}"
    out = Path(tempfile.mkdtemp(prefix="cohw_slice_")) / "config.json"
    out.write_text(json.dumps(data, indent=1))
    return out


#: Narrower Llama widths for quick runs: same structure (MHA, SwiGLU, RMSNorm, RoPE).
SMALL_LLAMA = {"hidden_size": 1024, "intermediate_size": 2752, "num_attention_heads": 8,
               "num_key_value_heads": 8}


def llama_slice(phase: str = "prefill", batch: int = 1, seq_len: int = 512, width: str = "full",
                device: str = "cpu", dtype: torch.dtype | str | None = None, seed: int = 0) -> Block:
    """One Llama-2-7B decoder layer (``width="full"``: hidden 4096; ``"small"``: hidden 1024,
    see :data:`SMALL_LLAMA`), prefill of ``seq_len`` tokens or one decode step against a KV
    cache of ``seq_len`` tokens, batch ``batch``. Logits for the last position only."""
    from cohw_utils import workloads

    if phase not in ("prefill", "decode"):
        raise CohwError(f"phase must be 'prefill' or 'decode', got {phase!r}")
    if width not in ("full", "small"):
        raise CohwError(f"width must be 'full' or 'small', got {width!r}")
    _check_size(batch=batch, seq_len=seq_len)
    path = slice_config(**(SMALL_LLAMA if width == "small" else {}))
    # profiled decode steps reuse one set of inputs, so the cache grows a token per call: transformers'
    # own DynamicCache (what generate() uses by default), not the fixed-length static cache
    built = workloads.build(str(path), scale="full", device=device, dtype=dtype, batch=batch,
                            seq_len=seq_len, prefill_logits="last", seed=seed, cache="dynamic")
    ph = built.phase(phase)
    hidden = built.config.hidden_size
    return Block(f"llama-2-7b layer {phase}", built.model, ph.make_inputs, ph.run,
                 f"one Llama-2-7B decoder layer (hidden {hidden}), {ph.description}",
                 layer_prefix="model.layers.0")


def unet_block(latent: int = 64, batch: int = 1, device: str = "cpu",
               dtype: torch.dtype = torch.float32, seed: int = 0) -> Block:
    """SD 1.5's first ``CrossAttnDownBlock2D`` on a ``latent`` x ``latent`` latent (64 for
    512 px images), CFG batch ``2 * batch``, forward under no_grad."""
    _check_size(latent=latent, batch=batch)
    from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D

    cfg = {k: v for k, v in json.loads((CONFIGS / "sd-1.5" / "unet" / "config.json").read_text()).items()
           if not k.startswith("_")}
    ch = cfg["block_out_channels"][0]
    temb = ch * 4  # the UNet's time-embedding width
    heads = cfg["attention_head_dim"]  # SD 1.5's "attention_head_dim" is the head count
    heads = heads[0] if isinstance(heads, list) else heads
    torch.manual_seed(seed)
    with torch.device(device):
        block = CrossAttnDownBlock2D(
            in_channels=ch, out_channels=ch, temb_channels=temb, num_layers=cfg["layers_per_block"],
            resnet_eps=cfg["norm_eps"], resnet_act_fn=cfg["act_fn"], resnet_groups=cfg["norm_num_groups"],
            num_attention_heads=heads, cross_attention_dim=cfg["cross_attention_dim"],
            downsample_padding=cfg["downsample_padding"], add_downsample=True).to(dtype).eval()
    b2 = 2 * batch

    def make_inputs():
        gen = _generator(device, seed + 1)
        x = torch.randn(b2, ch, latent, latent, device=device, dtype=dtype, generator=gen)
        t = torch.randn(b2, temb, device=device, dtype=dtype, generator=gen)
        ctx = torch.randn(b2, 77, cfg["cross_attention_dim"], device=device, dtype=dtype, generator=gen)
        return (x, t, ctx), {}

    def run(x, temb_, ctx):
        with torch.no_grad():
            return block(x, temb_, encoder_hidden_states=ctx)

    return Block("sd-1.5 unet block", block, make_inputs, run,
                 f"SD 1.5 CrossAttnDownBlock2D ({ch} channels), latent {latent}x{latent}, CFG batch {b2}")


# ------------------------------------------------------------------------------ profiling
@contextlib.contextmanager
def _without_profiler_banners():
    """Drop the ``USDT: ... profiler_start/stop`` lines torch's C++ profiler writes to file
    descriptor 2 for every session; anything else written there is passed on afterwards."""
    import sys

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (some embedded interpreters): leave it alone
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [ln for ln in tmp.read().decode(errors="replace").splitlines()
                    if ln.strip() and not ln.startswith("USDT:")]
            if kept:
                print("\n".join(kept), file=sys.stderr)


def profile(block: Block, repeats: int = 3, warmup: int = 1, trace_file: str | None = None) -> pd.DataFrame:
    """:func:`cohw_utils.spine.measure.profile_ops` of one call of the block (inputs made afresh
    before the profiled runs; every run sees the same inputs). The profiler's per-session
    ``USDT`` banner lines on stderr are dropped; other stderr output is kept."""
    from cohw_utils.spine.measure import profile_ops

    args, kwargs = block.make_inputs()
    with _without_profiler_banners():
        table = profile_ops(block.run, *args, model=block.model, phase=block.name, repeats=repeats,
                            warmup=warmup, trace_file=trace_file, **kwargs)
    table.attrs["block"] = block.description
    return table


def layer_only(table: pd.DataFrame, prefix: str | None) -> pd.DataFrame:
    """Rows of modules under ``prefix`` (all rows when None); attrs are kept."""
    if not prefix:
        return table
    keep = table["module"].map(lambda m: m == prefix or m.startswith(prefix + "."))
    out = table[keep].copy()
    out.attrs = dict(table.attrs)
    return out


def measured_class_shares(table: pd.DataFrame) -> pd.DataFrame:
    """Per operator class of a profiled op table: ops, FLOPs, bytes moved, time, the % of
    FLOPs and % of runtime, and achieved GFLOP/s and GB/s. Views are dropped."""
    t = table[table["op_class"] != VIEW].pipe(optable.with_bytes_moved)
    if "time_s" not in t:
        raise CohwError("class_shares needs a profiled table (cohw_utils.spine.measure.profile_ops or opclasses.profile)")
    g = t.groupby("op_class").agg(ops=("op", "size"), flops=("flops", "sum"),
                                  bytes_moved=("bytes_moved", "sum"), time_s=("time_s", "sum"))
    g = g.reindex([c for c in CLASS_ORDER if c in g.index])
    g["flops_%"] = 100.0 * g["flops"] / g["flops"].sum()
    g["runtime_%"] = 100.0 * g["time_s"] / g["time_s"].sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        g["GFLOP/s"] = g["flops"] / g["time_s"] / 1e9
        g["GB/s"] = g["bytes_moved"] / g["time_s"] / 1e9
    return g


def ivanov_table() -> pd.DataFrame:
    """Ivanov et al.'s Table 1: index = their class, columns flop_% and runtime_%."""
    raw = pd.read_csv(DATA / "ivanov2021_bert.csv")
    wide = raw.pivot_table(index="row", columns="metric", values="value", aggfunc="first")
    wide = wide.rename(columns={"flop_pct": "flop_%", "runtime_pct": "runtime_%"})
    wide = wide.reindex(list(PAPER_CLASS.values()))[["flop_%", "runtime_%"]]
    wide.index.name = "class"
    wide.attrs["citation"] = raw["citation"].iloc[0]
    wide.attrs["setting"] = raw["notes"].iloc[0]
    return wide


def compare_with_paper(shares: pd.DataFrame) -> pd.DataFrame:
    """Our class shares beside the paper's: one row per class (the paper's three, then ours
    that it has no row for), columns ``flops_% (ours)``, ``flops_% (paper)``, ``runtime_%
    (ours)``, ``runtime_% (paper)`` and ``runtime/FLOP share (ours)``."""
    paper = ivanov_table()
    rows = []
    for cls in CLASS_ORDER:
        if cls not in shares.index and cls not in PAPER_CLASS:
            continue
        ours = shares.loc[cls] if cls in shares.index else None
        pname = PAPER_CLASS.get(cls)
        f = float(ours["flops_%"]) if ours is not None else 0.0
        r = float(ours["runtime_%"]) if ours is not None else 0.0
        rows.append({"class": pname or f"{cls} (no row in the paper)",
                     "flops_% (ours)": f, "flops_% (paper)": paper.loc[pname, "flop_%"] if pname else np.nan,
                     "runtime_% (ours)": r,
                     "runtime_% (paper)": paper.loc[pname, "runtime_%"] if pname else np.nan,
                     "runtime/FLOP share (ours)": r / f if f else np.inf})
    return pd.DataFrame(rows).set_index("class")


# ------------------------------------------------------------------------------ views
def module_rates(table: pd.DataFrame, depth: int | None = None) -> pd.DataFrame:
    """Per module (path cut to ``depth``): ops, FLOPs, bytes, measured time, achieved GFLOP/s
    and GB/s, and the share of the table's time; largest time first."""
    t = table[table["op_class"] != VIEW].pipe(optable.with_bytes_moved)
    key = t["module"].map(lambda m: module_prefix(m, depth))
    g = t.groupby(key).agg(ops=("op", "size"), flops=("flops", "sum"), bytes_moved=("bytes_moved", "sum"),
                           time_s=("time_s", "sum"))
    with np.errstate(divide="ignore", invalid="ignore"):
        g["GFLOP/s"] = g["flops"] / g["time_s"] / 1e9
        g["GB/s"] = g["bytes_moved"] / g["time_s"] / 1e9
    g["time_%"] = 100.0 * g["time_s"] / g["time_s"].sum()
    return g.sort_values("time_s", ascending=False)


def slowest_ops(table: pd.DataFrame, n: int = 10, peak_flops: float | None = None,
             mem_bw: float | None = None, classes: tuple[str, ...] | None = None) -> pd.DataFrame:
    """The ``n`` op rows that take the most measured time (of the given ``classes``, default
    all), with FLOPs, bytes, intensity, achieved GFLOP/s and GB/s; with ``peak_flops`` and
    ``mem_bw`` (e.g. this machine's probe) also the % of each and the roof the op sits under
    (memory if its intensity is below the ridge point). Time % is of the whole table."""
    t = table[table["op_class"] != VIEW]
    if classes:
        t = t[t["op_class"].isin(classes)]
    t = t.nlargest(n, "time_s")
    out = pd.DataFrame({
        "op": t["op"].str.removeprefix("aten.").str.removesuffix(".default"),
        "module": t["module"], "class": t["op_class"], "pass": t["pass"],
        "time_ms": 1e3 * t["time_s"], "time_%": 100 * t["time_s"] / table["time_s"].sum(),
        "flops": t["flops"], "bytes_moved": optable.bytes_moved(t),
        "intensity": t["intensity"], "GFLOP/s": t["achieved_flops"] / 1e9, "GB/s": t["achieved_bw"] / 1e9,
    })
    if peak_flops and mem_bw:
        out["% peak FLOP/s"] = 100 * t["achieved_flops"] / peak_flops
        out["% peak BW"] = 100 * t["achieved_bw"] / mem_bw
        out["bound (roofline)"] = np.where(t["intensity"] < peak_flops / mem_bw, "memory", "compute")
    return out.reset_index(drop=True)


def fig_class_shares(comparisons: dict[str, pd.DataFrame]):
    """Stacked bars of % FLOPs and % runtime per class, for the paper and each measured block
    (``comparisons``: name -> :func:`measured_class_shares` table)."""
    import matplotlib.pyplot as plt

    paper = ivanov_table()
    bars: list[tuple[str, dict[str, float]]] = [
        ("paper FLOPs", dict(zip(PAPER_CLASS, paper["flop_%"]))),
        ("paper runtime", dict(zip(PAPER_CLASS, paper["runtime_%"])))]
    for name, s in comparisons.items():
        bars.append((f"{name} FLOPs", s["flops_%"].to_dict()))
        bars.append((f"{name} runtime", s["runtime_%"].to_dict()))
    colors = {CONTRACTION: "tab:blue", NORMALIZATION: "tab:orange", ELEMENTWISE: "tab:green",
              DATA_MOVEMENT: "tab:purple", OTHER: "tab:gray"}
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(bars) + 1.4))
    labels = [b[0] for b in bars][::-1]
    for cls in CLASS_ORDER:
        left = [sum(v.get(c, 0.0) for c in CLASS_ORDER[:CLASS_ORDER.index(cls)]) for _, v in bars][::-1]
        width = [v.get(cls, 0.0) for _, v in bars][::-1]
        ax.barh(labels, width, left=left, color=colors[cls], label=PAPER_CLASS.get(cls, cls))
    ax.set(xlim=(0, 100), xlabel="% of total")
    ax.set_title("FLOPs vs runtime per operator class (paper: Ivanov et al. 2021, Table 1)", fontsize=10)
    handles, names = ax.get_legend_handles_labels()
    fig.legend(handles, names, fontsize=8, ncol=5, loc="lower center")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def measure_class_shares(block: str = "bert", repeats: int = 3, **options: Any) -> pd.DataFrame:
    """Build a block (``"bert"``, ``"llama-prefill"``, ``"llama-decode"``, ``"unet"``),
    profile it and return its :func:`measured_class_shares` (restricted to the layer for the Llama
    slice). A plain function of picklable arguments, so that
    :func:`cohw_utils.studies.performance.fusion.run_in_subprocess` can run it in a fresh process."""
    builders = {"bert": bert_layer, "unet": unet_block,
                "llama-prefill": lambda **kw: llama_slice("prefill", **kw),
                "llama-decode": lambda **kw: llama_slice("decode", **kw)}
    if block not in builders:
        raise CohwError(f"unknown block '{block}'; use one of: {', '.join(builders)}")
    blk = builders[block](**options)
    table = profile(blk, repeats=repeats)
    shares = measured_class_shares(layer_only(table, blk.layer_prefix))
    shares.attrs = {"block": blk.description, "wall_s": table.attrs["wall_s"]}
    return shares


def fig_class_roofline(table: pd.DataFrame, peak_flops: float, mem_bw: float, title: str = ""):
    """Each timed op as a point of achieved GFLOP/s against arithmetic intensity (log-log),
    coloured by class and sized by time, under this machine's roofline (``peak_flops``,
    ``mem_bw``: the probe's figures)."""
    import matplotlib.pyplot as plt

    t = table[(table["op_class"] != VIEW) & (table["flops"] > 0) & (table["time_s"] > 0)]
    colors = {CONTRACTION: "tab:blue", NORMALIZATION: "tab:orange", ELEMENTWISE: "tab:green",
              DATA_MOVEMENT: "tab:purple", OTHER: "tab:gray"}
    fig, ax = plt.subplots(figsize=(7, 4.6))
    size = 10 + 300 * t["time_s"] / t["time_s"].max()
    for cls, g in t.groupby("op_class"):
        ax.scatter(g["intensity"], g["achieved_flops"] / 1e9, s=size[g.index], alpha=0.6,
                   color=colors.get(cls, "k"), label=PAPER_CLASS.get(cls, cls))
    x = np.logspace(np.log10(max(t["intensity"].min() / 2, 1e-3)), np.log10(t["intensity"].max() * 2), 100)
    ax.plot(x, np.minimum(peak_flops, x * mem_bw) / 1e9, "k--", lw=1,
            label=f"roofline: {peak_flops / 1e9:.0f} GFLOP/s, {mem_bw / 1e9:.0f} GB/s")
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP/byte, unfused count)",
           ylabel="achieved GFLOP/s")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def predicted_shares(table: pd.DataFrame, hardware: list, model=None) -> pd.DataFrame:
    """% of the *predicted* time per operator class on each chip: the op table timed with
    :func:`cohw_utils.views.roofline.predict_times` (default model: the ideal roofline, every op
    unfused at max(FLOPs / peak, bytes / bandwidth)). ``hardware``: names in ``hardware.csv``
    or :class:`~cohw_utils.hardware.Hardware` objects. Columns = chips, plus a row
    ``total ms``."""
    from cohw_utils.hardware import get_hardware
    from cohw_utils.views.roofline import predict_times

    cols = {}
    for h in hardware:
        hw = h if hasattr(h, "mem_bw") else get_hardware(h)
        p = predict_times(table, hw, model)
        p = p[p["op_class"] != VIEW]
        g = p.groupby("op_class")["time"].sum()
        g = g.reindex([c for c in CLASS_ORDER if c in g.index])
        col = 100.0 * g / g.sum()
        col.loc["total ms"] = 1e3 * g.sum()
        cols[hw.name] = col
    return pd.DataFrame(cols)
