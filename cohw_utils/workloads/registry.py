"""The workload registry: :data:`WORKLOADS` (the thirteen proxy workloads, by name: dense, MoE/MLA
and vision-language LLMs, UNet and MMDiT diffusion, ViT and ResNet, NeRFs, Gaussian splatting,
text-to-3D),
:func:`get_workload` (by name, or any Hugging Face or diffusers ``config.json`` path, built by
the family :func:`~cohw_utils.workloads.families.config_workload` picks), :func:`build` and
:func:`list_workloads`.

It is the one module that knows every family (:mod:`~cohw_utils.workloads.llm`,
:mod:`~cohw_utils.workloads.diffusion`, :mod:`~cohw_utils.workloads.vision`,
:mod:`~cohw_utils.workloads.nerf`, :mod:`~cohw_utils.workloads.dreamfusion`,
:mod:`~cohw_utils.workloads.hf_families`, :mod:`~cohw_utils.workloads.diffusers_config`,
:mod:`~cohw_utils.workloads.splatting`); the families never
import it. Chapters 1-5 all build workloads through :func:`build`, re-exported as
``cohw_utils.workloads.build`` with the rest of this module's public names.
"""
from __future__ import annotations

from pathlib import Path

import torch

from cohw_utils.core.data import config_path, kept_configs
from cohw_utils.core.errors import UnknownWorkloadError
from cohw_utils.workloads.base import Built, Workload, _workload
from cohw_utils.workloads.diffusion import _build_sd15
from cohw_utils.workloads.diffusers_config import _build_diffusers
from cohw_utils.workloads.dreamfusion import _build_dreamfusion
from cohw_utils.workloads.families import config_workload
from cohw_utils.workloads.helpers import CONFIG_DIR
from cohw_utils.workloads.llm import _build_causal_lm
from cohw_utils.workloads.hf_families import _build_vision_language
from cohw_utils.workloads.nerf import _build_nerfacto, _build_vanilla_nerf
from cohw_utils.workloads.splatting import SPLAT_WORKLOAD
from cohw_utils.workloads.vision import _TINY_RESNET, _TINY_VIT, _build_vision


_LLAMA_SOURCE = ("Touvron et al., Llama 2: Open Foundation and Fine-Tuned Chat Models, arXiv:2307.09288; "
                 "https://huggingface.co/meta-llama/{}")


# One LLM request = one prefill + one decode step per output token. 338 is the mean output length of
# ShareGPT conversations in the vLLM paper (Kwon et al. 2023, Figure 11: 337.99 tokens), the request mix
# Chapter 4's paging study samples too. An assumption of the proxy set: edit it for your traffic.
LLM_CALLS = {"prefill": 1, "decode": 338}
# One Stable Diffusion 1.5 image, as diffusers' StableDiffusionPipeline makes it by default: the prompt and
# the empty negative prompt each through the text encoder (classifier-free guidance), num_inference_steps=50
# denoising steps (each at twice the batch with guidance: not modelled, the step is traced at the given
# batch), one VAE decode.
SD_CALLS = {"text_encoder": 2, "unet_step": 50, "vae_decode": 1}
# One FLUX.1-dev image, as diffusers' FluxPipeline makes it by default: num_inference_steps=28 steps of the
# transformer (guidance-distilled: true_cfg_scale=1.0, so one pass per step, no negative prompt).
FLUX_CALLS = {"denoise_step": 28}
# One LLaVA answer: the image through the vision tower once, one prefill of image + prompt tokens, decode steps.
VLM_CALLS = {"image_encode": 1, "prefill": 1, "decode": LLM_CALLS["decode"]}


def _llama(size: str, note: str) -> Workload:
    repo = f"Llama-2-{size}-hf"
    return _workload(
        f"llama-2-{size}", "llm", f"Llama-2-{size.upper()} decoder LM ({note}), fp16 inference: prefill and decode",
        _LLAMA_SOURCE.format(repo), "transformers", ("prefill", "decode"), torch.float16,
        _build_causal_lm, config_path=CONFIG_DIR / f"llama-2-{size}" / "config.json", calls_per_request=LLM_CALLS,
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
        "diffusers", ("text_encoder", "unet_step", "vae_decode"), torch.float16, _build_sd15,
        calls_per_request=SD_CALLS),
    _workload(
        "deepseek-v2-lite", "llm",
        "DeepSeek-V2-Lite decoder LM: mixture of experts (64 routed + 2 shared, 6 routed per token) with "
        "multi-head latent attention (a 512-wide compressed KV latent + 64 RoPE dims cached per token), bf16",
        "DeepSeek-AI, DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts Language Model, "
        "arXiv:2405.04434; https://huggingface.co/deepseek-ai/DeepSeek-V2-Lite", "transformers",
        ("prefill", "decode"), torch.bfloat16, _build_causal_lm,
        config_path=CONFIG_DIR / "deepseek-v2-lite" / "config.json", calls_per_request=LLM_CALLS),
    _workload(
        "llava-1.5-7b", "multimodal",
        "LLaVA-1.5-7B vision-language model: CLIP ViT-L/14-336 vision tower, MLP projector, Vicuna-7B (Llama) "
        "decoder; one 336x336 image (576 image tokens) + prompt, then decode",
        "Liu et al., Improved Baselines with Visual Instruction Tuning, CVPR 2024 (arXiv:2310.03744); "
        "https://huggingface.co/llava-hf/llava-1.5-7b-hf", "transformers",
        ("image_encode", "prefill", "decode"), torch.float16, _build_vision_language,
        config_path=CONFIG_DIR / "llava-1.5-7b" / "config.json", calls_per_request=VLM_CALLS),
    _workload(
        "flux.1-dev", "diffusion",
        "FLUX.1-dev text-to-image transformer (MMDiT: 19 double-stream + 38 single-stream blocks, 12B), one "
        "denoising step of a 1024x1024 image (4096 latent tokens) with 512 T5 text tokens, bf16",
        "Black Forest Labs, FLUX.1 (2024), https://huggingface.co/black-forest-labs/FLUX.1-dev; MMDiT: Esser et al., "
        "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis, ICML 2024 (arXiv:2403.03206)",
        "diffusers", ("denoise_step",), torch.bfloat16, _build_diffusers,
        config_path=CONFIG_DIR / "flux.1-dev" / "transformer" / "config.json", calls_per_request=FLUX_CALLS),
    SPLAT_WORKLOAD,
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
        f"unknown workload '{name}'{why}; known: {', '.join(WORKLOADS)}; kept configs: "
        f"{', '.join(c for c in kept_configs() if c not in WORKLOADS)}; or pass a path to a Hugging Face config.json"
    )


def get_workload(name_or_path) -> Workload:
    """A registered workload by name (case-insensitive), or the workload of a config: a path (file
    or folder) or the name of one kept in ``data/configs`` (``qwen3-30b-a3b``): :func:`~cohw_utils.workloads.families.config_workload` picks the family (causal LM,
    SSM, hybrid, seq2seq, speech, encoder, vision, dual encoder, vision-language, diffusers) and
    its phases. Unknown names raise :class:`UnknownWorkloadError` listing the known ones; a bad
    config file, or one no family fits, raises :class:`ConfigError`."""
    if isinstance(name_or_path, Workload):
        return name_or_path
    key = str(name_or_path).strip()
    if key.lower() in WORKLOADS:
        return WORKLOADS[key.lower()]
    found = config_path(key)  # a path, or a config kept in data/configs ("qwen3-30b-a3b")
    if found is not None:
        return config_workload(found)
    path = Path(key).expanduser()
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
