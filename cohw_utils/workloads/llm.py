"""Decoder LMs: Llama-2 7B/13B/70B from their published configs, and any Hugging Face decoder-LM
``config.json`` given as a path (attention, latent attention, sliding windows, and the state-space
and hybrid models whose cache is a recurrent state), built with ``AutoModelForCausalLM.from_config``
(at full scale on ``meta``, or shrunk to a tiny seeded model on cpu), with ``prefill`` and
``decode`` phases. Decode runs as a serving engine runs it: against a pre-allocated static KV cache
that the step writes one token into (``cache="dynamic"`` keeps transformers' growing cache).

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
from cohw_utils.workloads.hf_config import (
    HYBRID_LAYER_TYPES, STATE_LAYER_TYPES, _out_cache, attention_geometry, cache_layer_types, load_hf_config,
    mla_geometry)

DEFAULT_SEQ_LEN = 512
#: The ``cache`` option of the decoder-LM workloads: how the decode phase holds its KV cache.
DECODE_CACHES = ("static", "dynamic")

_TINY_LM = dict(hidden_size=64, head_dim=16, num_attention_heads=4, num_hidden_layers=2,
                intermediate_size=128, vocab_size=512)


# Tiny latent attention and mixture of experts: a 32-wide latent with 8 RoPE dims, heads of 16 + 8
# (no-RoPE + RoPE) for queries and keys and 16 for values; 4 routed experts, 2 per token, 1 shared,
# of width 32, the first layer dense (as DeepSeek's first_k_dense_replace keeps).
_TINY_MLA = dict(kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, q_lora_rank=None)
_TINY_MOE = dict(n_routed_experts=4, num_local_experts=4, num_experts=4, num_experts_per_tok=2,
                 n_shared_experts=1, moe_intermediate_size=32, first_k_dense_replace=1, n_group=1,
                 topk_group=1)


def _shrink_decoder_config(config):
    """Same model_type, a few narrow layers; keeps MHA / GQA / MQA character (4 query heads with
    4, 2 or 1 KV heads), latent attention (a narrow latent, :data:`_TINY_MLA`) and a mixture of
    experts (4 experts, 2 per token, :data:`_TINY_MOE`) where the full model has them."""
    cfg = copy.deepcopy(config)
    if mla_geometry(cfg) is not None:
        for name, v in _TINY_MLA.items():
            setattr(cfg, name, v)
        heads = kv = int(cfg.num_attention_heads)
        if getattr(cfg, "num_key_value_heads", None) is not None:
            kv = int(cfg.num_key_value_heads)
    else:
        _, heads, kv, _ = attention_geometry(cfg)
    for name, v in _TINY_MOE.items():
        if isinstance(getattr(cfg, name, None), int):
            setattr(cfg, name, v)
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
    if mla_geometry(cfg) is not None and getattr(cfg, "head_dim", None) is not None:
        cfg.head_dim = _TINY_MLA["qk_rope_head_dim"]  # DeepSeek's rotary embedding sizes itself by head_dim
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


def _grouped_gemm_dtype(model, device, dtype) -> tuple[torch.dtype, str]:
    """fp16 -> bf16 for a mixture-of-experts model traced on ``meta``: torch's grouped GEMM (the
    experts' kernel in transformers 5) accepts bf16 only there. Both are 2 bytes an element and the
    op table's FLOPs and bytes are the same; the phase description says so."""
    has_experts = any(isinstance(getattr(m, "num_experts", None), int) and m.num_experts > 1
                      and any(p.dim() >= 3 for p in m.parameters(recurse=False)) for m in model.modules())
    if device.type == "meta" and dtype == torch.float16 and has_experts:
        return torch.bfloat16, " (fp16 traced as bf16 on meta: torch's grouped GEMM for the experts takes bf16; same bytes and FLOPs)"
    return dtype, ""


def _build_causal_lm(wl, scale, device, dtype, batch, seq_len, *, config_path,
                     prefill_logits="all", attn_implementation=None, cache="static", seed=0):
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
    * ``decode``: one step of 1 new token per sequence (``input_ids`` (batch, 1), at position
      seq_len) against the cache of a seq_len-token prompt, which ``make_inputs`` fills with an
      untraced prefill. Units: batch tokens. The cache, by the ``cache`` option:

      - ``"static"`` (default): transformers' ``StaticCache`` with ``max_cache_len = seq_len + 1``,
        pre-allocated, so the step writes its one token in place (``index_copy_`` at position
        seq_len) and attention reads all seq_len + 1 positions, as a serving engine's static or
        paged cache does: decode bytes = weights + KV read + one token's KV written. Sliding-window
        layers get ``StaticSlidingWindowLayer`` (``min(W, seq_len + 1)`` positions; once the window
        is full, transformers rolls it, which copies the window each step: the trace counts that).
        The position is passed (``position_ids`` = seq_len) and the cache's position counter is
        kept on the host: on meta it would be a tensor with no value.
      - ``"dynamic"``: the cache the model's own prefill returns (``DynamicCache``), which
        ``torch.cat``s the whole cache onto the new token every step (reads and writes all of it):
        transformers' default, not how serving engines run; kept to show the difference.

      Models whose cache is not (only) a KV cache -- state-space (Mamba, Mamba2) and hybrid
      (Jamba) layers, ``_is_stateful`` models -- decode with their own cache class (whatever
      ``model(..., use_cache=True)`` returns), as does a config transformers' ``StaticCache``
      cannot be built for; the phase description records which cache is used and why. A model
      that accepts a ``StaticCache`` but fails to fill it raises one :class:`ConfigError` line
      pointing to ``cache="dynamic"``.

    Options: ``prefill_logits`` ("last"/"all"), ``attn_implementation`` (e.g. "eager" to see
    explicit matmul/softmax ops instead of SDPA), ``cache`` ("static"/"dynamic"), ``seed``.
    """
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoModelForCausalLM

    if prefill_logits not in ("last", "all"):
        raise CohwError(f"prefill_logits must be 'last' or 'all', got {prefill_logits!r}")
    if cache not in DECODE_CACHES:
        raise CohwError(f"cache must be one of {', '.join(map(repr, DECODE_CACHES))}, got {cache!r}")
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
    dtype, dtype_note = _grouped_gemm_dtype(model, device, dtype)
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

    plan, why = _decode_cache_plan(model, cache, cache_kw)
    pos_kw = "position_ids" if "position_ids" in params else None

    def decode_inputs():
        _, kw = prefill_inputs()
        if "logits_to_keep" in params:  # the set-up prefill needs only the cache
            kw["logits_to_keep"] = 1
        if plan == "static":
            from transformers import StaticCache

            kw[cache_kw] = StaticCache(config=model.config, max_cache_len=seq_len + 1)
        try:
            with torch.no_grad():
                filled = _out_cache(model(**kw))
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:
            if plan != "static":
                raise
            raise ConfigError(f"{config_path}: {type(model).__name__} cannot fill a static cache on {device} "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                              "build it with cache='dynamic'") from None
        if plan == "static":
            _keep_position_on_host(filled, seq_len)
        gen = _generator(device, seed + 2)
        step = {"input_ids": _randint(vocab, (batch, 1), device, gen), cache_kw: filled, "use_cache": True}
        if pos_kw and plan == "static":
            step[pos_kw] = torch.full((batch, 1), seq_len, dtype=torch.long, device=device)
        return (), step

    run = _no_grad(model)
    if plan == "static":
        held = (f"a static KV cache (StaticCache, {seq_len + 1} positions pre-allocated; the step writes one "
                "token in place)")
    else:
        held = f"the model's own cache ({why})"
    phases = {
        "prefill": Phase("prefill", prefill_inputs, run, batch * seq_len, "token",
                         description=f"prompt of {seq_len} tokens x batch {batch}, filling the KV cache{dtype_note}"),
        "decode": Phase("decode", decode_inputs, run, batch, "token",
                        description=f"one new token per sequence at position {seq_len} after a {seq_len}-token "
                                    f"prompt, batch {batch}, against {held}{dtype_note}"),
    }
    return Built(wl, scale, device, dtype, model, config, phases)


def _decode_cache_plan(model, cache: str, cache_kw: str) -> tuple[str, str]:
    """("static", "") when the decode step can run against transformers' ``StaticCache``, else
    ("own", the reason the model's own cache is used)."""
    if cache == "dynamic":
        return "own", "cache='dynamic': transformers' DynamicCache, which concatenates the whole cache each step"
    kinds = {t for t, _ in cache_layer_types(model.config)}
    recurrent = sorted(kinds & set(STATE_LAYER_TYPES + HYBRID_LAYER_TYPES))
    if recurrent or getattr(model, "_is_stateful", False):
        what = f"{', '.join(recurrent)} layers" if recurrent else "a stateful model"
        return "own", f"{what}: a recurrent state, not only a KV cache, kept in the model's own cache class"
    if cache_kw not in inspect.signature(model.forward).parameters:
        return "own", f"{type(model).__name__}.forward takes no cache object, so no static cache can be passed"
    from transformers import StaticCache

    try:
        StaticCache(config=model.config, max_cache_len=2)
    except Exception as e:  # the reason goes into the phase description
        return "own", f"transformers' StaticCache cannot be built for this config ({type(e).__name__}: {e})"
    return "static", ""


def _keep_position_on_host(cache, seq_len: int) -> None:
    """Keep each static layer's position counter on the host with its true value (seq_len).

    ``StaticLayer`` moves its counter to the cache's device; on ``meta`` that tensor has no value,
    so the model could not know the decode position (OPT's positions fail outright). A serving
    engine keeps positions on the host too. Written by hand: transformers has no option for it.
    """
    from transformers.cache_utils import StaticLayer

    for layer in getattr(cache, "layers", []):
        if isinstance(layer, StaticLayer) and getattr(layer, "cumulative_length", None) is not None:
            if layer.cumulative_length.device.type == "meta":
                layer.cumulative_length = torch.tensor(seq_len, dtype=torch.long)


def _describe_attention(config) -> str:
    """One phrase for the workload description: the attention (or state) geometry."""
    kinds = cache_layer_types(config)
    n = len(kinds)
    attn = [t for t, _ in kinds if t not in STATE_LAYER_TYPES + ("dummy",)]
    windows = sorted({w for t, w in kinds if w})
    mla = mla_geometry(config)
    if not attn:
        return f"{n} layers of recurrent state (state-space model, no attention)"
    if mla is not None:
        geo = (f"{mla['heads']} heads of multi-head latent attention (latent {mla['kv_lora_rank']} + rope "
               f"{mla['qk_rope_head_dim']})")
    else:
        _, heads, kv, hd = attention_geometry(config)
        geo = f"{heads} heads, {kv} KV heads of dim {hd}"
    parts = [f"{n} layers" if len(attn) == n else f"{n} layers, {len(attn)} with attention", geo]
    if windows:
        parts.append(f"sliding window {', '.join(map(str, windows))} on "
                     f"{sum(1 for _, w in kinds if w)} layers")
    return ", ".join(parts)


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
    return _workload(
        str(path), "llm",
        f"decoder LM '{config.model_type}' from {cfg_file} ({_describe_attention(config)})",
        str(cfg_file), "transformers", ("prefill", "decode"), default,
        _build_causal_lm, config_path=cfg_file,
    )
