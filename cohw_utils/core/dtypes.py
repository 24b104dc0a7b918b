"""Datatype names: one spelling per dtype across the package, its data files and the CLI.

Short names (``fp32``, ``tf32``, ``bf16``, ``fp16``, ``fp8``, ``int8``, ``int4``...) are the
columns of ``data/hardware.csv`` and the values of ``--dtype``. ``BYTES`` gives storage size
per element; sub-byte formats (int4) are fractional and exclude per-group scales, which the
quantization chapter adds explicitly.
"""
from __future__ import annotations

import torch

from cohw_utils.core.errors import CohwError

BYTES: dict[str, float] = {
    "fp64": 8, "fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int32": 4, "int8": 1,
    "uint8": 1, "int4": 0.5, "int64": 8, "bool": 1,
}

_TORCH_TO_NAME: dict[torch.dtype, str] = {
    torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
    torch.int64: "int64", torch.int32: "int32", torch.int8: "int8", torch.uint8: "uint8",
    torch.bool: "bool",
}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        _TORCH_TO_NAME[getattr(torch, _name)] = "fp8"

_ALIASES: dict[str, str] = {
    "float64": "fp64", "double": "fp64", "float32": "fp32", "float": "fp32", "bfloat16": "bf16",
    "float16": "fp16", "half": "fp16", "float8": "fp8", "float8_e4m3fn": "fp8",
}

_NAME_TO_TORCH: dict[str, torch.dtype] = {
    "fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
}


def dtype_name(dtype: torch.dtype | str) -> str:
    """Short name of a torch dtype or of any accepted spelling (``torch.bfloat16`` -> ``bf16``)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _TORCH_TO_NAME:
            raise CohwError(f"dtype {dtype} has no short name; known: {', '.join(BYTES)}")
        return _TORCH_TO_NAME[dtype]
    key = str(dtype).lower().removeprefix("torch.")
    key = _ALIASES.get(key, key)
    if key not in BYTES:
        raise CohwError(f"unknown dtype '{dtype}'; use one of: {', '.join(BYTES)}")
    return key


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The torch dtype to *build a model in* for a name: fp32, bf16, fp16 (or fp64)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype_name(dtype)
    if name not in _NAME_TO_TORCH:
        raise CohwError(
            f"cannot build a model in dtype '{dtype}'; use one of: {', '.join(_NAME_TO_TORCH)} "
            "(low-bit formats are applied by the quantization chapter, not at build time)")
    return _NAME_TO_TORCH[name]


def bytes_per_element(dtype: torch.dtype | str) -> float:
    """Storage bytes of one element (0.5 for int4)."""
    return BYTES[dtype_name(dtype)]
