"""A GPTQ checkpoint on the runtime, measured: our GPTQ -> packed int4 -> onnxruntime ``MatMulNBits`` -> parity.

onnxruntime has no loader for GPTQ checkpoints; what such a checkpoint becomes in it is the
contrib operator ``com.microsoft.MatMulNBits``. :func:`gptq_matmulnbits` does that repacking
for one linear layer and checks it, so the "GPTQ checkpoint" row of the runtime-format table
is a measurement, not an empty probe:

1. **Quantize** ``W`` (N out x K in) with the package's GPTQ
   (:func:`cohw_utils.studies.quantization.gptq.gptq_quantize`, int4, asymmetric, groups of
   ``block_size`` input columns, fp16-rounded scales) on ``H = X^T X / T`` of ``T``
   calibration rows.
2. **Pack** as the operator's spec says (onnxruntime ``ContribOperators.md``, MatMulNBits):
   ``B`` uint8 of shape ``(N, K / block_size, block_size / 2)``, two 4-bit codes per byte
   along K, the first in the low nibble; ``scales`` float32 ``(N, K / block_size)``;
   ``zero_points`` uint8 ``(N, ceil(K / block_size / 2))``, packed the same way (an odd last
   nibble is 0); ``g_idx`` int32 ``(K,)``, column k's group (``k // block_size``: this GPTQ
   quantizes columns in order, so groups are contiguous). Attributes ``K``, ``N``, ``bits=4``,
   ``block_size``.
3. **Run** in onnxruntime (CPU provider) on fresh activations ``A`` (M x K), once per repack of
   :data:`VARIANTS` (zero points packed or as floats; with or without ``g_idx``), and compare with
   the dequantized reference ``A @ ((codes - zero) * scale)^T`` computed in float64: the
   operator's error (``max_abs``, ``max_rel`` = max_abs / max|ref|). Beside it, the
   quantization error itself (the same product with the fp32 weights) and GPTQ's and RTN's
   layer errors on the calibration inputs.
4. **g_idx**: the spec marks it deprecated. The probe reports each repack's error (on
   onnxruntime 1.32's CPU provider, packed uint8 zero points *with* ``g_idx`` give wrong
   results without an error, while float zero points with ``g_idx`` match), then runs the best
   ``g_idx`` repack with a scrambled ``g_idx`` and reports whether the output moved
   (``g_idx_used``): an act-order checkpoint (columns out of group order) relies on it.

Used by Chapter 3 (SW enabling), section "which quantization formats the runtime executes",
and by :mod:`.gap_report`'s ``gptq_matmulnbits`` format probe.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from cohw_utils.core.errors import CohwError
from cohw_utils.studies.quantization.gptq import gptq_quantize
from cohw_utils.studies.quantization.schemes import QTensor, Scheme

__all__ = ["GPTQProbe", "VARIANTS", "pack_matmulnbits", "matmulnbits_model", "gptq_matmulnbits"]


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """(..., m) integers 0..15 -> (..., ceil(m / 2)) uint8, element 2j in the low nibble."""
    c = codes.astype(np.uint8)
    if c.shape[-1] % 2:
        c = np.concatenate([c, np.zeros(c.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)


def pack_matmulnbits(q: QTensor, block_size: int) -> dict[str, np.ndarray]:
    """MatMulNBits inputs ``B``, ``scales``, ``zero_points``, ``g_idx`` of a 4-bit asymmetric
    :class:`QTensor` (N x K) quantized in groups of ``block_size`` (module docstring, step 2)."""
    n, k = q.shape
    sch = q.scheme
    if sch.bits != 4 or sch.symmetric or q.zero is None:
        raise CohwError(f"MatMulNBits packing here takes 4-bit asymmetric weights, got {sch.name}")
    if q.group != block_size or block_size < 16 or block_size & (block_size - 1):
        raise CohwError(f"block_size must equal the weight's group ({q.group}) and be a power of two >= 16, "
                        f"got {block_size}; quantize with Scheme(4, group_size=16, 32, 64 or 128)")
    blocks = k // block_size
    codes = q.codes.numpy().astype(np.int64).reshape(n, blocks, block_size)
    zero = q.zero.numpy().round().astype(np.int64)
    return {"B": _pack_nibbles(codes), "scales": q.scale.numpy().astype(np.float32),
            "zero_points": _pack_nibbles(zero), "g_idx": (np.arange(k) // block_size).astype(np.int32)}


def matmulnbits_model(k: int, n: int, block_size: int, packed: dict[str, np.ndarray], zero_points: str = "packed",
                      g_idx: str | None = "initializer"):
    """A one-node ONNX model ``Y = MatMulNBits(A, B, scales, zero_points[, g_idx])``, A of shape
    (M, K) with M symbolic. ``zero_points``: ``"packed"`` (uint8, two per byte) or ``"float"``
    (unpacked, the type of A); ``g_idx``: ``"initializer"``, ``"input"`` (fed at run time) or None."""
    from onnx import TensorProto as TP, helper, numpy_helper

    zp = packed["zero_points"] if zero_points == "packed" else packed["zero_float"]
    inits = [numpy_helper.from_array(packed["B"], "B"), numpy_helper.from_array(packed["scales"], "scales"),
             numpy_helper.from_array(zp, "zero_points")]
    inputs = [helper.make_tensor_value_info("A", TP.FLOAT, ["M", k])]
    names = ["A", "B", "scales", "zero_points"]
    if g_idx == "input":
        inputs.append(helper.make_tensor_value_info("g_idx", TP.INT32, [k]))
    elif g_idx == "initializer":
        inits.append(numpy_helper.from_array(packed["g_idx"], "g_idx"))
    if g_idx:
        names.append("g_idx")
    node = helper.make_node("MatMulNBits", names, ["Y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=block_size)
    g = helper.make_graph([node], "gptq_matmulnbits", inputs, [helper.make_tensor_value_info("Y", TP.FLOAT, ["M", n])],
                          inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


#: The repacks tried: (zero-point format, g_idx). A GPTQ checkpoint carries g_idx; the runtime's
#: own quantizer writes packed zero points and no g_idx.
VARIANTS = (("packed", None), ("packed", "initializer"), ("float", "initializer"))


@dataclass(frozen=True)
class GPTQProbe:
    """What :func:`gptq_matmulnbits` measured (errors are max-norm: max|d| / max|ref|).

    ``variants``: one row per repack of :data:`VARIANTS` with the operator's error against the
    dequantized reference (``max_abs``, ``max_rel``, ``passed`` within the fp32 tolerance).
    The headline (``max_abs``, ``max_rel``) is the best repack that keeps ``g_idx``."""

    k: int
    n: int
    m: int
    block_size: int
    variants: pd.DataFrame
    max_abs: float            # |MatMulNBits - dequantized reference| of the headline repack
    max_rel: float
    quant_rel: float          # |MatMulNBits - fp32 weights' product| / max|fp32 product|: quantization error
    gptq_error: float         # GPTQ's layer output error on the calibration inputs (mean ||dW x||^2)
    rtn_error: float          # round-to-nearest on the same grid
    g_idx_used: bool          # did a scrambled g_idx change the headline repack's output?
    packed_bytes: int         # B + scales + packed zero_points + g_idx
    fp32_bytes: int
    onnxruntime: str


def gptq_matmulnbits(w: torch.Tensor | None = None, calib: torch.Tensor | None = None, *, k: int = 256,
                     n: int = 128, m: int = 16, block_size: int = 32, tokens: int = 512,
                     seed: int = 0) -> GPTQProbe:
    """Quantize a linear layer with GPTQ, run it as MatMulNBits in onnxruntime, measure parity.

    ``w`` (N x K) and ``calib`` (T x K) default to seeded random ones of the given sizes (the
    calibration channels get unequal scales, as real activations have, so GPTQ has something
    to compensate); activations ``A`` (M x K) are a fresh draw."""
    import onnxruntime as ort

    from cohw_utils.studies.enabling.export import ort_session
    from cohw_utils.studies.enabling.parity import TOLERANCES, _compare

    gen = torch.Generator().manual_seed(seed)
    if w is None:
        w = torch.randn(n, k, generator=gen) / k ** 0.5
    if w.dim() != 2:
        raise CohwError(f"w must be (out, in), got shape {tuple(w.shape)}")
    n, k = w.shape
    if calib is None:
        calib = torch.randn(tokens, k, generator=gen) * torch.linspace(0.2, 3.0, k)
    if calib.dim() != 2 or calib.shape[1] != k:
        raise CohwError(f"calib must be (tokens, {k}), got shape {tuple(calib.shape)}")
    w, calib = w.float(), calib.float()
    H = calib.double().T @ calib.double() / calib.shape[0]
    r = gptq_quantize(w, H, Scheme(4, group_size=block_size, symmetric=False))
    packed = pack_matmulnbits(r.qtensor, block_size)
    packed["zero_float"] = r.qtensor.zero.numpy().astype(np.float32)
    a = (torch.randn(m, k, generator=gen) * torch.linspace(0.2, 3.0, k)).numpy().astype(np.float32)
    ref = a.astype(np.float64) @ r.qtensor.dequantize(torch.float64).numpy().T
    rows, outs = [], {}
    for zp, gi in VARIANTS:
        y = ort_session(matmulnbits_model(k, n, block_size, packed, zp, gi)).run(None, {"A": a})[0]
        p = _compare([y], [torch.from_numpy(ref)], TOLERANCES["fp32"])
        outs[(zp, gi)] = y
        rows.append({"zero_points": f"{zp} ({'uint8, 2 per byte' if zp == 'packed' else 'float32'})",
                     "g_idx": "yes" if gi else "no", "max_abs": p.max_abs, "max_rel": p.max_rel, "passed": p.passed})
    variants = pd.DataFrame(rows)
    with_g = variants[variants.g_idx == "yes"].sort_values("max_rel")
    best = with_g.index[0]
    zp, _ = VARIANTS[best]
    y = outs[VARIANTS[best]]
    sess = ort_session(matmulnbits_model(k, n, block_size, packed, zp, "input"))
    scrambled = np.random.default_rng(seed).permutation(packed["g_idx"]).astype(np.int32)
    y2 = sess.run(None, {"A": a, "g_idx": scrambled})[0]
    fp = a.astype(np.float64) @ w.double().numpy().T
    nbytes = sum(packed[x].nbytes for x in ("B", "scales", "zero_points", "g_idx"))
    return GPTQProbe(k, n, m, block_size, variants, float(with_g.max_abs.iloc[0]), float(with_g.max_rel.iloc[0]),
                     float(np.abs(y - fp).max() / np.abs(fp).max()), r.error, r.rtn_error,
                     bool(np.abs(y2 - y).max() > 0), nbytes, 4 * n * k, ort.__version__)
