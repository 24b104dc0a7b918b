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

Any Hugging Face ``config.json`` can also be given as a path instead of a name: decoder LMs
(dense, mixture-of-experts, sliding-window, latent attention), state-space and hybrid models,
encoders, encoder-decoders (text and speech), vision classifiers, dual encoders and
vision-language models (:mod:`~cohw_utils.workloads.families`), and diffusers model configs
(UNet, DiT/MMDiT transformers, VAE: :mod:`~cohw_utils.workloads.diffusers_config`). A family that
cannot be built is refused in one line naming its type and what is supported.

Public API (import it from here; the submodules are the implementation):

* registry (:mod:`~cohw_utils.workloads.registry`): :func:`build`, :func:`get_workload`,
  :func:`list_workloads`, :data:`WORKLOADS`;
* types (:mod:`~cohw_utils.workloads.base`): :class:`Phase`, :class:`Built`, :class:`Workload`,
  and ``SCALES``;
* Hugging Face configs and the KV cache (:mod:`~cohw_utils.workloads.hf_config`):
  :func:`load_hf_config`, :func:`attention_geometry`, :func:`kv_cache_bytes_per_token`,
  :func:`cache_tensors`;
* caches measured from the model's own cache object (:mod:`~cohw_utils.workloads.caches`):
  :func:`measure_cache`, :func:`cache_report`, :class:`CacheReport`; config families
  (:func:`model_family`, ``FAMILIES``); mixture-of-experts parameters (:func:`moe_parameters`,
  :func:`active_parameters`, :mod:`~cohw_utils.workloads.moe`);
* ``CONFIG_DIR`` (the repo's config folder), ``DEFAULT_SEQ_LEN`` (512, the LLM phases' default
  ``seq_len``), ``DEFAULT_RAYS`` (the NeRF phases' default ray counts);
* the NeRF renderers :class:`NerfactoRenderer` and :class:`VanillaNeRFRenderer`
  (:mod:`~cohw_utils.workloads.nerf`).

The families live in :mod:`~cohw_utils.workloads.llm` (Llama-2, any HF decoder config),
:mod:`~cohw_utils.workloads.diffusion` (Stable Diffusion 1.5), :mod:`~cohw_utils.workloads.vision`
(ViT-B/16, ResNet-50), :mod:`~cohw_utils.workloads.nerf` (Nerfacto, vanilla NeRF) and
:mod:`~cohw_utils.workloads.dreamfusion` (SDS text-to-3D), on the shared
:mod:`~cohw_utils.workloads.helpers`.

Used by every chapter (Chapters 1-5 build their models here).
"""
from __future__ import annotations

from cohw_utils.workloads.base import SCALES, Built, Phase, Workload
from cohw_utils.workloads.caches import CacheReport, cache_report, measure_cache
from cohw_utils.workloads.families import FAMILIES, model_family
from cohw_utils.workloads.helpers import CONFIG_DIR
from cohw_utils.workloads.hf_config import (
    attention_geometry, cache_layer_types, cache_tensors, kv_cache_bytes_per_token, load_hf_config, mla_geometry)
from cohw_utils.workloads.llm import DECODE_CACHES, DEFAULT_SEQ_LEN
from cohw_utils.workloads.moe import MoEParameters, active_parameters, moe_parameters
from cohw_utils.workloads.nerf import DEFAULT_RAYS, NerfactoRenderer, VanillaNeRFRenderer
from cohw_utils.workloads.registry import WORKLOADS, build, get_workload, list_workloads

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
    "attention_geometry",
    "cache_layer_types",
    "mla_geometry",
    "measure_cache",
    "cache_report",
    "CacheReport",
    "DECODE_CACHES",
    "FAMILIES",
    "model_family",
    "MoEParameters",
    "moe_parameters",
    "active_parameters",
    "SCALES",
    "DEFAULT_SEQ_LEN",
    "DEFAULT_RAYS",
    "NerfactoRenderer",
    "VanillaNeRFRenderer",
]
