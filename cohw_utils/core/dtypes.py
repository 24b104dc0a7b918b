"""Datatype names: one spelling per dtype across the package, its data files and the CLI.

Short names (``fp32``, ``tf32``, ``bf16``, ``fp16``, ``fp8``, ``int8``, ``int4``...) are the
columns of ``data/hardware.csv`` and the values of ``--dtype``. ``BYTES`` gives storage size
per element; sub-byte formats (int4) are fractional and exclude per-group scales, which the
quantization chapter adds explicitly.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cohw_utils.core.errors import CohwError

if TYPE_CHECKING:
    import torch

BYTES: dict[str, float] = {
    "fp64": 8, "fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int32": 4, "int8": 1,
    "uint8": 1, "int4": 0.5, "int64": 8, "bool": 1,
}

# spellings of every name, torch's own (str(torch.bfloat16) = "torch.bfloat16") included, so that
# naming a dtype needs no torch import (a warm CLI call reads tables, it builds nothing)
_ALIASES: dict[str, str] = {
    "float64": "fp64", "double": "fp64", "float32": "fp32", "float": "fp32", "bfloat16": "bf16",
    "float16": "fp16", "half": "fp16", "float8": "fp8", "float8_e4m3fn": "fp8", "float8_e5m2": "fp8",
}

_BUILD = {"fp64": "float64", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _is_torch_dtype(dtype: Any) -> bool:
    return type(dtype).__module__ == "torch" and type(dtype).__name__ == "dtype"


def dtype_name(dtype: "torch.dtype | str") -> str:
    """Short name of a torch dtype or of any accepted spelling (``torch.bfloat16`` -> ``bf16``)."""
    key = str(dtype).lower().removeprefix("torch.")
    key = _ALIASES.get(key, key)
    if key not in BYTES:
        if _is_torch_dtype(dtype):
            raise CohwError(f"dtype {dtype} has no short name; known: {', '.join(BYTES)}")
        raise CohwError(f"unknown dtype '{dtype}'; use one of: {', '.join(BYTES)}")
    return key


def parse_dtype(dtype: "torch.dtype | str") -> "torch.dtype":
    """The torch dtype to *build a model in* for a name: fp32, bf16, fp16 (or fp64)."""
    if _is_torch_dtype(dtype):
        return dtype  # type: ignore[return-value]
    name = dtype_name(dtype)
    if name not in _BUILD:
        raise CohwError(
            f"cannot build a model in dtype '{dtype}'; use one of: {', '.join(_BUILD)} "
            "(low-bit formats are applied by the quantization chapter, not at build time)")
    import torch

    return getattr(torch, _BUILD[name])


def bytes_per_element(dtype: torch.dtype | str) -> float:
    """Storage bytes of one element (0.5 for int4)."""
    return BYTES[dtype_name(dtype)]
