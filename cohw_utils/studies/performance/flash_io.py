"""FlashAttention's IO: the bytes standard attention and a tiled (flash) kernel move, and a
measured CPU comparison of PyTorch's math and flash SDPA backends.

Dao et al. (NeurIPS 2022), Theorem 2: for sequence length ``N``, head dimension ``d`` and an
on-chip memory (SRAM) of ``M`` elements with ``d <= M <= N d``, standard attention makes
``Theta(N d + N^2)`` HBM accesses and FlashAttention ``Theta(N^2 d^2 / M)``. The counts here are
exact for the two algorithms, per (batch, head), times ``batch x heads x bytes per element``:

**Math path** (the paper's Algorithm 0, what ``SDPBackend.MATH`` runs): read Q and K, write
``S = Q K^T``; read S, write ``P = softmax(S)``; read P and V, write ``O = P V``::

    reads  = 2 N d + N^2 + (N^2 + N d) = 3 N d + 2 N^2
    writes = N^2 + N^2 + N d           = 2 N^2 + N d

S and P are in the input dtype (as in torch's math path). The softmax's own temporaries
(the row max and sum; torch's ``exp`` buffer) are not counted: a floor, not a ceiling.

**Flash kernel**, tiled so that blocks of Q, K, V and O fit in ``M`` (elements = on-chip bytes
/ bytes per element), in one of two loop orders:

* ``"q_outer"`` (default; FlashAttention-2's order, and the order of PyTorch's CPU flash
  kernel): the outer loop walks ``T_r = ceil(N / B_r)`` query blocks, each read once, with its
  output block written once; the inner loop re-reads every K and V block for each query block.
  Blocks ``B_r = B_c = floor(M / (4 d))`` (a Q, K, V and O block of ``B x d`` each), capped at N;
  the ``B_r x B_c`` score tile is assumed to live in registers. Traffic: ``N d`` (Q) +
  ``2 N d T_r`` (K, V) + ``N d`` (O) elements, plus the logsumexp, ``N`` fp32 values written.
* ``"kv_outer"``: the paper's Algorithm 1, as Theorem 2 analyses it: ``B_c = ceil(M / (4 d))``,
  ``B_r = min(B_c, d)``; K and V read once, and for each of the ``T_c = ceil(N / B_c)`` K/V
  blocks every Q block is read and every O block read and written (with its row statistics
  ``l`` and ``m``, ``2 N`` values each way, in fp32). Traffic: ``2 N d`` + ``T_c (N d + N d
  + 2 N)`` read, ``T_c (N d + 2 N)`` written.

Both fall as ``M`` grows until one block covers the whole sequence, where K and V (or Q and O)
are read once. Measured (:func:`measure_sdpa`): ``F.scaled_dot_product_attention`` under
``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`` and ``(SDPBackend.FLASH_ATTENTION)`` on
the CPU, timed with :func:`cohw_utils.core.timing.time_callable` (median, min, max), and the
bytes each materialises, counted by a dispatch mode over the aten ops it runs
(:func:`materialized_bytes`: every new output storage, and the peak of those alive at once).

Used by Chapter 4.3 (section 4.3.3, fusion: FlashAttention's IO).
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import pandas as pd
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cohw_utils.core.dtypes import bytes_per_element, dtype_name, parse_dtype
from cohw_utils.core.errors import CohwError
from cohw_utils.core.timing import time_callable

#: On-chip SRAM per streaming multiprocessor of an A100, as Dao et al. state it (192 KB).
A100_SRAM_BYTES = 192 * 1000
LOOP_ORDERS = ("q_outer", "kv_outer")
_STAT_BYTES = 4  # logsumexp / row statistics are fp32


@dataclass(frozen=True)
class AttentionIO:
    """Bytes read and written by one attention forward (all batches and heads)."""

    path: str
    reads: float
    writes: float
    block_rows: int | None = None   # B_r (flash only)
    block_cols: int | None = None   # B_c (flash only)
    passes: int | None = None       # T_r (q_outer: K/V passes) or T_c (kv_outer: Q/O passes)

    @property
    def total(self) -> float:
        return self.reads + self.writes


def _check(seq_len: int, head_dim: int, heads: int, batch: int) -> None:
    for name, v in (("seq_len", seq_len), ("head_dim", head_dim), ("heads", heads), ("batch", batch)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise CohwError(f"{name} must be a positive integer, got {v!r}")


def math_io(seq_len: int, head_dim: int, heads: int = 1, batch: int = 1, dtype: str = "fp32") -> AttentionIO:
    """Standard attention's HBM traffic (see the module docstring): ``(3Nd + 2N^2)`` elements
    read and ``(2N^2 + Nd)`` written per head, times batch x heads x bytes per element."""
    _check(seq_len, head_dim, heads, batch)
    n, d, e = seq_len, head_dim, bytes_per_element(dtype)
    scale = batch * heads * e
    return AttentionIO("math", reads=scale * (3 * n * d + 2 * n * n), writes=scale * (2 * n * n + n * d))


def flash_io(seq_len: int, head_dim: int, heads: int = 1, batch: int = 1, dtype: str = "fp32",
             sram_bytes: float = A100_SRAM_BYTES, loop_order: str = "q_outer") -> AttentionIO:
    """A tiled (flash) kernel's HBM traffic for an on-chip memory of ``sram_bytes`` (see the
    module docstring for the two loop orders and their block sizes)."""
    _check(seq_len, head_dim, heads, batch)
    if loop_order not in LOOP_ORDERS:
        raise CohwError(f"loop_order must be one of {', '.join(LOOP_ORDERS)}, got {loop_order!r}")
    e = bytes_per_element(dtype)
    if not (isinstance(sram_bytes, (int, float)) and math.isfinite(sram_bytes) and sram_bytes > 0):
        raise CohwError(f"sram_bytes must be a positive number of bytes, got {sram_bytes!r}")
    n, d = seq_len, head_dim
    m = int(sram_bytes // e)  # elements
    if m < 4 * d:
        raise CohwError(f"an on-chip memory of {sram_bytes:g} B holds {m} {dtype_name(parse_dtype(dtype))} "
                        f"elements, fewer than the 4 x head_dim = {4 * d} a Q, K, V and O row need; "
                        "use a larger sram_bytes")
    scale = batch * heads
    if loop_order == "q_outer":
        block = min(m // (4 * d), n)
        passes = math.ceil(n / block)
        reads = scale * e * (n * d + 2 * n * d * passes)
        writes = scale * (e * n * d + _STAT_BYTES * n)
        return AttentionIO("flash", reads=reads, writes=writes, block_rows=block, block_cols=block, passes=passes)
    bc = min(math.ceil(m / (4 * d)), n)
    br = min(bc, d, n)
    passes = math.ceil(n / bc)
    reads = scale * (e * 2 * n * d + passes * (e * 2 * n * d + _STAT_BYTES * 2 * n))
    writes = scale * passes * (e * n * d + _STAT_BYTES * 2 * n)
    return AttentionIO("flash", reads=reads, writes=writes, block_rows=br, block_cols=bc, passes=passes)


def io_table(seq_lens, head_dim: int = 64, heads: int = 1, batch: int = 1, dtype: str = "fp16",
             sram_bytes: float = A100_SRAM_BYTES, loop_order: str = "q_outer") -> pd.DataFrame:
    """Math-path and flash bytes for each sequence length: one row per N with ``math_MB``,
    ``flash_MB``, ``ratio`` (math / flash), the flash block sizes and passes (1 MB = 1e6 B)."""
    rows = []
    for n in seq_lens:
        m, f = math_io(n, head_dim, heads, batch, dtype), flash_io(n, head_dim, heads, batch, dtype, sram_bytes, loop_order)
        rows.append({"N": n, "math_MB": m.total / 1e6, "flash_MB": f.total / 1e6, "ratio": m.total / f.total,
                     "block": f.block_rows if loop_order == "q_outer" else f"{f.block_rows}x{f.block_cols}",
                     "passes": f.passes})
    out = pd.DataFrame(rows).set_index("N")
    out.attrs.update(head_dim=head_dim, heads=heads, batch=batch, dtype=dtype, sram_bytes=sram_bytes,
                     loop_order=loop_order)
    return out


# ----------------------------------------------------------------------------- measured
class _Materialized(TorchDispatchMode):
    """Counts the bytes of every new output storage of the aten ops run under it, and the peak
    of those alive at once (each freed when its last tensor is collected)."""

    def __init__(self) -> None:
        super().__init__()
        self.allocated = 0
        self.live = 0
        self.peak = 0
        self.ops: list[str] = []
        self._refs: dict[int, int] = {}

    def _release(self, key: int, nbytes: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(str(func.overloadpacket))
        flat = torch.utils._pytree.tree_leaves((args, kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in flat if isinstance(a, torch.Tensor)}
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if key in inputs and key not in self._refs:  # a view or in-place result of an input: not new
                continue
            if key not in self._refs:
                self._refs[key] = 0
                self.allocated += nbytes
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            self._refs[key] += 1
            weakref.finalize(t, self._release, key, nbytes)
        return out


def materialized_bytes(fn, *args, **kwargs) -> dict:
    """Run ``fn(*args, **kwargs)`` once and count what its aten ops allocate: ``allocated``
    (bytes of every new output storage, the output included), ``peak_live`` (most bytes of those
    alive at once) and ``ops`` (the aten ops, in order)."""
    mode = _Materialized()
    with mode:
        out = fn(*args, **kwargs)
    del out
    return {"allocated": mode.allocated, "peak_live": mode.peak, "ops": mode.ops}


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION}[name])


def measure_sdpa(seq_lens=(512, 1024, 2048), head_dim: int = 64, heads: int = 4, batch: int = 1,
                 dtype: str = "fp32", repeats: int = 5, warmup: int = 1, seed: int = 0) -> pd.DataFrame:
    """Time ``F.scaled_dot_product_attention`` (non-causal) on the CPU under the math and the
    flash backend for each N, and count the bytes each materialises (:func:`materialized_bytes`).
    One row per N: median/min/max ms of each backend, ``speedup`` (math median / flash median),
    allocated and peak-live MiB of each, the IO model's bytes (:func:`math_io`; flash is left to
    the caller, since its M is a choice) and the largest difference between the two outputs."""
    _check(max(seq_lens), head_dim, heads, batch)
    torch_dtype = parse_dtype(dtype)
    if repeats < 1:
        raise CohwError(f"repeats must be >= 1, got {repeats}")
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in seq_lens:
        _check(n, head_dim, heads, batch)
        q, k, v = (torch.randn(batch, heads, n, head_dim, generator=g).to(torch_dtype) for _ in range(3))
        row: dict = {"N": n}
        outs = {}
        for name in ("math", "flash"):
            with _sdpa_backend(name), torch.no_grad():
                call = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
                t = time_callable(call, repeats=repeats, warmup=warmup)
                mem = materialized_bytes(call)
                outs[name] = call()
            row.update({f"{name}_ms": 1e3 * t.median, f"{name}_min_ms": 1e3 * t.min, f"{name}_max_ms": 1e3 * t.max,
                        f"{name}_alloc_MiB": mem["allocated"] / 2**20, f"{name}_peak_MiB": mem["peak_live"] / 2**20,
                        f"{name}_ops": len(mem["ops"])})
        row["speedup"] = row["math_ms"] / row["flash_ms"]
        row["model_math_MiB"] = math_io(n, head_dim, heads, batch, dtype).total / 2**20
        row["max_abs_diff"] = float((outs["math"].float() - outs["flash"].float()).abs().max())
        rows.append(row)
    out = pd.DataFrame(rows).set_index("N")
    out.attrs["method"] = (f"F.scaled_dot_product_attention, batch {batch}, {heads} heads, head_dim {head_dim}, "
                           f"{dtype_name(torch_dtype)}, non-causal, under sdpa_kernel(MATH) and (FLASH_ATTENTION); "
                           f"median of {repeats} timed calls after {warmup} warm-up (time.perf_counter), "
                           f"{torch.get_num_threads()} threads; bytes from a dispatch mode over the aten ops")
    return out
