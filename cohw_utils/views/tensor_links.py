"""Which op of an op table produced each tensor another op reads: tensor identity from shapes.

The op table (:mod:`cohw_utils.spine.trace`) records per row the shapes of its tensor inputs
and outputs, its dtype and its bytes, but no tensor identities (no producer row ids). A view
that needs to know whether an activation was written by an earlier op of the same phase (an
intermediate) or comes from outside it (a phase input, a parameter, a cache) approximates
identity here by shape:

* **Producer of an input**: the most recent earlier row that wrote a tensor of the same shape.
  A ``view``-class row (``view``, ``transpose``, ``expand``, ``t``...: no bytes) is no
  producer: its outputs take the producer of its first input, so a reshaped or transposed
  intermediate keeps its origin. An input with no earlier producer of its shape (the phase's
  inputs, parameters other than the weights a caller excludes, a KV cache read from outside
  the phase) gets ``-1``.
* **Consumed**: a row's outputs are read later if some later non-view row reads a tensor of one
  of its output shapes, directly or through views. A row whose outputs nobody reads wrote a
  phase output (logits, a classifier's scores) or something dead.

What that approximates, and where it errs: two different tensors of one shape are not told
apart. A parameter or phase input whose shape equals an earlier intermediate's (ViT's position
embedding, 197 x 768 like the token sequence it is added to) is taken for that intermediate;
an intermediate is counted consumed when any later op reads its shape, even if that read was of
another tensor. Both errors are confined to such coincidences; exact identities would need the
tracer to record storage ids per row.

Each input's share of its row's activation bytes is its nominal size (elements x the row's
element size) over the row's non-excluded inputs together, so a caller can split a row's
``bytes_read`` between inputs of different origins.

Used by Chapter 4.4 (the cache-resident activations of :mod:`cohw_utils.views.energy_model`)
and, through it, Chapter 5's energy what-ifs.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cohw_utils.core.errors import CohwError
from cohw_utils.core.opclasses import VIEW

__all__ = ["TensorLinks", "tensor_links"]


@dataclass(frozen=True)
class TensorLinks:
    """Producer links of one op table (module docstring). One entry per (row, input) pair in
    ``in_row`` / ``in_root`` (producing row, ``-1`` = from outside the phase) / ``in_share``
    (the input's share of its row's nominal input bytes); per row ``consumed`` (an output is
    read later), ``out_nominal`` (nominal bytes of the first output) and ``last_root`` (the
    producer of the last input, ``-1`` if none: the new entries of a cache append)."""

    in_row: np.ndarray
    in_root: np.ndarray
    in_share: np.ndarray
    consumed: np.ndarray
    out_nominal: np.ndarray
    last_root: np.ndarray


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def tensor_links(table: pd.DataFrame, excluded: Sequence[Sequence[int]], esize: Sequence[float]) -> TensorLinks:
    """Producer links of ``table``'s rows; ``excluded[i]`` are input positions of row i left out
    (the weights a caller accounts for itself), ``esize[i]`` its element size in bytes."""
    for col in ("op_class", "input_shapes", "output_shapes"):
        if col not in table.columns:
            raise CohwError(f"not an op table: missing column {col!r}; build it with cohw_utils.spine.trace.trace")
    n = len(table)
    if len(excluded) != n or len(esize) != n:
        raise CohwError(f"tensor_links needs one excluded-list and one element size per row ({n}), "
                        f"got {len(excluded)} and {len(esize)}")
    ins = [tuple(tuple(int(d) for d in s) for s in x) for x in table["input_shapes"]]
    outs = [tuple(tuple(int(d) for d in s) for s in x) for x in table["output_shapes"]]
    is_view = (table["op_class"] == VIEW).to_numpy()
    keep = [[j for j in range(len(ins[i])) if j not in set(excluded[i])] for i in range(n)]

    consumed = np.zeros(n, dtype=bool)
    later: set[tuple[int, ...]] = set()
    for i in range(n - 1, -1, -1):  # backwards: which shapes are read after row i
        read_later = any(o in later for o in outs[i])
        if is_view[i]:
            if read_later and ins[i]:
                later.add(ins[i][0])
            continue
        consumed[i] = read_later
        later.update(ins[i][j] for j in keep[i])

    producer: dict[tuple[int, ...], int] = {}
    in_row, in_root, in_share = [], [], []
    last_root = np.full(n, -1, dtype=int)
    for i in range(n):  # forwards: the latest producer of each shape
        if is_view[i]:
            root = producer.get(ins[i][0], -1) if ins[i] else -1
            for o in outs[i]:
                producer[o] = root
            continue
        sizes = [_numel(ins[i][j]) * float(esize[i]) for j in keep[i]]
        total = sum(sizes)
        if total > 0:
            for j, size in zip(keep[i], sizes):
                in_row.append(i)
                in_root.append(producer.get(ins[i][j], -1))
                in_share.append(size / total)
        if ins[i]:
            last_root[i] = producer.get(ins[i][-1], -1)
        for o in outs[i]:
            producer[o] = i
    out_nominal = np.array([_numel(o[0]) * float(e) if o else 0.0 for o, e in zip(outs, esize)])
    return TensorLinks(np.array(in_row, dtype=int), np.array(in_root, dtype=int),
                       np.array(in_share, dtype=float), consumed, out_nominal, last_root)
