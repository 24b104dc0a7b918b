"""Cost rules: what one aten op costs in FLOPs, MACs and bytes.

This module is the single statement of the book's counting semantics. Every chapter links
here rather than restating it.

Counting semantics
------------------
* **FLOPs = 2 x MACs** for tensor contractions (mm, addmm, bmm, baddbmm, convolution and its
  backward, scaled-dot-product attention in all its fused variants). The contraction formulas
  are torch's own (``torch.utils.flop_counter.flop_registry``); we do not re-derive them. A
  bias add fused into ``addmm``/``baddbmm``/convolution is not counted, as torch does not.
* **Attention is counted full**, as torch's formula does: ``4 * B * H * Tq * Tk * D`` FLOPs for
  QK^T and PV, whether or not the call is causal. A causal kernel that skips masked tiles does
  about half that work; :func:`cohw_utils.spine.trace.summarize` reports the contraction total as
  counted. Softmax inside a fused attention kernel is not counted separately.
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
* **Data movement** (copy, clone, cat, stack, gather/index/embedding, scatter, pad) costs
  0 FLOPs; gathers read only the rows they fetch (index bytes + output bytes).
* **Views** (view, reshape-as-view, transpose, permute, expand, slice, select, squeeze,
  detach, ...) cost 0 FLOPs and **0 bytes**: they change metadata only. Their class is
  ``view`` so summaries can drop them.
* **Creation** ops (no tensor input: empty, zeros, arange, randn, ...; and the ``*_like`` /
  ``new_*`` ops, whose input only gives a shape) cost 0 FLOPs, read nothing and write their
  output. Class ``other``.
* **Losses**: mse/l1/smooth-l1/binary cross-entropy and their backward 3 FLOPs per input
  element; nll_loss 1 per output element.
* **Bytes** assume unfused, eager execution: every op reads each tensor input from main memory
  and writes each output back. A tensor's bytes are its *distinct* elements times the element
  size, so a broadcast (stride-0) input counts once. This is an upper bound on traffic: a
  fusing compiler or a cache that holds the tensor moves less.
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

aten = torch.ops.aten
OpPacket = torch._ops.OpOverloadPacket

CONTRACTION = "contraction"
NORMALIZATION = "normalization"
ELEMENTWISE = "element-wise"
DATA_MOVEMENT = "data movement"
VIEW = "view"
OTHER = "other"
OP_CLASSES = (CONTRACTION, NORMALIZATION, ELEMENTWISE, DATA_MOVEMENT, VIEW, OTHER)


@dataclass(frozen=True)
class OpCost:
    """Cost of one executed op. ``flops``/``macs`` are NaN-free ints; bytes are ints."""

    op_class: str
    flops: int
    macs: int
    bytes_read: int
    bytes_written: int


# A rule maps (args, kwargs, out) to (op_class, flops, macs, bytes_read or None).
# bytes_read None means "the default: distinct bytes of every tensor input".
Rule = Callable[[tuple, dict, Any], tuple[str, int, int, "int | None"]]
_RULES: dict[OpPacket, Rule] = {}


def register_cost(ops: OpPacket | list[OpPacket], rule: Rule) -> None:
    """Register (or replace) the cost rule for one or more aten op packets.

    ``rule(args, kwargs, out)`` returns ``(op_class, flops, macs, bytes_read)``;
    ``bytes_read=None`` keeps the default (distinct bytes of every tensor input).
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


def _gather(args, kwargs, out):
    # Reads only what it fetches: the index tensors plus as many bytes as it writes.
    ts = tensors((args, kwargs))
    index_bytes = sum(tensor_bytes(t) for t in ts if not t.is_floating_point() and not t.is_complex())
    return DATA_MOVEMENT, 0, 0, index_bytes + sum(tensor_bytes(t) for t in tensors(out))


def _copy_(args, kwargs, out):
    # dst.copy_(src): reads src, writes dst.
    return DATA_MOVEMENT, 0, 0, tensor_bytes(args[1]) if isinstance(args[1], torch.Tensor) else 0


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
    return OTHER, _numel_out(out) * max(1, math.ceil(math.log2(max(n, 2)))), 0, None


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
        return OTHER, int(x.numel() * max(1.0, math.log2(max(min(k, n), 2)))), 0, None

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
register_cost(_ops("_softmax_backward_data", "_log_softmax_backward_data"),
              _per_out_element(NORMALIZATION, 5))

register_cost(_ops("cumsum", "cumprod", "logcumsumexp"), _per_in_element(ELEMENTWISE, 1))
# Element-wise ops torch does not tag pointwise.
register_cost(_ops("floor_divide", "remainder", "fmod"), _per_out_element(ELEMENTWISE, 1))
register_cost(_ops("histc", "bincount", "histogram"), _per_in_element(OTHER, 1))
register_cost(_ops("searchsorted", "bucketize"), _searchsorted)
for _name in _SORT_DIM_ARG:
    register_cost(_ops(_name), _sort_rule(_name))

register_cost(_ops("embedding", "index_select", "gather", "index", "take", "take_along_dim",
                   "_embedding_bag", "masked_select", "nonzero"), _gather)
register_cost(_ops("copy_"), _copy_)
register_cost(_ops("clone", "_to_copy", "contiguous", "cat", "stack", "constant_pad_nd",
                   "reflection_pad2d", "replicate_pad2d", "repeat", "repeat_interleave", "roll",
                   "flip", "scatter", "scatter_add", "scatter_reduce", "index_put", "index_put_",
                   "index_add", "index_copy", "index_fill", "masked_scatter", "slice_scatter",
                   "select_scatter", "as_strided_scatter", "embedding_dense_backward",
                   "tril", "triu", "upsample_nearest2d", "upsample_nearest2d_backward",
                   "_unsafe_index", "_unsafe_index_put", "lift_fresh_copy",
                   "split_with_sizes_copy", "unbind_copy", "narrow_copy", "fill_", "zero_",
                   "resize_", "set_"),
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


def op_cost(func: torch._ops.OpOverload, args: tuple, kwargs: dict, out: Any) -> OpCost | None:
    """Cost of one executed op under the semantics above; None when no rule applies."""
    rule = rule_for(func, args, kwargs, out)
    if rule is None:
        return None
    op_class, flops, macs, bytes_read = rule(args, kwargs, out)
    if op_class == VIEW:
        return OpCost(VIEW, 0, 0, 0, 0)
    if bytes_read is None:
        bytes_read = sum(tensor_bytes(t) for t in tensors((args, kwargs)))
    bytes_written = sum(tensor_bytes(t) for t in tensors(out))
    return OpCost(op_class, int(flops), int(macs), int(bytes_read), int(bytes_written))


def has_rule(func: torch._ops.OpOverload) -> bool:
    """Whether an op has an explicit rule (tag-based fallbacks are decided per call)."""
    return func._overloadpacket in _RULES
