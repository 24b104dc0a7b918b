"""Weight-only quantization of a decoder LM: formats, bytes, methods and CPU kernels.

Formats (a :class:`Scheme`; every scale is stored as **fp16**, as GPTQ, AWQ and GGUF store them)
--------------------------------------------------------------------------------------------------
* **Symmetric** ``b``-bit (``int8`` by default): ``w ~ code * scale`` with signed codes in
  ``[-(2^(b-1)-1), 2^(b-1)-1]`` and ``scale = amax / (2^(b-1)-1)`` over the group. No zero point.
* **Asymmetric** ``b``-bit (``int4`` by default): ``w ~ (code - zero) * scale`` with unsigned codes
  in ``[0, 2^b-1]``, ``scale = (hi - lo) / (2^b - 1)`` where ``lo = min(min w, 0)`` and
  ``hi = max(max w, 0)`` (the range always holds 0, as in GPTQ's quantizer), and an integer zero
  point ``round(-lo / scale)`` stored in ``b`` bits.
* **Groups**: ``group_size=None`` is *per output channel* (one scale per row of the ``(out, in)``
  weight); ``group_size=g`` gives each run of ``g`` consecutive input columns of a row its own
  scale (and zero).
* **Rounding and error bound**: codes are ``round-half-to-even(w / scale)`` (plus the zero
  point), clamped to the code range. The fp16 scale is rounded *up* from the exact one, so the
  range always covers the group and no weight is clipped: every dequantized weight is within
  ``scale / 2`` of the original (``tests/test_quant.py`` pins it).
* **GGUF blocks** (llama.cpp's ``Q8_0`` and ``Q4_0``): 32 weights per block with one fp16 scale
  ``d``; ``Q8_0`` stores 32 int8 codes (34 bytes per block, ``d = amax/127``), ``Q4_0`` 32
  4-bit codes ``q`` with ``w ~ (q - 8) * d`` and ``d = (the weight of largest magnitude) / -8``
  (18 bytes per block). They are quantized by the ``gguf`` package (llama.cpp's own Python
  reference), and map exactly onto symmetric groups of 32 (``Q4_0`` codes ``q - 8`` in
  ``[-8, 7]``), so the same dequantize and kernels apply.

Bits per weight **include the scales and zero points**:
``bits + (16 + zero_bits) / group`` where ``group`` is ``g`` or the row length, ``zero_bits`` is
``bits`` (asymmetric) or 0. E.g. int4 g128 asymmetric 4.156, int8 per-channel on a 4096-wide
row 8.004, ``Q4_0`` 4.5, ``Q8_0`` 8.5. :meth:`QTensor.nbytes` is the packed storage: codes at
``bits`` each, scales at 2 bytes, zeros at ``zero_bits``.

What is quantized in a model: the seven linear layers of every decoder block
(``q/k/v/o_proj``, ``gate/up/down_proj``), as GPTQ and AWQ do. Embedding, LM head and norms are
*kept* at 16 bits (rounded to fp16) in every quantized variant and counted at 2 bytes each.

Methods (:func:`quantize_lm`, names as ``parse_method`` reads them)
-------------------------------------------------------------------
``fp32``, ``bf16`` (the whole model cast to bf16, computing in bf16: this CPU's fast 16-bit
path), ``fp16`` (every weight rounded to fp16, computing in fp32), ``rtn-int8[-gG]`` and ``rtn-int4[-gG]``
(round-to-nearest, per channel or group ``G``), ``gptq-int4[-gG]`` (:mod:`cohw_utils.studies.quantization.gptq`;
``gptq-int4-act`` quantizes columns in decreasing ``H_ii`` order, the "act-order" variant),
``awq-int4[-gG]`` (activation-aware scaling, then RTN; see :func:`awq_scale_block`),
``gguf-q8_0`` and ``gguf-q4_0``. Accuracy is evaluated in fp32 on the *dequantized* weights
(so any kernel computes the same function up to summation order).

Kernels for the speed measurement (:class:`QuantLinear`), on this CPU:
``int8pack`` = ``torch._weight_int8pack_mm`` (symmetric int8, per channel; fp32 activations
and scales); ``int4pack`` = ``torch.ops.aten._weight_int4pack_mm_for_cpu`` on weights packed
by ``_convert_weight_to_int4pack_for_cpu`` (4-bit codes, groups of 32/64/128/256; asymmetric
via a float zero ``(8 - zero) * scale``, ``Q4_0`` via zero 0); everything else runs
``dequant``: rebuild the fp32 weight from codes and scales every call, then ``F.linear``. The
``dequant`` path keeps one code per byte (it is the reference, not a fast path), and the CPU
kernels hold their scales in fp32; the *byte accounting* is always the packed format above.

The int8 KV cache (:class:`Int8KVLayer`) stores keys and values as symmetric int8 per
(batch, head, token) vector over ``head_dim``, with one fp16 scale each:
``head_dim + 2`` bytes per vector instead of ``2 * head_dim`` in fp16.

Reference numbers from papers are rows of ``data/quant_reference.csv``: ``paper``, ``table``,
``model``, ``dataset``, ``metric``, ``format``, ``method``, ``value``, ``citation`` (a key of
``references.bib``) and ``source`` (URL); :func:`load_reference` reads it.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from cohw_utils.core.errors import CohwError
from cohw_utils.core.data import DATA_DIR

#: The linear layers of a Llama decoder block, in execution order.
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Linear layers that read the same input, and the op whose output that input is (AWQ folds
#: its per-channel scale into that op).
INPUT_GROUPS = (
    (("q_proj", "k_proj", "v_proj"), "input_layernorm"),
    (("o_proj",), "v_proj"),
    (("gate_proj", "up_proj"), "post_attention_layernorm"),
    (("down_proj",), "up_proj"),
)
#: Group sizes the CPU int4 kernel accepts.
INT4PACK_GROUPS = (32, 64, 128, 256)
GGUF_BLOCK = 32


# ------------------------------------------------------------------------------------ schemes
@dataclass(frozen=True)
class Scheme:
    """A weight format: ``bits``, ``group_size`` (None = per output channel), ``symmetric``;
    ``scale_bits`` 16 (fp16 scales, the default) or 32 (exact fp32 scales, for tests)."""

    bits: int
    group_size: int | None = None
    symmetric: bool = False
    scale_bits: int = 16

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise CohwError(f"bits must be an integer from 2 to 8, got {self.bits!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise CohwError(f"group_size must be a positive integer or None (per channel), got {self.group_size!r}")
        if self.scale_bits not in (16, 32):
            raise CohwError(f"scale_bits must be 16 (fp16) or 32 (fp32), got {self.scale_bits!r}")

    @property
    def zero_bits(self) -> int:
        return 0 if self.symmetric else self.bits

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1

    def group(self, in_features: int) -> int:
        g = self.group_size or in_features
        if in_features % g:
            raise CohwError(f"group size {g} does not divide the row length {in_features}; "
                            "pick a group size that divides the layer's input features")
        return g

    def bits_per_weight(self, in_features: int) -> float:
        """Storage bits per weight including scales (and zeros) for rows of ``in_features``."""
        return self.bits + (self.scale_bits + self.zero_bits) / self.group(in_features)

    @property
    def name(self) -> str:
        g = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"int{self.bits}-{g}-{'sym' if self.symmetric else 'asym'}"


def scheme(bits: int, group_size: int | None = None, symmetric: bool | None = None) -> Scheme:
    """The book's defaults: int8 symmetric, int4 (and below) asymmetric."""
    return Scheme(bits, group_size, bits == 8 if symmetric is None else symmetric)


def _fp16_round_up(s: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 value >= s (so a stored fp16 scale never clips the range)."""
    h = s.to(torch.float16)
    h = torch.where(h.float() < s, torch.nextafter(h, torch.full_like(h, math.inf)), h)
    return h.to(s.dtype)


def grid(w: torch.Tensor, sch: Scheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) of each row of ``w`` (rows x columns of one group): shapes (rows,)."""
    if sch.symmetric:
        amax = w.abs().amax(dim=1)
        scale = torch.where(amax > 0, amax / sch.qmax, torch.ones_like(amax))
        return (_fp16_round_up(scale) if sch.scale_bits == 16 else scale), None
    lo = w.amin(dim=1).clamp(max=0)
    hi = w.amax(dim=1).clamp(min=0)
    scale = torch.where(hi > lo, (hi - lo) / sch.qmax, torch.ones_like(hi))
    if sch.scale_bits == 16:
        scale = _fp16_round_up(scale)
    zero = torch.clamp(torch.round(-lo / scale), 0, sch.qmax)
    return scale, zero


def encode(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, sch: Scheme) -> torch.Tensor:
    """Codes (as floats) of ``w`` (rows x m) on the grid ``scale``/``zero`` of shape (rows,)."""
    q = torch.round(w / scale[:, None])
    if zero is not None:
        q = q + zero[:, None]
    return q.clamp(sch.qmin, sch.qmax)


def decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    return ((codes - zero[:, None]) if zero is not None else codes) * scale[:, None]


# ------------------------------------------------------------------------------------ tensors
@dataclass
class QTensor:
    """A quantized ``(out, in)`` weight: integer ``codes`` (out, in), ``scale`` and ``zero``
    (None when symmetric) of shape (out, in / group), and its :class:`Scheme`."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    scheme: Scheme
    fmt: str = ""  # e.g. "Q4_0" when the tensor came from a GGUF block format

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def group(self) -> int:
        return self.scheme.group(self.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.shape
        g = self.group
        c = self.codes.to(dtype).view(n, k // g, g)
        if self.zero is not None:
            c = c - self.zero.to(dtype)[..., None]
        return (c * self.scale.to(dtype)[..., None]).view(n, k)

    def error_bound(self) -> torch.Tensor:
        """``scale / 2`` broadcast to the weight's shape: the largest possible |w - dequant(w)|."""
        n, k = self.shape
        return (self.scale / 2).repeat_interleave(self.group, dim=1).view(n, k)

    @property
    def nbytes(self) -> int:
        """Packed storage: codes at ``bits`` each, fp16 scales, zeros at ``zero_bits``."""
        n, k = self.shape
        groups = n * (k // self.group)
        bits = n * k * self.scheme.bits + groups * (self.scheme.scale_bits + self.scheme.zero_bits)
        return math.ceil(bits / 8)

    @property
    def bits_per_weight(self) -> float:
        return self.scheme.bits_per_weight(self.shape[1])


def quantize_rtn(w: torch.Tensor, sch: Scheme) -> QTensor:
    """Round-to-nearest quantization of a 2-D weight ``(out, in)`` (see the module docstring)."""
    if w.dim() != 2:
        raise CohwError(f"quantize a 2-D (out, in) weight; got shape {tuple(w.shape)}")
    n, k = w.shape
    g = sch.group(k)
    wg = w.detach().float().reshape(n * (k // g), g)
    scale, zero = grid(wg, sch)
    codes = encode(wg, scale, zero, sch)
    dtype = torch.int8 if sch.symmetric else torch.uint8
    return QTensor(codes.reshape(n, k).to(dtype), scale.view(n, k // g),
                   None if zero is None else zero.view(n, k // g), sch)


# ------------------------------------------------------------------------------------ GGUF blocks
GGUF_TYPES = ("Q8_0", "Q4_0")


def _gguf_type(name: str):
    import gguf

    key = name.upper()
    if key not in GGUF_TYPES:
        raise CohwError(f"unknown GGUF block type {name!r}; use one of {', '.join(GGUF_TYPES)}")
    return getattr(gguf.GGMLQuantizationType, key)


def gguf_quantize(w: torch.Tensor, qtype: str) -> tuple[np.ndarray, QTensor]:
    """Quantize ``w`` (out, in) with the ``gguf`` package into llama.cpp blocks.

    Returns the raw blocks (uint8, shape ``(out, in/32 * bytes_per_block)``, exactly what a
    .gguf file stores) and the same numbers as a :class:`QTensor` (symmetric groups of 32 with
    fp16 scales), whose ``nbytes`` equals the raw size."""
    import gguf

    t = _gguf_type(qtype)
    n, k = w.shape
    if k % GGUF_BLOCK:
        raise CohwError(f"GGUF {qtype} needs rows that are a multiple of 32 weights; this one has {k}")
    raw = gguf.quants.quantize(w.detach().float().numpy(), t)
    blocks = raw.reshape(n * k // GGUF_BLOCK, -1)
    d = torch.from_numpy(blocks[:, :2].copy().view(np.float16).astype(np.float32)).view(n, k // GGUF_BLOCK)
    if qtype.upper() == "Q8_0":
        codes = torch.from_numpy(blocks[:, 2:].copy().view(np.int8)).view(n, k)
        sch = Scheme(8, GGUF_BLOCK, symmetric=True)
    else:  # Q4_0: byte j holds weight j (low nibble) and weight j + 16 (high nibble)
        qs = blocks[:, 2:]
        nib = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - 8
        codes = torch.from_numpy(nib).view(n, k)
        sch = Scheme(4, GGUF_BLOCK, symmetric=True)
    return raw, QTensor(codes, d, None, sch, fmt=qtype.upper())


def gguf_dequantize(raw: np.ndarray, qtype: str) -> torch.Tensor:
    """llama.cpp's dequantization of raw blocks (the ``gguf`` package's), as fp32."""
    import gguf

    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, _gguf_type(qtype))))


#: HF Llama parameter names -> llama.cpp GGUF tensor names.
_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf_name: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` -> ``blk.3.ffn_up.weight`` (llama.cpp's naming)."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", hf_name)
    if m and m.group(2) in _GGUF_NAMES:
        return f"blk.{m.group(1)}.{_GGUF_NAMES[m.group(2)]}.weight"
    raise CohwError(f"no GGUF name for parameter {hf_name!r}")


def write_gguf(path: str | Path, model: nn.Module, qtype: str) -> dict[str, int]:
    """Write ``model``'s weights to a .gguf file: block linears in ``qtype`` (Q8_0/Q4_0), every
    other tensor in fp16 (norms in fp32, as llama.cpp keeps them), llama.cpp tensor names and
    the ``llama.*`` hyper-parameters. Returns the data bytes written per tensor.

    The file is a weights container in the real format; it carries no tokenizer, and q/k are
    not permuted into llama.cpp's rotary layout, so llama.cpp itself would not run it as is."""
    import gguf

    t = _gguf_type(qtype)
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_block_count(int(cfg.num_hidden_layers))
    w.add_feed_forward_length(int(cfg.intermediate_size))
    w.add_head_count(int(cfg.num_attention_heads))
    w.add_head_count_kv(int(cfg.num_key_value_heads))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(int(cfg.vocab_size))
    w.add_file_type({"Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype.upper()])
    sizes = {}
    linears = {f"{n}.weight" for n in block_linears(model)}
    for name, p in model.named_parameters():
        arr = p.detach().float().numpy()
        gname = gguf_name(name)
        if name in linears:
            raw = gguf.quants.quantize(arr, t)
            w.add_tensor(gname, raw, raw_shape=raw.shape, raw_dtype=t)
            sizes[gname] = raw.nbytes
        else:
            data = arr if arr.ndim == 1 else arr.astype(np.float16)
            w.add_tensor(gname, data)
            sizes[gname] = data.nbytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sizes


def read_gguf(path: str | Path) -> pd.DataFrame:
    """The tensors of a .gguf file: name, type, shape, elements, bytes (``gguf.GGUFReader``)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    return pd.DataFrame([{"name": t.name, "type": t.tensor_type.name, "shape": tuple(int(s) for s in t.shape),
                          "elements": int(t.n_elements), "bytes": int(t.n_bytes)} for t in r.tensors])


# ------------------------------------------------------------------------------------ model plumbing
def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The quantized layers: ``{'model.layers.0.self_attn.q_proj': Linear, ...}`` in order."""
    out = {name: m for name, m in model.named_modules()
           if isinstance(m, (nn.Linear, QuantLinear)) and name.rsplit(".", 1)[-1] in LINEAR_NAMES
           and ".layers." in f".{name}"}
    if not out:
        raise CohwError("the model has no decoder-block linear layers (q_proj ... down_proj); "
                        "pass a Llama-style causal LM")
    return out


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", model)
    if not hasattr(inner, "layers"):
        raise CohwError("the model has no .model.layers; pass a Llama-style causal LM")
    return inner.layers


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _round_rest_to_fp16(model: nn.Module, skip: set[str]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in skip:
                p.copy_(p.half().float())


# ------------------------------------------------------------------------------------ methods
@dataclass(frozen=True)
class Method:
    """A parsed method name (see :func:`parse_method`)."""

    name: str
    algo: str               # fp32, fp16, rtn, gptq, awq, gguf
    scheme: Scheme | None   # None for fp32/fp16/bf16
    gguf_type: str | None = None
    act_order: bool = False

    @property
    def needs_calibration(self) -> bool:
        return self.algo in ("gptq", "awq")


_METHOD_RE = re.compile(r"(rtn|gptq|awq)-int(\d)(?:-g(\d+))?(-act)?")
METHOD_EXAMPLES = ("fp32", "bf16", "fp16", "rtn-int8", "rtn-int4-g128", "gptq-int4-g128", "awq-int4-g128",
                   "gguf-q8_0", "gguf-q4_0")


def parse_method(name: str) -> Method:
    """``'rtn-int4-g128'`` -> Method; a bad name raises :class:`CohwError` with examples."""
    key = str(name).strip().lower()
    if key in ("fp32", "fp16", "bf16"):
        return Method(key, key, None)
    if key in ("gguf-q8_0", "gguf-q4_0"):
        t = key.split("-")[1].upper()
        return Method(key, "gguf", Scheme(8 if t == "Q8_0" else 4, GGUF_BLOCK, True), t)
    m = _METHOD_RE.fullmatch(key)
    if m is None:
        raise CohwError(f"unknown quantization method {name!r}; use names like {', '.join(METHOD_EXAMPLES)}")
    algo, bits, g, act = m.group(1), int(m.group(2)), m.group(3), bool(m.group(4))
    if act and (algo != "gptq" or g):
        raise CohwError(f"{name!r}: '-act' (GPTQ's act-order) applies to per-channel gptq only, e.g. gptq-int4-act")
    return Method(key, algo, scheme(bits, int(g) if g else None), act_order=act)


@dataclass
class QuantizedLM:
    """A quantized copy of a causal LM.

    ``model`` computes in fp32 with the dequantized weights (for perplexity); ``weights`` holds
    the quantized block linears; ``method``/``info`` say how they were made. Bytes: the
    quantized linears at their packed size, every other parameter at 2 bytes (fp32: 4)."""

    method: Method
    model: nn.Module
    weights: dict[str, QTensor]
    info: dict[str, Any] = field(default_factory=dict)

    def linear_params(self) -> int:
        return sum(m.weight.numel() for m in block_linears(self.model).values())

    def other_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters()) - self.linear_params()

    def linear_bytes(self) -> int:
        if not self.weights:
            return self.linear_params() * (4 if self.method.algo == "fp32" else 2)
        return sum(q.nbytes for q in self.weights.values())

    def weight_bytes(self) -> int:
        """Bytes of the whole model as stored (see the class docstring)."""
        return self.linear_bytes() + self.other_params() * (4 if self.method.algo == "fp32" else 2)

    def linear_bits_per_weight(self) -> float:
        return 8 * self.linear_bytes() / self.linear_params()

    def kernel_model(self, kernel: str = "auto") -> tuple[nn.Module, dict[str, int]]:
        """A copy whose block linears run a quantized kernel (:class:`QuantLinear`); returns the
        model and how many layers each kernel got. Unquantized methods return a plain copy
        (fp16 runs in fp32 on this CPU, with fp16-valued weights)."""
        m = copy.deepcopy(self.model)
        if not self.weights:
            how = "bf16 compute" if self.method.algo == "bf16" else "fp32 compute"
            return m, {f"F.linear ({self.method.algo} weights, {how})": len(block_linears(m))}
        used: dict[str, int] = {}
        for name, lin in block_linears(m).items():
            ql = QuantLinear(self.weights[name], lin.bias, kernel=kernel)
            used[ql.kernel] = used.get(ql.kernel, 0) + 1
            _set_module(m, name, ql)
        return m, used


def quantize_lm(model: nn.Module, method: str | Method, calib: torch.Tensor | None = None,
                batch: int = 8, **options: Any) -> QuantizedLM:
    """Quantize ``model``'s decoder-block linears with ``method`` (see the module docstring).

    ``calib``: LongTensor (n, seq) of token windows, required by ``gptq-*`` and ``awq-*``;
    ``options`` go to the algorithm (GPTQ: ``blocksize``, ``percdamp``, ``act_order``; AWQ:
    ``n_grid``). The input model is not modified."""
    meth = parse_method(method) if isinstance(method, str) else method
    if meth.needs_calibration and calib is None:
        raise CohwError(f"method {meth.name} needs calibration data: pass calib=(n, seq) token ids")
    m = copy.deepcopy(model).float().eval()
    if meth.algo == "fp32":
        return QuantizedLM(meth, m, {})
    lin_names = block_linears(m)
    if meth.algo == "fp16":
        _round_rest_to_fp16(m, set())
        return QuantizedLM(meth, m, {})
    if meth.algo == "bf16":
        return QuantizedLM(meth, m.to(torch.bfloat16), {})
    weights: dict[str, QTensor] = {}
    info: dict[str, Any] = {}
    if meth.algo == "awq":  # fold the scales first, so the kept tensors are rounded after folding
        info = awq_lm(m, calib, meth.scheme, batch=batch, **options)
    _round_rest_to_fp16(m, {f"{n}.weight" for n in lin_names})
    if meth.algo in ("rtn", "gguf"):
        for name, lin in lin_names.items():
            if meth.algo == "rtn":
                q = quantize_rtn(lin.weight, meth.scheme)
            else:
                q = gguf_quantize(lin.weight, meth.gguf_type)[1]
            weights[name] = q
            with torch.no_grad():
                lin.weight.copy_(q.dequantize())
    elif meth.algo == "gptq":
        from cohw_utils.studies.quantization.gptq import gptq_lm

        options.setdefault("act_order", meth.act_order)
        weights, info = gptq_lm(m, calib, meth.scheme, batch=batch, **options)
    elif meth.algo == "awq":
        for name, lin in lin_names.items():
            q = quantize_rtn(lin.weight, meth.scheme)
            weights[name] = q
            with torch.no_grad():
                lin.weight.copy_(q.dequantize())
    return QuantizedLM(meth, m, weights, info)


def quantize_layers(model: nn.Module, names: Iterable[str], sch: Scheme) -> nn.Module:
    """A copy of ``model`` with only the named block linears RTN-quantized (fake-quant, fp32)."""
    m = copy.deepcopy(model).float().eval()
    lins = block_linears(m)
    for name in names:
        if name not in lins:
            raise CohwError(f"no block linear called {name!r}; known: {', '.join(list(lins)[:7])} ...")
        with torch.no_grad():
            lins[name].weight.copy_(quantize_rtn(lins[name].weight, sch).dequantize())
    return m


# ------------------------------------------------------------------------------------ block walking
class _Stop(Exception):
    pass


@torch.no_grad()
def block_inputs(model: nn.Module, calib: torch.Tensor, batch: int = 8) -> tuple[list[torch.Tensor], list[dict]]:
    """Hidden states entering decoder block 0 for each calibration batch, with the keyword
    arguments (mask, rotary embeddings, positions) the block is called with."""
    layer0 = decoder_layers(model)[0]
    states, kwargs = [], []

    def grab(module, args, kw):
        states.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.append({k: v for k, v in kw.items() if k not in ("cache", "past_key_values")})
        raise _Stop

    h = layer0.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for i in range(0, len(calib), batch):
            try:
                model(input_ids=calib[i:i + batch], use_cache=False)
            except _Stop:
                pass
    finally:
        h.remove()
    return states, kwargs


@dataclass
class InputStats:
    """Second moment ``H = X^T X / n`` and mean |x| per input channel of one linear's inputs."""

    H: torch.Tensor
    absmean: torch.Tensor
    n: int = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        total = self.n + m
        # fp32 products (as GPTQ's reference code), accumulated in fp64 across batches
        self.H.mul_(self.n / total).add_((x.T @ x).double() / total)
        self.absmean.mul_(self.n / total).add_(x.abs().sum(0).double() / total)
        self.n = total


@torch.no_grad()
def collect_stats(layer: nn.Module, states: list[torch.Tensor], kwargs: list[dict],
                  names: Iterable[str] = LINEAR_NAMES) -> dict[str, InputStats]:
    """Run one decoder block on the calibration states; input statistics of its linears
    (layers that read the same input, e.g. q/k/v, share one :class:`InputStats` object)."""
    mods = {n: m for n, m in layer.named_modules() if n.rsplit(".", 1)[-1] in names}
    short = {n.rsplit(".", 1)[-1]: n for n in mods}
    stats: dict[str, InputStats] = {}
    hooks = []
    for group, _ in INPUT_GROUPS:
        present = [short[g] for g in group if g in short]
        if not present:
            continue
        k = mods[present[0]].in_features
        st = InputStats(torch.zeros(k, k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64))
        for n in present:
            stats[n] = st
        hooks.append(mods[present[0]].register_forward_pre_hook(lambda mod, args, st=st: st.add(args[0])))
    try:
        for s, kw in zip(states, kwargs):
            layer(s, **kw)
    finally:
        for h in hooks:
            h.remove()
    return {n: stats[n] for n in mods if n in stats}


@torch.no_grad()
def run_block(layer: nn.Module, states: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    out = []
    for s, kw in zip(states, kwargs):
        o = layer(s, **kw)
        out.append(o[0] if isinstance(o, tuple) else o)
    return out


# ------------------------------------------------------------------------------------ AWQ
def output_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """Mean squared output error ``E_x ||(W - W_hat) x||^2 = tr(dW H dW^T)`` with ``H = E[x x^T]``."""
    d = (w.detach().float() - w_hat.detach().float())
    return float(((d @ H.float()) * d).sum(dtype=torch.float64))


def awq_search(weights: list[torch.Tensor], stats: InputStats, sch: Scheme, n_grid: int = 20
               ) -> tuple[torch.Tensor, float, list[float]]:
    """AWQ's scale search (Lin et al. 2024, eq. 4-5) for layers that share one input.

    For ``alpha`` in ``{0, 1/n_grid, ..., (n_grid-1)/n_grid}``: ``s = mean|x|^alpha`` (normalised
    by ``sqrt(max s * min s)`` as the reference code does), quantize ``W diag(s)`` with RTN, undo
    the scale, and measure the output error ``sum_layers tr(dW H dW^T)`` on the calibration
    inputs. Returns the best ``s`` (per input channel), its alpha and the error of every alpha;
    alpha = 0 is plain RTN, so the chosen scale never does worse than RTN on this objective."""
    x_mean = stats.absmean.float().clamp(min=1e-8)
    losses, best = [], (math.inf, 0.0, torch.ones_like(x_mean))
    for i in range(n_grid):
        alpha = i / n_grid
        s = x_mean.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        loss = 0.0
        for w in weights:
            w_hat = quantize_rtn(w * s[None, :], sch).dequantize() / s[None, :]
            loss += output_error(w, w_hat, stats.H)
        losses.append(loss)
        if loss < best[0]:
            best = (loss, alpha, s)
    return best[2], best[1], losses


@torch.no_grad()
def awq_scale_block(layer: nn.Module, stats: dict[str, InputStats], sch: Scheme, n_grid: int = 20,
                    scales: dict[str, torch.Tensor] | None = None, out_scales: dict[str, torch.Tensor] | None = None,
                    search: dict[str, dict] | None = None) -> dict[str, float]:
    """Search and fold AWQ scales into one Llama decoder block, in place.

    For each input group (q/k/v; o; gate/up; down) the scale ``s`` multiplies the layers'
    input columns and divides the op that produces their input (the RMSNorm weight, or the
    rows of ``v_proj`` / ``up_proj``), so the block computes the same function in exact
    arithmetic and only the rounding of the later RTN step changes. (AWQ's weight-clipping
    search is not done, and the error is each linear's own output error rather than the
    output of the attention or MLP module the reference code measures.) Returns the chosen
    alpha per group. If given, ``scales`` receives each linear's input scale ``s`` by module
    path, ``out_scales`` the ``s`` divided out of a linear's output rows (v_proj, up_proj), and
    ``search`` each group's alpha and calibration output error at alpha 0 (RTN) and at the best
    alpha."""
    alphas = {}
    for names, prev_name in INPUT_GROUPS:
        mods = [layer.get_submodule(_path(layer, n)) for n in names]
        st = stats[_path(layer, names[0])]
        s, alpha, losses = awq_search([m.weight.float() for m in mods], st, sch, n_grid)
        if search is not None:
            search["+".join(names)] = {"alpha": alpha, "rtn_error": losses[0], "awq_error": min(losses)}
        prev = layer.get_submodule(_path(layer, prev_name))
        if prev.weight.dim() == 1:   # RMSNorm weight
            prev.weight.div_(s)
        else:                         # a linear's output rows
            prev.weight.div_(s[:, None])
            if getattr(prev, "bias", None) is not None:
                prev.bias.div_(s)
            if out_scales is not None:
                out_scales[_path(layer, prev_name)] = s
        for n, m in zip(names, mods):
            m.weight.mul_(s[None, :])
            if scales is not None:
                scales[_path(layer, n)] = s
        alphas["+".join(names)] = alpha
    return alphas


def _path(layer: nn.Module, short: str) -> str:
    for n, _ in layer.named_modules():
        if n.rsplit(".", 1)[-1] == short:
            return n
    raise CohwError(f"decoder block has no submodule {short!r}")


@torch.no_grad()
def awq_lm(model: nn.Module, calib: torch.Tensor, sch: Scheme, batch: int = 8, n_grid: int = 20) -> dict[str, Any]:
    """AWQ scaling of every decoder block of ``model`` in place (weights stay fp32; quantize
    afterwards with RTN). Blocks are visited in order on the calibration inputs, each block's
    inputs being the outputs of the already-scaled blocks before it."""
    states, kwargs = block_inputs(model, calib, batch)
    alphas, scales, outs, search = {}, {}, {}, []
    prefix = next(n for n, m in model.named_modules() if m is decoder_layers(model))
    for i, layer in enumerate(decoder_layers(model)):
        stats = collect_stats(layer, states, kwargs)
        s: dict[str, torch.Tensor] = {}
        o: dict[str, torch.Tensor] = {}
        found: dict[str, dict] = {}
        alphas[i] = awq_scale_block(layer, stats, sch, n_grid, scales=s, out_scales=o, search=found)
        scales.update({f"{prefix}.{i}.{k}": v for k, v in s.items()})
        outs.update({f"{prefix}.{i}.{k}": v for k, v in o.items()})
        search += [{"block": i, "group": g, **v} for g, v in found.items()]
        states = run_block(layer, states, kwargs)
    return {"alpha": alphas, "input_scale": scales, "output_scale": outs, "search": search,
            "calibration_tokens": int(calib.numel())}


# ------------------------------------------------------------------------------------ kernels
class QuantLinear(nn.Module):
    """A linear layer computing with a quantized weight on a CPU kernel.

    ``kernel``: ``'int8pack'``, ``'int4pack'``, ``'dequant'`` or ``'auto'`` (the fastest one the
    format allows: int8 per-channel symmetric -> int8pack; 4-bit with group 32/64/128/256 ->
    int4pack; else dequant). See the module docstring for what each kernel is."""

    def __init__(self, q: QTensor, bias: torch.Tensor | None = None, kernel: str = "auto"):
        super().__init__()
        n, k = q.shape
        self.in_features, self.out_features = k, n
        ok = {"dequant": True,
              "int8pack": q.scheme.bits == 8 and q.scheme.symmetric and q.group == k,
              "int4pack": q.scheme.bits == 4 and q.group in INT4PACK_GROUPS}
        if kernel == "auto":
            kernel = "int8pack" if ok["int8pack"] else "int4pack" if ok["int4pack"] else "dequant"
        if kernel not in ok:
            raise CohwError(f"unknown kernel {kernel!r}; use auto, int8pack, int4pack or dequant")
        if not ok[kernel]:
            raise CohwError(f"kernel {kernel} cannot run {q.scheme.name} (group {q.group}); use kernel='auto'")
        self.kernel = kernel
        self.q = q
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        if kernel == "int8pack":
            self.register_buffer("w_int8", q.codes.to(torch.int8).contiguous())
            self.register_buffer("w_scale", q.scale.view(n).float().contiguous())
        elif kernel == "int4pack":
            if q.zero is None:   # symmetric codes in [-8, 7] -> unsigned with zero 8
                u, zf = q.codes.to(torch.int32) + 8, torch.zeros_like(q.scale)
            else:                 # (u - z) s = (u - 8) s + (8 - z) s
                u, zf = q.codes.to(torch.int32), (8 - q.zero) * q.scale
            self.register_buffer("w_int4", torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), 1))
            self.register_buffer("w_sz", torch.stack([q.scale.T, zf.T], dim=-1).float().contiguous())
            self.group = q.group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.kernel == "int8pack":
            y = torch._weight_int8pack_mm(x2, self.w_int8, self.w_scale)
        elif self.kernel == "int4pack":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.w_int4, self.group, self.w_sz)
        else:
            y = F.linear(x2, self.q.dequantize(x.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    @property
    def weight(self) -> torch.Tensor:  # shape/numel for accounting code that expects a Linear
        return self.q.dequantize()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.q.fmt or self.q.scheme.name}, kernel={self.kernel}"


def gemv_ladder(n: int, k: int, layers: int = 1, repeats: int = 10, warmup: int = 2, seed: int = 0,
                group_size: int = 128) -> pd.DataFrame:
    """Time one token (``x`` of shape (1, k)) through ``layers`` distinct ``(n, k)`` weights in
    each format and kernel: fp32 and bf16 ``F.linear``, int8 per-channel (int8pack, and
    dequantize-then-matmul), int4 g``group_size`` (int4pack, and dequant), Q4_0 (int4pack).

    ``bytes`` is the packed weight storage read per token; ``GB/s`` = bytes / median time.
    Several distinct weights (``layers``) keep a small format from being served from cache."""
    from cohw_utils.spine.measure import time_callable

    for name, v in (("n", n), ("k", k), ("layers", layers), ("repeats", repeats)):
        if not isinstance(v, int) or v < 1:
            raise CohwError(f"gemv_ladder: {name} must be a positive integer, got {v!r}")
    if k % group_size or k % GGUF_BLOCK or group_size not in INT4PACK_GROUPS:
        raise CohwError(f"gemv_ladder: k={k} must be a multiple of 32 and of group_size={group_size}, "
                        f"and group_size one of {INT4PACK_GROUPS}")
    gen = torch.Generator().manual_seed(seed)
    ws = [torch.randn(n, k, generator=gen) * 0.02 for _ in range(layers)]
    x = torch.randn(1, k, generator=gen)
    rows = []

    def add(fmt, kernel, mods, nbytes, xin):
        def fn():
            for m in mods:
                m(xin)
        with torch.no_grad():
            t = time_callable(fn, repeats=repeats, warmup=warmup)
        rows.append({"format": fmt, "kernel": kernel, "bytes": nbytes, "bits_per_weight": 8 * nbytes / (n * k * layers),
                     "median_ms": t.median * 1e3, "min_ms": t.min * 1e3, "max_ms": t.max * 1e3,
                     "GB/s": nbytes / t.median / 1e9, "timing": t})

    add("fp32", "F.linear", [lambda v, w=w: F.linear(v, w) for w in ws], 4 * n * k * layers, x)
    wb = [w.bfloat16() for w in ws]
    add("bf16", "F.linear", [lambda v, w=w: F.linear(v, w) for w in wb], 2 * n * k * layers, x.bfloat16())
    del wb
    q8 = [quantize_rtn(w, scheme(8)) for w in ws]
    add("int8 per-channel", "int8pack", [QuantLinear(q, kernel="int8pack") for q in q8], sum(q.nbytes for q in q8), x)
    add("int8 per-channel", "dequant", [QuantLinear(q, kernel="dequant") for q in q8], sum(q.nbytes for q in q8), x)
    del q8
    q4 = [quantize_rtn(w, scheme(4, group_size)) for w in ws]
    add(f"int4 g{group_size}", "int4pack", [QuantLinear(q, kernel="int4pack") for q in q4], sum(q.nbytes for q in q4), x)
    add(f"int4 g{group_size}", "dequant", [QuantLinear(q, kernel="dequant") for q in q4], sum(q.nbytes for q in q4), x)
    del q4
    g4 = [gguf_quantize(w, "Q4_0")[1] for w in ws]
    add("Q4_0", "int4pack", [QuantLinear(q, kernel="int4pack") for q in g4], sum(q.nbytes for q in g4), x)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------ int8 KV cache
def _dynamic_layer():
    from transformers.cache_utils import DynamicLayer

    return DynamicLayer


def _make_int8_layer_class():
    DynamicLayer = _dynamic_layer()

    class Int8KVLayer(DynamicLayer):
        """A KV-cache layer that stores keys and values as int8 with one fp16 scale per
        (batch, head, token) vector; reads return the dequantized tensors."""

        def lazy_initialization(self, key_states, value_states):
            super().lazy_initialization(key_states, value_states)
            self.dtype = key_states.dtype
            self.qk = self.qv = self.sk = self.sv = None

        @staticmethod
        def _q(t):
            amax = t.abs().amax(dim=-1, keepdim=True)
            s = _fp16_round_up(torch.where(amax > 0, amax / 127, torch.ones_like(amax)).float())
            return torch.round(t.float() / s).clamp(-127, 127).to(torch.int8), s.half()

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            qk, sk = self._q(key_states)
            qv, sv = self._q(value_states)
            if self.qk is None:
                self.qk, self.sk, self.qv, self.sv = qk, sk, qv, sv
            else:
                self.qk = torch.cat([self.qk, qk], dim=-2)
                self.sk = torch.cat([self.sk, sk], dim=-2)
                self.qv = torch.cat([self.qv, qv], dim=-2)
                self.sv = torch.cat([self.sv, sv], dim=-2)
            self.keys = (self.qk.float() * self.sk.float()).to(self.dtype)
            self.values = (self.qv.float() * self.sv.float()).to(self.dtype)
            return self.keys, self.values

        def stored_bytes(self) -> int:
            if self.qk is None:
                return 0
            return sum(t.numel() * t.element_size() for t in (self.qk, self.sk, self.qv, self.sv))

    return Int8KVLayer


_INT8_LAYER = None


def int8_kv_cache(config) -> Any:
    """A transformers ``Cache`` whose layers store K and V in int8 (see :class:`Int8KVLayer`)."""
    global _INT8_LAYER
    from transformers.cache_utils import Cache

    if _INT8_LAYER is None:
        _INT8_LAYER = _make_int8_layer_class()
    return Cache(layers=[_INT8_LAYER() for _ in range(config.num_hidden_layers)])


def kv_bytes_per_token(config, kv: str = "fp16") -> int:
    """KV-cache bytes one token adds: ``2 * layers * kv_heads * (head_dim * b + s)`` where
    ``fp32``: b=4, s=0; ``fp16``: b=2, s=0; ``int8``: b=1 plus a 2-byte fp16 scale per vector."""
    from cohw_utils.workloads import attention_geometry

    layers, _, kv_heads, head_dim = attention_geometry(config)
    per = {"fp32": 4 * head_dim, "fp16": 2 * head_dim, "bf16": 2 * head_dim, "int8": head_dim + 2}
    if kv not in per:
        raise CohwError(f"unknown KV-cache format {kv!r}; use fp32, fp16, bf16 or int8")
    return 2 * layers * kv_heads * per[kv]


# ------------------------------------------------------------------------------------ scale-up
#: Formats of the scale-up table: (label, bits per *linear* weight as a function of the row
#: length K), with everything else (embeddings, head, norms) at 16 bits.
SCALEUP_FORMATS: dict[str, Callable[[int], float]] = {
    "fp16": lambda k: 16.0,
    "int8 per-channel": lambda k: scheme(8).bits_per_weight(k),
    "Q8_0": lambda k: 8.5,
    "Q4_0": lambda k: 4.5,
    "int4 g128": lambda k: scheme(4, 128).bits_per_weight(k),
}


def model_bytes(model: nn.Module, fmt: str) -> dict[str, float]:
    """Weight bytes of a (meta) causal LM stored in ``fmt`` (a key of :data:`SCALEUP_FORMATS`):
    decoder-block linears at the format's bits per weight (with scales), the rest at fp16."""
    if fmt not in SCALEUP_FORMATS:
        raise CohwError(f"unknown format {fmt!r}; use one of {', '.join(SCALEUP_FORMATS)}")
    lin = block_linears(model)
    lin_bits = sum(m.weight.numel() * SCALEUP_FORMATS[fmt](m.in_features) for m in lin.values())
    n_lin = sum(m.weight.numel() for m in lin.values())
    n_all = sum(p.numel() for p in model.parameters())
    return {"params": n_all, "linear_params": n_lin, "bytes": lin_bits / 8 + 2 * (n_all - n_lin)}


def scaleup_table(names: Iterable[str] = ("llama-2-7b", "llama-2-13b", "llama-2-70b"),
                  hardware: dict | None = None, context: int = 4096, batch: int = 1,
                  kv: str = "fp16") -> pd.DataFrame:
    """Weight and KV bytes of each model in each format, whether it fits on each accelerator,
    and the roofline decode bound ``tokens/s <= bandwidth / bytes per token``.

    Bytes per decode token = every weight byte once (batch 1 reads all weights per step; a
    batch of B shares them) + the KV cache of ``context`` tokens x ``batch``. Fits = weights +
    KV <= the chip's nominal memory (one chip, no tensor parallelism; activations and runtime
    overhead ignored, so 'fits' is necessary, not sufficient)."""
    from cohw_utils.hardware import load_hardware
    from cohw_utils.workloads import build

    if not isinstance(context, int) or context < 0 or not isinstance(batch, int) or batch < 1:
        raise CohwError(f"context must be an integer >= 0 and batch >= 1, got context={context!r}, batch={batch!r}")
    hw = hardware if hardware is not None else load_hardware()
    rows = []
    for name in names:
        built = build(name, device="meta")
        kv_b = kv_bytes_per_token(built.config, kv) * context * batch
        for fmt in SCALEUP_FORMATS:
            mb = model_bytes(built.model, fmt)
            for chip in hw.values():
                total = mb["bytes"] + kv_b
                fits = chip.mem_bytes is not None and total <= chip.mem_bytes
                rows.append({"model": name, "format": fmt, "params": mb["params"], "weight_GB": mb["bytes"] / 1e9,
                             "kv_GB": kv_b / 1e9, "chip": chip.name, "memory_GB": (chip.mem_bytes or float("nan")) / 1e9,
                             "fits": fits, "bound_tok_s": batch * chip.mem_bw / total})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------ references
def load_reference(path: str | Path | None = None) -> pd.DataFrame:
    """Published quantization results (``data/quant_reference.csv``; columns in the module docstring)."""
    p = Path(path) if path else DATA_DIR / "quant_reference.csv"
    try:
        df = pd.read_csv(p)
    except OSError as err:
        raise CohwError(f"cannot read reference results {p}: {err}") from None
    need = {"paper", "table", "model", "dataset", "metric", "format", "method", "value", "citation", "source"}
    if missing := need - set(df.columns):
        raise CohwError(f"{p}: missing column(s) {', '.join(sorted(missing))}")
    return df


# ------------------------------------------------------------------------------------ chapter views
def bytes_per_token(q: QuantizedLM) -> int:
    """Weight bytes one decode step reads: every stored weight once, except the embedding
    table, of which a step gathers one row."""
    emb = q.model.get_input_embeddings().weight
    per = 4 if q.method.algo == "fp32" else 2
    return q.weight_bytes() - emb.numel() * per + emb.shape[1] * per


def _kernels(used: dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in used.items())


def evaluate_methods(model: nn.Module, methods: Iterable[str], windows: torch.Tensor,
                     calib: torch.Tensor | None = None, prompt: torch.Tensor | None = None,
                     new_tokens: int = 32, repeats: int = 5, batch: int = 8,
                     progress: Callable[[str], Any] | None = None) -> tuple[pd.DataFrame, dict[str, QuantizedLM]]:
    """Quantize ``model`` with each method; measure held-out perplexity and (if ``prompt`` is
    given) greedy decode speed with the fastest kernel each format allows.

    Columns: method, bits_per_weight (of the quantized linears, scales and zeros included),
    bytes (whole model as stored), bytes_per_token (read per decode step), ppl, delta_ppl and
    delta_pct (vs the first method, normally fp32) with delta_pct_lo/hi, the 95% interval of
    :func:`cohw_utils.studies.quantization.tinylm.paired_change` over the windows, tokens_per_s, tok_s_min/max (from
    the slowest and fastest timed run), GB_per_s (bytes_per_token x tokens/s), kernel,
    quantize_s. Each :class:`QuantizedLM` keeps its per-window NLL in ``info['window_nll']``."""
    import time

    from cohw_utils.studies.quantization.tinylm import decode_tokens_per_s, paired_change, window_nll

    rows, done = [], {}
    ref_nll = None
    for name in methods:
        t0 = time.perf_counter()
        q = quantize_lm(model, name, calib=calib, batch=batch)
        tq = time.perf_counter() - t0
        nll = window_nll(q.model, windows, batch=batch)
        q.info["window_nll"] = nll
        ref_nll = nll if ref_nll is None else ref_nll
        ppl = math.exp(float(nll.mean()))
        _, lo, hi = paired_change(ref_nll, nll)
        row = {"method": q.method.name, "bits_per_weight": q.linear_bits_per_weight(), "bytes": q.weight_bytes(),
               "bytes_per_token": bytes_per_token(q), "ppl": ppl, "delta_pct_lo": lo, "delta_pct_hi": hi,
               "quantize_s": tq}
        if prompt is not None:
            km, used = q.kernel_model()
            rate, t = decode_tokens_per_s(km, prompt, new_tokens=new_tokens, repeats=repeats)
            row.update(tokens_per_s=rate, tok_s_min=new_tokens / t.max, tok_s_max=new_tokens / t.min,
                       GB_per_s=row["bytes_per_token"] * rate / 1e9, kernel=_kernels(used), timing=t.describe("ms"))
            del km
        rows.append(row)
        done[q.method.name] = q
        if progress is not None:
            progress(f"{q.method.name}: ppl {ppl:.3f}" + (f", {row['tokens_per_s']:.0f} tok/s" if prompt is not None else ""))
    df = pd.DataFrame(rows)
    df.insert(df.columns.get_loc("ppl") + 1, "delta_ppl", df["ppl"] - df["ppl"].iloc[0])
    df.insert(df.columns.get_loc("delta_ppl") + 1, "delta_pct", 100 * (df["ppl"] / df["ppl"].iloc[0] - 1))
    return df, done


def sensitivity(model: nn.Module, windows: torch.Tensor, sch: Scheme, batch: int = 8) -> pd.DataFrame:
    """Perplexity change when *one* block linear at a time is RTN-quantized with ``sch`` and
    everything else stays fp32: one row per layer with block, linear, ppl, delta_pct and its
    95% interval (delta_lo/delta_hi, paired over the windows; :func:`cohw_utils.studies.quantization.tinylm.paired_change`)
    and ``resolved`` (the interval excludes 0)."""
    from cohw_utils.studies.quantization.tinylm import paired_change, window_nll

    base = window_nll(model, windows, batch=batch)
    rows = []
    for name in block_linears(model):
        nll = window_nll(quantize_layers(model, [name], sch), windows, batch=batch)
        d, lo, hi = paired_change(base, nll)
        block = int(re.search(r"layers\.(\d+)\.", name).group(1))
        rows.append({"layer": name, "block": block, "linear": name.rsplit(".", 1)[-1],
                     "ppl": math.exp(float(nll.mean())), "delta_pct": d, "delta_lo": lo, "delta_hi": hi,
                     "resolved": lo > 0 or hi < 0})
    return pd.DataFrame(rows)


def sensitivity_figure(table: pd.DataFrame, title: str = ""):
    """Heat map of ``delta_pct`` (blocks x linear layers) from :func:`sensitivity`; a ``*``
    marks the changes whose 95% interval excludes 0."""
    from matplotlib.figure import Figure

    grid_ = table.pivot(index="block", columns="linear", values="delta_pct")[list(LINEAR_NAMES)]
    res = table.pivot(index="block", columns="linear", values="resolved")[list(LINEAR_NAMES)]
    fig = Figure(figsize=(7.5, 0.8 + 0.45 * len(grid_)))
    ax = fig.add_subplot()
    lim = float(np.nanmax(np.abs(grid_.to_numpy()))) or 1.0
    im = ax.imshow(grid_.to_numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(len(grid_.columns)), grid_.columns, rotation=30, ha="right")
    ax.set_yticks(range(len(grid_)), [f"block {b}" for b in grid_.index])
    for (i, j), v in np.ndenumerate(grid_.to_numpy()):
        ax.text(j, i, f"{v:+.2f}{'*' if res.iat[i, j] else ''}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="perplexity change (%)")
    ax.set_title(title or "held-out perplexity change when only this layer is quantized", fontsize=10)
    fig.tight_layout()
    return fig


def ladder_figure(ladder: pd.DataFrame, mem_bw: float | None = None):
    """Time per token against weight bytes per token for each format/kernel of
    :func:`gemv_ladder` (log time axis, min..max as error bars), with the bandwidth bound
    ``time = bytes / mem_bw`` when ``mem_bw`` is given."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.2))
    ax = fig.add_subplot()
    markers = "osD^v<>ph"
    for i, (_, r) in enumerate(ladder.iterrows()):
        ax.errorbar(r["bytes"] / 1e6, r["median_ms"], yerr=[[r["median_ms"] - r["min_ms"]], [r["max_ms"] - r["median_ms"]]],
                    fmt=markers[i % len(markers)], capsize=3, label=f"{r['format']} ({r['kernel']})")
    if mem_bw:
        xs = np.linspace(ladder["bytes"].min() * 0.8, ladder["bytes"].max() * 1.05, 50)
        ax.plot(xs / 1e6, xs / mem_bw * 1e3, "k--", lw=1, label=f"bytes / {mem_bw / 1e9:.0f} GB/s (measured bandwidth)")
    ax.set_yscale("log")
    ax.set_xlabel("weight bytes read per token (MB)")
    ax.set_ylabel("time per token (ms, log scale)")
    ax.set_title("one token through the same weights in each format", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


@torch.no_grad()
def input_second_moments(model: nn.Module, windows: torch.Tensor, batch: int = 8) -> dict[str, torch.Tensor]:
    """``H = E[x x^T]`` of every block linear's input, from one forward pass of ``model`` over
    ``windows`` (layers that share an input share one matrix)."""
    lins = block_linears(model)
    stats: dict[int, InputStats] = {}
    owner: dict[str, int] = {}
    hooks = []
    for name, m in lins.items():
        parent = name.rsplit(".", 1)[0]
        short = name.rsplit(".", 1)[1]
        group = next(g for g, _ in INPUT_GROUPS if short in g)
        key = hash((parent, group[0]))
        owner[name] = key
        if key not in stats:
            k = m.in_features
            stats[key] = InputStats(torch.zeros(k, k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64))
            hooks.append(m.register_forward_pre_hook(lambda mod, args, st=stats[key]: st.add(args[0])))
    try:
        for i in range(0, len(windows), batch):
            model(input_ids=windows[i:i + batch], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {name: stats[owner[name]].H for name in lins}


def layer_errors(model: nn.Module, quantized: dict[str, QuantizedLM], H: dict[str, torch.Tensor]) -> pd.DataFrame:
    """Output error ``tr(dW H dW^T)`` of every block linear of each quantized model against
    ``model``'s weights, for the input moments ``H`` (e.g. from :func:`input_second_moments` on
    held-out text): one row per layer, one column per method."""
    ref = block_linears(model)
    rows = []
    for name, lin in ref.items():
        row = {"layer": name}
        for meth, q in quantized.items():
            w_hat = block_linears(q.model)[name].weight
            s = q.info.get("input_scale", {}).get(name)
            if s is not None:  # AWQ: the layer computes Q(W s) (x / s); its effective weight is Q(W s) / s
                w_hat = w_hat / s[None, :]
            o = q.info.get("output_scale", {}).get(name)
            if o is not None:  # ... and v/up_proj's rows were divided by the next layer's scale
                w_hat = w_hat * o[:, None]
            row[meth] = output_error(lin.weight, w_hat, H[name])
        rows.append(row)
    return pd.DataFrame(rows)
