"""The "decompose the op" dirty fix: aten-level rewrites of ops a converter cannot lower into ops it can.

:data:`DECOMPOSITIONS` maps an aten overload to a Python function built from other aten ops;
:func:`cohw_utils.studies.enabling.export.fix` applies it to an exported program with
``run_decompositions`` and re-converts. Each rewrite computes the same values as the op it
replaces (``tests/test_enabling.py`` compares them with torch's), possibly at a different cost.

Used by Chapter 3 (SW enabling), section "dirty fixes".
"""
from __future__ import annotations

import torch

__all__ = ["DECOMPOSITIONS", "searchsorted_by_comparison"]


def searchsorted_by_comparison(sorted_sequence, self, *, out_int32=False, right=False, side=None, sorter=None):
    """``aten.searchsorted`` as compare-and-count: the index of each value is the number of
    sorted entries below it (``<`` for side="left", ``<=`` for "right").

    ONNX has no binary-search operator. This costs N comparisons per query instead of
    log2(N), but uses only Less/LessOrEqual and ReduceSum, which every runtime has; with NeRF's
    32..256 samples per ray that is cheap next to the field MLPs.
    """
    if sorter is not None:
        sorted_sequence = sorted_sequence.gather(-1, sorter)
    right = right or side == "right"
    s, v = sorted_sequence.unsqueeze(-2), self.unsqueeze(-1)
    below = (s <= v) if right else (s < v)
    return below.sum(-1, dtype=torch.int32 if out_int32 else torch.int64)


DECOMPOSITIONS: dict = {torch.ops.aten.searchsorted.Tensor: searchsorted_by_comparison}
