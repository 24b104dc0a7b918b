"""Mixture-of-experts geometry: routed experts, experts per token, and *active* parameters.

A mixture-of-experts (MoE) layer holds ``E`` routed experts and sends each token to ``k`` of them
(plus any shared experts every token uses). Its *total* parameters are what memory must hold; its
*active* parameters, those one token's forward pass multiplies by, set the FLOPs per token and,
at batch-1 decode, the weight bytes read per step.

Semantics of :func:`active_parameters`:

* routed expert weights are found in the built model, not in a list of names: every module with a
  ``num_experts`` attribute holding a 3-D parameter with that leading dimension (transformers'
  fused ``*Experts`` modules: Mixtral, DeepSeek-V2/V3, Qwen-MoE, gpt-oss...); each of its
  parameters with that leading dimension (weights and per-expert biases) counts ``k / E`` active.
  A router also knows ``num_experts`` but holds only an ``(E, hidden)`` matrix: it counts in full;
* ``k`` is read from the config (``num_experts_per_tok``, ``moe_topk``, ``top_k``,
  ``num_selected_experts``); shared experts, attention, embeddings and the router count in full;
* a model with no such module is dense: active = total.

Chapter 2's "Architectures of now" table and the CLI's ``analyze`` print both numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cohw_utils.core.errors import ConfigError
from cohw_utils.core.params import count_parameters

_TOP_K_NAMES = ("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts", "experts_per_token")


@dataclass(frozen=True)
class MoEParameters:
    """Total and active parameters of a model; ``routed`` are the routed experts' weights."""

    total: int
    active: int
    routed: int
    experts: int | None
    experts_per_token: int | None

    @property
    def is_moe(self) -> bool:
        return self.routed > 0


def _top_k(config) -> int | None:
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is None:
            continue
        for name in _TOP_K_NAMES:
            v = cfg.get(name) if isinstance(cfg, dict) else getattr(cfg, name, None)
            if isinstance(v, int) and v > 0:
                return v
    return None


def moe_parameters(model: torch.nn.Module, config) -> MoEParameters:
    """Total, active and routed-expert parameters of ``model`` (see the module docstring).

    Raises :class:`ConfigError` when the model has routed experts but the config names no
    experts-per-token count (the active count would be a guess).
    """
    total = count_parameters(model)
    routed, experts, seen = 0, None, set()
    for mod in model.modules():
        e = getattr(mod, "num_experts", None)
        if not isinstance(e, int) or e < 2:
            continue
        own = list(mod.parameters(recurse=False))
        if not any(p.dim() >= 3 and p.shape[0] == e for p in own):
            continue  # a router (its (E, hidden) weight is not an expert's): counts in full
        for p in own:
            if p.shape and p.shape[0] == e and id(p) not in seen:
                seen.add(id(p))
                routed += p.numel()
                experts = e
    if not routed:
        return MoEParameters(total, total, 0, None, None)
    k = _top_k(config)
    if k is None:
        raise ConfigError(
            f"the model has {experts} routed experts but its config names no experts-per-token count "
            f"({' / '.join(_TOP_K_NAMES)}); add it to the config")
    active = total - routed + routed * k // experts
    return MoEParameters(total, int(active), routed, experts, k)


def active_parameters(model: torch.nn.Module, config) -> int:
    """Parameters one token's forward pass uses (= total for a dense model)."""
    return moe_parameters(model, config).active
