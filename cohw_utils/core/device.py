"""Which device a chapter runs its live (non-``meta``) code on.

``"auto"`` picks CUDA when ``torch.cuda.is_available()``, else the CPU, so the same notebook
uses a GPU where there is one. Full-scale analysis always runs on ``meta`` regardless.

:func:`cpu_has_native_bf16` says whether this CPU computes bfloat16 in hardware (AVX512-BF16 or
AMX, as oneDNN detects them). Without it, torch emulates bf16 GEMMs at a few GFLOP/s, some 100x
below fp32 on the same cores, so code that runs bf16 on the CPU for speed (the quantization
chapter's training) asks first.

Used by every chapter with live code (its ``DEVICE`` parameter).
"""
from __future__ import annotations

import torch

from cohw_utils.core.errors import CohwError

CHOICES = ("auto", "cpu", "cuda", "meta")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` / ``cpu`` / ``cuda[:N]`` / ``meta`` -> a torch.device, with a clear error."""
    if isinstance(name, torch.device):
        return name
    key = str(name).strip().lower()
    if key == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if key.split(":")[0] not in CHOICES[1:]:
        raise CohwError(f"unknown device '{name}'; use one of {', '.join(CHOICES)}")
    if key.startswith("cuda") and not torch.cuda.is_available():
        raise CohwError(f"device '{name}' asked for, but torch sees no CUDA GPU; use 'auto' or 'cpu'")
    return torch.device(key)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has native bfloat16 arithmetic (oneDNN's own check: AVX512-BF16/AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False
