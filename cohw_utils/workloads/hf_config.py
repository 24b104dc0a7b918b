"""Hugging Face decoder configs and the KV cache: read a ``config.json`` into its ``transformers``
config class without the Hub (:func:`load_hf_config`), the attention geometry of a decoder config
(:func:`attention_geometry`: layers, heads, KV heads, head_dim, for MHA, GQA and MQA), the cache
kind of every layer as transformers builds it (:func:`cache_layer_types`: full attention, sliding
window, recurrent state), the latent geometry of multi-head latent attention
(:func:`mla_geometry`), the KV-cache bytes one token adds (:func:`kv_cache_bytes_per_token`, the
closed form; multi-head latent attention gets its compressed latent) and the (key, value) tensors
of a transformers cache (:func:`cache_tensors`).

The closed forms here are cross-checks: the cache a model really holds is measured from its own
cache object by :func:`cohw_utils.workloads.caches.measure_cache`. A config the closed form does
not fit (a state-space model has no attention; MLA has no per-head K/V width) raises a
:class:`ConfigError` that says so and points there, never a wrong number.

The decoder-LM workloads (:mod:`cohw_utils.workloads.llm`, Chapters 1-5) build from these
configs; the KV-cache numbers feed Chapter 2's KV-cache view (:mod:`cohw_utils.views.kvcache`),
Chapter 3's enabling study, Chapter 4's memory, paging, MBU and quantization studies, and
``cohw_utils.spine.analyze``. The public functions are re-exported by :mod:`cohw_utils.workloads`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from cohw_utils.core.errors import CohwError, ConfigError
from cohw_utils.workloads.helpers import _public, _read_json


def load_hf_config(path) -> "transformers.PretrainedConfig":  # noqa: F821
    """Read a Hugging Face ``config.json`` (a file, or a folder holding one) into its
    ``transformers`` config class, without touching the Hub.

    Raises :class:`ConfigError` naming the file and the fix for: a missing file, malformed JSON,
    a missing ``model_type`` key, or a ``model_type`` this transformers version does not know.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    data = _public(_read_json(p))
    model_type = data.get("model_type")
    if not model_type:
        raise ConfigError(
            f"{p}: no 'model_type' key; add the Hugging Face architecture name, "
            'e.g. "model_type": "llama" (transformers needs it to pick the config class)'
        )
    import transformers
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ConfigError(
            f"{p}: unknown model_type '{model_type}' (transformers {transformers.__version__} has no such "
            "architecture); fix the spelling (e.g. llama, mistral, qwen2, gpt2) or use a newer transformers"
        )
    if "torch_dtype" in data and "dtype" not in data:  # transformers 5's name for it (saves a warning)
        data["dtype"] = data.pop("torch_dtype")
    try:
        return CONFIG_MAPPING[model_type].from_dict(data)
    except Exception as e:  # a config class rejecting its values
        raise ConfigError(f"{p}: transformers could not build a '{model_type}' config from it: {e}") from None


def _cfg_get(config, *names, default=None):
    for n in names:
        v = config.get(n) if isinstance(config, dict) else getattr(config, n, None)
        if v is not None:
            return v
    return default


#: Cache layer kinds (transformers' ``layer_types`` names) that hold keys and values per token.
KV_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention", "indexed_attention")
#: ... and those that hold a recurrent state of constant size (SSM / linear attention / conv).
STATE_LAYER_TYPES = ("linear_attention", "conv")
HYBRID_LAYER_TYPES = ("hybrid", "hybrid_sliding")  # a layer holding both


def _model_type(config) -> str:
    mt = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return mt or "?"


def cache_layer_types(config) -> list[tuple[str, int | None]]:
    """Per decoder layer, the kind of cache transformers gives it and its window:
    ``("full_attention", None)``, ``("sliding_attention", W)`` / ``("chunked_attention", W)`` (a
    window of W tokens), ``("linear_attention", None)`` / ``("conv", None)`` (a recurrent state of
    constant size: Mamba, Jamba's SSM layers), ``("hybrid", None)`` (both), ``("dummy", None)`` (no
    cache of its own: it reuses another layer's KV, or has no attention).

    Read with transformers' own ``cache_utils.get_layer_types_and_kwargs``, the function its
    ``DynamicCache`` / ``StaticCache`` build their layers from, on the config's decoder text config
    (so a Mistral config with ``sliding_window`` on every layer reads as sliding, as its cache
    caps it). A plain dict (no config class) reads as full attention on every layer.
    """
    if isinstance(config, (str, Path)):
        config = load_hf_config(config)
    if isinstance(config, dict):
        layers = _cfg_get(config, "num_hidden_layers", "n_layer", "num_layers")
        return [("full_attention", None)] * int(layers or 0)
    from transformers.cache_utils import get_layer_types_and_kwargs

    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    try:
        types, kwargs = get_layer_types_and_kwargs(text)
    except Exception:  # a config transformers' helper cannot read: every layer full attention
        layers = _cfg_get(text, "num_hidden_layers", "n_layer", "num_layers", default=0)
        return [("full_attention", None)] * int(layers)
    return [(str(t), kw.get("sliding_window")) for t, kw in zip(types, kwargs)]


def mla_geometry(config) -> dict | None:
    """The latent geometry of a multi-head latent attention config (DeepSeek-V2/V3 and kin: it has
    ``kv_lora_rank`` and ``qk_rope_head_dim``) as a dict (``kv_lora_rank``, ``qk_rope_head_dim``,
    ``qk_nope_head_dim``, ``v_head_dim``, ``heads``), else None."""
    rank = _cfg_get(config, "kv_lora_rank")
    rope = _cfg_get(config, "qk_rope_head_dim")
    if rank is None or rope is None:
        return None
    return {"kv_lora_rank": int(rank), "qk_rope_head_dim": int(rope),
            "qk_nope_head_dim": int(_cfg_get(config, "qk_nope_head_dim", default=0)),
            "v_head_dim": int(_cfg_get(config, "v_head_dim", default=0)),
            "heads": int(_cfg_get(config, "num_attention_heads", default=0))}


def _no_attention_error(config) -> ConfigError:
    return ConfigError(
        f"model_type '{_model_type(config)}' has no attention layers (a state-space model): its cache is a "
        "recurrent state of constant size, not KV bytes per token; measure it with "
        "cohw_utils.workloads.caches.measure_cache(build(config))"
    )


def attention_geometry(config) -> tuple[int, int, int, int]:
    """(layers, attention heads, KV heads, head_dim) of a decoder config (object or dict).

    ``layers`` counts every decoder layer (a hybrid such as Jamba has attention in only some of
    them: :func:`cache_layer_types` says which). Raises :class:`ConfigError`, naming the reason and
    pointing to ``measure_cache``, for a config with no attention (Mamba: its layer types are all
    recurrent state) and for multi-head latent attention (``kv_lora_rank``: K and V are not cached
    per head, so no (kv_heads, head_dim) describes the cache).
    """
    layers = _cfg_get(config, "num_hidden_layers", "n_layer", "num_layers")
    if not isinstance(config, dict) and layers is not None:
        kinds = {t for t, _ in cache_layer_types(config)}
        if kinds and not kinds & set(KV_LAYER_TYPES + HYBRID_LAYER_TYPES):
            raise _no_attention_error(config)
    mla = mla_geometry(config)
    if mla is not None:
        raise ConfigError(
            f"model_type '{_model_type(config)}' uses multi-head latent attention (kv_lora_rank={mla['kv_lora_rank']}, "
            f"qk_rope_head_dim={mla['qk_rope_head_dim']}): its cache is a compressed latent, not per-head K/V; "
            "use kv_cache_bytes_per_token (the latent) or cohw_utils.workloads.caches.measure_cache"
        )
    heads = _cfg_get(config, "num_attention_heads", "n_head", "num_heads")
    hidden = _cfg_get(config, "hidden_size", "n_embd", "d_model")
    if layers is None:
        raise ConfigError(
            "config has no layer count (num_hidden_layers / n_layer); pass a decoder LM config"
        )
    if heads is None:
        raise ConfigError(
            f"config (model_type '{_model_type(config)}') has {layers} layers but no attention-head count "
            "(num_attention_heads): if it is a state-space model it has no KV cache, measure its state with "
            "cohw_utils.workloads.caches.measure_cache; else add num_attention_heads"
        )
    kv = _cfg_get(config, "num_key_value_heads")
    if kv is None:
        if _cfg_get(config, "multi_query", default=False) and not _cfg_get(config, "new_decoder_architecture", default=False):
            kv = 1  # MQA: gpt_bigcode, falcon-7b
        else:
            kv = _cfg_get(config, "num_kv_heads", "n_head_kv", default=heads)
    head_dim = _cfg_get(config, "head_dim")
    if head_dim is None:
        if hidden is None:
            raise ConfigError("config has neither head_dim nor hidden_size; cannot size the KV cache")
        head_dim = hidden // heads
    return int(layers), int(heads), int(kv), int(head_dim)


def kv_cache_bytes_per_token(config, dtype_bytes: float = 2) -> int:
    """Bytes of KV cache one token adds (one sequence), the closed form, summed over the layers
    that cache keys and values (:func:`cache_layer_types`; a hybrid's recurrent layers add none).

    * MHA / GQA / MQA: ``2 (K and V) * attention layers * kv_heads * head_dim * dtype_bytes``.
      ``kv_heads`` is ``num_key_value_heads`` (GQA; 1 for MQA, e.g. ``multi_query=True``), or the
      attention-head count when absent (MHA). ``head_dim`` is ``config.head_dim`` when the config
      has it, else ``hidden_size / num_attention_heads``. Llama-2 in fp16: 7B 524,288; 13B 819,200;
      70B 327,680 (GQA, 8 KV heads).
    * Multi-head latent attention (``kv_lora_rank``; DeepSeek-V2/V3): the compressed latent,
      ``(kv_lora_rank + qk_rope_head_dim) * attention layers * dtype_bytes``, what serving engines
      (vLLM, SGLang, FlashMLA) store and what transformers 5 caches too; DeepSeek-V2-Lite in bf16:
      (512 + 64) x 27 x 2 = 31,104.
    * Sliding-window layers count here at their per-token rate, which holds only until the window
      fills; the bytes at a context (capped at the window) are
      :meth:`~cohw_utils.workloads.caches.CacheReport.bytes_at` of ``measure_cache``, or
      :func:`cohw_utils.views.kvcache.kv_cache_bytes`.
    * A model with no attention layer (Mamba) raises :class:`ConfigError`: its state is constant in
      length, see ``measure_cache``.

    ``config`` is a ``PretrainedConfig``, a dict, or a path to a config.json.
    """
    if isinstance(config, (str, Path)):
        config = load_hf_config(config)
    kinds = cache_layer_types(config)
    n_attn = sum(t in KV_LAYER_TYPES or t in HYBRID_LAYER_TYPES for t, _ in kinds)
    if kinds and n_attn == 0:
        raise _no_attention_error(config)
    mla = mla_geometry(config)
    if mla is not None:
        out = (mla["kv_lora_rank"] + mla["qk_rope_head_dim"]) * n_attn * dtype_bytes
    else:
        layers, _, kv, head_dim = attention_geometry(config)
        out = 2 * (n_attn or layers) * kv * head_dim * dtype_bytes
    return int(out) if float(out).is_integer() else out


def cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (key, value) tensors of a transformers KV cache, one pair per layer, each shaped
    ``(batch, kv_heads, seq, head_dim)``."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(k, v) for k, v in cache]


def _out_cache(out):
    for name in ("cache", "past_key_values"):
        v = getattr(out, name, None)
        if v is not None:
            return v
    raise CohwError("the model returned no cache (KV or recurrent state); does its architecture support use_cache=True?")
