"""Which device a chapter runs its live (non-``meta``) code on.

``"auto"`` picks CUDA when ``torch.cuda.is_available()``, else the CPU, so the same notebook
uses a GPU where there is one. Full-scale analysis always runs on ``meta`` regardless.
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
