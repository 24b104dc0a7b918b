"""The LLM KV cache: its size from a config, checked against real caches, and the memory it leaves.

Units: bytes (1 GB = 1e9 bytes, as ``data/hardware.csv``), tokens, sequences.

* **KV bytes per token** = ``2 (K and V) x layers x kv_heads x head_dim x bytes per element``
  (:func:`cohw_utils.workloads.kv_cache_bytes_per_token`): ``kv_heads`` is the attention-head
  count for multi-head attention (MHA), ``num_key_value_heads`` for grouped-query attention
  (GQA), 1 for multi-query attention (MQA). Any dtype of :mod:`cohw_utils.core.dtypes` may be given
  (``fp16`` 2 bytes, ``fp8``/``int8`` 1, ``int4`` 0.5; per-group scales of quantized caches are
  not included).
* **KV bytes** of ``batch`` sequences of ``seq_len`` tokens = per token x seq_len x batch: the
  contiguous cache Hugging Face's ``DynamicCache`` holds. A paged cache (vLLM) allocates in
  blocks of ``block_size`` tokens, so a sequence takes ``ceil(seq_len / block_size)`` blocks.
* :func:`measure_cache` builds the real model (tiny on CPU, or full scale on ``meta``), runs a
  prefill with ``use_cache=True`` and sums the bytes of the cache tensors it returns, so the
  formula is checked against what transformers actually allocates.
* How much of a chip's memory the cache may use is :mod:`cohw_utils.views.memory_budget`'s one
  rule (:func:`~cohw_utils.views.memory_budget.memory_layout`, re-exported here).

Used by Chapters 1, 2 and 4.1-4.2 (KV-cache growth and concurrency).
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
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
    """Layers, attention heads, KV heads, head_dim and the attention kind (MHA/GQA/MQA) of a
    decoder named as :func:`decoder_config` accepts, as a dict (the row :func:`geometry_table` shows)."""
    cfg = decoder_config(config)
    # the config-field rules (n_head / num_kv_heads / multi_query ...) have one home:
    # workloads.attention_geometry; reuse it rather than restating them.
    layers, heads, kv, head_dim = workloads.attention_geometry(cfg)
    kind = "MHA" if kv == heads else ("MQA" if kv == 1 else "GQA")
    return {"layers": layers, "heads": heads, "kv_heads": kv, "head_dim": head_dim, "kind": kind}


def kv_bytes_per_token(config: Any, dtype: str | torch.dtype = "fp16") -> float:
    """KV-cache bytes one token adds, at ``dtype`` (an int for byte-sized dtypes)."""
    cfg = decoder_config(config)
    per_element = workloads.kv_cache_bytes_per_token(cfg, 1)  # 2 x layers x kv_heads x head_dim
    b = bytes_per_element(dtype)
    out = per_element * b
    return int(out) if float(out).is_integer() else float(out)


def kv_cache_bytes(config: Any, seq_len: int, batch: int = 1, dtype: str | torch.dtype = "fp16",
                   block_size: int | None = None) -> float:
    """KV-cache bytes of ``batch`` sequences of ``seq_len`` tokens (paged when ``block_size``)."""
    if seq_len < 0 or batch < 1:
        raise CohwError(f"seq_len must be >= 0 and batch >= 1, got seq_len={seq_len}, batch={batch}")
    tokens = seq_len if not block_size else math.ceil(seq_len / block_size) * block_size
    return kv_bytes_per_token(config, dtype) * tokens * batch


def kv_table(configs: Mapping[str, Any], seq_lens: Iterable[int], batches: Iterable[int] = (1,),
             dtype: str = "fp16") -> pd.DataFrame:
    """Long table: one row per (model, batch, seq_len) with ``kv_bytes`` and ``kv_gb``."""
    rows = []
    for name, cfg in configs.items():
        per_tok = kv_bytes_per_token(cfg, dtype)
        for b in batches:
            for s in seq_lens:
                rows.append({"model": name, "batch": b, "seq_len": s, "kv_bytes": per_tok * s * b,
                             "kv_gb": per_tok * s * b / GB})
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
    ``weights`` bytes."""
    per = kv_bytes_per_token(config, dtype) * batch
    return int(math.floor(weights / per)) + 1


# ------------------------------------------------------------------------------------ real caches
@dataclass(frozen=True)
class CacheCheck:
    """A real cache against the formula: both in bytes, plus the first layer's K shape."""

    model: str
    scale: str
    device: str
    dtype: str
    batch: int
    seq_len: int
    layers: int
    key_shape: tuple[int, ...]
    measured_bytes: int
    formula_bytes: int

    @property
    def agrees(self) -> bool:
        return self.measured_bytes == self.formula_bytes


def measure_cache(workload: str, seq_len: int = 16, batch: int = 2, scale: str = "tiny",
                  device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None) -> CacheCheck:
    """Run a prefill of ``batch`` x ``seq_len`` tokens with ``use_cache=True`` and compare the
    bytes of the returned cache tensors (:func:`cohw_utils.workloads.cache_tensors`) with
    :func:`kv_cache_bytes` of the *built* config (the tiny config at ``scale="tiny"``).

    ``device="meta"`` at ``scale="full"`` checks the published architecture without memory;
    ``scale="tiny"`` on ``cpu`` (or ``cuda``) allocates real tensors.
    """
    kw = {} if dtype is None else {"dtype": dtype}
    built = workloads.build(workload, scale=scale, device=device, batch=batch, seq_len=seq_len, **kw)
    if built.workload.domain != "llm":
        raise CohwError(f"'{workload}' is not a decoder LM; measure_cache needs one")
    ph = built.phase("prefill")
    args, kwargs = ph.make_inputs()
    with torch.no_grad():
        out = ph.run(*args, **kwargs)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if cache is None:
        raise CohwError(f"'{workload}' returned no KV cache from its prefill; does it support use_cache=True?")
    pairs = workloads.cache_tensors(cache)
    measured = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in pairs)
    formula = kv_cache_bytes(built.config, seq_len, batch, built.dtype)
    return CacheCheck(model=built.workload.name, scale=scale, device=str(built.device),
                      dtype=dtype_name(built.dtype), batch=batch, seq_len=seq_len, layers=len(pairs),
                      key_shape=tuple(pairs[0][0].shape), measured_bytes=int(measured),
                      formula_bytes=int(formula))


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
    batch size; dotted horizontal lines at each model's weight bytes, where given, with a dot
    where batch 1's cache overtakes them."""
    seq = np.array(list(seq_lens) if seq_lens is not None else np.unique(np.logspace(7, 20, 40, base=2).astype(int)))
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    styles = ["-", "--", "-.", ":"]
    for i, (name, cfg) in enumerate(configs.items()):
        color = f"C{i}"
        per = kv_bytes_per_token(cfg, dtype)
        for j, b in enumerate(batches):
            ax.plot(seq, per * seq * b / GB, styles[j % len(styles)], color=color,
                    label=f"{name}, batch {b}")
        if weights and name in weights:
            ax.axhline(weights[name] / GB, color=color, lw=0.8, ls=":")
            x1 = exceeds_weights_at(cfg, weights[name], 1, dtype)
            ax.plot([x1], [per * x1 / GB], "o", color=color, ms=4)
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
