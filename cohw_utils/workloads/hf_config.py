"""Hugging Face decoder configs and the KV cache: read a ``config.json`` into its ``transformers``
config class without the Hub (:func:`load_hf_config`), the attention geometry of a decoder config
(:func:`attention_geometry`: layers, heads, KV heads, head_dim, for MHA, GQA and MQA), the KV-cache
bytes one token adds (:func:`kv_cache_bytes_per_token`) and the (key, value) tensors of a
transformers cache (:func:`cache_tensors`).

The decoder-LM workloads (:mod:`cohw_utils.workloads.llm`, Chapters 1-5) build from these
configs; the KV-cache numbers feed Chapter 2's KV-cache view (:mod:`cohw_utils.views.kvcache`),
Chapter 3's enabling study, Chapter 4's memory, paging, MBU and quantization studies, and
``cohw_utils.spine.analyze``. All four public functions are re-exported by
:mod:`cohw_utils.workloads`.
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


def attention_geometry(config) -> tuple[int, int, int, int]:
    """(layers, attention heads, KV heads, head_dim) of a decoder config (object or dict)."""
    layers = _cfg_get(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _cfg_get(config, "num_attention_heads", "n_head", "num_heads")
    hidden = _cfg_get(config, "hidden_size", "n_embd", "d_model")
    if layers is None or heads is None:
        raise ConfigError(
            "config has no layer or attention-head count (num_hidden_layers / num_attention_heads); "
            "pass a decoder LM config"
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


def kv_cache_bytes_per_token(config, dtype_bytes: int = 2) -> int:
    """Bytes of KV cache one token adds: ``2 (K and V) * layers * kv_heads * head_dim * dtype_bytes``.

    ``kv_heads`` is ``num_key_value_heads`` (GQA; 1 for MQA, e.g. ``multi_query=True``), or the
    attention-head count when absent (MHA). ``head_dim`` is ``config.head_dim`` when the config has
    it, else ``hidden_size / num_attention_heads``. ``config`` is a ``PretrainedConfig``, a dict, or
    a path to a config.json. Llama-2 in fp16: 7B 524,288; 13B 819,200; 70B 327,680 (GQA, 8 KV heads).
    """
    if isinstance(config, (str, Path)):
        config = load_hf_config(config)
    layers, _, kv, head_dim = attention_geometry(config)
    return 2 * layers * kv * head_dim * int(dtype_bytes)


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
    raise CohwError("the model returned no KV cache; does its architecture support use_cache=True?")
