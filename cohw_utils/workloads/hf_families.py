"""Builders for the Hugging Face families that are not decoder LMs: text encoders, encoder-decoders
(text and speech), image classifiers, dual encoders (CLIP-style) and vision-language models
(LLaVA-style), each a real ``transformers`` class built with ``from_config`` and split into the
phases that family runs at inference.

:mod:`cohw_utils.workloads.families` picks the family of a ``config.json`` and hands it to one of
the ``_build_*`` functions here (decoder LMs, SSMs and hybrids go to
:mod:`cohw_utils.workloads.llm`). Chapter 2 (the architecture inventory: "Architectures of now")
and Chapter 1 (the proxy set) build these workloads; every chapter that accepts a config path
(and the CLI's ``analyze``) reaches them through ``workloads.build``.

Meta-device notes (why some inputs differ from a plain call). On ``meta`` a tensor has a shape but
no values, so model code that *reads* a value cannot run there. Three such reads are worked
around, each only on ``meta`` and each without changing the arithmetic:

* transformers' validation checks (``torch_compilable_check``, e.g. "image tokens match image
  features") are switched off for the call with transformers' own switch
  ``TRANSFORMERS_DISABLE_TORCH_CHECK=1``;
* encoder-decoder decoders (BART, Whisper, T5...) build an all-ones padding mask and read it to
  decide to skip it; on meta they get the equivalent 4-D boolean causal mask instead (one extra
  SDPA operand of batch x query x key bytes);
* a text encoder is called with the all-ones ``attention_mask`` a tokenizer returns, unless on meta
  the model would read it (BERT's SDPA path checks it is all ones and then drops it): there it is
  left out, which is the path the model takes on a real device.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os

import torch

from cohw_utils.core.errors import CohwError, ConfigError
from cohw_utils.workloads.base import Built, Phase
from cohw_utils.workloads.helpers import _construct, _generator, _no_grad, _randint, _randn
from cohw_utils.workloads.hf_config import _out_cache, load_hf_config
from cohw_utils.workloads.llm import DEFAULT_SEQ_LEN  # 512, the LLM phases' default; capped by each config


# ------------------------------------------------------------------------------- shared pieces
def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _load(config_path, scale: str, family: str):
    if scale == "tiny":
        raise ConfigError(
            f"{config_path}: tiny scale not available for family '{family}'; use scale='full' on meta "
            "(or write a small config.json and build it at scale='full' on cpu)"
        )
    return load_hf_config(config_path)


def _make(config, config_path, device, dtype, seed, auto_name: str, mapping_name: str, **extra):
    """``transformers.<auto_name>.from_config(config)`` on ``device``; one-line ConfigError if the
    auto class has no entry for this config or transformers rejects it."""
    import transformers

    mapping = getattr(transformers, mapping_name)
    try:
        mapping[type(config)]  # imports the modeling module outside the device context
    except KeyError:
        raise ConfigError(
            f"{config_path}: model_type '{config.model_type}' has no {auto_name} class in transformers"
        ) from None
    auto = getattr(transformers, auto_name)
    extra = {k: v for k, v in extra.items() if v is not None}
    try:
        model = _construct(device, seed, lambda: auto.from_config(config, **extra))
    except Exception as e:  # a config the class rejects, e.g. inconsistent sizes
        raise ConfigError(
            f"{config_path}: transformers cannot build {auto_name} for '{config.model_type}': {_first_line(e)}"
        ) from None
    return model.to(dtype).eval()


@contextlib.contextmanager
def _checks_off(device: torch.device):
    """On meta, switch off transformers' value checks (``TRANSFORMERS_DISABLE_TORCH_CHECK``, read at
    each check) for the duration of a call: they compare tensor values meta does not have."""
    if device.type != "meta":
        yield
        return
    old = os.environ.get("TRANSFORMERS_DISABLE_TORCH_CHECK")
    os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"]
        else:
            os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = old


def _is_meta_read(e: BaseException) -> bool:
    return isinstance(e, RuntimeError) and "meta tensor" in str(e)


def _guarded(fn, device: torch.device, what: str):
    """``fn`` under no_grad (and, on meta, with transformers' value checks off); a meta-device value
    read deep inside the model becomes one ConfigError line naming ``what`` and the fix."""

    def run(*args, **kwargs):
        try:
            with torch.no_grad(), _checks_off(device):
                return fn(*args, **kwargs)
        except RuntimeError as e:
            if not _is_meta_read(e):
                raise
            raise ConfigError(
                f"{what} reads tensor values, which the meta device does not have (data-dependent model "
                "code); build a small config on device='cpu', or for an fp16 overflow check use dtype='bf16'"
            ) from None

    functools.update_wrapper(run, fn, updated=())  # a module's name and docstring, not its __dict__
    return run


def _seq_len(seq_len, limit, config_path, what: str, reserve: int = 0) -> int:
    """``seq_len`` or the default (512, or ``limit - reserve`` when smaller); a request beyond the
    config's position limit is refused."""
    cap = None if limit is None else int(limit) - reserve
    if seq_len is None:
        return DEFAULT_SEQ_LEN if cap is None else min(DEFAULT_SEQ_LEN, cap)
    if cap is not None and seq_len > cap:
        raise ConfigError(
            f"{config_path}: seq_len {seq_len} exceeds what {what} allows ({cap}); pass seq_len <= {cap}"
        )
    return seq_len


def _cache_kw(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _vocab(config, decoder: bool = False) -> int:
    """The (decoder's, with ``decoder``) vocabulary size, also for composite configs
    (``EncoderDecoderConfig`` keeps it in its encoder and decoder sub-configs)."""
    v = getattr(config, "vocab_size", None)
    if v is None:
        v = getattr(config.get_text_config(decoder=decoder), "vocab_size", None)
    if v is None and hasattr(config, "decoder" if decoder else "encoder"):
        v = getattr(getattr(config, "decoder" if decoder else "encoder"), "vocab_size", None)
    if not v:
        raise ConfigError(f"config '{config.model_type}' names no vocab_size; add it to the config.json")
    return int(v)


def _causal_mask(batch: int, q: int, k: int, device) -> torch.Tensor:
    """(batch, 1, q, k) boolean mask: query i (the last q of k positions) sees keys <= its position."""
    return torch.ones(q, k, dtype=torch.bool, device=device).tril(k - q)[None, None].expand(batch, 1, q, k)


def _encoder_decoder_phases(model, device, batch, vocab, target_len, encoder_inputs, encode_units,
                            encode_unit, encode_desc, seed):
    """``encode`` (the encoder alone) and ``decode`` (one decoder token per sequence against the
    encoder output and a self-attention cache of ``target_len`` tokens, as ``generate()`` runs it)."""
    encoder = model.get_encoder()
    cache_kw = _cache_kw(model)
    meta = device.type == "meta"

    def decode_inputs():
        _, enc_kw = encoder_inputs()
        gen = _generator(device, seed + 2)
        with torch.no_grad():
            enc = encoder(**enc_kw)
            kw = {"encoder_outputs": enc, "use_cache": True,
                  "decoder_input_ids": _randint(vocab, (batch, target_len), device, gen)}
            if meta:
                kw["decoder_attention_mask"] = _causal_mask(batch, target_len, target_len, device)
            cache = _out_cache(model(**kw))  # self-attention K/V of target_len tokens + cross K/V
        step = {"encoder_outputs": enc, "decoder_input_ids": _randint(vocab, (batch, 1), device, gen),
                cache_kw: cache, "use_cache": True}
        if meta:
            step["decoder_attention_mask"] = _causal_mask(batch, 1, target_len + 1, device)
        return (), step

    return {
        "encode": Phase("encode", _guarded(encoder_inputs, device, "encode set-up"),
                        _guarded(encoder, device, "encode"), encode_units, encode_unit, description=encode_desc),
        "decode": Phase("decode", _guarded(decode_inputs, device, "decode set-up"), _guarded(model, device, "decode"),
                        batch, "token",
                        description=f"one decoder token per sequence against the encoder output and a "
                                    f"self-attention cache of {target_len} tokens, batch {batch}"),
    }


# -------------------------------------------------------------------------------------- encoder
def _build_encoder(wl, scale, device, dtype, batch, seq_len, *, config_path, attn_implementation=None, seed=0):
    """Text encoder (BERT, RoBERTa, DeBERTa...): ``AutoModel.from_config(config)`` (``BertModel``:
    embeddings, the encoder layers and the pooler, no task head); root module = that model.
    Tiny scale is not available (ConfigError); build a small config at full scale on cpu.

    Phase ``forward``: ``input_ids`` (batch, seq_len) with the all-ones ``attention_mask`` a tokenizer
    returns (left out on meta where the model would read it; see the module docstring), under
    no_grad; ``seq_len`` defaults to 512, or ``max_position_embeddings`` when smaller; units:
    batch*seq_len tokens. Options: ``attn_implementation``, ``seed``.
    """
    config = _load(config_path, scale, "encoder")
    seq_len = _seq_len(seq_len, getattr(config, "max_position_embeddings", None), config_path,
                       "max_position_embeddings")
    model = _make(config, config_path, device, dtype, seed, "AutoModel", "MODEL_MAPPING",
                  attn_implementation=attn_implementation)
    vocab = _vocab(config)
    use_mask = _mask_runs(model, device, vocab, min(seq_len, 8))

    def inputs():
        ids = _randint(vocab, (batch, seq_len), device, _generator(device, seed + 1))
        kw = {"input_ids": ids}
        if use_mask:
            kw["attention_mask"] = torch.ones_like(ids)
        return (), kw

    phases = {"forward": Phase("forward", inputs, _guarded(model, device, "forward"), batch * seq_len, "token",
                               description=f"encode {batch} sequence(s) of {seq_len} tokens")}
    return Built(wl, scale, device, dtype, model, config, phases)


def _mask_runs(model, device, vocab, n) -> bool:
    """Whether the encoder runs with an attention_mask on this device: always off meta; on meta, a
    one-sequence probe tells whether the model reads the mask's values (it then takes the no-mask
    path, which is what it does on a real device with an all-ones mask)."""
    if device.type != "meta":
        return True
    ids = torch.zeros(1, n, dtype=torch.long, device=device)
    try:
        with torch.no_grad(), _checks_off(device):
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    except RuntimeError as e:
        if _is_meta_read(e):
            return False
        raise
    return True


# ------------------------------------------------------------------------------------- seq2seq
def _build_seq2seq(wl, scale, device, dtype, batch, seq_len, *, config_path, target_len=None,
                   attn_implementation=None, seed=0):
    """Encoder-decoder text model (BART, T5, mBART, Pegasus, Marian...):
    ``AutoModelForSeq2SeqLM.from_config(config)`` (``BartForConditionalGeneration``...); root module
    = that model. Tiny scale is not available (ConfigError).

    Phases (``seq_len`` defaults to 512, or ``max_position_embeddings`` when smaller):

    * ``encode``: the encoder (``model.get_encoder()``) over ``input_ids`` (batch, seq_len) source
      tokens; units: batch*seq_len tokens.
    * ``decode``: ``make_inputs`` runs the encoder and the decoder over ``target_len`` (default
      seq_len) already generated target tokens, untraced, filling the ``EncoderDecoderCache``
      (self-attention K/V and the cross-attention K/V of the encoder output); ``run`` is one
      decoder step: ``decoder_input_ids`` (batch, 1), ``encoder_outputs`` and the cache, logits
      for the new token; units: batch tokens.

    Options: ``target_len``, ``attn_implementation``, ``seed``.
    """
    config = _load(config_path, scale, "seq2seq")
    limit = getattr(config, "max_position_embeddings", None)
    seq_len = _seq_len(seq_len, limit, config_path, "max_position_embeddings")
    target_len = _seq_len(target_len or seq_len, limit, config_path, "max_position_embeddings (decoder)", reserve=1)
    model = _make(config, config_path, device, dtype, seed, "AutoModelForSeq2SeqLM",
                  "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING", attn_implementation=attn_implementation)
    src_vocab = _vocab(config)

    def encoder_inputs():
        return (), {"input_ids": _randint(src_vocab, (batch, seq_len), device, _generator(device, seed + 1))}

    phases = _encoder_decoder_phases(model, device, batch, _vocab(config, decoder=True), target_len, encoder_inputs,
                                     batch * seq_len, "token", f"encode {batch} source sequence(s) of {seq_len} tokens",
                                     seed)
    return Built(wl, scale, device, dtype, model, config, phases)


def _build_speech_seq2seq(wl, scale, device, dtype, batch, seq_len, *, config_path, attn_implementation=None, seed=0):
    """Speech encoder-decoder (Whisper): ``AutoModelForSpeechSeq2Seq.from_config(config)``
    (``WhisperForConditionalGeneration``); root module = that model. Tiny scale is not available.

    Phases:

    * ``encode``: the audio encoder over ``input_features`` (batch, num_mel_bins,
      2*max_source_positions) log-mel frames, both read from the config (80 x 3000 for
      Whisper: a 30 s window; the encoder's two convolutions, the second of stride 2, leave
      max_source_positions = 1500 positions); units: batch*max_source_positions encoder frames.
    * ``decode``: as for seq2seq: one decoder token per sequence against the encoder output and a
      self-attention cache of ``seq_len`` generated tokens (default 512, or max_target_positions - 1
      when smaller: 447 for Whisper); units: batch tokens.

    Options: ``attn_implementation``, ``seed``.
    """
    config = _load(config_path, scale, "speech-seq2seq")
    mels, src = getattr(config, "num_mel_bins", None), getattr(config, "max_source_positions", None)
    if not mels or not src:
        raise ConfigError(
            f"{config_path}: speech model '{config.model_type}' has no num_mel_bins / max_source_positions; "
            "only log-mel encoder-decoders (Whisper-style) are supported"
        )
    target = getattr(config, "max_target_positions", None)
    seq_len = _seq_len(seq_len, target, config_path, "max_target_positions", reserve=1)
    model = _make(config, config_path, device, dtype, seed, "AutoModelForSpeechSeq2Seq",
                  "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING", attn_implementation=attn_implementation)
    frames = 2 * src

    def encoder_inputs():
        return (), {"input_features": _randn((batch, mels, frames), device, dtype, _generator(device, seed + 1))}

    phases = _encoder_decoder_phases(model, device, batch, _vocab(config, decoder=True), seq_len, encoder_inputs,
                                     batch * src, "encoder frame",
                                     f"encode {batch} window(s) of {mels} x {frames} log-mel frames",
                                     seed)
    return Built(wl, scale, device, dtype, model, config, phases)


# -------------------------------------------------------------------------------------- vision
def _square(size, what) -> int:
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ConfigError(f"{what} is {list(size)}; only square images are supported")
        size = size[0]
    return int(size)


def _build_image_classifier(wl, scale, device, dtype, batch, seq_len, *, config_path, image_size=None, seed=0):
    """Image classifier (ViT, Swin, ConvNeXt, ResNet...): ``AutoModelForImageClassification.from_config``;
    root module = the classifier. Tiny scale is not available (ConfigError).

    Phase ``forward``: ``pixel_values`` (batch, num_channels, H, W), H = W = the config's
    ``image_size`` (224 when it has none, as ResNet) or the ``image_size`` option (written into the
    config, so a ViT gets position embeddings for that resolution); under no_grad; units: batch
    images. Options: ``image_size``, ``seed``.
    """
    config = _load(config_path, scale, "vision")
    size = image_size or _square(getattr(config, "image_size", None) or 224, f"{config_path}: image_size")
    if not isinstance(size, int) or size < 32:
        raise CohwError(f"image_size must be an integer >= 32, got {size!r}")
    if getattr(config, "image_size", None) is not None:
        config.image_size = size
    model = _make(config, config_path, device, dtype, seed, "AutoModelForImageClassification",
                  "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING")
    channels = getattr(config, "num_channels", 3)

    def inputs():
        return (), {"pixel_values": _randn((batch, channels, size, size), device, dtype, _generator(device, seed + 1))}

    phases = {"forward": Phase("forward", inputs, _guarded(model, device, "forward"), batch, "image",
                               description=f"classify {batch} image(s) of {size}x{size}")}
    return Built(wl, scale, device, dtype, model, config, phases)


def _build_dual_encoder(wl, scale, device, dtype, batch, seq_len, *, config_path, seed=0):
    """Dual encoder (CLIP, SigLIP): ``AutoModel.from_config(config)`` (``CLIPModel``: the vision and
    text towers and their projections); root module = that model. Tiny scale is not available.

    Phases:

    * ``image_encode``: ``model.get_image_features(pixel_values)``, (batch, channels, S, S) with S =
      ``vision_config.image_size``: the vision tower and the visual projection; units: batch images.
    * ``text_encode``: ``model.get_text_features(input_ids)``, (batch, seq_len) with seq_len
      defaulting to ``text_config.max_position_embeddings`` (77 for CLIP) or 512 when smaller;
      the text tower and the text projection; units: batch*seq_len tokens.

    Option: ``seed``.
    """
    config = _load(config_path, scale, "dual-encoder")
    vc, tc = getattr(config, "vision_config", None), getattr(config, "text_config", None)
    if vc is None or tc is None:
        raise ConfigError(f"{config_path}: a dual encoder needs vision_config and text_config; this one lacks one")
    size = _square(vc.image_size, f"{config_path}: vision_config.image_size")
    seq_len = _seq_len(seq_len, getattr(tc, "max_position_embeddings", None), config_path,
                       "text_config.max_position_embeddings")
    model = _make(config, config_path, device, dtype, seed, "AutoModel", "MODEL_MAPPING")
    for fn in ("get_image_features", "get_text_features"):
        if not hasattr(model, fn):
            raise ConfigError(
                f"{config_path}: {type(model).__name__} has no {fn}(); it is not a CLIP-style dual encoder")
    channels, vocab = getattr(vc, "num_channels", 3), tc.vocab_size

    def image_inputs():
        return (), {"pixel_values": _randn((batch, channels, size, size), device, dtype, _generator(device, seed + 1))}

    def text_inputs():
        return (), {"input_ids": _randint(vocab, (batch, seq_len), device, _generator(device, seed + 2))}

    phases = {
        "image_encode": Phase("image_encode", image_inputs, _guarded(model.get_image_features, device, "image_encode"),
                              batch, "image", description=f"embed {batch} image(s) of {size}x{size}"),
        "text_encode": Phase("text_encode", text_inputs, _guarded(model.get_text_features, device, "text_encode"),
                             batch * seq_len, "token", description=f"embed {batch} text(s) of {seq_len} tokens"),
    }
    return Built(wl, scale, device, dtype, model, config, phases)


# ----------------------------------------------------------------------------- vision-language
def _image_token_count(features) -> int:
    """Image tokens per image from ``get_image_features`` output (a list of per-image (tokens, dim)
    tensors, as LLaVA returns, or a (batch, tokens, dim) tensor)."""
    f = getattr(features, "pooler_output", features)
    if isinstance(f, (list, tuple)):
        f = f[0]
    if not torch.is_tensor(f):
        raise ConfigError(f"get_image_features returned {type(f).__name__}; cannot count image tokens")
    return int(f.shape[1] if f.dim() == 3 else f.shape[0])


def _build_vision_language(wl, scale, device, dtype, batch, seq_len, *, config_path, prefill_logits="all", seed=0):
    """Vision-language model (LLaVA-style: a vision tower, a projector and a decoder LM):
    ``AutoModelForImageTextToText.from_config(config)`` (``LlavaForConditionalGeneration``); root
    module = that model. Tiny scale is not available. One image per sequence, of the vision
    tower's ``image_size``; models taking patch grids (``image_grid_thw``: Qwen2-VL...) are refused.

    Phases (N = image tokens per image, read from the model: 576 for LLaVA-1.5 at 336 px):

    * ``image_encode``: ``model.get_image_features(pixel_values)`` on (batch, C, S, S): the vision
      tower, feature-layer selection and the multimodal projector; units: batch images.
    * ``prefill``: the model's forward on ``pixel_values`` and ``input_ids`` of N image-token ids
      (``config.image_token_id``) followed by ``seq_len`` text tokens (default 512), so it runs the
      image encode, merges the features into the embeddings and runs the LM over N + seq_len
      positions, filling the KV cache; ``prefill_logits`` "all" (default: logits at every
      position, as ``workloads.llm``) or "last" (``logits_to_keep=1``, as ``generate()``);
      units: batch*(N + seq_len) tokens.
    * ``decode``: ``make_inputs`` runs that prefill (untraced); ``run`` is one text token per
      sequence against the cache of N + seq_len positions; units: batch tokens.

    Options: ``prefill_logits``, ``seed``.
    """
    if prefill_logits not in ("last", "all"):
        raise CohwError(f"prefill_logits must be 'last' or 'all', got {prefill_logits!r}")
    config = _load(config_path, scale, "vision-language")
    vc = getattr(config, "vision_config", None)
    image_token = getattr(config, "image_token_id", None)
    if image_token is None:
        image_token = getattr(config, "image_token_index", None)
    if vc is None or getattr(vc, "image_size", None) is None or image_token is None:
        raise ConfigError(
            f"{config_path}: vision-language model '{config.model_type}' has no vision_config.image_size or "
            "image_token_id; only LLaVA-style models (one image of fixed size) are supported"
        )
    size = _square(vc.image_size, f"{config_path}: vision_config.image_size")
    model = _make(config, config_path, device, dtype, seed, "AutoModelForImageTextToText",
                  "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING")
    params = inspect.signature(model.forward).parameters
    if "image_grid_thw" in params or not hasattr(model, "get_image_features"):
        raise ConfigError(
            f"{config_path}: {type(model).__name__} takes image patch grids (image_grid_thw) rather than "
            "(batch, C, H, W) pixel_values; only LLaVA-style vision-language models are supported"
        )
    seq_len = seq_len or DEFAULT_SEQ_LEN
    channels = getattr(vc, "num_channels", 3)
    vocab = config.get_text_config().vocab_size
    cache_kw = "cache" if "cache" in params else "past_key_values"
    keep = "logits_to_keep" in params
    # Pixtral-style towers (Mistral-3) take each image's size; LLaVA's treats image_sizes as optional
    sized = inspect.signature(model.get_image_features).parameters.get("image_sizes")
    sized = sized is not None and sized.default is inspect.Parameter.empty

    def image_kw(n, gen):
        kw = {"pixel_values": _randn((n, channels, size, size), device, dtype, gen)}
        if sized:
            kw["image_sizes"] = torch.tensor([[size, size]] * n, device=device)
        return kw

    encode = _guarded(model.get_image_features, device, "image_encode")
    try:
        n_img = _image_token_count(encode(**image_kw(1, _generator(device, seed))))
    except (ConfigError, RuntimeError, ValueError, TypeError, IndexError) as e:
        raise ConfigError(
            f"{config_path}: {type(model).__name__}.get_image_features fails on one ({channels}, {size}, {size}) "
            f"image ({_first_line(e)}); only LLaVA-style vision-language models are supported"
        ) from None

    def image_inputs():
        return (), image_kw(batch, _generator(device, seed + 1))

    def prefill_inputs(last=prefill_logits == "last"):
        gen = _generator(device, seed + 1)
        text = _randint(vocab - 1, (batch, seq_len), device, gen)
        text = text + (text >= image_token).long()  # any id but the image token's
        ids = torch.cat([torch.full((batch, n_img), image_token, dtype=torch.long, device=device), text], dim=1)
        kw = {"input_ids": ids, **image_kw(batch, gen), "use_cache": True}
        if last and keep:
            kw["logits_to_keep"] = 1
        return (), kw

    run = _guarded(model, device, "prefill")

    def decode_inputs():
        _, kw = prefill_inputs(last=True)
        cache = _out_cache(run(**kw))
        gen = _generator(device, seed + 2)
        step = _randint(vocab - 1, (batch, 1), device, gen)
        step = step + (step >= image_token).long()
        return (), {"input_ids": step, cache_kw: cache, "use_cache": True}

    total = n_img + seq_len
    phases = {
        "image_encode": Phase("image_encode", image_inputs, encode, batch, "image",
                              description=f"vision tower + projector on {batch} image(s) of {size}x{size} "
                                          f"-> {n_img} tokens each"),
        "prefill": Phase("prefill", prefill_inputs, run, batch * total, "token",
                         description=f"{n_img} image tokens + {seq_len} text tokens x batch {batch}, "
                                     "filling the KV cache"),
        "decode": Phase("decode", decode_inputs, _guarded(model, device, "decode"), batch, "token",
                        description=f"one new token per sequence against a KV cache of {total} tokens, batch {batch}"),
    }
    return Built(wl, scale, device, dtype, model, config, phases)
