"""GGUF (llama.cpp) block formats ``Q8_0`` and ``Q4_0``, and real .gguf files.

* ``Q8_0``: 32 weights per block with one fp16 scale ``d = amax/127`` and 32 int8 codes
  (34 bytes per block, 8.5 bits per weight).
* ``Q4_0``: 32 weights per block with one fp16 scale ``d = (the weight of largest magnitude) / -8``
  and 32 4-bit codes ``q``, ``w ~ (q - 8) * d`` (18 bytes per block, 4.5 bits per weight).

They are quantized by the ``gguf`` package (llama.cpp's own Python reference), and map exactly
onto symmetric groups of 32 of :mod:`cohw_utils.studies.quantization.schemes` (``Q4_0`` codes
``q - 8`` in ``[-8, 7]``), so the same dequantize and kernels apply. :func:`write_gguf` writes a
model's weights in the real file format (llama.cpp tensor names, block linears in the block
type, the rest fp16, norms fp32); :func:`read_gguf` lists a file's tensors and their bytes.

Used by Chapter 4.2b (quantization): the ``gguf-q8_0``/``gguf-q4_0`` methods and the GGUF file
section.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from cohw_utils.core.errors import CohwError
from cohw_utils.studies.quantization.blocks import block_linears
from cohw_utils.studies.quantization.schemes import QTensor, Scheme

#: Weights per GGUF block.
GGUF_BLOCK = 32
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

