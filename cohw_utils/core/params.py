"""The one parameter count and the one weight-bytes rule.

``count_parameters(model)`` = unique parameter elements: ``model.parameters()`` yields a tied
weight (Llama's shared embedding/LM head, where tied) once, so it counts once; buffers (rotary
tables, BatchNorm statistics) are not parameters. ``trainable=True`` counts only those with
``requires_grad``. Works on ``meta`` models (shapes only).

``parameter_bytes(parameters, dtype)`` = parameters x bytes per element of ``dtype``
(:func:`cohw_utils.core.dtypes.bytes_per_element`: ``int4`` is 0.5 B; group scales of quantized
formats are not included, the quantization study adds them).

Used by every chapter that states a model's size (Chapters 1, 2, 4, 5).
"""
from __future__ import annotations

from typing import Any

import torch

from cohw_utils.core.dtypes import bytes_per_element

__all__ = ["count_parameters", "parameter_bytes"]


def count_parameters(model: torch.nn.Module, trainable: bool = False) -> int:
    """Unique parameter elements of ``model`` (only ``requires_grad`` ones if ``trainable``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def parameter_bytes(parameters: int | torch.nn.Module, dtype: Any) -> float:
    """Bytes of ``parameters`` weights (a count, or a model to count) stored in ``dtype``."""
    n = count_parameters(parameters) if isinstance(parameters, torch.nn.Module) else int(parameters)
    return n * bytes_per_element(dtype)
