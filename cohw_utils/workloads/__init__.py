"""Proxy workloads: real models from real libraries, built from configs kept in this repo.

Every workload the book measures is a *real* library class (``LlamaForCausalLM``,
``UNet2DConditionModel``, nerfstudio's ``NerfactoField``...) constructed from a config file under
``cohw_utils/data/configs/`` whose values are copied from the published ``config.json`` (or, for
nerfstudio, from the library's config dataclass defaults). Nothing is downloaded: weights are
random, and at full scale they live on torch's ``meta`` device, which stores shapes and dtypes but
no data, so a 70B-parameter model builds in well under a second and runs shape-correct forward
passes whose aten ops the tracer (:mod:`cohw_utils.spine.trace`) records.

Two scales:

* ``"full"``: the published architecture. Build it on ``device="meta"`` (the default) to trace it.
  The NeRF workloads are small enough to also run on ``cpu``.
* ``"tiny"``: the same class with a shrunk config (a few layers, narrow widths), on ``cpu`` with
  seeded random weights, so tests and notebooks can execute it for real in milliseconds.

A workload has named *phases* (``prefill``/``decode``, ``unet_step``, ``render``...). Each phase
gives an untraced ``make_inputs()`` and a ``run(*args, **kwargs)`` that is the work to trace::

    built = build("llama-2-70b")                 # full scale on meta, fp16
    ph = built.phase("decode")
    args, kwargs = ph.make_inputs()              # runs the prefill to fill the KV cache
    out = ph.run(*args, **kwargs)                # one decode step: trace this

Call ``make_inputs()`` afresh before each ``run``: some runs change their inputs (a decode step
appends to its KV cache; a NeRF forward sets the ray bundle's near/far bounds).

Any Hugging Face decoder-LM ``config.json`` can also be given as a path instead of a name.
"""
from __future__ import annotations

import copy
import functools
import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch
from torch import nn

from cohw_utils.core.errors import CohwError, ConfigError, UnknownWorkloadError
from cohw_utils.core.data import DATA_DIR

__all__ = [
    "Phase",
    "Built",
    "Workload",
    "WORKLOADS",
    "CONFIG_DIR",
    "list_workloads",
    "get_workload",
    "build",
    "load_hf_config",
    "kv_cache_bytes_per_token",
    "cache_tensors",
]

CONFIG_DIR = DATA_DIR / "configs"
SCALES = ("full", "tiny")
DEFAULT_SEQ_LEN = 512
DEFAULT_RAYS = {"full": 4096, "tiny": 256}

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64,
}


# --------------------------------------------------------------------------------------------
# Registry types
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Phase:
    """One traceable piece of a workload: ``run(*args, **kwargs)`` on ``make_inputs()``."""

    name: str
    make_inputs: Callable[[], tuple[tuple, dict]]
    run: Callable[..., Any]
    units: int
    unit_name: str
    backward: bool = False
    description: str = ""


@dataclass(repr=False)
class Built:
    """A constructed workload: its root module, config(s) and phases."""

    workload: "Workload"
    scale: str
    device: torch.device
    dtype: torch.dtype
    model: nn.Module
    config: Any
    phases: dict[str, Phase]

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return (f"Built(workload={self.workload.name!r}, scale={self.scale!r}, device={self.device}, "
                f"dtype={self.dtype}, params={n:,}, phases=[{', '.join(self.phases)}])")

    def phase(self, name: str) -> Phase:
        try:
            return self.phases[name]
        except KeyError:
            raise CohwError(
                f"workload '{self.workload.name}' has no phase '{name}'; "
                f"its phases: {', '.join(self.phases)}"
            ) from None


@dataclass(frozen=True)
class Workload:
    """A registry entry: what the workload is, where it comes from, and how to build it."""

    name: str
    domain: str
    description: str
    source: str
    library: str
    phases: tuple[str, ...]
    default_dtype: torch.dtype
    builder: Callable[..., Built]


class _Builder:
    """The callable stored as ``Workload.builder``.

    ``builder(scale="full", device="meta", dtype=None, batch=1, seq_len=None, **kw)`` validates and
    normalises the common arguments, then calls the workload's build function. Options in ``kw``
    are the keyword-only parameters of that function (see each ``_build_*`` docstring).
    """

    def __init__(self, fn: Callable[..., Built], **bound: Any):
        self.fn = fn
        self.bound = bound
        self.workload: Workload | None = None  # set by _workload() once the Workload exists
        functools.update_wrapper(self, fn)  # the build function's docstring documents the workload
        del self.__wrapped__  # ...but inspect.signature(builder) should show __call__'s arguments

    def __repr__(self) -> str:
        shown = "".join(f" {k}={v!r}" if not isinstance(v, Path) else f" {k}={v.parent.name}/{v.name}"
                        for k, v in self.bound.items() if not isinstance(v, dict))
        return f"<builder {self.fn.__name__}{shown}>"

    @property
    def options(self) -> tuple[str, ...]:
        params = inspect.signature(self.fn).parameters.values()
        return tuple(
            p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in self.bound
        )

    def __call__(self, scale="full", device="meta", dtype=None, batch=1, seq_len=None, **kw):
        wl = self.workload
        assert wl is not None, "builder not attached to a Workload"
        if scale not in SCALES:
            raise CohwError(f"unknown scale '{scale}' for workload '{wl.name}'; use one of: {', '.join(SCALES)}")
        dev = _as_device(device)
        dt = _resolve_dtype(wl, dev, dtype)
        if not isinstance(batch, int) or batch < 1:
            raise CohwError(f"batch must be a positive integer, got {batch!r}")
        if seq_len is not None and (not isinstance(seq_len, int) or seq_len < 1):
            raise CohwError(f"seq_len must be a positive integer, got {seq_len!r}")
        unknown = sorted(set(kw) - set(self.options))
        if unknown:
            opts = ", ".join(self.options) or "none"
            raise CohwError(
                f"workload '{wl.name}' has no option {', '.join(repr(u) for u in unknown)}; its options: {opts}"
            )
        return self.fn(wl, scale, dev, dt, batch, seq_len, **self.bound, **kw)


def _workload(name, domain, description, source, library, phases, default_dtype, fn, **bound) -> Workload:
    builder = _Builder(fn, **bound)
    wl = Workload(name, domain, description, source, library, tuple(phases), default_dtype, builder)
    builder.workload = wl
    return wl


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def _as_device(device) -> torch.device:
    try:
        return device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise CohwError(f"unknown device {device!r} ({e}); use 'meta', 'cpu' or 'cuda'") from None


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key in _DTYPE_NAMES:
            return _DTYPE_NAMES[key]
    raise CohwError(f"unknown dtype {dtype!r}; use one of: float32, float16, bfloat16")


def _resolve_dtype(wl: Workload, device: torch.device, dtype) -> torch.dtype:
    """``None`` -> the workload's published dtype, except on CPU, where it is float32 (CPU
    half-precision kernels are slow or missing)."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else wl.default_dtype
    return _as_dtype(dtype)


def _read_json(path: Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; pass the path to a Hugging Face config.json (or the folder holding it)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror}); check the path and its permissions") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
            "fix the file, or copy the model's config.json again"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object {{...}}, got {type(data).__name__}")
    return data


def _public(d: dict) -> dict:
    """Drop this repo's provenance keys (``_cohw_*``) before handing a config to a library."""
    return {k: v for k, v in d.items() if not k.startswith("_cohw")}


def _repo_json(*parts: str) -> dict:
    return _public(_read_json(CONFIG_DIR.joinpath(*parts)))


def _generator(device: torch.device, seed: int):
    """A seeded generator for real devices; ``None`` on meta (there is no data to seed)."""
    if device.type == "meta":
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _randn(shape, device, dtype, gen):
    return torch.randn(*shape, device=device, dtype=dtype, generator=gen)


def _randint(high, shape, device, gen):
    return torch.randint(0, high, tuple(shape), device=device, generator=gen)


def _construct(device: torch.device, seed: int, fn: Callable[[], nn.Module]) -> nn.Module:
    """Seed torch's global RNG (weights are random: seeding makes tiny models reproducible) and
    construct directly on ``device``: on meta no memory is allocated and no init kernel runs.

    Import every library module ``fn`` needs *before* calling this: a module imported inside the
    ``torch.device`` context would create its module-level tensors (e.g. nerfstudio's colour
    constants) on that device, for good.
    """
    torch.manual_seed(seed)
    with torch.device(device):
        return fn()


def _no_grad(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.no_grad():
            return fn(*args, **kwargs)

    return run


def _check_float32(wl: Workload, dtype: torch.dtype) -> None:
    if dtype != torch.float32:
        raise CohwError(
            f"workload '{wl.name}' runs in float32 only (nerfstudio's fields and samplers are "
            f"written for it), got {dtype}; pass dtype='float32' or leave dtype unset"
        )


# --------------------------------------------------------------------------------------------
# Hugging Face configs, KV cache
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# Decoder LMs (Llama-2, any HF config.json)
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# Stable Diffusion 1.5
# --------------------------------------------------------------------------------------------
_TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=1000, projection_dim=32)
_TINY_UNET = dict(block_out_channels=[32, 64], layers_per_block=1, cross_attention_dim=32,
                  attention_head_dim=2, norm_num_groups=8, sample_size=8,
                  down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
_TINY_VAE = dict(block_out_channels=[8, 16, 32, 32], layers_per_block=1, norm_num_groups=4, sample_size=64)


def _sd_parts(scale):
    """Configs of SD 1.5's text encoder (CLIPTextConfig), UNet and VAE (dicts), maybe shrunk."""
    from transformers import CLIPTextConfig

    te = _repo_json("sd-1.5", "text_encoder", "config.json")
    unet = _repo_json("sd-1.5", "unet", "config.json")
    vae = _repo_json("sd-1.5", "vae", "config.json")
    if scale == "tiny":
        te.update(_TINY_CLIP)
        unet.update(_TINY_UNET)
        vae.update(_TINY_VAE)
        unet["cross_attention_dim"] = te["hidden_size"]
    return CLIPTextConfig.from_dict(te), unet, vae


def _vae_scale(vae_cfg: dict) -> int:
    return 2 ** (len(vae_cfg["block_out_channels"]) - 1)


def _unet_multiple(unet_cfg: dict) -> int:
    return 2 ** (len(unet_cfg["down_block_types"]) - 1)


def _check_image_size(image_size, unet_cfg, vae_cfg) -> int:
    need = _vae_scale(vae_cfg) * _unet_multiple(unet_cfg)
    if not isinstance(image_size, int) or image_size < need or image_size % need:
        raise CohwError(f"image_size must be a positive multiple of {need} for this UNet/VAE, got {image_size!r}")
    return image_size


def _build_sd15(wl, scale, device, dtype, batch, seq_len, *, image_size=None, guidance_scale=7.5, seed=0):
    """Stable Diffusion 1.5: ``CLIPTextModel`` (openai/clip-vit-large-patch14 text tower),
    ``UNet2DConditionModel`` and ``AutoencoderKL`` from runwayml/stable-diffusion-v1-5's configs.
    Root module: ``nn.ModuleDict(text_encoder=..., unet=..., vae=...)``; config: dict of the three.

    ``image_size`` (default 512 full, 64 tiny) sets the latent to image_size/8 (64x64 at 512;
    768 and 1024 work too). ``seq_len`` is ignored: CLIP's context is fixed at 77 tokens.
    Tiny: 2-layer CLIP of width 32, a 2-level UNet (32, 64 channels), a 4-level VAE (8..32
    channels, still 8x downsampling).

    Phases, all under no_grad, one unit = one generated image (``batch`` images):

    * ``text_encoder``: ``input_ids`` (2*batch, 77): the prompt and the empty negative prompt for
      classifier-free guidance, as the pipeline encodes them.
    * ``unet_step``: one denoising step: ``latents`` (batch, 4, h, w), timestep ``t`` and
      ``encoder_hidden_states`` (2*batch, 77, 768); ``run`` concatenates the latents twice (CFG
      batch 2*batch), runs the UNet and combines ``uncond + guidance_scale*(cond - uncond)``.
      The scheduler update itself (a few elementwise ops) is not included. A 50-step generation is
      50 of these.
    * ``vae_decode``: ``AutoencoderKL.decode`` (decoder only) of (batch, 4, h, w) latents scaled by
      1/scaling_factor, to (batch, 3, image_size, image_size).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    te_cfg, unet_cfg, vae_cfg = _sd_parts(scale)
    lat_mult = _vae_scale(vae_cfg)
    image_size = _check_image_size(image_size or unet_cfg["sample_size"] * lat_mult, unet_cfg, vae_cfg)
    lat = image_size // lat_mult

    def make():
        return nn.ModuleDict({
            "text_encoder": CLIPTextModel(te_cfg),
            "unet": UNet2DConditionModel.from_config(unet_cfg),
            "vae": AutoencoderKL.from_config(vae_cfg),
        })

    model = _construct(device, seed, make).to(dtype).eval()
    text_encoder, unet, vae = model["text_encoder"], model["unet"], model["vae"]
    ctx, vocab, width = te_cfg.max_position_embeddings, te_cfg.vocab_size, te_cfg.hidden_size
    lat_ch = unet.config.in_channels
    scaling = vae.config.scaling_factor

    def te_inputs():
        gen = _generator(device, seed + 1)
        return (_randint(vocab, (2 * batch, ctx), device, gen),), {}

    def te_run(input_ids):
        return text_encoder(input_ids).last_hidden_state

    def unet_inputs():
        gen = _generator(device, seed + 2)
        latents = _randn((batch, lat_ch, lat, lat), device, dtype, gen)
        t = torch.tensor(500, device=device)
        emb = _randn((2 * batch, ctx, width), device, dtype, gen)
        return (latents, t, emb), {}

    def unet_run(latents, t, encoder_hidden_states):
        x = torch.cat([latents] * 2)
        eps = unet(x, t, encoder_hidden_states=encoder_hidden_states).sample
        uncond, cond = eps.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def vae_inputs():
        gen = _generator(device, seed + 3)
        return (_randn((batch, vae.config.latent_channels, lat, lat), device, dtype, gen),), {}

    def vae_run(latents):
        return vae.decode(latents / scaling).sample

    phases = {
        "text_encoder": Phase("text_encoder", te_inputs, _no_grad(te_run), batch, "image",
                              description=f"CLIP text encoder, {2 * batch} sequences of {ctx} tokens (prompt + negative)"),
        "unet_step": Phase("unet_step", unet_inputs, _no_grad(unet_run), batch, "image",
                           description=f"one UNet denoising step, latent {lat}x{lat}, CFG batch {2 * batch}"),
        "vae_decode": Phase("vae_decode", vae_inputs, _no_grad(vae_run), batch, "image",
                            description=f"VAE decoder, latent {lat}x{lat} -> image {image_size}x{image_size}"),
    }
    config = {"text_encoder": te_cfg, "unet": unet.config, "vae": vae.config, "image_size": image_size}
    return Built(wl, scale, device, dtype, model, config, phases)


# --------------------------------------------------------------------------------------------
# Vision: ViT-B/16, ResNet-50
# --------------------------------------------------------------------------------------------
_TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 image_size=32, patch_size=8, num_labels=10)
_TINY_RESNET = dict(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=10)


def _build_vision(wl, scale, device, dtype, batch, seq_len, *, config_name, tiny, image_size=None, seed=0):
    """Image classifier from its published config: ``ViTForImageClassification``
    (google/vit-base-patch16-224) or ``ResNetForImageClassification`` (microsoft/resnet-50);
    root module = the classifier. Tiny: 2 narrow layers (ViT, 32x32 input) or one bottleneck per
    stage with 16..128 channels (ResNet, 64x64 input), 10 classes.

    Phase ``forward``: ``pixel_values`` (batch, 3, H, W), H = W = the config's image_size (224 at
    full scale) or the ``image_size`` option (for ViT this resizes the position embeddings, as a
    ViT fine-tuned at that resolution has); under no_grad; units: batch images.
    """
    from transformers import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING, AutoModelForImageClassification

    config = load_hf_config(CONFIG_DIR / config_name / "config.json")
    MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING[type(config)]  # import outside the device context
    if scale == "tiny":
        for k, v in tiny.items():
            setattr(config, k, v)  # num_labels' setter also rebuilds id2label
    default_size = getattr(config, "image_size", None) or (64 if scale == "tiny" else 224)
    image_size = image_size or default_size
    patch = getattr(config, "patch_size", 1)
    if not isinstance(image_size, int) or image_size < 32 or image_size % patch:
        raise CohwError(f"image_size must be an integer >= 32 and a multiple of the patch size {patch}, got {image_size!r}")
    if getattr(config, "image_size", None) is not None:
        config.image_size = image_size  # ViT: position embeddings for this resolution (as ViT-B/16@384 has)
    model = _construct(device, seed, lambda: AutoModelForImageClassification.from_config(config))
    model = model.to(dtype).eval()
    channels = config.num_channels

    def inputs():
        gen = _generator(device, seed + 1)
        return (), {"pixel_values": _randn((batch, channels, image_size, image_size), device, dtype, gen)}

    def run(pixel_values):
        return model(pixel_values=pixel_values).logits

    phases = {"forward": Phase("forward", inputs, _no_grad(run), batch, "image",
                               description=f"classify {batch} image(s) of {image_size}x{image_size}")}
    return Built(wl, scale, device, dtype, model, config, phases)


# --------------------------------------------------------------------------------------------
# NeRF (nerfstudio components)
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _ns() -> SimpleNamespace:
    """nerfstudio imports, done once and only when a NeRF workload is built."""
    import warnings

    with warnings.catch_warnings():
        # nerfstudio decorates trunc_exp with the deprecated torch.cuda.amp.custom_fwd, and its
        # utils import viser, which imports deprecated websockets modules
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        from nerfstudio.cameras.rays import RayBundle
        from nerfstudio.field_components.encodings import NeRFEncoding
        from nerfstudio.field_components.field_heads import FieldHeadNames
        from nerfstudio.field_components.spatial_distortions import SceneContraction
        from nerfstudio.fields.density_fields import HashMLPDensityField
        from nerfstudio.fields.nerfacto_field import NerfactoField
        from nerfstudio.fields.vanilla_nerf_field import NeRFField
        from nerfstudio.model_components.losses import MSELoss, distortion_loss, interlevel_loss
        from nerfstudio.model_components.ray_samplers import (
            PDFSampler, ProposalNetworkSampler, UniformSampler)
        from nerfstudio.model_components.renderers import (
            AccumulationRenderer, DepthRenderer, RGBRenderer)
        from nerfstudio.model_components.scene_colliders import NearFarCollider
    return SimpleNamespace(**{k: v for k, v in locals().items() if k != "warnings"})


class NerfactoRenderer(nn.Module):
    """nerfstudio's Nerfacto, wired as ``NerfactoModel.populate_modules``/``get_outputs`` wire it,
    from the real components, without the parts that need a dataset or downloads (camera
    optimizer, PSNR/SSIM/LPIPS metrics, viewer callbacks). Submodule names follow
    ``NerfactoModel``: ``collider``, ``proposal_networks.{0,1}``, ``proposal_sampler``, ``field``
    (``field.mlp_base`` hash grid + MLP, ``field.mlp_head`` colour MLP), ``renderer_*``.

    ``forward(ray_bundle)``: near/far collider -> proposal sampling (uniform-then-PDF resampling
    through the proposal density nets) -> NerfactoField query of the final samples -> volume
    rendering of RGB, accumulation and depth. Returns a dict as ``get_outputs`` does.
    """

    def __init__(self, cfg: dict):
        super().__init__()
        ns = _ns()
        self.cfg = dict(cfg)
        contraction = None if cfg["disable_scene_contraction"] else ns.SceneContraction(order=float("inf"))
        aabb = torch.tensor(cfg["aabb"], dtype=torch.float32)
        app_dim = cfg["appearance_embed_dim"] if cfg["use_appearance_embedding"] else 0
        impl = cfg["implementation"]
        self.field = ns.NerfactoField(
            aabb, hidden_dim=cfg["hidden_dim"], num_levels=cfg["num_levels"], max_res=cfg["max_res"],
            base_res=cfg["base_res"], features_per_level=cfg["features_per_level"],
            log2_hashmap_size=cfg["log2_hashmap_size"], hidden_dim_color=cfg["hidden_dim_color"],
            hidden_dim_transient=cfg["hidden_dim_transient"], spatial_distortion=contraction,
            num_images=cfg["num_train_images"], use_pred_normals=cfg["predict_normals"],
            use_average_appearance_embedding=cfg["use_average_appearance_embedding"],
            appearance_embedding_dim=app_dim, average_init_density=cfg["average_init_density"],
            implementation=impl,
        )
        n_prop = cfg["num_proposal_iterations"]
        args_list = cfg["proposal_net_args_list"]
        nets = [ns.HashMLPDensityField(aabb, spatial_distortion=contraction, **args_list[min(i, len(args_list) - 1)],
                                       average_init_density=cfg["average_init_density"], implementation=impl)
                for i in range(1 if cfg["use_same_proposal_network"] else n_prop)]
        self.proposal_networks = nn.ModuleList(nets)
        self.density_fns = [nets[min(i, len(nets) - 1)].density_fn for i in range(n_prop)]
        initial = None
        if cfg["proposal_initial_sampler"] == "uniform":
            initial = ns.UniformSampler(single_jitter=cfg["use_single_jitter"])
        self.proposal_sampler = ns.ProposalNetworkSampler(
            num_nerf_samples_per_ray=cfg["num_nerf_samples_per_ray"],
            num_proposal_samples_per_ray=tuple(cfg["num_proposal_samples_per_ray"]),
            num_proposal_network_iterations=n_prop, single_jitter=cfg["use_single_jitter"],
            update_sched=lambda step: 1, initial_sampler=initial,
        )
        self.collider = ns.NearFarCollider(near_plane=cfg["near_plane"], far_plane=cfg["far_plane"])
        self.renderer_rgb = ns.RGBRenderer(background_color=cfg["background_color"])
        self.renderer_accumulation = ns.AccumulationRenderer()
        self.renderer_depth = ns.DepthRenderer(method="median")
        self.renderer_expected_depth = ns.DepthRenderer(method="expected")
        self.rgb_loss = ns.MSELoss()

    def forward(self, ray_bundle):
        ns = _ns()
        ray_bundle = self.collider(ray_bundle)
        ray_samples, weights_list, ray_samples_list = self.proposal_sampler(ray_bundle, density_fns=self.density_fns)
        field_outputs = self.field.forward(ray_samples, compute_normals=self.cfg["predict_normals"])
        weights = ray_samples.get_weights(field_outputs[ns.FieldHeadNames.DENSITY])
        weights_list.append(weights)
        ray_samples_list.append(ray_samples)
        rgb = self.renderer_rgb(rgb=field_outputs[ns.FieldHeadNames.RGB], weights=weights)
        with torch.no_grad():
            depth = self.renderer_depth(weights=weights, ray_samples=ray_samples)
        outputs = {
            "rgb": rgb,
            "accumulation": self.renderer_accumulation(weights=weights),
            "depth": depth,
            "expected_depth": self.renderer_expected_depth(weights=weights, ray_samples=ray_samples),
        }
        if self.training:
            outputs["weights_list"] = weights_list
            outputs["ray_samples_list"] = ray_samples_list
        for i in range(self.cfg["num_proposal_iterations"]):
            outputs[f"prop_depth_{i}"] = self.renderer_depth(weights=weights_list[i], ray_samples=ray_samples_list[i])
        return outputs

    def loss(self, outputs: dict, target_rgb: torch.Tensor) -> torch.Tensor:
        """``NerfactoModel.get_loss_dict`` in training: RGB MSE + interlevel (proposal) loss +
        distortion loss, with the config's multipliers."""
        return self.rgb_loss(target_rgb, outputs["rgb"]) + self.proposal_losses(outputs)

    def proposal_losses(self, outputs: dict) -> torch.Tensor:
        """Interlevel loss (the only loss that trains the proposal nets) + distortion loss."""
        ns = _ns()
        wl, rsl = outputs["weights_list"], outputs["ray_samples_list"]
        return (self.cfg["interlevel_loss_mult"] * ns.interlevel_loss(wl, rsl)
                + self.cfg["distortion_loss_mult"] * ns.distortion_loss(wl, rsl))


class VanillaNeRFRenderer(nn.Module):
    """nerfstudio's vanilla NeRF (Mildenhall et al. 2020), wired as ``NeRFModel.get_outputs`` wires
    it, from the real components: ``collider`` -> ``sampler_uniform`` (coarse samples) ->
    ``field_coarse`` (NeRFField: positional encoding, 8x256 MLP with a skip at layer 4, RGB head)
    -> ``renderer_*`` -> ``sampler_pdf`` (importance samples from the coarse weights, plus the
    coarse ones) -> ``field_fine`` -> ``renderer_*``. No metrics modules (they need torchvision).
    """

    def __init__(self, cfg: dict):
        super().__init__()
        ns = _ns()
        self.cfg = dict(cfg)
        pos = ns.NeRFEncoding(**cfg["position_encoding"])
        dirs = ns.NeRFEncoding(**cfg["direction_encoding"])
        field_args = dict(base_mlp_num_layers=cfg["base_mlp_num_layers"], base_mlp_layer_width=cfg["base_mlp_layer_width"],
                          head_mlp_num_layers=cfg["head_mlp_num_layers"], head_mlp_layer_width=cfg["head_mlp_layer_width"],
                          skip_connections=tuple(cfg["skip_connections"]))
        self.collider = ns.NearFarCollider(near_plane=cfg["near_plane"], far_plane=cfg["far_plane"])
        self.field_coarse = ns.NeRFField(position_encoding=pos, direction_encoding=dirs, **field_args)
        self.field_fine = ns.NeRFField(position_encoding=pos, direction_encoding=dirs, **field_args)
        self.sampler_uniform = ns.UniformSampler(num_samples=cfg["num_coarse_samples"])
        self.sampler_pdf = ns.PDFSampler(num_samples=cfg["num_importance_samples"])
        self.renderer_rgb = ns.RGBRenderer(background_color=cfg["background_color"])
        self.renderer_accumulation = ns.AccumulationRenderer()
        self.renderer_depth = ns.DepthRenderer()
        self.rgb_loss = ns.MSELoss()

    def forward(self, ray_bundle):
        ns = _ns()
        D, RGB = ns.FieldHeadNames.DENSITY, ns.FieldHeadNames.RGB
        ray_bundle = self.collider(ray_bundle)
        samples_uniform = self.sampler_uniform(ray_bundle)
        coarse = self.field_coarse.forward(samples_uniform)
        weights_coarse = samples_uniform.get_weights(coarse[D])
        rgb_coarse = self.renderer_rgb(rgb=coarse[RGB], weights=weights_coarse)
        acc_coarse = self.renderer_accumulation(weights_coarse)
        depth_coarse = self.renderer_depth(weights_coarse, samples_uniform)
        samples_pdf = self.sampler_pdf(ray_bundle, samples_uniform, weights_coarse)
        fine = self.field_fine.forward(samples_pdf)
        weights_fine = samples_pdf.get_weights(fine[D])
        return {
            "rgb_coarse": rgb_coarse,
            "rgb_fine": self.renderer_rgb(rgb=fine[RGB], weights=weights_fine),
            "accumulation_coarse": acc_coarse,
            "accumulation_fine": self.renderer_accumulation(weights_fine),
            "depth_coarse": depth_coarse,
            "depth_fine": self.renderer_depth(weights_fine, samples_pdf),
        }

    def loss(self, outputs: dict, target_rgb: torch.Tensor) -> torch.Tensor:
        """``NeRFModel.get_loss_dict``: coarse + fine RGB MSE (coefficients 1.0)."""
        return self.rgb_loss(target_rgb, outputs["rgb_coarse"]) + self.rgb_loss(target_rgb, outputs["rgb_fine"])


_TINY_NERFACTO = dict(num_levels=4, log2_hashmap_size=12, max_res=128, hidden_dim=16, hidden_dim_color=16,
                      appearance_embed_dim=8, num_proposal_samples_per_ray=[32, 16], num_nerf_samples_per_ray=8,
                      proposal_net_args_list=[
                          {"hidden_dim": 8, "log2_hashmap_size": 10, "num_levels": 2, "max_res": 32, "use_linear": False},
                          {"hidden_dim": 8, "log2_hashmap_size": 10, "num_levels": 2, "max_res": 64, "use_linear": False}])
_TINY_VANILLA = dict(num_coarse_samples=16, num_importance_samples=16, base_mlp_num_layers=3,
                     base_mlp_layer_width=32, head_mlp_num_layers=1, head_mlp_layer_width=16, skip_connections=[1],
                     position_encoding={"in_dim": 3, "num_frequencies": 4, "min_freq_exp": 0.0, "max_freq_exp": 3.0, "include_input": True},
                     direction_encoding={"in_dim": 3, "num_frequencies": 2, "min_freq_exp": 0.0, "max_freq_exp": 1.0, "include_input": True})


def _nerf_config(name: str, scale: str, overrides: dict | None = None) -> dict:
    cfg = _repo_json(name, "config.json")
    if scale == "tiny":
        cfg.update(_TINY_NERFACTO if name == "nerfacto" else _TINY_VANILLA)
    cfg.update(overrides or {})
    return cfg


def _random_rays(n: int, radius: float, num_images: int, device, gen):
    """``n`` rays from cameras on a sphere of ``radius`` towards points near the scene centre."""
    ns = _ns()
    fn = torch.nn.functional
    origins = fn.normalize(_randn((n, 3), device, torch.float32, gen), dim=-1) * radius
    targets = 0.25 * _randn((n, 3), device, torch.float32, gen)
    directions = fn.normalize(targets - origins, dim=-1)
    return ns.RayBundle(
        origins=origins, directions=directions,
        pixel_area=torch.full((n, 1), 1e-6, device=device),
        camera_indices=_randint(max(num_images, 1), (n, 1), device, gen),
    )


def _nerf_phases(model: nn.Module, cfg: dict, device, rays: int, seed: int, num_images: int) -> dict[str, Phase]:
    radius = cfg["camera_radius"]

    def render_inputs():
        return (_random_rays(rays, radius, num_images, device, _generator(device, seed + 1)),), {}

    def render(ray_bundle):
        model.eval()
        with torch.no_grad():
            return model(ray_bundle)

    def train_inputs():
        gen = _generator(device, seed + 2)
        bundle = _random_rays(rays, radius, num_images, device, gen)
        target = torch.rand(rays, 3, device=device, generator=gen)
        return (bundle, target), {}

    def train_step(ray_bundle, target_rgb):
        model.train()
        loss = model.loss(model(ray_bundle), target_rgb)
        loss.backward()
        return loss.detach()

    return {
        "render": Phase("render", render_inputs, render, rays, "ray",
                        description=f"volume-render {rays} rays, no grad"),
        "train_step": Phase("train_step", train_inputs, train_step, rays, "ray", backward=True,
                            description=f"forward + loss + backward on a batch of {rays} rays"),
    }


def _build_nerfacto(wl, scale, device, dtype, batch, seq_len, *, rays=None, seed=0):
    """Nerfacto (nerfstudio) from ``NerfactoModelConfig`` defaults: a 16-level hash grid
    (2 features/level, 2^19 entries per level, resolutions 16..2048) + 2x64 MLP density/feature
    net, SH-encoded directions, a 3x64 colour MLP, a 32-d appearance embedding (100 train images),
    two 5-level proposal hash-grid density nets (2^17 entries, max res 128 and 256) feeding a
    ProposalNetworkSampler of 256 -> 96 -> 48 samples per ray, scene contraction, volume
    rendering. nerfstudio's pure-torch hash encoding is used (not tiny-cuda-nn). Root module:
    :class:`NerfactoRenderer`. Tiny: 4 hash levels of 2^12, 32 -> 16 -> 8 samples, 256 rays.

    ``rays`` (default 4096 full, 256 tiny; ``batch`` is unused) random rays from cameras on the
    unit sphere looking at the scene centre. Phases: ``render`` (eval mode, no grad) and
    ``train_step`` (train mode: forward, RGB MSE to random target colours + interlevel and
    distortion losses, backward into the hash tables and MLPs). A train step is a proposal-net
    update step (nerfstudio updates them every 1..5 steps) with annealing at its steady value.
    Float32 only. Works on meta and on cpu (full scale: a few seconds per render on 2 cores).
    """
    _check_float32(wl, dtype)
    _ns()  # import nerfstudio outside the device context
    cfg = _nerf_config("nerfacto", scale)
    rays = rays or DEFAULT_RAYS[scale]
    model = _construct(device, seed, lambda: NerfactoRenderer(cfg)).to(dtype)
    phases = _nerf_phases(model, cfg, device, rays, seed, cfg["num_train_images"])
    return Built(wl, scale, device, dtype, model, cfg, phases)


def _build_vanilla_nerf(wl, scale, device, dtype, batch, seq_len, *, rays=None, seed=0):
    """Vanilla NeRF (nerfstudio ``NeRFModel`` components, ``VanillaModelConfig`` defaults): two
    NeRFFields (coarse and fine), each positional encoding (10 frequencies for position, 4 for
    direction) -> 8x256 ReLU MLP with a skip at layer 4 -> density head, and a 2x128 head -> RGB;
    64 uniform coarse samples, 128 PDF importance samples (the fine field sees 193: nerfstudio's
    PDF sampler merges 129 new bin edges with the 65 coarse ones), white
    background, near 2 / far 6 (Blender). Root module: :class:`VanillaNeRFRenderer`. Tiny: 3x32 MLP (skip at layer 1),
    16 + 16 samples, 256 rays.

    ``rays`` (default 4096 full, 256 tiny; ``batch`` is unused) random rays from cameras at radius
    4 looking at the scene centre. Phases: ``render`` (no grad) and ``train_step`` (forward, coarse
    + fine RGB MSE to random targets, backward). Float32 only; works on meta and on cpu.
    """
    _check_float32(wl, dtype)
    _ns()  # import nerfstudio outside the device context
    cfg = _nerf_config("vanilla-nerf", scale)
    rays = rays or DEFAULT_RAYS[scale]
    model = _construct(device, seed, lambda: VanillaNeRFRenderer(cfg)).to(dtype)
    phases = _nerf_phases(model, cfg, device, rays, seed, 1)
    return Built(wl, scale, device, dtype, model, cfg, phases)


# --------------------------------------------------------------------------------------------
# DreamFusion (SDS with Stable Diffusion 1.5 guiding a Nerfacto field)
# --------------------------------------------------------------------------------------------
def _camera_rays(batch: int, height: int, width: int, df: dict, device, seed: int):
    """Rays of ``batch`` pinhole cameras looking at the origin, radius and vertical field of view
    drawn from stable-dreamfusion's ranges (drawn on CPU, so meta works too)."""
    ns = _ns()
    fn = torch.nn.functional
    g = torch.Generator().manual_seed(seed)
    r = torch.empty(batch).uniform_(*df["radius_range"], generator=g)
    fovy = torch.deg2rad(torch.empty(batch).uniform_(*df["fovy_range"], generator=g))
    theta = torch.empty(batch).uniform_(math.radians(45), math.radians(105), generator=g)  # polar angle
    phi = torch.empty(batch).uniform_(0, 2 * math.pi, generator=g)
    centres = torch.stack([r * torch.sin(theta) * torch.sin(phi), r * torch.cos(theta),
                           r * torch.sin(theta) * torch.cos(phi)], dim=-1)
    forward = fn.normalize(-centres, dim=-1)
    up = torch.tensor([0.0, 1.0, 0.0]).expand_as(forward)
    right = fn.normalize(torch.cross(forward, up, dim=-1), dim=-1)
    true_up = torch.cross(right, forward, dim=-1)
    ys = torch.linspace(1, -1, height)
    xs = torch.linspace(-1, 1, width) * (width / height)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    tan = torch.tan(fovy / 2)[:, None, None, None]
    dirs = (forward[:, None, None] + tan * (xx[None, ..., None] * right[:, None, None]
                                             + yy[None, ..., None] * true_up[:, None, None]))
    dirs = fn.normalize(dirs, dim=-1).reshape(-1, 3)
    origins = centres[:, None, None].expand(batch, height, width, 3).reshape(-1, 3)
    pixel_area = ((2 * torch.tan(fovy / 2) / height) ** 2)[:, None].expand(batch, height * width).reshape(-1, 1)
    return ns.RayBundle(origins=origins.to(device), directions=dirs.to(device),
                        pixel_area=pixel_area.contiguous().to(device),
                        camera_indices=torch.zeros(batch * height * width, 1, dtype=torch.long, device=device))


def _build_dreamfusion(wl, scale, device, dtype, batch, seq_len, *, latent_mode=None, guidance_scale=None,
                       render_size=None, seed=0):
    """DreamFusion-style text-to-3D step (Poole et al. 2022), as ashawkey/stable-dreamfusion
    implements score distillation sampling (SDS) with Stable Diffusion: root module
    ``nn.ModuleDict(nerf=NerfactoRenderer, vae=AutoencoderKL, unet=UNet2DConditionModel)``, the
    NeRF from nerfacto's config (appearance embedding off: there are no training images) and the
    VAE/UNet from SD 1.5's configs (frozen: ``requires_grad_(False)``). The text encoder is not
    part of the step: stable-dreamfusion encodes the prompt once, so the step takes (random)
    text embeddings.

    Phase ``sds_step`` (backward=True; units: 1 step of ``batch`` views):

    * inputs: a RayBundle of ``batch`` cameras x render_size^2 pixels (64x64 default full,
      16x16 tiny; radius in [1, 1.5], fovy in [40, 70] degrees), text embeddings
      (2*batch, 77, width) ordered [negative, prompt], and a timestep per view drawn from
      [0.02, 0.98] * 1000.
    * run: render the views with the NeRF in train mode (with grad) -> latents, by
      ``latent_mode="vae"`` (default, stable-dreamfusion's main path: bilinear upsample of the
      render to the VAE's image size, 512 at full scale, and ``vae.encode(...).latent_dist.sample()
      * scaling_factor`` with grad through the encoder) or ``latent_mode="interpolate"``
      (stable-dreamfusion's latent mode: RGB + opacity bilinearly resized to the 64x64 latent,
      * 2 - 1) -> under no_grad: add noise at t (DDIM scheduler ``add_noise`` with SD 1.5's betas),
      UNet on the CFG batch of 2*batch, ``eps_hat = uncond + guidance_scale*(cond - uncond)``
      (guidance 100) -> ``grad = w(t) * (eps_hat - noise)`` with ``w(t) = 1 - alphas_cumprod[t]``
      -> ``loss = (grad * latents).sum()`` (stable-dreamfusion's form: its gradient with respect
      to the latents is exactly ``grad``) plus nerfacto's interlevel and distortion losses on the
      proposal weights (as nerfstudio's own DreamFusion, Generfacto, adds them: without them the
      proposal nets get no gradient) -> ``loss.backward()``, which backpropagates the SDS gradient
      through the VAE encoder (in "vae" mode) and the volume renderer into the NeRF's hash grids
      and MLPs.

    ``dtype`` is the Stable Diffusion parts' dtype (fp16 by default on meta/GPU, fp32 on CPU);
    the NeRF always runs in float32, as in stable-dreamfusion's mixed precision. Full scale is
    meant for meta (it runs on cpu too, slowly); tiny runs on cpu in about a second.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    _ns()  # import nerfstudio outside the device context
    df = _repo_json("dreamfusion-sd", "config.json")
    latent_mode = latent_mode or df["latent_mode"]
    if latent_mode not in ("vae", "interpolate"):
        raise CohwError(f"latent_mode must be 'vae' or 'interpolate', got {latent_mode!r}")
    guidance_scale = df["guidance_scale"] if guidance_scale is None else guidance_scale
    render_size = render_size or (df["render_height"] if scale == "full" else 16)
    nerf_cfg = _nerf_config("nerfacto", scale, {"use_appearance_embedding": False})
    te_cfg, unet_cfg, vae_cfg = _sd_parts(scale)
    lat_mult = _vae_scale(vae_cfg)
    lat = unet_cfg["sample_size"]
    image_size = lat * lat_mult

    def make():
        return nn.ModuleDict({
            "nerf": NerfactoRenderer(nerf_cfg),
            "vae": AutoencoderKL.from_config(vae_cfg),
            "unet": UNet2DConditionModel.from_config(unet_cfg),
        })

    model = _construct(device, seed, make)
    for part in ("vae", "unet"):  # nn.Module.to: diffusers' own .to() warns about casting
        nn.Module.to(model[part], dtype).requires_grad_(False).eval()
    nerf, vae, unet = model["nerf"], model["vae"], model["unet"]
    scheduler = DDIMScheduler.from_config(_repo_json("sd-1.5", "scheduler", "scheduler_config.json"))
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    n_train = scheduler.config.num_train_timesteps
    t_min, t_max = int(n_train * df["t_range"][0]), int(n_train * df["t_range"][1])
    scaling = vae.config.scaling_factor
    ctx, width = te_cfg.max_position_embeddings, te_cfg.hidden_size
    H = W = render_size

    def inputs():
        bundle = _camera_rays(batch, H, W, df, device, seed + 1)
        gen = _generator(device, seed + 2)
        emb = _randn((2 * batch, ctx, width), device, dtype, gen)
        t = torch.randint(t_min, t_max + 1, (batch,), generator=torch.Generator().manual_seed(seed + 3)).to(device)
        return (bundle, emb, t), {}

    def sds_step(ray_bundle, text_embeddings, t):
        fn = torch.nn.functional
        nerf.train()
        out = nerf(ray_bundle)
        rgb = out["rgb"].reshape(batch, H, W, 3).permute(0, 3, 1, 2)
        if latent_mode == "vae":
            img = fn.interpolate(rgb, (image_size, image_size), mode="bilinear", align_corners=False)
            latents = vae.encode((2 * img - 1).to(dtype)).latent_dist.sample() * scaling
        else:
            acc = out["accumulation"].reshape(batch, H, W, 1).permute(0, 3, 1, 2)
            x = torch.cat([rgb, acc], dim=1)
            latents = (fn.interpolate(x, (lat, lat), mode="bilinear", align_corners=False) * 2 - 1).to(dtype)
        with torch.no_grad():
            noise = torch.randn_like(latents)
            noisy = scheduler.add_noise(latents, noise, t)
            eps = unet(torch.cat([noisy] * 2), torch.cat([t] * 2), encoder_hidden_states=text_embeddings).sample
            uncond, cond = eps.chunk(2)
            eps_hat = uncond + guidance_scale * (cond - uncond)
            w = (1 - alphas_cumprod[t]).to(latents.dtype)[:, None, None, None]
            grad = torch.nan_to_num(w * (eps_hat - noise))
        loss = (grad * latents).sum() + nerf.proposal_losses(out)
        loss.backward()
        return loss.detach()

    phases = {"sds_step": Phase(
        "sds_step", inputs, sds_step, 1, "step", backward=True,
        description=(f"score distillation: render {batch}x{H}x{W} rays, {latent_mode} -> {lat}x{lat} latent, "
                     f"UNet with CFG batch {2 * batch} (no grad), SDS gradient back into the NeRF"))}
    config = {"dreamfusion": df, "nerf": nerf_cfg, "unet": unet.config, "vae": vae.config,
              "latent_mode": latent_mode, "guidance_scale": guidance_scale, "render_size": render_size}
    return Built(wl, scale, device, dtype, model, config, phases)


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------
_LLAMA_SOURCE = ("Touvron et al., Llama 2: Open Foundation and Fine-Tuned Chat Models, arXiv:2307.09288; "
                 "https://huggingface.co/meta-llama/{}")


def _llama(size: str, note: str) -> Workload:
    repo = f"Llama-2-{size}-hf"
    return _workload(
        f"llama-2-{size}", "llm", f"Llama-2-{size.upper()} decoder LM ({note}), fp16 inference: prefill and decode",
        _LLAMA_SOURCE.format(repo), "transformers", ("prefill", "decode"), torch.float16,
        _build_causal_lm, config_path=CONFIG_DIR / f"llama-2-{size}" / "config.json",
    )


WORKLOADS: dict[str, Workload] = {wl.name: wl for wl in [
    _llama("7b", "32 layers, hidden 4096, 32 heads MHA"),
    _llama("13b", "40 layers, hidden 5120, 40 heads MHA"),
    _llama("70b", "80 layers, hidden 8192, 64 heads with 8 KV heads GQA"),
    _workload(
        "sd-1.5", "diffusion",
        "Stable Diffusion 1.5 text-to-image: CLIP ViT-L/14 text encoder, 860M UNet, KL VAE decoder",
        "Rombach et al., High-Resolution Image Synthesis with Latent Diffusion Models, CVPR 2022; "
        "https://huggingface.co/runwayml/stable-diffusion-v1-5",
        "diffusers", ("text_encoder", "unet_step", "vae_decode"), torch.float16, _build_sd15),
    _workload(
        "vit-b-16", "vision", "ViT-B/16 image classifier, 224x224, 1000 classes",
        "Dosovitskiy et al., An Image is Worth 16x16 Words, ICLR 2021; https://huggingface.co/google/vit-base-patch16-224",
        "transformers", ("forward",), torch.float32, _build_vision, config_name="vit-b-16", tiny=_TINY_VIT),
    _workload(
        "resnet-50", "vision", "ResNet-50 image classifier, 224x224, 1000 classes",
        "He et al., Deep Residual Learning for Image Recognition, CVPR 2016; https://huggingface.co/microsoft/resnet-50",
        "transformers", ("forward",), torch.float32, _build_vision, config_name="resnet-50", tiny=_TINY_RESNET),
    _workload(
        "nerfacto", "nerf", "Nerfacto: hash-grid NeRF with proposal sampling (nerfstudio defaults)",
        "Tancik et al., Nerfstudio: A Modular Framework for Neural Radiance Field Development, SIGGRAPH 2023; "
        "https://github.com/nerfstudio-project/nerfstudio (nerfstudio/models/nerfacto.py)",
        "nerfstudio", ("render", "train_step"), torch.float32, _build_nerfacto),
    _workload(
        "vanilla-nerf", "nerf", "Vanilla NeRF: 8x256 MLP, 64 coarse + 128 fine samples per ray",
        "Mildenhall et al., NeRF: Representing Scenes as Neural Radiance Fields for View Synthesis, ECCV 2020; "
        "https://github.com/nerfstudio-project/nerfstudio (nerfstudio/models/vanilla_nerf.py)",
        "nerfstudio", ("render", "train_step"), torch.float32, _build_vanilla_nerf),
    _workload(
        "dreamfusion-sd", "text-to-3d",
        "DreamFusion-style score distillation step: Nerfacto render -> SD 1.5 VAE/UNet guidance -> backward into the NeRF",
        "Poole et al., DreamFusion: Text-to-3D using 2D Diffusion, arXiv:2209.14988; "
        "https://github.com/ashawkey/stable-dreamfusion (guidance/sd_utils.py)",
        "diffusers", ("sds_step",), torch.float16, _build_dreamfusion),
]}


def list_workloads():
    """The registry as a DataFrame: name, domain, library, phases, source."""
    import pandas as pd

    return pd.DataFrame(
        [{"name": w.name, "domain": w.domain, "library": w.library, "phases": ", ".join(w.phases),
          "source": w.source} for w in WORKLOADS.values()],
        columns=["name", "domain", "library", "phases", "source"],
    )


def _unknown(name: str, why: str = "") -> UnknownWorkloadError:
    return UnknownWorkloadError(
        f"unknown workload '{name}'{why}; known: {', '.join(WORKLOADS)}; "
        "or pass a path to a Hugging Face config.json"
    )


def get_workload(name_or_path) -> Workload:
    """A registered workload by name (case-insensitive), or a decoder-LM workload built from a
    Hugging Face ``config.json`` path (file or folder). Unknown names raise
    :class:`UnknownWorkloadError` listing the known ones; a bad config file raises
    :class:`ConfigError`."""
    if isinstance(name_or_path, Workload):
        return name_or_path
    key = str(name_or_path).strip()
    if key.lower() in WORKLOADS:
        return WORKLOADS[key.lower()]
    path = Path(key).expanduser()
    if path.is_file() or (path.is_dir() and (path / "config.json").is_file()):
        return _hf_path_workload(path)
    if path.is_dir():
        raise _unknown(key, " (a folder with no config.json in it)")
    looks_like_path = key.endswith(".json") or "/" in key or "\\" in key
    raise _unknown(key, " (no such file)" if looks_like_path else "")


def build(name_or_path, scale: str = "full", device="meta", dtype=None, batch: int = 1,
          seq_len: int | None = None, **kw) -> Built:
    """Build a workload: ``get_workload(name_or_path).builder(scale, device, dtype, batch, seq_len, **kw)``.

    ``scale`` "full" (published config; default on ``meta``) or "tiny" (shrunk, for cpu).
    ``dtype=None`` -> the workload's published dtype (fp16 for the LLMs and Stable Diffusion),
    float32 on cpu. ``kw``: workload options (e.g. ``image_size`` for sd-1.5, ``rays`` for the
    NeRFs, ``latent_mode`` for dreamfusion-sd); unknown options raise :class:`CohwError`.
    """
    return get_workload(name_or_path).builder(scale, device, dtype, batch, seq_len, **kw)
