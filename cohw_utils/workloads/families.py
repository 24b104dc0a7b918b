"""Any Hugging Face (or diffusers) ``config.json`` as a workload: :func:`model_family` names the
architecture family of a config from transformers' own auto mappings and cache layer types, and
:func:`config_workload` turns a config path into a :class:`~cohw_utils.workloads.base.Workload`
with the phases of that family.

Families and their phases:

=================== ====================================== ======================================
family              examples                               phases
=================== ====================================== ======================================
``causal-lm``       llama, mistral, qwen2, gpt2, mixtral   prefill, decode
``ssm``             mamba, mamba2, falcon_mamba, rwkv      prefill, decode (recurrent state)
``hybrid``          jamba, zamba, bamba, falcon_h1         prefill, decode (KV cache + state)
``seq2seq``         bart, t5, mbart, pegasus, marian       encode, decode
``speech-seq2seq``  whisper                                encode, decode
``encoder``         bert, roberta, deberta                 forward
``vision``          vit, swin, convnext, resnet            forward
``dual-encoder``    clip, siglip                           image_encode, text_encode
``vision-language`` llava                                  image_encode, prefill, decode
=================== ====================================== ======================================

A config with ``_class_name`` (a diffusers config) goes to
``cohw_utils.workloads.diffusers_config.diffusers_workload``. Decoder LMs, SSMs and hybrids are
built by :mod:`cohw_utils.workloads.llm` (``AutoModelForCausalLM``); the other families by
:mod:`cohw_utils.workloads.hf_families`.

:func:`cohw_utils.workloads.registry.get_workload` calls :func:`config_workload` for every config
path, so every chapter that takes a reader's own config (Chapter 1's proxy set, Chapter 2's
architecture inventory, "Architectures of now"; Chapters 3-5's parameters cells) and the CLI's
``analyze`` reach it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from cohw_utils.core.errors import ConfigError
from cohw_utils.workloads.base import Workload, _workload
from cohw_utils.workloads.helpers import _DTYPE_NAMES, _read_json
from cohw_utils.workloads.hf_config import load_hf_config
from cohw_utils.workloads.hf_families import (
    _build_dual_encoder, _build_encoder, _build_image_classifier, _build_seq2seq, _build_speech_seq2seq,
    _build_vision_language)
from cohw_utils.workloads.llm import _build_causal_lm, _hf_path_workload

FAMILIES = ("causal-lm", "ssm", "hybrid", "seq2seq", "speech-seq2seq", "encoder", "vision", "dual-encoder",
            "vision-language")

# family -> (Workload.domain, auto mapping naming its class, builder, phases, default dtype when the
# config names none: the LLM convention fp16 for the decoder families, fp32 for the others)
_FAMILY = {
    "causal-lm": ("llm", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", _build_causal_lm, ("prefill", "decode"), torch.float16),
    "ssm": ("llm", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", _build_causal_lm, ("prefill", "decode"), torch.float16),
    "hybrid": ("llm", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", _build_causal_lm, ("prefill", "decode"), torch.float16),
    "seq2seq": ("seq2seq", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", _build_seq2seq, ("encode", "decode"),
                torch.float32),
    "speech-seq2seq": ("speech", "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", _build_speech_seq2seq,
                       ("encode", "decode"), torch.float32),
    "encoder": ("encoder", "MODEL_MAPPING_NAMES", _build_encoder, ("forward",), torch.float32),
    "vision": ("vision", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", _build_image_classifier, ("forward",),
               torch.float32),
    "dual-encoder": ("multimodal", "MODEL_MAPPING_NAMES", _build_dual_encoder, ("image_encode", "text_encode"),
                     torch.float32),
    "vision-language": ("multimodal", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", _build_vision_language,
                        ("image_encode", "prefill", "decode"), torch.float16),
}


def _in(mapping: str, config) -> bool:
    """Whether transformers' auto mapping ``mapping`` (e.g. ``MODEL_FOR_CAUSAL_LM_MAPPING``) has a
    class for this config (no modeling module is imported)."""
    import transformers

    return type(config) in getattr(transformers, mapping)


def _cache_layers(config) -> tuple[int, int]:
    """(attention layers, recurrent-state layers) of a decoder config, by the cache layer class
    transformers itself gives each layer (``cache_utils.get_layer_types_and_kwargs`` and
    ``DYNAMIC_LAYER_TYPE_MAPPING``): a KV layer (full, sliding, chunked, indexed) counts as
    attention, a linear-attention/SSM/conv state layer as recurrent, a "hybrid" layer (both) as
    both, a shared or attention-free MLP layer as neither. Configs without an attention-head count
    (RWKV, xLSTM keep their own recurrent state) have no attention layer whatever the cache says."""
    from transformers import cache_utils as cu

    try:
        types, _ = cu.get_layer_types_and_kwargs(config)
    except Exception:  # a config transformers' cache cannot lay out: fall back to the head count
        types = ["full_attention"] * int(getattr(config, "num_hidden_layers", 0) or 0)
    attn = state = 0
    for t in types:
        cls = cu.DYNAMIC_LAYER_TYPE_MAPPING.get(t)
        if cls is None:
            continue
        attn += issubclass(cls, cu.CacheLayerMixin)
        state += issubclass(cls, cu.LinearAttentionCacheLayerMixin)
    try:
        heads = getattr(config, "num_attention_heads", None)
    except Exception:  # a per-layer attribute transformers refuses to read globally: it has heads
        heads = 1
    if heads is None:
        return 0, state or len(types)
    return attn, state


def model_family(config) -> str:
    """The architecture family of a Hugging Face config: one of :data:`FAMILIES`, or "diffusers" for
    a diffusers config (``_class_name``). ``config`` is a ``PretrainedConfig``, a dict, or a path to
    a config.json (or its folder).

    Decided by transformers' auto mappings, in this order (a model type can sit in several: BART
    also has a causal-LM class, CLIP an image classifier, BERT a ``BertLMHeadModel``):
    speech-seq2seq (``MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING`` and ``is_encoder_decoder``);
    vision-language (``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING``, a ``vision_config``, not an
    encoder-decoder); seq2seq (``MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING`` and
    ``is_encoder_decoder``); decoder LMs (``MODEL_FOR_CAUSAL_LM_MAPPING``, not a masked LM), split
    by the cache layers transformers gives them (:func:`_cache_layers`) into causal-lm (attention
    only), ssm (recurrent state only) and hybrid (both); dual-encoder
    (``MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING`` with text and vision towers); vision
    (``MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING``); encoder (``MODEL_FOR_MASKED_LM_MAPPING`` or
    ``MODEL_FOR_TEXT_ENCODING_MAPPING``). Anything else raises a one-line :class:`ConfigError`
    naming its model_type and the supported families.
    """
    return _family(config)


def _family(config, where: str = "") -> str:
    """:func:`model_family`; ``where`` (e.g. the file's path and ": ") prefixes the error."""
    if isinstance(config, (str, Path)):
        p = Path(config)
        p = p / "config.json" if p.is_dir() else p
        where = f"{p}: "
        if "_class_name" in _read_json(p):
            return "diffusers"
        config = load_hf_config(p)
    elif isinstance(config, dict):
        if "_class_name" in config:
            return "diffusers"
        from transformers import CONFIG_MAPPING

        mt = config.get("model_type")
        if mt not in CONFIG_MAPPING:
            raise ConfigError(
                f"model_type {mt!r} is not a transformers architecture; pass a config with a known model_type")
        config = CONFIG_MAPPING[mt].from_dict({k: v for k, v in config.items() if not k.startswith("_cohw")})
    enc_dec = bool(getattr(config, "is_encoder_decoder", False))
    towers = getattr(config, "vision_config", None) is not None and getattr(config, "text_config", None) is not None
    if _in("MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING", config) and enc_dec:
        return "speech-seq2seq"
    if _in("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING", config) and getattr(config, "vision_config", None) is not None \
            and not enc_dec:
        return "vision-language"
    if _in("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING", config) and enc_dec:
        return "seq2seq"
    if _in("MODEL_FOR_CAUSAL_LM_MAPPING", config) and not _in("MODEL_FOR_MASKED_LM_MAPPING", config):
        attn, state = _cache_layers(config)
        return "hybrid" if attn and state else "ssm" if state else "causal-lm"
    if _in("MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING", config) and towers:
        return "dual-encoder"
    if _in("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING", config):
        return "vision"
    if _in("MODEL_FOR_MASKED_LM_MAPPING", config) or _in("MODEL_FOR_TEXT_ENCODING_MAPPING", config):
        return "encoder"
    raise ConfigError(
        f"{where}model_type '{config.model_type}' fits no supported family; supported: {', '.join(FAMILIES)} "
        "(e.g. llama, mamba, jamba, t5, whisper, bert, vit, clip, llava) and diffusers configs"
    )


def _default_dtype(config, fallback: torch.dtype) -> torch.dtype:
    """The config's (torch_)dtype when it names a floating type, else ``fallback``."""
    d = getattr(config, "dtype", None)
    if isinstance(d, str):
        d = _DTYPE_NAMES.get(d)
    return d if isinstance(d, torch.dtype) and d.is_floating_point else fallback


def _class_name(config, family: str) -> str:
    from transformers.models.auto import modeling_auto

    names = getattr(modeling_auto, _FAMILY[family][1])
    return str(names.get(config.model_type, "?"))


def config_workload(path) -> Workload:
    """The workload of a config path (a config.json, or the folder holding one), by its family
    (:func:`model_family`): a diffusers config (``_class_name``) goes to
    ``workloads.diffusers_config.diffusers_workload``; a causal LM to ``llm._hf_path_workload``
    (unchanged); an SSM or hybrid to ``llm._build_causal_lm`` with its layer counts in the
    description; the other families to the builders of :mod:`~cohw_utils.workloads.hf_families`.

    The workload's name and source are the path; ``domain`` is "llm" (causal-lm, ssm, hybrid),
    "seq2seq", "speech", "encoder", "vision" or "multimodal" (dual-encoder, vision-language); its
    ``default_dtype`` is the config's dtype, else fp16 for the LLM-based families and fp32 for the
    rest. Raises :class:`ConfigError` (one line) for a config no family fits.
    """
    path = Path(path).expanduser()
    cfg_file = path / "config.json" if path.is_dir() else path
    if "_class_name" in _read_json(cfg_file):
        try:
            from cohw_utils.workloads.diffusers_config import diffusers_workload
        except ImportError:
            raise ConfigError(
                f"{cfg_file}: a diffusers config (_class_name), but this checkout has no "
                "cohw_utils.workloads.diffusers_config to build it; update the package"
            ) from None
        return diffusers_workload(path)
    config = load_hf_config(cfg_file)
    family = _family(config, f"{cfg_file}: ")
    if family == "causal-lm":
        return _hf_path_workload(path)
    domain, _, builder, phases, fallback = _FAMILY[family]
    cls = _class_name(config, family)
    detail = ""
    if family in ("ssm", "hybrid"):
        attn, state = _cache_layers(config)
        detail = f", {state} layers with recurrent state" + (f", {attn} with attention" if attn else "")
    return _workload(
        str(path), domain,
        f"{family} '{config.model_type}' ({cls}) from {cfg_file}{detail}: phases {', '.join(phases)}",
        str(cfg_file), "transformers", phases, _default_dtype(config, fallback), builder, config_path=cfg_file,
    )
