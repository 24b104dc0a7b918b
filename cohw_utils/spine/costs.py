"""Cost rules: what one aten op costs in FLOPs, MACs and bytes.

This module is the single statement of the book's counting semantics. Every chapter links
here rather than restating it.

Counting semantics
------------------
* **FLOPs = 2 x MACs** for tensor contractions (mm, addmm, bmm, baddbmm, convolution and its
  backward, scaled-dot-product attention in all its fused variants). The contraction formulas
  are torch's own (``torch.utils.flop_counter.flop_registry``); we do not re-derive them. A
  bias add fused into ``addmm``/``baddbmm``/convolution is not counted, as torch does not.
* **Attention: two FLOP columns.** ``flops`` counts attention *full*, by torch's formula
  (``4 * B * H * Tq * Tk * D`` for QK^T and PV, causal or not), so it compares with
  FlopCounterMode and fvcore. ``flops_effective`` is the work a causal / sliding-window flash
  kernel does, skipping the masked part: the Tq queries sit at absolute positions
  ``Tk-Tq .. Tk-1`` (the query block is the last Tq of the Tk keys: prefill Tq = Tk, decode
  Tq = 1, chunked prefill in between); query i attends ``min(pos_i + 1, W)`` keys when causal
  with window W (W = infinity for full causal) and all Tk keys when not causal, so
  ``flops_effective = flops * sum_i(keys_i) / (Tq * Tk)`` (:func:`attended_keys`). Causal
  prefill is thus ``(T + 1) / (2 T)`` of the full count. On every row that is not one fused
  attention call (:data:`ATTENTION_OPS`, the tracer's ``aten.scaled_dot_product_attention`` row
  on meta) ``flops_effective == flops``; so is the CPU *math* path (explicit bmm rows), which
  does compute the masked scores. Whether a call is causal, and its window, is read by the
  tracer: (1) the call's ``is_causal=True``: causal, no window, with torch's alignment (query i
  attends ``min(i + 1, Tk)`` keys; the same as above when Tq = Tk, which is the only case in
  which transformers passes it); (2) an explicit mask tensor (what transformers passes; its
  values do not exist on meta): the calling attention module's ``is_causal`` and
  ``sliding_window`` attributes, or ``module.config.sliding_window`` for modules that pass the
  window as an argument (Mistral, Phi-3), via
  :func:`cohw_utils.spine.trace.module_causality`; **a module with no
  ``is_causal`` attribute counts as not causal** (effective = counted); a mask whose query
  dimension is 1 while Tq > 1 is one decode token with its query heads packed into the query
  dimension (transformers' ``pack_gqa``), each row at position Tk - 1; (3) neither: the call
  computes full attention and counts full. Masks that are neither causal nor a window
  (padding, bidirectional image tokens, Llama-4 chunks) are taken as the module says; a static
  cache handed to attention whole (Tk = its maximum length) counts every slot as a key; a real
  kernel computes whole tiles on the diagonal, slightly more than this exact count. Softmax
  inside a fused attention kernel is not counted separately.
* **Element-wise ops** (every op torch tags ``pointwise``: add, mul, gelu, silu, exp, rsqrt,
  where, ...) cost **1 FLOP per output element**, whatever the function. A transcendental such
  as ``exp`` takes many instructions on real hardware; counting it as one keeps the count
  comparable to fvcore and to analytic models. MACs = 0.
* **Reductions** (ops tagged ``reduction``: sum, mean, amax, var, ...) and scans (cumsum,
  cumprod) cost **1 FLOP per input element**.
* **Normalizations**: layer norm 5 FLOPs per element (mean, subtract, square, variance sum,
  scale) plus 1 each for an affine weight and bias; group norm and batch norm the same;
  softmax and log-softmax 5 per element (max, subtract, exp, sum, divide); their backward ops
  count the same per element. Element-wise ops issued from inside a module whose class name
  contains ``Norm`` (e.g. ``LlamaRMSNorm``, written as pow/mean/rsqrt/mul) are classed as
  *normalization* by the tracer, so the class shares follow Ivanov et al.
* **Sorting and search** (class ``other``): sort/argsort n log2 n comparisons per row,
  topk/kthvalue n log2 k, searchsorted ceil(log2 n) per query; each comparison counts 1 FLOP.
* **Data movement** (copy, clone, cat, stack, pad, gather, scatter) costs 0 FLOPs, except the
  accumulating scatters (``scatter_add``, ``scatter_reduce``, ``index_add``,
  ``index_put(accumulate=True)``, ``_unsafe_index_put(accumulate=True)``,
  ``embedding_dense_backward``) and ``_embedding_bag``: **1 FLOP per source element** added.
  Their bytes, with S = the trace's ``sector_bytes`` (default 32, NVIDIA's DRAM transaction
  size; per chip ``Hardware.sector_bytes``, 64 for a CPU cache line):

  - **Gathers** (``embedding``, ``index_select``, ``index``/``_unsafe_index`` of whole rows,
    ``_embedding_bag``; ``gather``, ``take``, ``take_along_dim`` of single elements) fetch n
    contiguous runs of r bytes (a row: the source's elements after the gathered dimension, as
    far as they are contiguous in memory; one element for ``gather``) and **read
    ``n * ceil(r / S) * S`` bytes plus the index bytes**, writing their output. No reuse is
    assumed and there is no cap: every fetch pays its sectors even when indices repeat. So this
    is exact for random access into a table much larger than the cache, and an upper bound when
    indices repeat, the table stays in cache (a coarse hash-grid level) or neighbouring fetches
    share a sector (sorted indices). Runs are taken to start on a sector boundary (a row whose
    bytes are a multiple of S does; a misaligned run can touch one sector more). A hash-grid
    lookup of 2 fp32 features (8 bytes) reads 32.
  - **In-place scatters** (``index_copy_``, ``index_put_``, ``scatter_``, ``index_add_``,
    ``scatter_add_``, ``index_fill_``; and ``copy_``/``fill_``/``zero_`` into a view of a larger
    tensor) **write only the region they touch**, in sectors (n runs of r bytes, as for
    gathers), and read the index and the source; the accumulating ones also read the region
    (read-modify-write). The rest of the destination is not touched, so a static KV cache
    written at one position (transformers 5.24 ``StaticCache.update``:
    ``keys.index_copy_(2, cache_position, key_states)``) costs one token's K/V, exactly.
  - **Out-of-place scatters** (``scatter``, ``scatter_add``, ``scatter_reduce``, ``index_add``,
    ``index_copy``, ``index_fill``, ``index_put``, ``_unsafe_index_put``, ``slice_scatter``,
    ``select_scatter``, ``as_strided_scatter``) return a new tensor: as eager runs them, they
    **copy the destination** (read it, write the output) and then pay the in-place cost;
    ``embedding_dense_backward`` writes its zero-filled output, then scatters into it.
  - ``masked_select`` and ``nonzero`` scan their whole input (the default rule).
* **Views** (view, reshape-as-view, transpose, permute, expand, slice, select, squeeze,
  detach, ...) cost 0 FLOPs and **0 bytes**: they change metadata only. Their class is
  ``view`` so summaries can drop them.
* **Creation** ops (no tensor input: empty, zeros, arange, randn, ...; and the ``*_like`` /
  ``new_*`` ops, whose input only gives a shape) cost 0 FLOPs, read nothing and write their
  output. Class ``other``.
* **Losses**: mse/l1/smooth-l1/binary cross-entropy and their backward 3 FLOPs per input
  element; nll_loss 1 per output element.
* **Bytes** are DRAM traffic under unfused, eager execution with no reuse between ops: every op
  reads each tensor input from main memory and writes each output back. A tensor's bytes are its
  *distinct* elements times the element size, so a broadcast (stride-0) input counts once.
  Where this is exact and where an upper bound:

  - **exact**: views (0 bytes: metadata only); in-place writes of one region (only the region,
    in sectors); gathers rounded to sectors, under no reuse; an op run alone on dense tensors
    (its compulsory traffic: what an ideal kernel for that op moves).
  - **an upper bound** across ops: a fusing compiler keeps intermediates on chip, and a cache
    holds a tensor read twice (weights re-read by a second op, a table whose gathered rows
    repeat); and for gathers/scatters whose indices repeat or hit in cache.
  - **not counted**: traffic inside one kernel beyond its compulsory bytes (GEMM tiles re-read
    when they do not fit on chip, K/V re-read per query block in flash attention), and the
    partial sector at the end of a dense tensor.
* **Arithmetic intensity** = FLOPs / (bytes read + bytes written), in FLOP per byte.

An op that matches none of these rules is **uncosted**: the tracer records it with NaN costs
and lists it in the summary (or raises :class:`~cohw_utils.core.errors.UncostedOpError` with
``strict=True``). Add a rule with :func:`register_cost`.

Operator classes: ``contraction``, ``normalization``, ``element-wise``, ``data movement``,
``view``, ``other``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry as _TORCH_FLOP_REGISTRY
from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

from cohw_utils.hardware.specs import DEFAULT_SECTOR_BYTES

aten = torch.ops.aten
OpPacket = torch._ops.OpOverloadPacket

# the class names live in core (torch-free) and are re-exported here, where the rules assign them
from cohw_utils.core.counting import search_comparisons, sort_comparisons  # noqa: E402
from cohw_utils.core.opclasses import (COMMUNICATION, CONTRACTION, DATA_MOVEMENT, ELEMENTWISE,  # noqa: E402,F401
                                       NORMALIZATION, OP_CLASSES, OTHER, VIEW)


@dataclass(frozen=True)
class OpCost:
    """Cost of one executed op: ints, never NaN. ``flops_effective`` None means "= flops"
    (every op but a fused attention call, whose effective count the tracer sets)."""

    op_class: str
    flops: int
    macs: int
    bytes_read: int
    bytes_written: int
    flops_effective: int | None = None


# A rule maps (args, kwargs, out) to (op_class, flops, macs, bytes_read or None[, bytes_written]).
# bytes_read None means "the default: distinct bytes of every tensor input"; without a fifth
# item, bytes_written is the distinct bytes of every output.
Rule = Callable[..., tuple]
_RULES: dict[OpPacket, Rule] = {}


def register_cost(ops: OpPacket | list[OpPacket], rule: Rule) -> None:
    """Register (or replace) the cost rule for one or more aten op packets.

    ``rule(args, kwargs, out)`` returns ``(op_class, flops, macs, bytes_read)`` or
    ``(op_class, flops, macs, bytes_read, bytes_written)``; ``bytes_read=None`` keeps the default
    (distinct bytes of every tensor input), and without ``bytes_written`` it is the distinct
    bytes of every output. A rule that needs the sector size is marked ``rule.sector_bytes =
    True`` and is then called with ``sector_bytes=`` as well.
    """
    for op in ops if isinstance(ops, list) else [ops]:
        _RULES[op] = rule


# ---------------------------------------------------------------------------- tensor helpers
def tensor_bytes(t: torch.Tensor) -> int:
    """Distinct bytes a tensor addresses: elements along stride-0 (broadcast) dims count once."""
    if t.numel() == 0:
        return 0
    try:
        n = 1
        for size, stride in zip(t.shape, t.stride()):
            if stride != 0:
                n *= size
    except RuntimeError:  # sparse / nested tensors have no strides
        n = t.numel()
    return n * t.element_size()


def tensors(tree: Any) -> list[torch.Tensor]:
    """All tensors in a nested structure of args/kwargs/outputs."""
    return [x for x in tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _numel_out(out: Any) -> int:
    return sum(t.numel() for t in tensors(out))


def _numel_first_in(args: tuple) -> int:
    ts = tensors(args)
    return ts[0].numel() if ts else 0


# ---------------------------------------------------------------------------- rule builders
def _contraction_from_torch(formula: Callable) -> Rule:
    def rule(args, kwargs, out):
        flops = int(formula(*args, **kwargs, out_val=out))
        return CONTRACTION, flops, flops // 2, None

    return rule


def _per_out_element(op_class: str, flops_per_element: int) -> Rule:
    def rule(args, kwargs, out):
        return op_class, flops_per_element * _numel_out(out), 0, None

    return rule


def _per_in_element(op_class: str, flops_per_element: int) -> Rule:
    def rule(args, kwargs, out):
        return op_class, flops_per_element * _numel_first_in(args), 0, None

    return rule


def _free(op_class: str) -> Rule:
    def rule(args, kwargs, out):
        return op_class, 0, 0, None

    return rule


def _layer_norm(args, kwargs, out):
    # native_layer_norm(input, normalized_shape, weight, bias, eps)
    affine = sum(1 for a in args[2:4] if isinstance(a, torch.Tensor))
    return NORMALIZATION, (5 + affine) * args[0].numel(), 0, None


def _group_or_batch_norm(args, kwargs, out):
    # native_group_norm(input, weight, bias, ...), native_batch_norm(input, weight, bias, ...)
    affine = sum(1 for a in args[1:3] if isinstance(a, torch.Tensor))
    return NORMALIZATION, (5 + affine) * args[0].numel(), 0, None


def _sdpa_fused(args, kwargs, out):
    # (query, key, value, ...): full attention, as torch's formula
    q, k, v = args[:3]
    flops = int(sdpa_flop_count(q.shape, k.shape, v.shape))
    return CONTRACTION, flops, flops // 2, None


def _sdpa_fused_backward(args, kwargs, out):
    # (grad_out, query, key, value, ...)
    g, q, k, v = args[:4]
    flops = int(sdpa_backward_flop_count(g.shape, q.shape, k.shape, v.shape))
    return CONTRACTION, flops, flops // 2, None


def _searchsorted(args, kwargs, out):
    # binary search: ceil(log2(n)) comparisons per query
    seq = args[0]
    n = seq.shape[-1] if isinstance(seq, torch.Tensor) and seq.dim() else 1
    return OTHER, search_comparisons(_numel_out(out), n), 0, None


_SORT_DIM_ARG = {"sort": 1, "argsort": 1, "msort": None, "topk": 2, "kthvalue": 2}


def _sort_rule(name: str) -> Rule:
    """Comparison sorts: n log2 n comparisons per sorted row (topk/kthvalue: n log2 k)."""

    def rule(args, kwargs, out):
        x = args[0]
        if not isinstance(x, torch.Tensor) or x.numel() == 0:
            return OTHER, 0, 0, None
        pos = _SORT_DIM_ARG[name]
        dim = args[pos] if pos is not None and len(args) > pos else kwargs.get("dim", -1 if pos else 0)
        n = x.shape[dim] if x.dim() else 1
        k = args[1] if name in ("topk", "kthvalue") and len(args) > 1 else n
        return OTHER, sort_comparisons(x.numel(), n, k), 0, None

    return rule


def _matmul_like(m: int, n: int, k: int, batch: int = 1) -> tuple[int, int]:
    macs = batch * m * n * k
    return 2 * macs, macs


def _mv(args, kwargs, out):  # mv(mat [m,k], vec [k]) / addmv(bias, mat, vec)
    mat = args[0] if args[0].dim() == 2 else args[1]
    flops, macs = _matmul_like(mat.shape[0], 1, mat.shape[1])
    return CONTRACTION, flops, macs, None


def _dot(args, kwargs, out):
    flops, macs = _matmul_like(1, 1, args[0].numel())
    return CONTRACTION, flops, macs, None


def _int_mm(args, kwargs, out):  # _int_mm(a [m,k] int8, b [k,n] int8) -> int32
    a, b = args[:2]
    flops, macs = _matmul_like(a.shape[0], b.shape[1], a.shape[1])
    return CONTRACTION, flops, macs, None


def _grouped_mm(args, kwargs, out):
    # _grouped_mm(a, b, offs): one GEMM per group (mixture-of-experts experts). a (M, K) with
    # b (G, K, N) routes each of the M rows to one group: 2*M*N*K. 3D x 3D is a batched GEMM.
    # 2D x 2D with a 3D output splits K across groups (the weight gradient): 2*M*N*K_total.
    # Bytes: with M rows routed over G groups at most min(G, M) groups hold rows, and a grouped
    # kernel reads only their weights (2 experts per token at batch-1 decode, not all 8).
    a, b = args[0], args[1]
    o = tensors(out)[0]
    k = a.shape[-1]
    rows_x_cols = o.numel() // o.shape[0] if a.dim() == 2 and b.dim() == 2 and o.dim() == 3 else o.numel()
    macs = rows_x_cols * k
    read = None
    if a.dim() == 2 and b.dim() == 3:
        groups = b.shape[0]
        others = sum(tensor_bytes(t) for t in tensors((args[2:], kwargs)))
        read = tensor_bytes(a) + tensor_bytes(b) * min(groups, a.shape[0]) // groups + others
    return CONTRACTION, 2 * macs, macs, read


def _weight_packed_mm(args, kwargs, out):  # _weight_int8pack_mm / _weight_int4pack_mm(x [m,k], w, ...)
    x = args[0]
    m, k = x.numel() // x.shape[-1], x.shape[-1]
    n = tensors(out)[0].shape[-1]
    flops, macs = _matmul_like(m, n, k)
    return CONTRACTION, flops, macs, None


# ---------------------------------------------------------------------------- the registry
def _ops(*names: str) -> list[OpPacket]:
    """Op packets by name, skipping ones this torch build lacks."""
    return [getattr(aten, n) for n in names if hasattr(aten, n)]


for _op, _formula in _TORCH_FLOP_REGISTRY.items():
    if isinstance(_op, OpPacket):
        register_cost(_op, _contraction_from_torch(_formula))

register_cost(_ops("_scaled_dot_product_flash_attention_for_cpu",
                   "_scaled_dot_product_fused_attention_overrideable"), _sdpa_fused)
register_cost(_ops("_scaled_dot_product_flash_attention_for_cpu_backward",
                   "_scaled_dot_product_fused_attention_overrideable_backward"), _sdpa_fused_backward)
register_cost(_ops("mv", "addmv"), _mv)
register_cost(_ops("dot", "vdot"), _dot)
register_cost(_ops("_int_mm"), _int_mm)
register_cost(_ops("_grouped_mm", "_scaled_grouped_mm"), _grouped_mm)
register_cost(_ops("_weight_int8pack_mm", "_weight_int4pack_mm", "_weight_int4pack_mm_for_cpu"),
              _weight_packed_mm)

register_cost(_ops("native_layer_norm", "native_layer_norm_backward"), _layer_norm)
register_cost(_ops("native_group_norm", "native_batch_norm", "_native_batch_norm_legit",
                   "_native_batch_norm_legit_no_training", "_native_batch_norm_legit_functional"),
              _group_or_batch_norm)
register_cost(_ops("native_group_norm_backward", "native_batch_norm_backward"),
              _per_in_element(NORMALIZATION, 5))
register_cost(_ops("_softmax", "_log_softmax", "_safe_softmax"), _per_in_element(NORMALIZATION, 5))
register_cost(_ops("_softmax_backward_data", "_log_softmax_backward_data"), _per_out_element(NORMALIZATION, 5))

register_cost(_ops("cumsum", "cumprod", "logcumsumexp"), _per_in_element(ELEMENTWISE, 1))
# Element-wise ops torch does not tag pointwise.
register_cost(_ops("floor_divide", "remainder", "fmod", "masked_fill", "masked_fill_", "polar"),
              _per_out_element(ELEMENTWISE, 1))
register_cost(_ops("histc", "bincount", "histogram"), _per_in_element(OTHER, 1))
register_cost(_ops("searchsorted", "bucketize"), _searchsorted)
for _name in _SORT_DIM_ARG:
    register_cost(_ops(_name), _sort_rule(_name))

register_cost(_ops("clone", "_to_copy", "contiguous", "cat", "stack", "constant_pad_nd",
                   "reflection_pad2d", "replicate_pad2d", "repeat", "repeat_interleave", "roll",
                   "flip", "masked_scatter", "masked_select", "nonzero", "tril", "triu",
                   "upsample_nearest2d", "upsample_nearest2d_backward", "lift_fresh_copy",
                   "split_with_sizes_copy", "unbind_copy", "narrow_copy", "resize_", "set_"),
              _free(DATA_MOVEMENT))
# Bilinear/bicubic resampling does arithmetic per output element (4 or 16 taps): count the taps.
register_cost(_ops("upsample_bilinear2d", "_upsample_bilinear2d_aa", "grid_sampler_2d",
                   "grid_sampler_3d"), _per_out_element(ELEMENTWISE, 8))
register_cost(_ops("_unsafe_view", "lift_fresh", "alias", "detach", "_reshape_alias",
                   "view_as_real", "view_as_complex", "_local_scalar_dense", "item"), _free(VIEW))
register_cost(_ops("max_pool2d_with_indices", "avg_pool2d", "adaptive_avg_pool2d",
                   "_adaptive_avg_pool2d", "max_pool2d_with_indices_backward",
                   "avg_pool2d_backward", "_adaptive_avg_pool2d_backward"),
              _per_in_element(ELEMENTWISE, 1))
register_cost(_ops("_fused_adam", "_fused_adamw"), _per_out_element(ELEMENTWISE, 12))


# Dropout (Chapter 4.3): on CPU, F.dropout in training is empty_like + bernoulli_ (the random
# mask, 1 FLOP per element) + div_ + mul; native_dropout (GPU) draws mask and output at once.
register_cost(_ops("bernoulli_", "native_dropout", "native_dropout_backward"),
              _per_out_element(ELEMENTWISE, 1))


def _creation(args, kwargs, out):
    # zeros_like/new_zeros/randn_like...: the input only gives a shape; nothing is read.
    return OTHER, 0, 0, 0


register_cost(_ops("empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like",
                   "randint_like", "new_empty", "new_zeros", "new_ones", "new_full",
                   "new_empty_strided", "empty_strided", "bernoulli"), _creation)
# Gradient of a slice/select/index: a zero tensor with the incoming gradient copied in.
register_cost(_ops("select_backward", "slice_backward", "index_select_backward",
                   "expand_backward", "as_strided_backward", "diagonal_backward"), _free(DATA_MOVEMENT))
# mse_loss: subtract, square, sum per element (+ a final divide); its backward likewise.
register_cost(_ops("mse_loss", "mse_loss_backward", "l1_loss", "smooth_l1_loss",
                   "smooth_l1_loss_backward", "binary_cross_entropy",
                   "binary_cross_entropy_backward"), _per_in_element(ELEMENTWISE, 3))
# Activation gradients torch does not tag pointwise: 1 FLOP per output element, like forward.
register_cost(_ops("softplus_backward", "elu_backward", "leaky_relu_backward", "hardtanh_backward",
                   "hardswish_backward", "hardsigmoid_backward", "mish_backward",
                   "log_sigmoid_backward", "log_sigmoid_forward"), _per_out_element(ELEMENTWISE, 1))
register_cost(_ops("nll_loss_forward", "nll_loss_backward", "nll_loss2d_forward"),
              _per_out_element(ELEMENTWISE, 1))
register_cost(_ops("upsample_bilinear2d_backward", "_upsample_bilinear2d_aa_backward",
                   "grid_sampler_2d_backward", "grid_sampler_3d_backward"), _per_in_element(ELEMENTWISE, 8))


# ---------------------------------------------------------------------------- gathers, scatters
# Sector arithmetic is written by hand: no library states DRAM traffic of a gather from shapes.
# Collectives (torch.distributed's ops, as a sharded model issues them): no FLOPs; bytes = buffers read and written;
# time is the link's (views.collectives); waiting on or wrapping a result is free (its op exists once imported):
import torch.distributed._functional_collectives  # noqa: E402,F401
_COMM = {("_c10d_functional", COMMUNICATION): "all_reduce all_reduce_ all_reduce_coalesced all_reduce_coalesced_ "
         "all_gather_into_tensor all_gather_into_tensor_coalesced all_gather_into_tensor_out reduce_scatter_tensor "
         "reduce_scatter_tensor_coalesced reduce_scatter_tensor_out all_to_all_single broadcast broadcast_ isend irecv",
         ("c10d", COMMUNICATION): "allreduce_ allreduce_coalesced_ allgather_ _allgather_base_ alltoall_ alltoall_base_ "
         "allgather_into_tensor_coalesced_ reduce_scatter_ _reduce_scatter_base_ broadcast_ send recv_ reduce_ gather_ scatter_",
         ("_c10d_functional", VIEW): "wait_tensor _wrap_tensor_autograd"}
for (_ns, _class), _names in _COMM.items():
    if _found := [getattr(getattr(torch.ops, _ns), n) for n in _names.split() if hasattr(getattr(torch.ops, _ns), n)]:
        register_cost(_found, _free(_class))


def sector_rounded_bytes(runs: int, run_bytes: int, sector_bytes: int) -> int:
    """Bytes moved by ``runs`` separate contiguous runs of ``run_bytes`` each, when memory moves
    in whole sectors of ``sector_bytes`` and each run starts on a sector boundary:
    ``runs * ceil(run_bytes / sector_bytes) * sector_bytes``."""
    if runs <= 0 or run_bytes <= 0:
        return 0
    return runs * -(-run_bytes // sector_bytes) * sector_bytes


def _run_elems(shape: tuple, stride: tuple, start: int = 0) -> int:
    """Elements in one contiguous run of a strided region: the longest dense suffix of its dims
    from ``start`` on (size-1 dims are skipped; a non-unit last stride gives runs of 1)."""
    run, expected = 1, 1
    for size, st in zip(reversed(shape[start:]), reversed(stride[start:])):
        if size == 1:
            continue
        if st != expected:
            break
        run *= size
        expected *= size
    return run


def _sectors(elements: int, run: int, elt: int, sector_bytes: int) -> int:
    """Sector-rounded bytes of ``elements`` touched in runs of ``run`` elements."""
    return sector_rounded_bytes(-(-elements // max(run, 1)), max(run, 1) * elt, sector_bytes)


def _dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _index_tensors(indices: Any) -> list[torch.Tensor]:
    return [t for t in (indices or []) if isinstance(t, torch.Tensor)]


def _indexed_region(src: torch.Tensor, indices: list) -> tuple[int, int]:
    """(elements, run elements) an advanced index ``src[indices]`` touches. A bool mask counts
    as if every element were selected (an upper bound: its values are unknown on meta)."""
    last, idx_shapes, covered = -1, [], set()
    pos = 0
    for t in indices:
        if isinstance(t, torch.Tensor):
            span = t.dim() if t.dtype == torch.bool else 1
            covered.update(range(pos, pos + span))
            idx_shapes.append(t.shape if t.dtype != torch.bool else (t.numel(),))
            last = pos + span - 1
            pos += span
        else:
            pos += 1
    picked = math.prod(torch.broadcast_shapes(*idx_shapes)) if idx_shapes else 1
    rest = math.prod(s for d, s in enumerate(src.shape) if d not in covered)
    return picked * rest, _run_elems(tuple(src.shape), tuple(src.stride()), last + 1)


def _gather_rule(table_arg: int, index_args: tuple[int, ...], rows: Callable | None) -> Rule:
    """A gather from ``args[table_arg]``: runs of ``rows(args)`` elements (None: single elements)."""

    def rule(args, kwargs, out, sector_bytes):
        table = args[table_arg]
        index = sum(tensor_bytes(t) for i in index_args if i < len(args) for t in tensors(args[i]))
        fetched = tensors(out)[0].numel()
        run = rows(args) if rows is not None else 1
        return DATA_MOVEMENT, 0, 0, index + _sectors(fetched, run, table.element_size(), sector_bytes)

    rule.sector_bytes = True
    return rule


def _after(t: torch.Tensor, dim: int) -> int:
    return _run_elems(tuple(t.shape), tuple(t.stride()), _dim(dim, t.dim()) + 1)


def _embedding_bag(args, kwargs, out, sector_bytes):
    # _embedding_bag(weight, indices, offsets, ..., per_sample_weights, ...): fetch one row per
    # index and add it into its bag: 1 FLOP per fetched element.
    weight, indices = args[0], args[1]
    run = _after(weight, 0)
    others = sum(tensor_bytes(t) for t in tensors((args[1:], kwargs)))
    fetched = indices.numel() * weight.numel() // max(weight.shape[0], 1)
    return (DATA_MOVEMENT, fetched, 0,
            others + _sectors(fetched, run, weight.element_size(), sector_bytes))


_embedding_bag.sector_bytes = True


def _scatter_cost(dst, out, region: int, run: int, source_bytes: int, accumulate: bool,
                  sector_bytes: int) -> tuple:
    """A write of ``region`` elements (runs of ``run``) into ``dst`` after reading
    ``source_bytes`` (index + source); accumulating: 1 FLOP per element and the region read too
    (read-modify-write). An out-of-place op first copies the destination (read it, write out)."""
    touched = _sectors(region, run, dst.element_size(), sector_bytes)
    read = source_bytes + (touched if accumulate else 0)
    written = touched
    if not any(t is dst for t in tensors(out)):  # out of place: a new tensor
        read += tensor_bytes(dst)
        written += sum(tensor_bytes(t) for t in tensors(out))
    return DATA_MOVEMENT, region if accumulate else 0, 0, read, written


def _scatter_rule(func_name: str) -> Rule:
    # scatter(self, dim, index, src|value[, reduce]), scatter_add, scatter_reduce(..., reduce,
    # include_self): element-wise writes at index positions; the source read is index-shaped.
    def rule(args, kwargs, out, sector_bytes):
        dst, index = args[0], args[2]
        src = args[3] if len(args) > 3 and isinstance(args[3], torch.Tensor) else None
        n = index.numel()
        used = min(tensor_bytes(src), n * src.element_size()) if src is not None else 0
        accumulate = func_name != "scatter" or "reduce" in kwargs
        return _scatter_cost(dst, out, n, 1, tensor_bytes(index) + used, accumulate, sector_bytes)

    rule.sector_bytes = True
    return rule


def _index_dim_rule(kind: str) -> Rule:
    # index_add(self, dim, index, source, alpha) / index_copy(self, dim, index, source) /
    # index_fill(self, dim, index, value): whole slices along ``dim`` at the indexed positions.
    def rule(args, kwargs, out, sector_bytes):
        dst, dim, index = args[0], args[1], args[2]
        d = _dim(dim, dst.dim())
        region = index.numel() * dst.numel() // max(dst.shape[d], 1) if dst.dim() else index.numel()
        sources = sum(tensor_bytes(t) for t in tensors(args[2:]) if t is not dst)
        return _scatter_cost(dst, out, region, _after(dst, d), sources, kind == "add", sector_bytes)

    rule.sector_bytes = True
    return rule


def _index_put(args, kwargs, out, sector_bytes):
    # index_put(self, indices, values, accumulate=False): the advanced-index region of self.
    dst, indices, values = args[0], args[1], args[2]
    accumulate = bool(args[3] if len(args) > 3 else kwargs.get("accumulate", False))
    region, run = _indexed_region(dst, list(indices))
    sources = sum(tensor_bytes(t) for t in _index_tensors(indices) + [values])
    return _scatter_cost(dst, out, region, run, sources, accumulate, sector_bytes)


_index_put.sector_bytes = True


def _region_write(view: torch.Tensor, sector_bytes: int) -> int:
    """Bytes written into ``view``: its own bytes when it is a whole tensor; its runs in sectors
    when it is a part of a larger one (a slice of a cache)."""
    whole = tensor_bytes(view)
    try:
        partial = view.untyped_storage().nbytes() > whole
    except (RuntimeError, NotImplementedError):
        partial = False
    if not partial:
        return whole
    run = _run_elems(tuple(view.shape), tuple(view.stride()))
    distinct = whole // max(view.element_size(), 1)
    return _sectors(distinct, run, view.element_size(), sector_bytes)


def _copy_(args, kwargs, out, sector_bytes):
    # dst.copy_(src): reads src, writes dst (only its region when dst is a view of a larger tensor).
    src = args[1] if isinstance(args[1], torch.Tensor) else None
    return (DATA_MOVEMENT, 0, 0, tensor_bytes(src) if src is not None else 0,
            _region_write(args[0], sector_bytes))


def _fill_(args, kwargs, out, sector_bytes):
    # fill_(self, value) / zero_(self): reads nothing but a tensor value, writes self's region.
    value = sum(tensor_bytes(t) for t in tensors(args[1:]))
    return DATA_MOVEMENT, 0, 0, value, _region_write(args[0], sector_bytes)


_copy_.sector_bytes = _fill_.sector_bytes = True


def _slice_like_scatter(kind: str) -> Rule:
    # slice_scatter(self, src, dim, start, end, step) / select_scatter(self, src, dim, index) /
    # as_strided_scatter(self, src, size, stride, offset): out-of-place: copy self, then write
    # src's region of the output.
    def rule(args, kwargs, out, sector_bytes):
        dst, src = args[0], args[1]
        o = tensors(out)[0]
        stride = list(o.stride())
        if kind == "slice":
            d = _dim(args[2] if len(args) > 2 else kwargs.get("dim", 0), o.dim())
            stride[d] *= args[5] if len(args) > 5 else kwargs.get("step", 1)
        elif kind == "select":
            del stride[_dim(args[2], o.dim())]
        else:
            stride = list(args[3])
        run = _run_elems(tuple(src.shape), tuple(stride))
        touched = _sectors(src.numel(), run, o.element_size(), sector_bytes)
        return DATA_MOVEMENT, 0, 0, tensor_bytes(dst) + tensor_bytes(src), tensor_bytes(o) + touched

    rule.sector_bytes = True
    return rule


def _embedding_dense_backward(args, kwargs, out, sector_bytes):
    # (grad_output, indices, num_weights, padding_idx, scale_grad_by_freq): a zero-filled
    # (num_weights, E) gradient, then one row added per index (read-modify-write).
    grad, indices = args[0], args[1]
    o = tensors(out)[0]
    rows = _sectors(grad.numel(), o.shape[-1] if o.dim() else 1, o.element_size(), sector_bytes)
    return (DATA_MOVEMENT, grad.numel(), 0, tensor_bytes(grad) + tensor_bytes(indices) + rows,
            tensor_bytes(o) + rows)


_embedding_dense_backward.sector_bytes = True

register_cost(_ops("embedding"), _gather_rule(0, (1,), lambda a: _after(a[0], 0)))
register_cost(_ops("index_select"), _gather_rule(0, (2,), lambda a: _after(a[0], a[1])))
register_cost(_ops("index", "_unsafe_index"),
              _gather_rule(0, (1,), lambda a: _indexed_region(a[0], list(a[1]))[1]))
register_cost(_ops("gather"), _gather_rule(0, (2,), None))
register_cost(_ops("take", "take_along_dim"), _gather_rule(0, (1,), None))
register_cost(_ops("_embedding_bag", "_embedding_bag_forward_only"), _embedding_bag)
register_cost(_ops("scatter", "scatter_"), _scatter_rule("scatter"))
register_cost(_ops("scatter_add", "scatter_add_", "scatter_reduce", "scatter_reduce_"),
              _scatter_rule("scatter_add"))
register_cost(_ops("index_add", "index_add_"), _index_dim_rule("add"))
register_cost(_ops("index_copy", "index_copy_", "index_fill", "index_fill_"), _index_dim_rule("copy"))
register_cost(_ops("index_put", "index_put_", "_index_put_impl_", "_unsafe_index_put"), _index_put)
register_cost(_ops("copy_"), _copy_)
register_cost(_ops("fill_", "zero_"), _fill_)
register_cost(_ops("slice_scatter"), _slice_like_scatter("slice"))
register_cost(_ops("select_scatter"), _slice_like_scatter("select"))
register_cost(_ops("as_strided_scatter"), _slice_like_scatter("strided"))
register_cost(_ops("embedding_dense_backward"), _embedding_dense_backward)


# ---------------------------------------------------------------------------- attention, effective
#: Fused attention ops (forward and backward) whose ``flops_effective`` the tracer sets from the
#: call's causality; the tracer's own meta row is ``aten.scaled_dot_product_attention``.
ATTENTION_OPS: frozenset[OpPacket] = frozenset(_ops(*(
    f"_scaled_dot_product_{k}{b}" for k in ("flash_attention_for_cpu", "efficient_attention",
                                            "flash_attention", "cudnn_attention",
                                            "fused_attention_overrideable")
    for b in ("", "_backward"))))


def _sum_min(n: int, cap: int | None) -> int:
    """sum_{p=1..n} min(p, cap)  (cap None: no cap)."""
    if n <= 0:
        return 0
    if cap is None or n <= cap:
        return n * (n + 1) // 2
    return cap * (cap + 1) // 2 + (n - cap) * cap


def attended_keys(tq: int, tk: int, causal: bool, window: int | None = None,
                  aligned: str = "end") -> int:
    """Sum over the ``tq`` queries of the keys each attends, out of ``tk`` keys.

    Not causal: ``tq * tk``. Causal, ``aligned="end"`` (the counting semantics): the queries are
    the last ``tq`` positions, ``tk-tq .. tk-1``, and query at position p attends
    ``min(p + 1, window)`` keys (``window`` None: no window). ``aligned="start"``: torch's
    ``is_causal`` for Tq != Tk, query i attends ``min(i + 1, tk)`` keys (no window).
    """
    if not causal:
        return tq * tk
    if aligned == "start":
        return _sum_min(tq, tk)
    if aligned != "end":
        raise ValueError(f"attended_keys(aligned={aligned!r}): use 'end' or 'start'")
    w = min(window, tk) if window else tk
    return _sum_min(tk, w) - _sum_min(tk - tq, w)


def effective_attention_flops(flops: int, tq: int, tk: int, keys: int) -> int:
    """``flops * keys / (tq * tk)``: the counted attention FLOPs scaled to the keys attended
    (exact in integers, as torch's formulas are multiples of ``tq * tk``)."""
    if tq <= 0 or tk <= 0:
        return flops
    return flops * keys // (tq * tk)


def _classify_by_tags(func: torch._ops.OpOverload, args: tuple, kwargs: dict, out: Any) -> Rule | None:
    """Fallback rules from torch's own op tags, for ops without an explicit rule."""
    if func.is_view:
        return _free(VIEW)
    tags = func.tags
    if torch.Tag.pointwise in tags:
        return _per_out_element(ELEMENTWISE, 1)
    if torch.Tag.reduction in tags:
        return _per_in_element(ELEMENTWISE, 1)
    if not tensors((args, kwargs)):  # no tensor input: a factory (empty, zeros, arange, randn...)
        return _free(OTHER)
    return None


def rule_for(func: torch._ops.OpOverload, args: tuple, kwargs: dict, out: Any) -> Rule | None:
    """The cost rule for one executed op, or None when the op is uncosted."""
    rule = _RULES.get(func._overloadpacket)
    if rule is None:
        rule = _classify_by_tags(func, args, kwargs, out)
    return rule


def op_cost(func: torch._ops.OpOverload, args: tuple, kwargs: dict, out: Any,
            sector_bytes: int = DEFAULT_SECTOR_BYTES) -> OpCost | None:
    """Cost of one executed op under the semantics above; None when no rule applies.
    ``sector_bytes`` is the DRAM access granularity that gathers and scatters round up to."""
    rule = rule_for(func, args, kwargs, out)
    if rule is None:
        return None
    extra = {"sector_bytes": sector_bytes} if getattr(rule, "sector_bytes", False) else {}
    op_class, flops, macs, bytes_read, *written = rule(args, kwargs, out, **extra)
    if op_class == VIEW:
        return OpCost(VIEW, 0, 0, 0, 0)
    if bytes_read is None:
        bytes_read = sum(tensor_bytes(t) for t in tensors((args, kwargs)))
    bytes_written = written[0] if written else sum(tensor_bytes(t) for t in tensors(out))
    return OpCost(op_class, int(flops), int(macs), int(bytes_read), int(bytes_written))


def has_rule(func: torch._ops.OpOverload) -> bool:
    """Whether an op has an explicit rule (tag-based fallbacks are decided per call)."""
    return func._overloadpacket in _RULES
