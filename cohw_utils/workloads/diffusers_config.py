"""Any diffusers model ``config.json`` (one with a ``_class_name`` key) as a workload: the
denoisers ``UNet2DConditionModel`` (SD 1.x/2.x, SDXL), ``SD3Transformer2DModel`` (MMDiT),
``FluxTransformer2DModel``, ``PixArtTransformer2DModel`` and ``DiTTransformer2DModel`` with a
``denoise_step`` phase, and ``AutoencoderKL`` with ``vae_decode`` and ``vae_encode`` phases.

:func:`diffusers_workload` turns a config path into a :class:`~cohw_utils.workloads.base.Workload`;
the model is the library class built with ``from_config`` (full scale on ``meta``), and each
phase builds the inputs that class's ``forward`` needs, sized from the config and from the
defaults of the diffusers pipeline that drives it (read from the installed pipeline's source).

Chapter 1 (the proxy set's DiT/MMDiT image model) and Chapter 2 (the architectures table: SDXL's
UNet, an SD3 or Flux transformer, their VAE) build these.
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
from pathlib import Path

import torch

from cohw_utils.core.errors import ConfigError
from cohw_utils.workloads.base import Built, Phase, Workload, _workload
from cohw_utils.workloads.helpers import _construct, _generator, _no_grad, _public, _randint, _randn, _read_json

DENOISERS = ("UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel",
             "PixArtTransformer2DModel", "DiTTransformer2DModel")
AUTOENCODERS = ("AutoencoderKL",)
SUPPORTED_CLASSES = DENOISERS + AUTOENCODERS

# The latent grid of every denoiser above is image/8: their pipelines compute vae_scale_factor =
# 2 ** (len(vae.config.block_out_channels) - 1), and the 4-level AutoencoderKL they ship with
# (e.g. sd-1.5/vae/config.json in this repo, block_out_channels 128..512) gives 2**3. A
# denoiser config does not name its VAE, so the denoiser phases use this factor.
VAE_SCALE_FACTOR = 8

# CLIP's context (77 tokens): max_position_embeddings of SD 1.5's text encoder config
# (data/configs/sd-1.5/text_encoder/config.json), the same CLIP tokenizer length SDXL uses.
_CLIP_CONFIG = ("sd-1.5", "text_encoder", "config.json")

# Where each denoiser's default text length and image size come from: the diffusers pipeline that
# drives it (its __call__'s max_sequence_length, and its default_sample_size where the model
# config has no sample_size). Read from the installed source by _pipeline_default.
_PIPELINES = {
    "SD3Transformer2DModel": ("diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3",
                              "StableDiffusion3Pipeline"),
    "FluxTransformer2DModel": ("diffusers.pipelines.flux.pipeline_flux", "FluxPipeline"),
    "PixArtTransformer2DModel": ("diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha", "PixArtAlphaPipeline"),
}

# The dtype each pipeline's usage example in diffusers' docstrings loads the model in
# (FluxPipeline: torch.bfloat16; StableDiffusionXLPipeline, StableDiffusion3Pipeline,
# PixArtAlphaPipeline, DiTPipeline: torch.float16). The VAE follows its pipeline (fp16); SDXL's
# pipeline upcasts a VAE with force_upcast=True to fp32 for decoding: pass dtype="float32" for that.
_DEFAULT_DTYPE = {"FluxTransformer2DModel": torch.bfloat16}

_TINY = {
    "UNet2DConditionModel": dict(
        block_out_channels=[32, 64], layers_per_block=1, cross_attention_dim=32, attention_head_dim=2,
        num_attention_heads=None, transformer_layers_per_block=1, reverse_transformer_layers_per_block=None,
        norm_num_groups=8, sample_size=8, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], only_cross_attention=False),
    "SD3Transformer2DModel": dict(
        num_layers=2, num_attention_heads=2, attention_head_dim=16, joint_attention_dim=32,
        caption_projection_dim=32, pooled_projection_dim=32, sample_size=8, pos_embed_max_size=16),
    "FluxTransformer2DModel": dict(
        num_layers=1, num_single_layers=2, num_attention_heads=2, attention_head_dim=16,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6]),
    "PixArtTransformer2DModel": dict(  # 3 heads: its size conditions split the width in thirds
        num_layers=2, num_attention_heads=3, attention_head_dim=16, cross_attention_dim=48,
        caption_channels=32, sample_size=8),
    "DiTTransformer2DModel": dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, sample_size=8),
    "AutoencoderKL": dict(layers_per_block=1, norm_num_groups=4, sample_size=64),
}
_TINY_TEXT_TOKENS = 8
_SDXL_TIME_IDS = 6  # original_size + crops_coords_top_left + target_size (StableDiffusionXLPipeline._get_add_time_ids)
_FLUX_TINY_SAMPLE = 8  # tiny Flux latent (Flux configs have no sample_size)


# ------------------------------------------------------------------------------ config reading
def _config_file(path) -> Path:
    p = Path(path).expanduser()
    return p / "config.json" if p.is_dir() else p


def _read_diffusers_config(path) -> tuple[Path, dict, str]:
    """(file, config dict without this repo's ``_cohw_*`` keys, class name); ConfigError on a bad one.

    Equivalent to ``cls.load_config(folder)`` for a local file (which json-loads it), with this
    package's one-line errors for a missing file or bad JSON.
    """
    file = _config_file(path)
    data = _public(_read_json(file))
    name = data.get("_class_name")
    if not name:
        raise ConfigError(f"{file}: no '_class_name' key, so it is not a diffusers model config; "
                          "pass a diffusers component's config.json (unet/, transformer/ or vae/)")
    if str(name).endswith("Pipeline") or file.name == "model_index.json":
        raise ConfigError(f"{file}: '{name}' is a whole pipeline (model_index.json); pass one component's "
                          "config.json instead, e.g. unet/config.json, transformer/config.json or vae/config.json")
    if name not in SUPPORTED_CLASSES:
        raise ConfigError(f"{file}: diffusers class '{name}' is not supported; supported: {', '.join(SUPPORTED_CLASSES)}")
    return file, data, name


@functools.lru_cache(maxsize=None)
def _pipeline_default(module: str, cls: str, name: str) -> int:
    """A pipeline default read from the installed diffusers source without importing the pipeline
    (which would import transformers' text encoders): the default of ``cls.__call__``'s parameter
    ``name``, or the constant assigned to ``self.<name>`` in ``cls.__init__``."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise ConfigError(f"cannot find {module} in the installed diffusers; pass the value explicitly")
    tree = ast.parse(Path(spec.origin).read_text())
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ClassDef) and node.name == cls):
            continue
        for fn in node.body:
            if isinstance(fn, ast.FunctionDef) and fn.name == "__call__":
                args = fn.args.args[len(fn.args.args) - len(fn.args.defaults):] + fn.args.kwonlyargs
                defaults = fn.args.defaults + fn.args.kw_defaults
                for a, d in zip(args, defaults):
                    if a.arg == name and isinstance(d, ast.Constant):
                        return int(d.value)
            if isinstance(fn, ast.FunctionDef) and fn.name == "__init__":
                for st in ast.walk(fn):
                    if (isinstance(st, ast.Assign) and isinstance(st.value, ast.Constant)
                            and any(isinstance(t, ast.Attribute) and t.attr == name for t in st.targets)):
                        return int(st.value.value)
    raise ConfigError(f"{cls} in the installed diffusers has no default for '{name}'; pass it explicitly")


def _clip_tokens() -> int:
    from cohw_utils.workloads.helpers import _repo_json

    return int(_repo_json(*_CLIP_CONFIG)["max_position_embeddings"])


def default_text_tokens(class_name: str) -> int | None:
    """The text sequence length a denoiser's pipeline feeds it by default (``None``: no text).

    UNet2DConditionModel: 77, CLIP's context (SD 1.5's text encoder config). SD3: 77 CLIP tokens
    + ``StableDiffusion3Pipeline``'s ``max_sequence_length`` (256) T5 tokens = 333, concatenated
    as the pipeline does. Flux: ``FluxPipeline``'s ``max_sequence_length`` (512) T5 tokens. PixArt: ``PixArtAlphaPipeline``'s 120 T5 tokens
    (PixArt-Sigma's pipeline uses 300: pass ``text_tokens=300``). DiT: class-conditional, ``None``.
    """
    if class_name == "UNet2DConditionModel":
        return _clip_tokens()
    if class_name == "DiTTransformer2DModel" or class_name not in _PIPELINES:
        return None
    t5 = _pipeline_default(*_PIPELINES[class_name], "max_sequence_length")
    return _clip_tokens() + t5 if class_name == "SD3Transformer2DModel" else t5


# ------------------------------------------------------------------------------ tiny configs
def _shrink(name: str, cfg: dict, file: Path) -> dict:
    tiny = dict(cfg)
    tiny.update(_TINY[name])
    if name == "UNet2DConditionModel":
        if cfg.get("class_embed_type") is not None or cfg.get("addition_embed_type") not in (None, "text_time") \
                or cfg.get("encoder_hid_dim_type") not in (None, "text_proj"):
            raise ConfigError(f"{file}: tiny scale is written for text-conditioned UNets (SD, SDXL); this one's "
                              "class/addition embeddings are not; use scale='full' on device='meta'")
        if cfg.get("addition_embed_type") == "text_time":
            tiny["addition_time_embed_dim"] = 8
            tiny["projection_class_embeddings_input_dim"] = 32 + _SDXL_TIME_IDS * 8
        if cfg.get("encoder_hid_dim") is not None:
            tiny["encoder_hid_dim"] = 32
        tiny["mid_block_type"] = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    elif name == "SD3Transformer2DModel" and cfg.get("dual_attention_layers"):
        tiny["dual_attention_layers"] = [0]
    elif name == "PixArtTransformer2DModel" and cfg.get("use_additional_conditions") is None:
        # keep the full model's choice: diffusers turns it on when sample_size == 128
        tiny["use_additional_conditions"] = cfg.get("sample_size", 128) == 128
    elif name == "AutoencoderKL":
        levels = len(cfg.get("block_out_channels", [64]))
        tiny["block_out_channels"] = [8 * 2 ** min(i, 2) for i in range(levels)]  # same levels: same 2**(L-1) scale
    return tiny


# ------------------------------------------------------------------------------ sizes
def _hw(size, what: str) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return int(size[0]), int(size[1])
    raise ConfigError(f"{what} must be an int or (height, width), got {size!r}")


def _latent_multiple(name: str, cfg) -> int:
    """The latent side must be a multiple of this (UNet: its downsamplings; DiTs: the patch)."""
    if name == "UNet2DConditionModel":
        return 2 ** (len(cfg["block_out_channels"]) - 1)
    if name == "FluxTransformer2DModel":
        return 2 * cfg.get("patch_size", 1)  # FluxPipeline packs 2x2 latent patches into tokens
    return cfg.get("patch_size", 2)


def _default_image_size(name: str, cfg: dict, scale: str) -> tuple[int, int]:
    if name == "AutoencoderKL":
        return _hw(cfg.get("sample_size", 512), "the VAE config's sample_size")
    if name == "FluxTransformer2DModel":
        side = _FLUX_TINY_SAMPLE if scale == "tiny" else _pipeline_default(*_PIPELINES[name], "default_sample_size")
        return side * VAE_SCALE_FACTOR, side * VAE_SCALE_FACTOR
    if cfg.get("sample_size") is None:
        raise ConfigError(f"{name} config has no sample_size (its latent side); pass image_size=... (pixels)")
    h, w = _hw(cfg["sample_size"], "the config's sample_size")
    return h * VAE_SCALE_FACTOR, w * VAE_SCALE_FACTOR


def _check_image_size(image_size, need: int, file: Path) -> tuple[int, int]:
    h, w = _hw(image_size, "image_size")
    if h < need or w < need or h % need or w % need:
        raise ConfigError(f"{file}: image_size must be a positive multiple of {need} for this model, "
                          f"got {image_size!r}; use e.g. {max(need, (h // need) * need)}")
    return h, w


# ------------------------------------------------------------------------------ the workload
def diffusers_workload(path) -> Workload:
    """A workload for one diffusers model ``config.json`` (a file, or the folder holding it).

    The config's ``_class_name`` picks the class (one of :data:`SUPPORTED_CLASSES`); any other
    class, a pipeline's ``model_index.json`` or a file with no ``_class_name`` raises a one-line
    :class:`ConfigError`. Phases: ``denoise_step`` for the denoisers, ``vae_decode`` and
    ``vae_encode`` for ``AutoencoderKL``; options ``image_size``, ``text_tokens``, ``seed``
    (see :func:`_build_diffusers`). Default dtype: the pipeline example's (bf16 for Flux, fp16
    otherwise).
    """
    file, cfg, name = _read_diffusers_config(path)
    phases = ("vae_decode", "vae_encode") if name in AUTOENCODERS else ("denoise_step",)
    what = ("latent autoencoder" if name in AUTOENCODERS else
            "denoising UNet" if name.startswith("UNet") else "denoising transformer")
    return _workload(
        str(path), "diffusion", f"diffusers {name} ({what}) from {file}", str(file), "diffusers",
        phases, _DEFAULT_DTYPE.get(name, torch.float16), _build_diffusers, config_path=file)


def _build_diffusers(wl, scale, device, dtype, batch, seq_len, *, config_path, image_size=None,
                     text_tokens=None, seed=0):
    """A diffusers model from its ``config.json``: ``cls.from_config(config)`` of the class its
    ``_class_name`` names, on ``device`` (full scale on ``meta``); root module = that model;
    config = dict(class_name, model (the model's FrozenDict config), image_size (h, w), latent
    (c, h, w), text_tokens).

    ``image_size`` (int or (height, width), pixels): default the config's ``sample_size`` x 8 for
    the denoisers (``sample_size`` is their latent side; 8 = the VAE scale factor, see
    :data:`VAE_SCALE_FACTOR`), FluxPipeline's ``default_sample_size`` (128) x 8 = 1024 for Flux,
    whose config has none, and the config's ``sample_size`` (pixels) for the VAE. It must be a
    multiple of 8 x the latent multiple (UNet: 2**(levels-1); transformers: the patch; Flux: 2x2
    packing). ``text_tokens`` (``seq_len`` is an alias; they must agree when both are given):
    default from :func:`default_text_tokens` (77 CLIP for UNets, 333 = 77 + 256 for SD3, 512 for
    Flux, 120 for PixArt; DiT has no text). Tiny: 2-level UNet of width 32/64, 2-layer
    transformers of 2 heads x 16 (PixArt: 3, its size conditions split the width in thirds), a
    VAE with the same number of levels at widths 8..32, 8 text tokens; UNets with a
    ``class_embed_type`` or image conditioning have no tiny form (ConfigError).

    Phases, under no_grad:

    * ``denoise_step`` (denoisers): one forward of the denoiser on ``batch`` latents, with the
      inputs its pipeline passes: UNet: ``sample`` (batch, in_channels, h, w), timestep 500,
      ``encoder_hidden_states`` (batch, text_tokens, cross_attention_dim or encoder_hid_dim), for
      SDXL (``addition_embed_type="text_time"``) ``added_cond_kwargs`` text_embeds (batch,
      projection_class_embeddings_input_dim - 6 x addition_time_embed_dim) and time_ids (batch, 6);
      class labels where the config has class embeddings. SD3: latents (batch, in_channels, h, w),
      ``encoder_hidden_states`` (batch, text_tokens, joint_attention_dim), ``pooled_projections``
      (batch, pooled_projection_dim), timestep. Flux: packed latents (batch, h/2 x w/2,
      in_channels), T5 states (batch, text_tokens, joint_attention_dim), pooled CLIP (batch,
      pooled_projection_dim), timestep/1000, ``img_ids``/``txt_ids`` as FluxPipeline builds them,
      ``guidance`` 3.5 when ``guidance_embeds``. PixArt: latents, T5 states (caption_channels),
      timestep, resolution/aspect-ratio conditions when the model uses them. DiT: latents,
      timestep, ImageNet class labels. Classifier-free guidance doubles the batch in the
      pipelines: that is the caller's choice (pass ``batch=2*images``); the step runs at
      ``batch`` as given. One unit = one denoising step of one latent (``batch`` units per run),
      unit name ``"step"``; the scheduler update (a few elementwise ops) is not included.
    * ``vae_decode`` (AutoencoderKL): ``decode`` of (batch, latent_channels, h/8, w/8) latents
      (unscaled by ``scaling_factor`` and ``shift_factor`` as pipelines do) to (batch, 3, h, w).
      Units: batch images.
    * ``vae_encode`` (AutoencoderKL): ``encode`` of (batch, 3, h, w) images, a sample of the
      posterior, times ``scaling_factor``. Units: batch images.
    """
    import diffusers

    file, cfg, name = _read_diffusers_config(config_path)
    if scale == "tiny":
        cfg = _shrink(name, cfg, file)
    if seq_len is not None and text_tokens is not None and seq_len != text_tokens:
        raise ConfigError(f"seq_len={seq_len} and text_tokens={text_tokens} disagree; pass only one")
    text_tokens = text_tokens if text_tokens is not None else seq_len
    if text_tokens is not None and (not isinstance(text_tokens, int) or text_tokens < 1):
        raise ConfigError(f"text_tokens must be a positive integer, got {text_tokens!r}")
    cls = getattr(diffusers, name)
    full = _with_defaults(cls, cfg)  # what from_config will register: checks run before building

    if image_size is None:
        image_size = _default_image_size(name, full, scale)
    if name in AUTOENCODERS:
        factor = 2 ** (len(full["block_out_channels"]) - 1)
        h, w = _check_image_size(image_size, factor, file)
        text_tokens = None
    else:
        factor = VAE_SCALE_FACTOR
        h, w = _check_image_size(image_size, _latent_multiple(name, full) * factor, file)
        _CHECKS.get(name, lambda *a: None)(full, file, h // factor, w // factor)
        if name == "DiTTransformer2DModel":
            text_tokens = None
        elif text_tokens is None:
            text_tokens = _TINY_TEXT_TOKENS if scale == "tiny" else default_text_tokens(name)
    lh, lw = h // factor, w // factor

    try:
        model = _construct(device, seed, lambda: cls.from_config(cfg))
    except (ValueError, TypeError, KeyError, AssertionError) as e:
        raise ConfigError(f"{file}: diffusers cannot build {name} from it ({str(e).splitlines()[0]}); fix the config") from None
    model = _cast(model, dtype).eval()
    mcfg = model.config

    if name in AUTOENCODERS:
        phases = _vae_phases(model, device, dtype, batch, (h, w), factor, seed)
        latent = (mcfg["latent_channels"], lh, lw)
    else:
        make = _INPUTS[name](model, batch, lh, lw, text_tokens, device, dtype, seed)
        latent = (mcfg["in_channels"], lh, lw)
        desc = (f"one {name} denoising step, latent {lh}x{lw} ({h}x{w} px), batch {batch}"
                + (f", {text_tokens} text tokens" if text_tokens else ""))
        phases = {"denoise_step": Phase("denoise_step", make, _no_grad(_denoise_run(model)), batch, "step",
                                        description=desc)}
    config = {"class_name": name, "model": mcfg, "image_size": (h, w), "latent": latent, "text_tokens": text_tokens}
    return Built(wl, scale, device, dtype, model, config, phases)


def _cast(model, dtype):
    """``model.to(dtype)`` without diffusers' ``ModelMixin.to`` warning, which it logs on every dtype
    cast even when the class keeps no module in fp32; modules the class does keep
    (``_keep_in_fp32_modules``) stay fp32, as ``from_pretrained(torch_dtype=...)`` keeps them."""
    torch.nn.Module.to(model, dtype)
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for mod_name, mod in model.named_modules():
        if any(k in mod_name.split(".") for k in keep):
            torch.nn.Module.to(mod, torch.float32)
    return model


def _with_defaults(cls, cfg: dict) -> dict:
    """``cfg`` over the class's ``__init__`` defaults (the values ``from_config`` fills in)."""
    params = inspect.signature(cls.__init__).parameters.values()
    full = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    full.update(cfg)
    return full


def _denoise_run(model):
    def run(**kwargs):
        return model(**kwargs, return_dict=False)[0]

    return run


# ------------------------------------------------------------------------------ inputs per class
def _check_unet(c: dict, file: Path, lh: int, lw: int) -> None:
    if isinstance(c["cross_attention_dim"], (list, tuple)) and len(set(c["cross_attention_dim"])) != 1:
        raise ConfigError(f"{file}: per-block cross_attention_dim {list(c['cross_attention_dim'])} is not supported "
                          "(one text width feeds every block); use a config with one cross_attention_dim")
    if c.get("encoder_hid_dim_type") not in (None, "text_proj"):
        raise ConfigError(f"{file}: encoder_hid_dim_type '{c['encoder_hid_dim_type']}' (image-conditioned UNet) is "
                          "not supported; supported: none or 'text_proj'")
    if c.get("addition_embed_type") not in (None, "text", "text_time"):
        raise ConfigError(f"{file}: addition_embed_type '{c['addition_embed_type']}' (image-conditioned UNet) is "
                          "not supported; supported: none, 'text', 'text_time' (SDXL)")
    if c.get("class_embed_type") not in (None, "timestep", "projection", "simple_projection"):
        raise ConfigError(f"{file}: class_embed_type '{c['class_embed_type']}' is not supported; supported: none, "
                          "'timestep', 'projection', 'simple_projection'")
    if c.get("addition_embed_type") == "text_time" and (
            c["projection_class_embeddings_input_dim"] - _SDXL_TIME_IDS * c["addition_time_embed_dim"] < 1):
        raise ConfigError(f"{file}: projection_class_embeddings_input_dim {c['projection_class_embeddings_input_dim']} "
                          f"leaves no room for text_embeds after {_SDXL_TIME_IDS} time ids x "
                          f"{c['addition_time_embed_dim']}; fix the config")


def _unet_inputs(model, batch, lh, lw, tokens, device, dtype, seed):
    c = model.config
    cet = c.get("class_embed_type")
    cross = c["cross_attention_dim"]
    width = c["encoder_hid_dim"] if c.get("encoder_hid_dim") is not None else (
        cross[0] if isinstance(cross, (list, tuple)) else cross)
    if c.get("addition_embed_type") == "text_time":
        text_dim = c["projection_class_embeddings_input_dim"] - _SDXL_TIME_IDS * c["addition_time_embed_dim"]

    def make():
        gen = _generator(device, seed + 1)
        kw = {"sample": _randn((batch, c["in_channels"], lh, lw), device, dtype, gen),
              "timestep": torch.tensor(500, device=device),
              "encoder_hidden_states": _randn((batch, tokens, width), device, dtype, gen)}
        if c.get("addition_embed_type") == "text_time":
            h, w = lh * VAE_SCALE_FACTOR, lw * VAE_SCALE_FACTOR
            time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=device, dtype=dtype).repeat(batch, 1)
            kw["added_cond_kwargs"] = {"text_embeds": _randn((batch, text_dim), device, dtype, gen),
                                       "time_ids": time_ids}
        if cet in ("projection", "simple_projection"):
            kw["class_labels"] = _randn((batch, c["projection_class_embeddings_input_dim"]), device, dtype, gen)
        elif cet == "timestep":
            kw["class_labels"] = torch.full((batch,), 20, device=device)  # e.g. the x4 upscaler's noise level
        elif c.get("num_class_embeds") is not None:
            kw["class_labels"] = _randint(c["num_class_embeds"], (batch,), device, gen)
        return (), kw

    return make


def _check_sd3(c: dict, file: Path, lh: int, lw: int) -> None:
    side = max(lh, lw) // c["patch_size"]
    if c.get("pos_embed_max_size") and side > c["pos_embed_max_size"]:
        raise ConfigError(f"{file}: a {lh}x{lw} latent is {side} patches wide, more than pos_embed_max_size "
                          f"{c['pos_embed_max_size']}; use image_size <= "
                          f"{c['pos_embed_max_size'] * c['patch_size'] * VAE_SCALE_FACTOR}")


def _sd3_inputs(model, batch, lh, lw, tokens, device, dtype, seed):
    c = model.config

    def make():
        gen = _generator(device, seed + 1)
        return (), {"hidden_states": _randn((batch, c["in_channels"], lh, lw), device, dtype, gen),
                    "encoder_hidden_states": _randn((batch, tokens, c["joint_attention_dim"]), device, dtype, gen),
                    "pooled_projections": _randn((batch, c["pooled_projection_dim"]), device, dtype, gen),
                    "timestep": torch.full((batch,), 500.0, device=device)}

    return make


def _flux_inputs(model, batch, lh, lw, tokens, device, dtype, seed):
    c = model.config
    ph, pw = lh // 2, lw // 2  # FluxPipeline._pack_latents: 2x2 latent patches -> one token of 4*16 channels

    def make():
        gen = _generator(device, seed + 1)
        # FluxPipeline._prepare_latent_image_ids: (0, row, col) per packed token; text ids are zeros
        rows = torch.arange(ph, device=device, dtype=dtype)[:, None].expand(ph, pw)
        cols = torch.arange(pw, device=device, dtype=dtype)[None, :].expand(ph, pw)
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(ph * pw, 3)
        kw = {"hidden_states": _randn((batch, ph * pw, c["in_channels"]), device, dtype, gen),
              "encoder_hidden_states": _randn((batch, tokens, c["joint_attention_dim"]), device, dtype, gen),
              "pooled_projections": _randn((batch, c["pooled_projection_dim"]), device, dtype, gen),
              "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),  # the pipeline passes t/1000
              "img_ids": img_ids, "txt_ids": torch.zeros(tokens, 3, device=device, dtype=dtype)}
        if c.get("guidance_embeds"):
            kw["guidance"] = torch.full((batch,), 3.5, device=device, dtype=torch.float32)  # FluxPipeline's guidance_scale
        return (), kw

    return make


def _check_pixart(c: dict, file: Path, lh: int, lw: int) -> None:
    if c.get("caption_channels") is None:
        raise ConfigError(f"{file}: PixArt config has no caption_channels (the T5 width); add it (4096 for PixArt)")


def _pixart_inputs(model, batch, lh, lw, tokens, device, dtype, seed):
    c = model.config

    def make():
        gen = _generator(device, seed + 1)
        h, w = lh * VAE_SCALE_FACTOR, lw * VAE_SCALE_FACTOR
        added = {"resolution": None, "aspect_ratio": None}
        if model.use_additional_conditions:  # PixArtAlphaPipeline's micro-conditions
            added = {"resolution": torch.tensor([[h, w]], device=device, dtype=dtype).repeat(batch, 1),
                     "aspect_ratio": torch.tensor([[h / w]], device=device, dtype=dtype).repeat(batch, 1)}
        return (), {"hidden_states": _randn((batch, c["in_channels"], lh, lw), device, dtype, gen),
                    "encoder_hidden_states": _randn((batch, tokens, c["caption_channels"]), device, dtype, gen),
                    "timestep": torch.full((batch,), 500, device=device), "added_cond_kwargs": added}

    return make


def _dit_inputs(model, batch, lh, lw, tokens, device, dtype, seed):
    c = model.config

    def make():
        gen = _generator(device, seed + 1)
        return (), {"hidden_states": _randn((batch, c["in_channels"], lh, lw), device, dtype, gen),
                    "timestep": torch.full((batch,), 500, device=device),
                    "class_labels": _randint(c["num_embeds_ada_norm"], (batch,), device, gen)}

    return make


_INPUTS = {"UNet2DConditionModel": _unet_inputs, "SD3Transformer2DModel": _sd3_inputs,
           "FluxTransformer2DModel": _flux_inputs, "PixArtTransformer2DModel": _pixart_inputs,
           "DiTTransformer2DModel": _dit_inputs}
_CHECKS = {"UNet2DConditionModel": _check_unet, "SD3Transformer2DModel": _check_sd3,
           "PixArtTransformer2DModel": _check_pixart}


def _vae_phases(vae, device, dtype, batch, hw, factor, seed) -> dict[str, Phase]:
    c = vae.config
    h, w = hw
    scaling, shift = c["scaling_factor"], c.get("shift_factor") or 0.0
    lat = (batch, c["latent_channels"], h // factor, w // factor)

    def decode_inputs():
        return (_randn(lat, device, dtype, _generator(device, seed + 1)),), {}

    def decode(latents):
        return vae.decode(latents / scaling + shift).sample

    def encode_inputs():
        return (_randn((batch, c["in_channels"], h, w), device, dtype, _generator(device, seed + 2)),), {}

    def encode(images):
        z = vae.encode(images).latent_dist.sample(generator=_generator(device, seed + 3))
        return (z - shift) * scaling

    px = f"{h}x{w}"
    return {
        "vae_decode": Phase("vae_decode", decode_inputs, _no_grad(decode), batch, "image",
                            description=f"VAE decoder, latent {lat[2]}x{lat[3]} -> image {px}"),
        "vae_encode": Phase("vae_encode", encode_inputs, _no_grad(encode), batch, "image",
                            description=f"VAE encoder, image {px} -> latent {lat[2]}x{lat[3]}"),
    }
