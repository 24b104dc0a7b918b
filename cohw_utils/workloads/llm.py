"""Decoder LMs: Llama-2 7B/13B/70B from their published configs, and any Hugging Face decoder-LM
``config.json`` given as a path, built with ``AutoModelForCausalLM.from_config`` (at full scale on
``meta``, or shrunk to a tiny seeded model on cpu), with ``prefill`` and ``decode`` phases.

The Llama-2 workloads are the LLM proxies of every chapter (1-5): the proxy set (Chapter 1), the
KV cache and architecture inventory (Chapter 2), software enabling (Chapter 3), roofline, latency,
quantization and energy (Chapter 4) and the co-design loop (Chapter 5).
"""
from __future__ import annotations

import copy
import inspect
from pathlib import Path

import torch

from cohw_utils.core.errors import CohwError, ConfigError
from cohw_utils.workloads.base import Built, Phase, Workload, _workload
from cohw_utils.workloads.helpers import _DTYPE_NAMES, _construct, _generator, _no_grad, _randint
from cohw_utils.workloads.hf_config import _out_cache, attention_geometry, load_hf_config

DEFAULT_SEQ_LEN = 512

_TINY_LM = dict(hidden_size=64, head_dim=16, num_attention_heads=4, num_hidden_layers=2,
                intermediate_size=128, vocab_size=512)


def _shrink_decoder_config(config):
    """Same model_type, a few narrow layers; keeps MHA / GQA / MQA character (4 query heads with
    4, 2 or 1 KV heads)."""
    cfg = copy.deepcopy(config)
    _, heads, kv, _ = attention_geometry(cfg)
    t = _TINY_LM
    tiny_kv = t["num_attention_heads"] if kv == heads else (1 if kv == 1 else 2)
    cfg.hidden_size = t["hidden_size"]
    cfg.num_attention_heads = t["num_attention_heads"]
    cfg.num_hidden_layers = t["num_hidden_layers"]
    cfg.vocab_size = t["vocab_size"]
    if getattr(cfg, "num_key_value_heads", None) is not None:
        cfg.num_key_value_heads = tiny_kv
    elif getattr(cfg, "num_kv_heads", None) is not None:
        cfg.num_kv_heads = tiny_kv
    if getattr(cfg, "head_dim", None) is not None:
        try:
            cfg.head_dim = t["head_dim"]
        except AttributeError:  # a derived property (e.g. falcon): it follows hidden_size / heads
            pass
    for name in ("intermediate_size", "ffn_dim", "n_inner"):
        if getattr(cfg, name, None) is not None:
            setattr(cfg, name, t["intermediate_size"])
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[: t["num_hidden_layers"]]
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v >= t["vocab_size"]:
            setattr(cfg, name, None)
    return cfg


def _build_causal_lm(wl, scale, device, dtype, batch, seq_len, *, config_path,
                     prefill_logits="all", attn_implementation=None, seed=0):
    """Decoder-only LM: ``AutoModelForCausalLM.from_config(config)`` (``LlamaForCausalLM`` for the
    Llama-2 configs), root module = the CausalLM itself.

    Full scale: the published config; tiny: 2 layers, hidden 64, 4 heads of dim 16 (with 4, 2 or 1
    KV heads as the full model is MHA, GQA or MQA), vocab 512, seeded weights.

    Phases (``seq_len`` defaults to 512):

    * ``prefill``: ``input_ids`` of shape (batch, seq_len), ``use_cache=True``, under no_grad.
      ``prefill_logits="all"`` (default) computes logits for every position, the convention of
      the analytic count 2 x params x tokens (and of training); ``"last"`` computes them for the
      last position only, as ``generate()`` and serving engines do (``logits_to_keep=1``),
      which saves 2 x vocab x hidden x (seq_len - 1) FLOPs per sequence.
      Units: batch*seq_len tokens.
    * ``decode``: ``make_inputs`` runs that prefill (untraced) to fill a ``DynamicCache`` of
      seq_len positions; ``run`` is one step of 1 new token per sequence: ``input_ids`` (batch, 1)
      plus the cache, which it extends to seq_len+1. Units: batch tokens.

    Options: ``prefill_logits`` ("last"/"all"), ``attn_implementation`` (e.g. "eager" to see
    explicit matmul/softmax ops instead of SDPA), ``seed``.
    """
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoModelForCausalLM

    if prefill_logits not in ("last", "all"):
        raise CohwError(f"prefill_logits must be 'last' or 'all', got {prefill_logits!r}")
    config = load_hf_config(config_path)
    if scale == "tiny":
        try:
            config = _shrink_decoder_config(config)
        except Exception as e:
            raise ConfigError(f"{config_path}: cannot shrink this config to tiny scale ({e}); use scale='full' on meta") from None
    seq_len = seq_len or DEFAULT_SEQ_LEN
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # import the modeling module outside the device context
    except KeyError:
        raise ConfigError(f"{config_path}: model_type '{config.model_type}' has no causal-LM class in transformers") from None
    try:
        model = _construct(device, seed, lambda: AutoModelForCausalLM.from_config(
            config, trust_remote_code=False, **extra))
    except ValueError as e:
        raise ConfigError(f"{config_path}: transformers cannot build a causal LM from it: {e}") from None
    model = model.to(dtype).eval()

    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    keep_last = prefill_logits == "last" and "logits_to_keep" in params
    vocab = model.config.vocab_size

    def prefill_inputs():
        gen = _generator(device, seed + 1)
        kw = {"input_ids": _randint(vocab, (batch, seq_len), device, gen), "use_cache": True}
        if keep_last:
            kw["logits_to_keep"] = 1
        return (), kw

    def decode_inputs():
        _, kw = prefill_inputs()
        if "logits_to_keep" in params:  # the set-up prefill needs only the cache
            kw["logits_to_keep"] = 1
        with torch.no_grad():
            cache = _out_cache(model(**kw))
        gen = _generator(device, seed + 2)
        step = {"input_ids": _randint(vocab, (batch, 1), device, gen), cache_kw: cache, "use_cache": True}
        return (), step

    run = _no_grad(model)
    phases = {
        "prefill": Phase("prefill", prefill_inputs, run, batch * seq_len, "token",
                         description=f"prompt of {seq_len} tokens x batch {batch}, filling the KV cache"),
        "decode": Phase("decode", decode_inputs, run, batch, "token",
                        description=f"one new token per sequence against a KV cache of {seq_len} tokens, batch {batch}"),
    }
    return Built(wl, scale, device, dtype, model, config, phases)


def _hf_path_workload(path: Path) -> Workload:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    cfg_file = path / "config.json" if path.is_dir() else path
    config = load_hf_config(cfg_file)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ConfigError(
            f"{cfg_file}: model_type '{config.model_type}' has no causal-LM class in transformers; "
            "a config path must describe a decoder LM (llama, mistral, qwen2, gpt2, ...)"
        )
    cfg_dtype = getattr(config, "dtype", None)  # the config's (torch_)dtype; fp16 when it names none
    if isinstance(cfg_dtype, str):
        cfg_dtype = _DTYPE_NAMES.get(cfg_dtype)
    default = cfg_dtype if isinstance(cfg_dtype, torch.dtype) and cfg_dtype.is_floating_point else torch.float16
    layers, heads, kv, hd = attention_geometry(config)
    return _workload(
        str(path), "llm",
        f"decoder LM '{config.model_type}' from {cfg_file} ({layers} layers, {heads} heads, {kv} KV heads of dim {hd})",
        str(cfg_file), "transformers", ("prefill", "decode"), default,
        _build_causal_lm, config_path=cfg_file,
    )
