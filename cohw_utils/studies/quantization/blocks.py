"""Decoder-block plumbing: which linears get quantized, and walking the blocks on calibration data.

What is quantized in a model: the seven linear layers of every decoder block
(``q/k/v/o_proj``, ``gate/up/down_proj``, :data:`LINEAR_NAMES`), as GPTQ and AWQ do. Embedding,
LM head and norms are *kept* at 16 bits by every quantized variant
(:mod:`cohw_utils.studies.quantization.methods`).

Block walking (GPTQ and AWQ both quantize one block at a time, each block seeing the outputs
of the already-quantized blocks before it): :func:`block_inputs` captures the hidden states
entering block 0, :func:`collect_stats` runs one block and accumulates its linears' input
statistics (:class:`InputStats`: ``H = E[x x^T]``, in fp64, and mean ``|x|`` per input
channel), :func:`run_block` produces the next block's inputs. :func:`output_error` is the
objective both methods lower: ``E_x ||(W - W_hat) x||^2 = tr(dW H dW^T)`` (squared units of the
layer's output, averaged over the calibration tokens).

Used by Chapter 4.2b (quantization), through the GPTQ, AWQ and method modules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from cohw_utils.core.errors import CohwError
from cohw_utils.studies.quantization.kernels import QuantLinear

#: The linear layers of a Llama decoder block, in execution order.
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Linear layers that read the same input, and the op whose output that input is (AWQ folds
#: its per-channel scale into that op).
INPUT_GROUPS = (
    (("q_proj", "k_proj", "v_proj"), "input_layernorm"),
    (("o_proj",), "v_proj"),
    (("gate_proj", "up_proj"), "post_attention_layernorm"),
    (("down_proj",), "up_proj"),
)


# ------------------------------------------------------------------------------------ model plumbing
def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The quantized layers: ``{'model.layers.0.self_attn.q_proj': Linear, ...}`` in order."""
    out = {name: m for name, m in model.named_modules()
           if isinstance(m, (nn.Linear, QuantLinear)) and name.rsplit(".", 1)[-1] in LINEAR_NAMES
           and ".layers." in f".{name}"}
    if not out:
        raise CohwError("the model has no decoder-block linear layers (q_proj ... down_proj); "
                        "pass a Llama-style causal LM")
    return out


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", model)
    if not hasattr(inner, "layers"):
        raise CohwError("the model has no .model.layers; pass a Llama-style causal LM")
    return inner.layers


# ------------------------------------------------------------------------------------ block walking
class _Stop(Exception):
    pass


@torch.no_grad()
def block_inputs(model: nn.Module, calib: torch.Tensor, batch: int = 8) -> tuple[list[torch.Tensor], list[dict]]:
    """Hidden states entering decoder block 0 for each calibration batch, with the keyword
    arguments (mask, rotary embeddings, positions) the block is called with."""
    layer0 = decoder_layers(model)[0]
    states, kwargs = [], []

    def grab(module, args, kw):
        states.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.append({k: v for k, v in kw.items() if k not in ("cache", "past_key_values")})
        raise _Stop

    h = layer0.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for i in range(0, len(calib), batch):
            try:
                model(input_ids=calib[i:i + batch], use_cache=False)
            except _Stop:
                pass
    finally:
        h.remove()
    return states, kwargs


@dataclass
class InputStats:
    """Second moment ``H = X^T X / n`` and mean |x| per input channel of one linear's inputs."""

    H: torch.Tensor
    absmean: torch.Tensor
    n: int = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        total = self.n + m
        # fp32 products (as GPTQ's reference code), accumulated in fp64 across batches
        self.H.mul_(self.n / total).add_((x.T @ x).double() / total)
        self.absmean.mul_(self.n / total).add_(x.abs().sum(0).double() / total)
        self.n = total


@torch.no_grad()
def collect_stats(layer: nn.Module, states: list[torch.Tensor], kwargs: list[dict],
                  names: Iterable[str] = LINEAR_NAMES) -> dict[str, InputStats]:
    """Run one decoder block on the calibration states; input statistics of its linears
    (layers that read the same input, e.g. q/k/v, share one :class:`InputStats` object)."""
    mods = {n: m for n, m in layer.named_modules() if n.rsplit(".", 1)[-1] in names}
    short = {n.rsplit(".", 1)[-1]: n for n in mods}
    stats: dict[str, InputStats] = {}
    hooks = []
    for group, _ in INPUT_GROUPS:
        present = [short[g] for g in group if g in short]
        if not present:
            continue
        k = mods[present[0]].in_features
        st = InputStats(torch.zeros(k, k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64))
        for n in present:
            stats[n] = st
        hooks.append(mods[present[0]].register_forward_pre_hook(lambda mod, args, st=st: st.add(args[0])))
    try:
        for s, kw in zip(states, kwargs):
            layer(s, **kw)
    finally:
        for h in hooks:
            h.remove()
    return {n: stats[n] for n in mods if n in stats}


@torch.no_grad()
def run_block(layer: nn.Module, states: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    out = []
    for s, kw in zip(states, kwargs):
        o = layer(s, **kw)
        out.append(o[0] if isinstance(o, tuple) else o)
    return out


def output_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """Mean squared output error ``E_x ||(W - W_hat) x||^2 = tr(dW H dW^T)`` with ``H = E[x x^T]``."""
    d = (w.detach().float() - w_hat.detach().float())
    return float(((d @ H.float()) * d).sum(dtype=torch.float64))


@torch.no_grad()
def input_second_moments(model: nn.Module, windows: torch.Tensor, batch: int = 8) -> dict[str, torch.Tensor]:
    """``H = E[x x^T]`` of every block linear's input, from one forward pass of ``model`` over
    ``windows`` (layers that share an input share one matrix)."""
    lins = block_linears(model)
    stats: dict[int, InputStats] = {}
    owner: dict[str, int] = {}
    hooks = []
    for name, m in lins.items():
        parent = name.rsplit(".", 1)[0]
        short = name.rsplit(".", 1)[1]
        group = next(g for g, _ in INPUT_GROUPS if short in g)
        key = hash((parent, group[0]))
        owner[name] = key
        if key not in stats:
            k = m.in_features
            stats[key] = InputStats(torch.zeros(k, k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64))
            hooks.append(m.register_forward_pre_hook(lambda mod, args, st=stats[key]: st.add(args[0])))
    feed_windows(model, windows, batch, hooks)
    return {name: stats[owner[name]].H for name in lins}


def feed_windows(model: nn.Module, windows: torch.Tensor, batch: int, hooks: list) -> None:
    """Run ``model`` over ``windows`` (token ids, one window per row) ``batch`` rows at a time,
    without a KV cache, then remove ``hooks`` (forward hooks that collect statistics), even on error."""
    try:
        for i in range(0, len(windows), batch):
            model(input_ids=windows[i:i + batch], use_cache=False)
    finally:
        for h in hooks:
            h.remove()


def submodule_path(layer: nn.Module, short: str) -> str:
    """The path inside decoder ``layer`` of the submodule whose name ends in ``short``
    (``"q_proj"`` -> ``"self_attn.q_proj"``)."""
    for n, _ in layer.named_modules():
        if n.rsplit(".", 1)[-1] == short:
            return n
    raise CohwError(f"decoder block has no submodule {short!r}; pass a Llama-style causal LM")

