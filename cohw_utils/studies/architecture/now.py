"""Architectures of now (Chapter 2): one table over every family the package builds from a config,
and the growth of each one's cache with context.

:func:`architectures_table` traces the first compute phase of each architecture at full scale on
``meta`` (:func:`cohw_utils.spine.analyze.analyze`) and reads, from that same run:

* ``parameters`` and ``active_parameters`` (a mixture-of-experts model's k of E routed experts,
  :mod:`cohw_utils.workloads.moe`);
* the cache the model itself returned, by layer type (:class:`~cohw_utils.workloads.CacheReport`):
  full attention, sliding window (W), recurrent state; ``kv_bytes_per_token`` is what a serving
  engine stores (for multi-head latent attention, the compressed latent), ``decompressed`` what a
  per-head cache of the same model would hold; ``state_bytes`` is constant in the context;
* FLOPs two ways: ``flops`` as torch counts them (attention full) and ``flops_effective``, what a
  causal or sliding-window flash kernel computes (:mod:`cohw_utils.spine.costs`).

Every row is traced in one dtype (bf16 by default: 2 bytes an element; fp16 and bf16 cost the
same). LLM prompts are ``seq_len`` tokens, or the model's own limit when that is shorter;
encoders, vision and diffusion models take their configs' input sizes; ``flops_per_token``
compares LLM rows traced at different prompt lengths (:data:`PROMPT_CAP`). :func:`kv_vs_context`
evaluates each cache report at a range of contexts (sliding layers cap at their window; recurrent
state does not grow) for :func:`fig_kv_vs_context`.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from cohw_utils import workloads
from cohw_utils.core.errors import CohwError
from cohw_utils.spine.analyze import analyze
from cohw_utils.spine.optable import totals
from cohw_utils.views.kvcache import attention_summary

_C = workloads.CONFIG_DIR

# label -> (registry name or config path, phase traced for the FLOP columns)
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "Llama-2-7B": ("llama-2-7b", "prefill"),
    "Llama-2-70B": ("llama-2-70b", "prefill"),
    "Qwen2.5-7B": (str(_C / "qwen2.5-7b-instruct"), "prefill"),
    "Phi-3.5-mini": (str(_C / "phi-3.5-mini-instruct"), "prefill"),
    "Gemma-3-1B": (str(_C / "gemma-3-1b-it"), "prefill"),
    "gpt-oss-20b": (str(_C / "gpt-oss-20b"), "prefill"),
    "Mixtral-8x7B": (str(_C / "capstone" / "mixtral-8x7b"), "prefill"),
    "Qwen3-30B-A3B": (str(_C / "qwen3-30b-a3b"), "prefill"),
    "DeepSeek-V2-Lite": ("deepseek-v2-lite", "prefill"),
    "DeepSeek-V3": (str(_C / "deepseek-v3"), "prefill"),
    "Mamba-2.8B": (str(_C / "mamba-2.8b"), "prefill"),
    "BART-large": (str(_C / "bart-large"), "encode"),
    "BERT-base": (str(_C / "bert-base"), "forward"),
    "ViT-B/16": (str(_C / "vit-b-16"), "forward"),
    "CLIP ViT-L/14": (str(_C / "clip-vit-large-patch14"), "image_encode"),
    "LLaVA-1.5-7B": ("llava-1.5-7b", "prefill"),
    "SDXL UNet": (str(_C / "sdxl-base-1.0" / "unet"), "denoise_step"),
    "SD3-medium MMDiT": (str(_C / "sd3-medium" / "transformer"), "denoise_step"),
    "FLUX.1-dev": ("flux.1-dev", "denoise_step"),
}
# Prompt caps where tracing the full prompt is slow: transformers' reference Mamba scan (no
# mamba_ssm kernels on this CPU) runs one Python step per token, ~0.1 s each traced, so Mamba is
# traced at 128 tokens; ``flops_per_token`` keeps the rows comparable (the scan is linear in T).
PROMPT_CAP: dict[str, int] = {"Mamba-2.8B": 128}
# A small subset (one per family) for the CI configuration of Chapter 2.
SMOKE_ARCHITECTURES = ("Llama-2-7B", "Gemma-3-1B", "DeepSeek-V2-Lite", "Mamba-2.8B", "BERT-base")


def _config_of(source: str):
    wl = workloads.get_workload(source)
    path = Path(source) if Path(source).exists() else None
    cfg_path = getattr(wl.builder, "bound", {}).get("config_path", path)
    if cfg_path is None:
        return None
    p = Path(cfg_path)
    if (p / "config.json").is_file():
        p = p / "config.json"
    data = json.loads(p.read_text())
    return None if "_class_name" in data else workloads.load_hf_config(p)


def _prompt_tokens(config, seq_len: int) -> int:
    cfg = getattr(config, "text_config", None) or config
    limit = getattr(cfg, "max_position_embeddings", None)
    return min(seq_len, limit) if isinstance(limit, int) and limit > 0 else seq_len


def attention_kind(config) -> str:
    """"MHA", "GQA (n KV heads)", "MQA", "MLA", "none" (state-space) or "-" (no decoder config)."""
    if config is None:
        return "-"
    # a vision-language model's decoder is its text_config; a dual encoder's towers both attend
    for cfg in (config, getattr(config, "text_config", None), getattr(config, "vision_config", None)):
        if cfg is None:
            continue
        try:
            s = attention_summary(cfg)
        except CohwError:
            continue
        return f"GQA ({s['kv_heads']} KV heads)" if s["kind"] == "GQA" else s["kind"]
    return "none"


def _layer_types(report) -> str:
    if report is None:
        return "no cache"
    parts = []
    for kind, t in report.by_type().items():
        parts.append(f"{t['layers']} x {kind}")
    return " + ".join(parts)


def architectures_table(names: Iterable[str] | None = None, seq_len: int = 2048, dtype: str = "bf16",
                        long_context: int = 32768,
                        entries: Mapping[str, tuple[str, str]] | None = None) -> tuple[pd.DataFrame, dict]:
    """One row per architecture (see the module docstring) and each one's CacheReport (or None).

    ``names``: labels of ``entries`` (default :data:`ARCHITECTURES`, all of them). ``long_context``:
    the context at which ``cache_bytes_at_long_context`` is evaluated (one sequence).
    """
    entries = dict(entries or ARCHITECTURES)
    names = list(names) if names is not None else list(entries)
    unknown = [n for n in names if n not in entries]
    if unknown:
        raise CohwError(f"unknown architectures {unknown}; known: {', '.join(entries)} (or pass entries=)")
    rows, reports = [], {}
    for label in names:
        source, phase = entries[label]
        config = _config_of(source)
        is_lm = phase in ("prefill", "decode")
        tokens = min(_prompt_tokens(config, seq_len), PROMPT_CAP.get(label, seq_len)) if is_lm else None
        a = analyze(source, phase, seq_len=tokens, dtype=dtype)
        t = totals(a.table)
        rep = a.cache
        reports[label] = rep
        rows.append({
            "architecture": label, "family": a.family, "attention": attention_kind(config),
            "parameters": a.parameters, "active_parameters": a.active_parameters,
            "phase": phase, "tokens": tokens, "cache_layers": _layer_types(rep),
            "kv_bytes_per_token": None if rep is None else rep.kv_bytes_per_token,
            "framework_bytes_per_token": None if rep is None else rep.framework_bytes_per_token,
            "decompressed_bytes_per_token": None if rep is None else rep.decompressed_bytes_per_token,
            "state_bytes": None if rep is None else rep.state_bytes,
            "cache_bytes_at_long_context": None if rep is None else rep.bytes_at(long_context, 1),
            "flops": t["flops"], "flops_effective": t["flops_effective"],
            "flops_per_token": t["flops"] / tokens if tokens else None,
            "effective_share": t["flops_effective"] / t["flops"] if t["flops"] else float("nan"),
        })
    table = pd.DataFrame(rows)
    table.attrs.update(dtype=dtype, seq_len=seq_len, long_context=long_context)
    return table, reports


def kv_vs_context(reports: Mapping[str, object], contexts: Iterable[int]) -> pd.DataFrame:
    """Cache bytes of one sequence at each context (rows) per architecture (columns), serving
    bytes; architectures without a cache are left out."""
    ctx = [int(c) for c in contexts]
    data = {label: [rep.bytes_at(c, 1) for c in ctx] for label, rep in reports.items() if rep is not None}
    return pd.DataFrame(data, index=pd.Index(ctx, name="context"))


def fig_kv_vs_context(curves: pd.DataFrame, title: str = "Cache per sequence vs context") -> Figure:
    """Log-log lines of :func:`kv_vs_context`: MHA/GQA grow linearly, sliding windows flatten at
    their window, latent attention grows slowly, a state-space model stays flat."""
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    for label in curves.columns:
        y = curves[label].where(curves[label] > 0)
        ax.plot(curves.index, y / 2**20, marker="o", markersize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("cache per sequence (MiB)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig
