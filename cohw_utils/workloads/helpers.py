"""Small helpers every workload family shares: the repo's config folder, dtype and device names,
reading the JSON configs kept under ``cohw_utils/data/configs/``, seeded random inputs, and
constructing a model directly on a device (``meta`` included).

Private to :mod:`cohw_utils.workloads` (nothing outside the layer imports it); every family module
(:mod:`~cohw_utils.workloads.llm`, :mod:`~cohw_utils.workloads.diffusion`,
:mod:`~cohw_utils.workloads.vision`, :mod:`~cohw_utils.workloads.nerf`,
:mod:`~cohw_utils.workloads.dreamfusion`) builds with them, so they sit under every workload
Chapters 1-5 build. ``CONFIG_DIR`` is re-exported as ``cohw_utils.workloads.CONFIG_DIR``.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from cohw_utils.core.data import DATA_DIR
from cohw_utils.core.errors import CohwError, ConfigError

CONFIG_DIR = DATA_DIR / "configs"

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64,
}


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
