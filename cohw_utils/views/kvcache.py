"""The LLM KV cache: its size from a config, checked against real caches, and the memory it leaves.

Units: bytes (1 GB = 1e9 bytes, as ``data/hardware.csv``), tokens, sequences.

* **KV bytes per token** (:func:`kv_bytes_per_token`, from
  :func:`cohw_utils.workloads.kv_cache_bytes_per_token`) = ``2 (K and V) x attention layers x
  kv_heads x head_dim x bytes per element``: ``kv_heads`` is the attention-head count for
  multi-head attention (MHA), ``num_key_value_heads`` for grouped-query attention (GQA), 1 for
  multi-query attention (MQA). For multi-head latent attention (MLA: DeepSeek-V2/V3) it is the
  compressed latent serving engines store, ``(kv_lora_rank + qk_rope_head_dim) x layers x bytes``
  (the serving number, which the memory and capacity views here use; see
  :mod:`cohw_utils.workloads.caches`). A hybrid (Jamba) counts its attention layers only; a pure
  state-space model (Mamba) raises, since its state does not grow per token. Any dtype of
  :mod:`cohw_utils.core.dtypes` may be given (``fp16`` 2 bytes, ``fp8``/``int8`` 1, ``int4`` 0.5;
  per-group scales of quantized caches are not included).
* **KV bytes** of ``batch`` sequences of ``seq_len`` tokens (:func:`kv_cache_bytes`) = per layer,
  bytes per token x ``seq_len``, except that a sliding-window layer (Gemma-2/3, Mistral v0.1,
  gpt-oss; read from the config as transformers' cache reads it) holds at most its window W, so
  beyond W the cache grows only by the full-attention layers. A paged cache (vLLM) allocates in
  blocks of ``block_size`` tokens, so a layer takes ``ceil(tokens / block_size)`` blocks.
* :func:`measure_cache` (:func:`cohw_utils.workloads.caches.measure_cache`, re-exported) builds the
  real model (tiny on CPU, or full scale on ``meta``), runs a prefill with ``use_cache=True`` and
  reads the cache object it returns, layer by layer, so the formula is checked against what
  transformers actually allocates (``formula_bytes`` / ``measured_bytes`` / ``agrees``).
* How much of a chip's memory the cache may use is :mod:`cohw_utils.views.memory_budget`'s one
  rule (:func:`~cohw_utils.views.memory_budget.memory_layout`, re-exported here).

Used by Chapters 1, 2 and 4.1-4.2 (KV-cache growth and concurrency).
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from cohw_utils import workloads
from cohw_utils.core.dtypes import bytes_per_element, dtype_name
from cohw_utils.core.errors import CohwError
from cohw_utils.core.params import parameter_bytes
from cohw_utils.views.memory_budget import MemoryLayout, memory_layout  # noqa: F401  (re-export)
from cohw_utils.workloads.caches import CacheReport, measure_cache  # noqa: F401  (re-export)
from cohw_utils.workloads.hf_config import HYBRID_LAYER_TYPES, KV_LAYER_TYPES, cache_layer_types, mla_geometry

GB = 1e9


# ------------------------------------------------------------------------------------ configs
def decoder_config(config: Any) -> Any:
    """A decoder config from a registry name (``"llama-2-13b"``), a path to a Hugging Face
    ``config.json`` (or its folder), a ``PretrainedConfig`` or a dict."""
    if isinstance(config, (str, Path)):
        key = str(config).strip().lower()
        wl = workloads.WORKLOADS.get(key)
        if wl is not None:
            path = getattr(wl.builder, "bound", {}).get("config_path")
            if wl.domain != "llm" or path is None:
                llms = [w.name for w in workloads.WORKLOADS.values() if w.domain == "llm"]
                raise CohwError(f"'{wl.name}' is not a decoder LM; use one of {', '.join(llms)} "
                                "or a path to a Hugging Face config.json")
            return workloads.load_hf_config(path)
        if not Path(config).expanduser().exists() and not re.search(r"[/\\]|\.json$", key):
            llms = [w.name for w in workloads.WORKLOADS.values() if w.domain == "llm"]
            raise CohwError(f"unknown decoder LM {str(config)!r}; use one of {', '.join(llms)} "
                            "or a path to a Hugging Face config.json")
        return workloads.load_hf_config(Path(config).expanduser())
    return config


def attention_summary(config: Any) -> dict[str, Any]:
    """Layers, attention heads, KV heads, head_dim and the attention kind (MHA/GQA/MQA/MLA) of a
    decoder named as :func:`decoder_config` accepts, as a dict (the row :func:`geometry_table` shows).

    MLA caches one latent per token and layer, shared by every head: ``kv_heads`` 1 and
    ``head_dim`` ``kv_lora_rank + qk_rope_head_dim`` (no separate V), as transformers' cache
    holds it. A state-space config (no attention) raises :class:`ConfigError`."""
    cfg = decoder_config(config)
    mla = mla_geometry(cfg)
    if mla is not None:
        layers = sum(t in KV_LAYER_TYPES for t, _ in cache_layer_types(cfg))
        return {"layers": layers, "heads": mla["heads"], "kv_heads": 1,
                "head_dim": mla["kv_lora_rank"] + mla["qk_rope_head_dim"], "kind": "MLA"}
    # the config-field rules (n_head / num_kv_heads / multi_query ...) have one home:
    # workloads.attention_geometry; reuse it rather than restating them.
    layers, heads, kv, head_dim = workloads.attention_geometry(cfg)
    kind = "MHA" if kv == heads else ("MQA" if kv == 1 else "GQA")
    return {"layers": layers, "heads": heads, "kv_heads": kv, "head_dim": head_dim, "kind": kind}


def kv_bytes_per_token(config: Any, dtype: str | torch.dtype = "fp16") -> float:
    """KV-cache bytes one token adds, at ``dtype`` (an int for byte-sized dtypes): the serving
    number (MLA: the latent), with sliding-window layers counted until their window fills."""
    cfg = decoder_config(config)
    per_element = workloads.kv_cache_bytes_per_token(cfg, 1)  # 2 x layers x kv_heads x head_dim
    b = bytes_per_element(dtype)
    out = per_element * b
    return int(out) if float(out).is_integer() else float(out)


def _layer_windows(cfg: Any) -> list[int | None]:
    """The window of each layer that caches K/V (None: full attention)."""
    return [w for t, w in cache_layer_types(cfg) if t in KV_LAYER_TYPES or t in HYBRID_LAYER_TYPES]


def _tokens(n: int, block_size: int | None) -> int:
    return n if not block_size else math.ceil(n / block_size) * block_size


def kv_cache_bytes(config: Any, seq_len: int, batch: int = 1, dtype: str | torch.dtype = "fp16",
                   block_size: int | None = None) -> float:
    """KV-cache bytes of ``batch`` sequences of ``seq_len`` tokens: per layer, its bytes per token
    x ``min(seq_len, W)`` for a sliding-window layer of window W, x ``seq_len`` otherwise (paged:
    each layer's tokens rounded up to whole blocks of ``block_size``)."""
    if seq_len < 0 or batch < 1:
        raise CohwError(f"seq_len must be >= 0 and batch >= 1, got seq_len={seq_len}, batch={batch}")
    cfg = decoder_config(config)
    per = kv_bytes_per_token(cfg, dtype)
    windows = _layer_windows(cfg)
    if not any(windows):
        return per * _tokens(seq_len, block_size) * batch
    per_layer = per / len(windows)  # every attention layer caches the same width
    out = sum(per_layer * _tokens(seq_len if w is None else min(seq_len, w), block_size) for w in windows) * batch
    return int(out) if float(out).is_integer() else out


def kv_table(configs: Mapping[str, Any], seq_lens: Iterable[int], batches: Iterable[int] = (1,),
             dtype: str = "fp16") -> pd.DataFrame:
    """Long table: one row per (model, batch, seq_len) with ``kv_bytes`` and ``kv_gb`` (sliding
    layers capped at their window, as :func:`kv_cache_bytes`)."""
    rows = []
    for name, cfg in configs.items():
        cfg = decoder_config(cfg)
        for b in batches:
            for s in seq_lens:
                kv = kv_cache_bytes(cfg, s, b, dtype)
                rows.append({"model": name, "batch": b, "seq_len": s, "kv_bytes": kv, "kv_gb": kv / GB})
    return pd.DataFrame(rows)


def geometry_table(configs: Mapping[str, Any], dtype: str = "fp16") -> pd.DataFrame:
    """Per model: layers, heads, KV heads, head_dim, kind and KV bytes per token at ``dtype``."""
    rows = []
    for name, cfg in configs.items():
        g = attention_summary(cfg)
        rows.append({"model": name, **g, f"kv_bytes_per_token_{dtype_name(dtype)}": kv_bytes_per_token(cfg, dtype)})
    return pd.DataFrame(rows).set_index("model")


def weight_bytes(workload: str, dtype: str = "fp16") -> int:
    """Bytes of a workload's weights at ``dtype``: :func:`cohw_utils.core.params.parameter_bytes`
    of the model built at full scale on ``meta`` (unique parameters, tied ones once)."""
    built = workloads.build(workload, scale="full", device="meta")
    return int(parameter_bytes(built.model, dtype))


def exceeds_weights_at(config: Any, weights: float, batch: int = 1, dtype: str = "fp16") -> int:
    """The smallest sequence length at which ``batch`` sequences' KV cache is larger than
    ``weights`` bytes (sliding layers stop growing at their window). Raises :class:`CohwError`
    when it never is (every layer sliding, the windows' cache smaller than the weights)."""
    cfg = decoder_config(config)
    per = kv_bytes_per_token(cfg, dtype) * batch
    windows = _layer_windows(cfg)
    if not any(windows):
        return int(math.floor(weights / per)) + 1
    if all(windows) and kv_cache_bytes(cfg, max(windows), batch, dtype) <= weights:
        raise CohwError(f"the KV cache never exceeds {weights:,.0f} bytes: every layer has a sliding window, "
                        f"and at the largest ({max(windows)} tokens) it holds "
                        f"{kv_cache_bytes(cfg, max(windows), batch, dtype):,.0f}")
    lo, hi = 0, 1
    while kv_cache_bytes(cfg, hi, batch, dtype) <= weights:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # bytes grow monotonically with the length: bisect
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if kv_cache_bytes(cfg, mid, batch, dtype) <= weights else (lo, mid)
    return hi


# ------------------------------------------------------------------------------------ memory layout
def largest_activation(table: pd.DataFrame) -> int:
    """Bytes of the largest tensor any op of a traced phase writes (a lower bound on the
    activation memory that phase needs at once)."""
    return int(table["bytes_written"].max()) if len(table) else 0


def concurrency_table(layout: MemoryLayout, seq_lens: Iterable[int], block_size: int | None = 16) -> pd.DataFrame:
    """Per sequence length: KV GB per sequence and how many sequences fit (paged in
    ``block_size``-token blocks; ``None`` for a contiguous cache)."""
    rows = []
    for s in seq_lens:
        rows.append({"seq_len": s, "kv_gb_per_sequence": layout.kv_per_token * s / GB,
                     "max_sequences": layout.max_sequences(s, block_size),
                     "max_batched_tokens": layout.max_sequences(s, block_size) * s})
    return pd.DataFrame(rows).set_index("seq_len")


# ------------------------------------------------------------------------------------ figures
def fig_kv_growth(configs: Mapping[str, Any], weights: Mapping[str, float] | None = None,
                  seq_lens: Iterable[int] | None = None, batches: Iterable[int] = (1, 8),
                  dtype: str = "fp16") -> Figure:
    """KV-cache GB against sequence length (log-log), one colour per model, one line style per
    batch size (sliding-window layers flatten at their window, :func:`kv_cache_bytes`); dotted
    horizontal lines at each model's weight bytes, where given, with a dot where batch 1's cache
    overtakes them."""
    seq = np.array(list(seq_lens) if seq_lens is not None else np.unique(np.logspace(7, 20, 40, base=2).astype(int)))
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    styles = ["-", "--", "-.", ":"]
    for i, (name, cfg) in enumerate(configs.items()):
        color = f"C{i}"
        cfg = decoder_config(cfg)
        for j, b in enumerate(batches):
            ax.plot(seq, [kv_cache_bytes(cfg, int(s), b, dtype) / GB for s in seq], styles[j % len(styles)],
                    color=color, label=f"{name}, batch {b}")
        if weights and name in weights:
            ax.axhline(weights[name] / GB, color=color, lw=0.8, ls=":")
            try:
                x1 = exceeds_weights_at(cfg, weights[name], 1, dtype)
            except CohwError:  # a sliding-only cache that never reaches the weights: no dot
                x1 = None
            if x1 is not None:
                ax.plot([x1], [kv_cache_bytes(cfg, x1, 1, dtype) / GB], "o", color=color, ms=4)
            ax.annotate(f"{name} weights {weights[name] / GB:.0f} GB", (seq[0], weights[name] / GB),
                        color=color, fontsize=7, xytext=(2, 2), textcoords="offset points")
    ax.set(xscale="log", yscale="log", xlabel="sequence length (tokens)", ylabel=f"KV cache, GB ({dtype_name(dtype)})",
           title="KV cache grows linearly with context and batch")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    return fig


def fig_memory_layout(layouts: Mapping[str, MemoryLayout], seq_len: int, block_size: int | None = 16) -> Figure:
    """One horizontal stacked bar per layout (weights | reserves | KV budget, in GB), with the
    KV budget divided into the sequences of ``seq_len`` tokens that fit."""
    fig, ax = plt.subplots(figsize=(8, 0.9 * len(layouts) + 1.4))
    colors = {"weights": "tab:blue", "runtime reserve": "tab:gray", "activations": "tab:orange",
              "KV-cache budget": "tab:green"}
    for y, (label, lay) in enumerate(layouts.items()):
        left = 0.0
        for part, row in lay.table().iterrows():
            w = row["GB"]
            ax.barh(y, w, left=left, color=colors[part], edgecolor="white",
                    label=part if y == 0 else None)
            if w / (lay.capacity / GB) > 0.14:
                ax.text(left + w / 2, y - 0.08, f"{part}\n{w:.1f} GB ({row['% of capacity']:.0f}%)",
                        ha="center", va="center", fontsize=7, color="white")
            left += w
        n = lay.max_sequences(seq_len, block_size)
        per = lay.kv_per_token * seq_len / GB
        start = (lay.weights + lay.runtime_reserve + lay.activations) / GB
        for k in range(1, n + 1):
            ax.plot([start + k * per] * 2, [y + 0.22, y + 0.4], color="k", lw=0.6)
        ax.annotate(f"{n} sequences of {seq_len} tokens", (lay.capacity / GB, y + 0.42),
                    ha="right", fontsize=7)
    ax.set_yticks(range(len(layouts)), list(layouts))
    ax.set(xlabel="GB (1e9 bytes)", title="Serving memory: weights, reserves and the KV-cache budget")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=4)
    fig.tight_layout()
    return fig
