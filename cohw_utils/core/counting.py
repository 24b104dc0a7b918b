"""Counting formulas that are not polynomials in a shape, torch-free.

The tracer's cost rules (:mod:`cohw_utils.spine.costs`) count most ops as polynomials of their
shapes, which the cost functions of :mod:`cohw_utils.spine.costfn` fit exactly. Comparison sorts
and binary searches are the exceptions (``n log2 n``, ``log2 n`` per query). Each is written once
here, so the rule that counts it in a trace and the cost function that evaluates it at a shape no
trace saw give the same integer.

Used by Chapter 2's op tables (routing sorts of a mixture of experts) and Chapter 4's sweeps.
"""
from __future__ import annotations

import math

import numpy as np


def sort_comparisons(numel: int, n: int, k: int | None = None) -> int:
    """Comparisons a comparison sort (or a top-k) makes: ``log2(min(k, n))`` per element of the
    input, at least one per element, truncated to an integer.

    ``numel`` elements in all, ``n`` along the sorted dimension (``numel / n`` independent rows),
    ``k`` kept per row (``None``: a full sort, ``k = n``). An ``n log2 n`` merge sort of each row
    is ``numel x log2 n``; a heap top-k is ``numel x log2 k``.
    """
    keep = n if k is None else min(k, n)
    return int(numel * max(1.0, math.log2(max(keep, 2))))


def sort_comparisons_array(numel: np.ndarray, n: np.ndarray, k: np.ndarray) -> np.ndarray:
    """:func:`sort_comparisons` over arrays (float64; the scalar function is the exact one)."""
    keep = np.maximum(np.minimum(k, n), 2).astype(float)
    return np.floor(numel * np.maximum(1.0, np.log2(keep)))


def search_comparisons(queries: int, n: int) -> int:
    """Comparisons of a binary search (``searchsorted``): ``ceil(log2 n)`` per query, at least one,
    in a sorted sequence of ``n``."""
    return queries * max(1, math.ceil(math.log2(max(n, 2))))


def search_comparisons_array(queries: np.ndarray, n: np.ndarray) -> np.ndarray:
    """:func:`search_comparisons` over arrays (float64)."""
    return queries * np.maximum(1.0, np.ceil(np.log2(np.maximum(n, 2).astype(float))))
