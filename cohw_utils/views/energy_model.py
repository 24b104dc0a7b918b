"""Energy: what each operation and each byte costs, and where a workload phase's joules go.

Two pieces: the **energy data** (``data/energy_per_op.csv``: picojoules per arithmetic
operation by dtype and per memory access by level, every row with its source and process node)
and the **energy model**, which turns an op table (:mod:`cohw_utils.spine.trace`) into joules split
into arithmetic by dtype and data movement by memory level. Everything here is an estimate of
*dynamic* energy from published per-operation figures; static/idle power, clocks, control and
instruction overheads are not modelled (a measured GPU joule includes them: see
:mod:`cohw_utils.hardware.power_meters`).

Units: energies in the data file are **pJ per operation** (arithmetic) or **pJ per access of
``bits`` bits** (memory); :class:`EnergyTable` holds pJ per op and **pJ per byte**; results are
**joules**.

Energy table (:class:`EnergyTable`)
-----------------------------------
A preset picks one value per quantity from the data file:

* ``"45nm"``: the seed's table, Horowitz (ISSCC 2014) at 45 nm as used by Han et al. (2015):
  arithmetic from Horowitz, register file / 8 KB SRAM / DRAM from Han's 32-bit figures
  (1 / 5 / 640 pJ), the 1 MB SRAM from Horowitz (100 pJ per 64 bits).
* ``"7nm-hbm2e"`` / ``"7nm-hbm2"``: arithmetic at 7 nm (Jouppi et al. 2021, Table 2, which
  includes bf16), off-chip HBM2E (Micron, 6.0 pJ/bit) or HBM2 (O'Connor et al. 2017,
  3.9 pJ/bit). The data file has no cross-checked 7 nm SRAM or register-file figure, so on-chip
  levels keep the 45 nm values (an upper bound; each used row's node is shown by
  :meth:`EnergyTable.table`).

A **MAC** costs one multiply in its dtype plus one add in the accumulator dtype (int8 -> int32,
fp16/bf16 -> fp32, fp32 -> fp32). A **non-MAC FLOP** (element-wise, normalization, reductions:
one per element under :mod:`cohw_utils.spine.costs`) costs one multiply in its dtype; integer/bool
element-wise work costs one int32 add. bf16 at 45 nm is *derived* (the data row says how).

The reuse model (:class:`ReuseModel`)
-------------------------------------
Every byte the op table counts (``bytes_read + bytes_written``, each op reading its inputs and
writing its outputs once, see :mod:`cohw_utils.spine.costs`) is served from one *home* level and is
also staged through the **local SRAM** next to the arithmetic units (8 KB-class) once:

* **Weights** are the parameter tensors a contraction reads: the weight (and bias) operand of
  ``mm``/``addmm`` in a ``Linear``-class module and of ``convolution`` in a ``Conv``-class
  module, and the rows an ``embedding`` gathers. Each is read once per phase run, as the op
  table counts it (a GEMM reuses each weight across every row of its input, so a batch of B
  reads the weights once, not B times). *Fits*: if the phase's weight bytes together are at
  most ``onchip_bytes``, the weights stay resident on chip across runs and their home is the
  **on-chip buffer** (1 MB-class SRAM); otherwise their home is **off-chip** memory. Other
  parameters (norm scales, nerfacto's hash tables read by gathers) count as activations.
* **Activations** (every other tensor: inputs, intermediates, KV cache, outputs) live
  off-chip: each op reads and writes them there, as the op table counts (unfused, eager).
  With ``fusion=True``, an element-wise, normalization or cast (``_to_copy``) op whose whole
  working set *fits* (its bytes read + written <= ``onchip_bytes``) runs as an epilogue of its
  neighbour and its activation traffic stays in the on-chip buffer; contractions, KV-cache
  updates and other data movement still go off-chip. ``kv_in_place=True`` replaces a KV-cache
  append written as ``torch.cat(cache, new)`` (which re-reads and re-writes the whole cache each
  step) by an in-place write of the new entries, as paged-attention serving engines do.
* **Cache-resident activations** (``activations_resident=True``): what a fusing compiler with a
  large L2 does. Every activation tensor an op of the phase writes and a later op reads stays on
  chip (on-chip buffer, never written to or read from off-chip) if it fits: its bytes are at most
  ``onchip_bytes`` (less the weights, when they are resident). Off-chip still: the phase's inputs
  and the parameters that are not weights (no producer in the phase), its outputs (written, never
  read), tensors larger than the buffer, and the KV cache: a KV-cache write (``cat``,
  ``index_copy_``, a dynamic cache's first ``cat`` onto an empty tensor in prefill) goes
  off-chip, and a later read of the cache reads the past entries off-chip and only the new
  entries, still on chip, from the buffer. The op table records no tensor identities, so a
  tensor's producer is found by shape (:mod:`cohw_utils.views.tensor_links` says how, and
  where that errs); each tensor is tested against the buffer alone (not the set live at once,
  which a compiler's schedule keeps small). It replaces the ``fusion`` rule (``fusion`` is then
  ignored), which keeps only element-wise work on chip and sends every contraction's
  activations off-chip.
* **Processing in memory** (``pim=True``): off-chip weight reads are consumed by compute in the
  memory and do not cross the interface; they cost ``pim_read_fraction`` of the off-chip energy
  per byte (cell activation and in-die movement; the I/O is saved) and skip the local SRAM. The
  MACs cost the same as on the processor.
* **Register file**: ``rf_bytes_per_mac`` bytes are read from it per MAC (0 = a systolic array
  that passes operands between neighbours; a SIMT FMA reads three operands).

Latency ties in through :mod:`cohw_utils.views.roofline`: :func:`offchip_table` is the op table with
each row's bytes replaced by the bytes the reuse model sends off-chip (PIM weight bytes divided
by ``pim_bw_x``, the internal bandwidth of the memory relative to its interface), so
``roofline_summary(offchip_table(...), hw)`` is the time of the same what-if. On-chip bandwidth
is taken as unlimited.

What-ifs on the workload itself are transformations of its :class:`OpRoles`:
:meth:`OpRoles.quantized` (int8/int4 weights, W8A8); a batch is a trace at that batch.
Tracing registry workloads, the what-if table, the batch sweep and the figures are Chapter 4.4's
study, :mod:`cohw_utils.studies.energy`: a view takes op tables and never traces.

For design-space sweeps, compute :func:`op_roles` once per traced phase and call
:func:`workload_energy` per design point (vectorised numpy over the op rows, ~0.3 ms for a
2,500-row decode step); :meth:`EnergyTable.replace` makes a design point's table.

Used by Chapter 4.4 (power and energy, through :mod:`cohw_utils.studies.energy`) and Chapter 5
(the co-design sweeps of :mod:`cohw_utils.studies.codesign`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cohw_utils.core.data import DATA_DIR, read_table
from cohw_utils.core.dtypes import BYTES, bytes_per_element, dtype_name
from cohw_utils.core.errors import CohwError, DataFileError
from cohw_utils.hardware import Hardware
from cohw_utils.spine.costs import CONTRACTION, ELEMENTWISE, NORMALIZATION
from cohw_utils.views.roofline import roofline_summary
from cohw_utils.views.tensor_links import TensorLinks, tensor_links

__all__ = [
    "EnergyDataError", "load_energy_data", "EnergyTable", "PRESETS", "ReuseModel", "OpRoles",
    "op_roles", "workload_energy", "offchip_table", "evaluate_energy", "LEVELS", "LEVEL_LABELS",
    "MEMORY_LEVELS", "OFFCHIP_LEVELS",
]


class EnergyDataError(DataFileError):
    """A malformed row in the energy data file, or a quantity the file does not have."""


# ------------------------------------------------------------------------------ the data file
_COLUMNS = ("kind", "op", "dtype", "level", "bits", "energy_pj", "node", "preferred", "derived",
            "rule", "source", "citation", "notes")
MEMORY_LEVELS = ("register", "sram_8kb", "sram_32kb", "sram_1mb", "dram", "hbm2", "hbm2e",
                 "gddr6", "gddr6x")
OFFCHIP_LEVELS = ("dram", "hbm2", "hbm2e", "gddr6", "gddr6x")


def _default_csv() -> Path:
    return DATA_DIR / "energy_per_op.csv"


def _bad(path: Path, line: int, column: str, value: object, why: str) -> EnergyDataError:
    return EnergyDataError(f"{path}: line {line}: field '{column}' = {value!r} {why}; "
                           "fix the row in the energy data file")


@functools.lru_cache(maxsize=4)
def _load(path: Path) -> pd.DataFrame:
    try:
        text = read_table(path, required=_COLUMNS, dtype=str, keep_default_na=False, skipinitialspace=True)
    except DataFileError as err:  # a missing file or column: the same error class as a bad row
        raise EnergyDataError(f"energy data: {err}") from None
    rows = []
    for i, r in text.iterrows():
        line = int(i) + 2
        kind = r["kind"].strip()
        if kind not in ("arith", "memory"):
            raise _bad(path, line, "kind", kind, "is not 'arith' or 'memory'")
        for col in ("node", "source", "citation"):
            if not r[col].strip():
                raise _bad(path, line, col, r[col], "is empty")
        for col in ("preferred", "derived"):
            if r[col].strip() not in ("yes", "no"):
                raise _bad(path, line, col, r[col], "is not 'yes' or 'no'")
        if r["derived"].strip() == "yes" and not r["rule"].strip():
            raise _bad(path, line, "rule", r["rule"], "is empty for a derived row (state the rule)")
        try:
            bits, pj = int(r["bits"]), float(r["energy_pj"])
        except ValueError:
            raise _bad(path, line, "bits/energy_pj", (r["bits"], r["energy_pj"]), "is not a number") from None
        if bits <= 0 or not (math.isfinite(pj) and pj > 0):
            raise _bad(path, line, "bits/energy_pj", (bits, pj), "is not positive")
        if kind == "arith":
            if r["op"].strip() not in ("add", "mult"):
                raise _bad(path, line, "op", r["op"], "is not 'add' or 'mult'")
            try:
                dt = dtype_name(r["dtype"].strip())
            except CohwError:
                raise _bad(path, line, "dtype", r["dtype"], f"is not a known dtype ({', '.join(BYTES)})") from None
            level = ""
        else:
            level, dt = r["level"].strip(), ""
            if level not in MEMORY_LEVELS:
                raise _bad(path, line, "level", level, f"is not one of {', '.join(MEMORY_LEVELS)}")
        rows.append({**{c: r[c].strip() for c in _COLUMNS}, "kind": kind, "dtype": dt,
                     "level": level, "bits": bits, "energy_pj": pj,
                     "pj_per_byte": pj / (bits / 8) if kind == "memory" else float("nan"),
                     "line": line})
    data = pd.DataFrame(rows)
    key = data.assign(k=data["op"] + data["dtype"] + data["level"])
    pref = key[key["preferred"] == "yes"]
    dup = pref[pref.duplicated(["k", "node"], keep=False)]
    if len(dup):
        raise _bad(path, int(dup["line"].iloc[0]), "preferred", "yes",
                   "duplicates another preferred row for the same quantity and node")
    return data


def load_energy_data(path: str | Path | None = None) -> pd.DataFrame:
    """Every row of the energy data file (validated), with ``pj_per_byte`` added for memory rows.

    A malformed row raises :class:`EnergyDataError` naming the file, line and field.
    """
    resolved = Path(path).expanduser().resolve() if path is not None else _default_csv()
    return _load(resolved).copy()


# ------------------------------------------------------------------------------ energy table
#: Accumulator dtype of a MAC in each input dtype.
ACCUMULATOR = {"int8": "int32", "int4": "int32", "int32": "int32", "fp16": "fp32",
               "bf16": "fp32", "fp32": "fp32"}
#: Levels of data movement, in the order results and figures list them.
LEVELS = ("register", "local", "buffer", "offchip", "pim")
LEVEL_LABELS = {"register": "register file", "local": "local SRAM (8 KB-class)",
                "buffer": "on-chip buffer (1 MB-class SRAM)", "offchip": "off-chip DRAM/HBM",
                "pim": "in-memory (PIM) weight reads"}
_ONCHIP_ROWS = {"register": "register", "local": "sram_8kb", "buffer": "sram_1mb"}

#: Presets: (arithmetic node, off-chip memory level).
PRESETS: dict[str, tuple[str, str]] = {
    "45nm": ("45 nm", "dram"),
    "7nm-hbm2e": ("7 nm", "hbm2e"),
    "7nm-hbm2": ("7 nm", "hbm2"),
}


@dataclass(frozen=True)
class EnergyTable:
    """pJ per arithmetic op (``op_pj[(op, dtype)]``, op in add/mult) and pJ per byte per level
    (``byte_pj[level]``, levels register/local/buffer/offchip). ``rows`` are the data-file rows
    used. Build with :meth:`load`; change a figure with :meth:`replace` for a design point."""

    name: str
    node: str
    offchip: str
    op_pj: Mapping[tuple[str, str], float] = field(hash=False)
    byte_pj: Mapping[str, float] = field(hash=False)
    rows: pd.DataFrame = field(default=None, repr=False, compare=False, hash=False)

    @classmethod
    def load(cls, preset: str = "45nm", *, node: str | None = None, offchip: str | None = None,
             path: str | Path | None = None) -> "EnergyTable":
        """A table from a preset (``45nm``, ``7nm-hbm2e``, ``7nm-hbm2``), optionally with the
        arithmetic ``node`` (``"45 nm"``/``"7 nm"``) or the ``offchip`` level
        (dram/hbm2/hbm2e/gddr6/gddr6x) overridden."""
        if preset not in PRESETS:
            raise EnergyDataError(f"unknown energy preset {preset!r}; use one of: {', '.join(PRESETS)}")
        p_node, p_off = PRESETS[preset]
        node, offchip = node or p_node, offchip or p_off
        data = load_energy_data(path)
        pref = data[data["preferred"] == "yes"]
        arith = pref[(pref["kind"] == "arith") & (pref["node"] == node)]
        if arith.empty:
            nodes = sorted(set(pref.loc[pref["kind"] == "arith", "node"]))
            raise EnergyDataError(f"no arithmetic rows for node {node!r}; nodes in the data: {', '.join(nodes)}")
        if offchip not in OFFCHIP_LEVELS:
            raise EnergyDataError(f"unknown off-chip level {offchip!r}; use one of: {', '.join(OFFCHIP_LEVELS)}")
        mem = pref[pref["kind"] == "memory"]
        used, byte_pj = [arith], {}
        for level, row_level in [*_ONCHIP_ROWS.items(), ("offchip", offchip)]:
            cand = mem[mem["level"] == row_level]
            same = cand[cand["node"] == node]
            pick = same if len(same) else cand[cand["node"] == "45 nm"] if row_level in _ONCHIP_ROWS.values() else cand
            if pick.empty:
                raise EnergyDataError(f"the energy data has no preferred row for level {row_level!r}")
            byte_pj[level] = float(pick["pj_per_byte"].iloc[0])
            used.append(pick.iloc[:1])
        op_pj = {(r.op, r.dtype): float(r.energy_pj) for r in arith.itertuples()}
        name = f"{node} arithmetic, {offchip} off-chip"
        return cls(name, node, offchip, op_pj, byte_pj, pd.concat(used, ignore_index=True))

    def replace(self, *, op_scale: float = 1.0, byte_pj: Mapping[str, float] | None = None,
                name: str | None = None) -> "EnergyTable":
        """A design-point variant: every arithmetic energy times ``op_scale``; levels in
        ``byte_pj`` (pJ/byte) replaced. The source rows are kept for reference."""
        if op_scale <= 0:
            raise CohwError(f"op_scale must be positive, got {op_scale}")
        new_bytes = dict(self.byte_pj)
        for level, v in (byte_pj or {}).items():
            if level not in self.byte_pj:
                raise CohwError(f"unknown level {level!r}; levels: {', '.join(self.byte_pj)}")
            if not v >= 0:
                raise CohwError(f"byte_pj[{level!r}] must be >= 0, got {v}")
            new_bytes[level] = float(v)
        ops = {k: v * op_scale for k, v in self.op_pj.items()}
        return dataclasses.replace(self, op_pj=ops, byte_pj=new_bytes, name=name or f"{self.name} (modified)")

    def _op(self, op: str, dtype: str) -> float:
        try:
            return self.op_pj[(op, dtype)]
        except KeyError:
            have = sorted({d for (_, d) in self.op_pj})
            raise EnergyDataError(f"no {op} energy for dtype {dtype!r} at {self.node}; "
                                  f"dtypes with energies: {', '.join(have)}") from None

    def mac_pj(self, dtype: str) -> float:
        """One multiply-accumulate: multiply in ``dtype`` + add in its accumulator dtype."""
        d = dtype_name(dtype)
        return self._op("mult", d) + self._op("add", ACCUMULATOR.get(d, d))

    def flop_pj(self, dtype: str) -> float:
        """One non-MAC FLOP (element-wise/normalization/reduction): a multiply in ``dtype``;
        integer and bool work costs an int32 add; a float dtype without a figure costs fp32."""
        try:
            d = dtype_name(dtype)
        except CohwError:
            d = "fp32"
        if d in ("int64", "int32", "int8", "uint8", "bool", "int4"):
            return self._op("add", "int32")
        if ("mult", d) not in self.op_pj:
            d = "fp32"
        return self._op("mult", d)

    def table(self) -> pd.DataFrame:
        """The figures this table uses, with their source, node and whether derived."""
        out = self.rows[["kind", "op", "dtype", "level", "bits", "energy_pj", "pj_per_byte",
                         "node", "derived", "rule", "source", "citation"]].copy()
        return out.reset_index(drop=True)


# ------------------------------------------------------------------------------ reuse model
@dataclass(frozen=True)
class ReuseModel:
    """Where each byte is served from (see the module docstring). ``onchip_bytes=None`` takes
    the last-level cache of the ``hw`` given to :func:`workload_energy`."""

    onchip_bytes: float | None = None
    fusion: bool = False
    activations_resident: bool = False
    pim: bool = False
    kv_in_place: bool = False
    weights_resident: str | bool = "auto"
    rf_bytes_per_mac: float = 0.0
    pim_read_fraction: float = 0.5
    pim_bw_x: float = 1.0

    def resolve(self, hw: Hardware | None) -> "ReuseModel":
        """Validated copy with ``onchip_bytes`` filled in from ``hw.llc_bytes``."""
        onchip = self.onchip_bytes
        if onchip is None:
            if hw is None or hw.llc_bytes is None:
                raise CohwError("ReuseModel.onchip_bytes is unset and no hardware with a published "
                                "last-level cache was given; pass onchip_bytes= or hw=")
            onchip = hw.llc_bytes
        if not onchip >= 0:
            raise CohwError(f"onchip_bytes must be >= 0, got {onchip}")
        if self.weights_resident not in ("auto", True, False):
            raise CohwError(f"weights_resident must be 'auto', True or False, got {self.weights_resident!r}")
        if not 0 <= self.pim_read_fraction <= 1:
            raise CohwError(f"pim_read_fraction must be in [0, 1], got {self.pim_read_fraction}")
        if not self.pim_bw_x > 0:
            raise CohwError(f"pim_bw_x must be positive, got {self.pim_bw_x}")
        if not self.rf_bytes_per_mac >= 0:
            raise CohwError(f"rf_bytes_per_mac must be >= 0, got {self.rf_bytes_per_mac}")
        return dataclasses.replace(self, onchip_bytes=float(onchip))


# ------------------------------------------------------------------------------ op roles
_LINEAR_OPS = {"aten.mm.default": (1,), "aten.addmm.default": (0, 2)}
_CONV_OPS = {"aten.convolution.default", "aten._convolution.default", "aten.conv2d.default",
             "aten.conv1d.default", "aten.conv3d.default"}
_GATHER_WEIGHT_OPS = {"aten.embedding.default"}
_FUSABLE_CLASSES = {ELEMENTWISE, NORMALIZATION}
_FUSABLE_OPS = {"aten._to_copy.default"}


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _weight_inputs(op: str, module_class: str) -> tuple[int, ...]:
    """Input positions of an op that are weights (see the module docstring for the rules)."""
    cls = module_class or ""
    if op in _GATHER_WEIGHT_OPS:
        return (0,)
    if op in _LINEAR_OPS and ("Linear" in cls or cls == "Conv1D"):
        return _LINEAR_OPS[op]
    if op in _CONV_OPS and "Conv" in cls:
        return (1, 2)
    return ()


def _weight_read(op: str, module_class: str, shapes: tuple, dtype: str, written: float) -> float:
    """Bytes of parameter tensors an op reads (see the module docstring for the rules)."""
    if op in _GATHER_WEIGHT_OPS:
        return written  # the gathered rows
    idx = _weight_inputs(op, module_class)
    if not idx:
        return 0.0
    try:
        esize = bytes_per_element(dtype)
    except (CohwError, KeyError):
        return 0.0
    return float(sum(_numel(shapes[i]) for i in idx if i < len(shapes)) * esize)


def _is_kv_append(op: str, module_class: str, shapes: tuple) -> bool:
    """A KV-cache append inside an attention module: ``torch.cat([cache, new], dim=-2)`` (HF
    ``DynamicCache``: re-reads and re-writes the cache) or ``cache.index_copy_(2, pos, new)``
    (``StaticCache``: writes the new entries in place). The new entries are the last input."""
    if "Attention" not in (module_class or ""):
        return False
    if op == "aten.cat.default" and len(shapes) == 2:
        a, b = shapes
        return len(a) == len(b) == 4 and a[:2] == b[:2] and a[-1] == b[-1] and a[-2] > b[-2]
    if op in ("aten.index_copy_.default", "aten.index_copy.default") and len(shapes) == 3:
        a, b = shapes[0], shapes[2]
        return len(a) == len(b) == 4 and a[:2] == b[:2] and a[-1] == b[-1]
    return False


def _is_kv_store(op: str, module_class: str, shapes: tuple) -> bool:
    """A dynamic cache's first write: ``torch.cat([empty, new])`` inside an attention module
    (HF ``DynamicCache`` in prefill), which :func:`_is_kv_append` does not count as an append."""
    return ("Attention" in (module_class or "") and op == "aten.cat.default" and len(shapes) == 2
            and _numel(shapes[0]) == 0 and len(shapes[1]) == 4)


@dataclass
class OpRoles:
    """Per-row arrays of one op table, split by role, ready for :func:`workload_energy`.

    Bytes: ``weight_read`` (parameter bytes read), ``act_read`` (other bytes read),
    ``written``; ``fusable`` marks element-wise/normalization/cast rows; ``kv_append`` marks
    KV-cache appends (``cat`` of a dynamic cache, ``index_copy_`` of a static one) and ``kv_new``
    their new-entry bytes (the ``kv_in_place`` what-if charges only these; a static cache already does);
    ``kv_store`` marks a dynamic cache's first write in prefill, and ``links`` are the producer
    links (:mod:`cohw_utils.views.tensor_links`) the ``activations_resident`` model reads. ``macs`` and ``other_flops``
    (FLOPs that are not half of a MAC) by row, ``dtype`` the short dtype name per row.
    ``aux_flops`` are (de)quantization multiplies a what-if adds, charged in ``aux_dtype`` (the
    original dtype). ``units``/``unit_name`` come from the phase when built from an
    :class:`~cohw_utils.spine.analyze.Analysis`.
    """

    table: pd.DataFrame
    dtype: np.ndarray
    contraction: np.ndarray
    macs: np.ndarray
    other_flops: np.ndarray
    weight_read: np.ndarray
    act_read: np.ndarray
    written: np.ndarray
    fusable: np.ndarray
    kv_append: np.ndarray
    kv_new: np.ndarray
    units: int | None = None
    unit_name: str | None = None
    label: str = ""
    notes: tuple[str, ...] = ()
    aux_flops: np.ndarray | None = None
    aux_dtype: np.ndarray | None = None
    kv_store: np.ndarray | None = None
    links: TensorLinks | None = None

    def __post_init__(self) -> None:
        if self.aux_flops is None:
            self.aux_flops = np.zeros(len(self.macs))
        if self.kv_store is None:
            self.kv_store = np.zeros(len(self.macs), dtype=bool)
        if self.aux_dtype is None:
            self.aux_dtype = self.dtype

    @property
    def weight_bytes(self) -> float:
        """Parameter bytes the phase reads (each weight once per run)."""
        return float(self.weight_read.sum())

    def quantized(self, weights: str = "int8", activations: str | None = None,
                  group_size: int | None = None) -> "OpRoles":
        """The same phase with weights stored in ``weights`` (int8/int4/fp8...).

        Weight-only (``activations=None``): weight bytes scale to the new element size plus an
        fp16 scale per ``group_size`` weights (default 128 for int4, per-channel, i.e.
        negligible, otherwise); arithmetic stays in the original dtype and each weight costs one
        dequantizing multiply per run. ``activations="int8"``: weight-bearing contractions run
        as int8 MACs (int32 accumulate) on int8 inputs, with one multiply per input and output
        element to quantize and dequantize.
        """
        wname = dtype_name(weights)
        if activations is not None and dtype_name(activations) != "int8":
            raise CohwError(f"activations must be None (weight-only) or 'int8', got {activations!r}")
        if group_size is None:
            group_size = 128 if BYTES[wname] < 1 else 0
        if group_size < 0:
            raise CohwError(f"group_size must be >= 0, got {group_size}")
        new_w = BYTES[wname] + (2.0 / group_size if group_size else 0.0)
        esize = np.array([_esize(d) for d in self.dtype])
        is_w = self.weight_read > 0
        w_elems = np.where(is_w, self.weight_read / esize, 0.0)
        if activations is None:
            return dataclasses.replace(self, weight_read=w_elems * new_w, aux_flops=self.aux_flops + w_elems,
                                       label=f"{self.label} {wname} weights".strip())
        wa = is_w & self.contraction
        act_elems = np.where(wa, self.act_read / esize, 0.0)
        out_elems = np.where(wa, self.written / esize, 0.0)
        return dataclasses.replace(
            self, weight_read=w_elems * new_w, dtype=np.where(wa, "int8", self.dtype).astype(object),
            act_read=np.where(wa, act_elems * 1.0, self.act_read),
            aux_flops=self.aux_flops + act_elems + out_elems, aux_dtype=self.aux_dtype,
            label=f"{self.label} W{wname.removeprefix('int')}A8".strip())


def _esize(d: str) -> float:
    try:
        return float(bytes_per_element(d))
    except (CohwError, KeyError):
        return 4.0


def op_roles(source: Any, label: str = "") -> OpRoles:
    """Split an op table (or an :class:`~cohw_utils.spine.analyze.Analysis`) into :class:`OpRoles`.

    Uncosted rows (NaN costs) count as zero and are listed in ``notes``.
    """
    units = unit_name = None
    table = source
    if hasattr(source, "table") and hasattr(source, "units"):
        table, units, unit_name = source.table, source.units, source.unit_name
        label = label or f"{source.workload}:{source.phase}"
    if not isinstance(table, pd.DataFrame):
        raise CohwError(f"op_roles needs an op table (DataFrame) or an Analysis, got {type(source).__name__}")
    needed = {"op", "module_class", "op_class", "input_shapes", "dtype", "flops", "macs",
              "bytes_read", "bytes_written", "costed"}
    missing = needed - set(table.columns)
    if missing:
        raise CohwError(f"not an op table: missing column(s) {', '.join(sorted(missing))}; "
                        "build it with cohw_utils.spine.trace.trace")
    t = table
    costed = t["costed"].to_numpy(dtype=bool)
    f = lambda c: np.nan_to_num(t[c].to_numpy(dtype=float)) * costed  # noqa: E731
    flops, macs, read, written = f("flops"), f("macs"), f("bytes_read"), f("bytes_written")
    dtype_short = []
    for d in t["dtype"]:
        try:
            dtype_short.append(dtype_name(d) if d else "fp32")
        except CohwError:
            dtype_short.append("fp32")
    dtype_arr = np.array(dtype_short, dtype=object)
    ops, classes = t["op"].to_numpy(), t["module_class"].to_numpy()
    shapes = t["input_shapes"].to_numpy()
    weight = np.array([_weight_read(o, c, s, d, w) for o, c, s, d, w in
                       zip(ops, classes, shapes, dtype_short, written)], dtype=float)
    weight = np.minimum(weight, read) * costed
    kv = np.array([_is_kv_append(o, c, s) for o, c, s in zip(ops, classes, shapes)], dtype=bool)
    store = np.array([_is_kv_store(o, c, s) for o, c, s in zip(ops, classes, shapes)], dtype=bool)
    kv_new = np.array([_numel(s[-1]) * _esize(d) if k else 0.0
                       for k, s, d in zip(kv | store, shapes, dtype_short)], dtype=float)
    links = tensor_links(t, [_weight_inputs(o, c) if w > 0 else () for o, c, w in zip(ops, classes, weight)],
                         [_esize(d) for d in dtype_short])
    op_class = t["op_class"].to_numpy()
    fusable = np.isin(op_class, list(_FUSABLE_CLASSES)) | np.isin(ops, list(_FUSABLE_OPS))
    notes = []
    if (~costed).any():
        notes.append(f"{int((~costed).sum())} uncosted op(s) counted as zero")
    return OpRoles(table=t, dtype=dtype_arr, contraction=(op_class == CONTRACTION),
                   macs=macs, other_flops=np.maximum(flops - 2 * macs, 0.0), weight_read=weight,
                   act_read=read - weight, written=written, fusable=fusable & costed,
                   kv_append=kv, kv_new=kv_new, units=units, unit_name=unit_name, label=label,
                   notes=tuple(notes), kv_store=store, links=links)


def _as_roles(et: Any) -> OpRoles:
    return et if isinstance(et, OpRoles) else op_roles(et)


# ------------------------------------------------------------------------------ the model
def _split(roles: OpRoles, model: ReuseModel) -> dict[str, np.ndarray | bool]:
    """Per-row bytes by home level: weights (buffer/offchip/pim), activations (buffer/offchip)."""
    onchip = model.onchip_bytes
    w = roles.weight_read
    if model.weights_resident == "auto":
        resident = bool(w.sum() <= onchip)
    else:
        resident = bool(model.weights_resident)
    w_buf = w if resident else np.zeros_like(w)
    w_off = np.zeros_like(w) if resident else w
    w_pim = np.zeros_like(w)
    if model.pim and not resident:
        w_pim, w_off = w_off, np.zeros_like(w)
    act_r, act_w = roles.act_read, roles.written
    if model.kv_in_place:
        act_r = np.where(roles.kv_append, roles.kv_new, act_r)
        act_w = np.where(roles.kv_append, roles.kv_new, act_w)
    if model.activations_resident:
        read_on, write_on = _resident_activations(roles, act_r, act_w, onchip - float(w_buf.sum()),
                                                  model.kv_in_place)
        return {"w_buf": w_buf, "w_off": w_off, "w_pim": w_pim, "resident": resident,
                "a_read_off": act_r - read_on, "a_write_off": act_w - write_on,
                "a_buf": read_on + write_on,
                "fused": (read_on + write_on > 0) & (read_on + write_on >= act_r + act_w)}
    fused = np.zeros(len(w), dtype=bool)
    if model.fusion:
        fused = roles.fusable & ((roles.act_read + roles.written + w) <= onchip)
    return {"w_buf": w_buf, "w_off": w_off, "w_pim": w_pim, "resident": resident,
            "a_read_off": np.where(fused, 0.0, act_r), "a_write_off": np.where(fused, 0.0, act_w),
            "a_buf": np.where(fused, act_r + act_w, 0.0), "fused": fused}


def _resident_activations(roles: OpRoles, act_r: np.ndarray, act_w: np.ndarray, capacity: float,
                          kv_in_place: bool) -> tuple[np.ndarray, np.ndarray]:
    """Bytes read and written on chip per row under ``activations_resident`` (module docstring):
    a row's output stays if it is read later, fits ``capacity`` and is no KV-cache write; a
    read is on chip in the share of its inputs whose producer kept them (a KV write keeps its
    new entries, ``kv_new`` of the cache it writes; an in-place append reads only those)."""
    links = roles.links
    if links is None:
        raise CohwError("activations_resident=True needs OpRoles built by op_roles (they carry the "
                        "producer links); call energy_model.op_roles(table)")
    n = len(act_w)
    kv = roles.kv_append | roles.kv_store
    kept = links.consumed & ~kv & (act_w > 0) & (act_w <= capacity)
    new_share = np.divide(roles.kv_new, links.out_nominal, out=np.zeros(n), where=links.out_nominal > 0)
    frac = np.where(kv, np.where(roles.kv_new <= capacity, np.minimum(new_share, 1.0), 0.0), kept * 1.0)
    root = np.where(links.in_root < 0, n, links.in_root)
    on_share = np.bincount(links.in_row, weights=links.in_share * np.append(frac, 0.0)[root], minlength=n)
    read_on = act_r * np.minimum(on_share, 1.0)
    if kv_in_place:  # the append reads just its new entries: on chip where their producer kept them
        new_on = np.append(frac, 0.0)[np.where(links.last_root < 0, n, links.last_root)]
        read_on = np.where(roles.kv_append, act_r * new_on, read_on)
    return read_on, np.where(kept, act_w, 0.0)


def workload_energy(table: EnergyTable, et: Any, model: ReuseModel | None = None,
                    hw: Hardware | None = None, units: int | None = None,
                    unit: str | None = None) -> dict[str, Any]:
    """Joules of one phase run: arithmetic by dtype and data movement by level.

    ``et`` is an op table, an :class:`~cohw_utils.spine.analyze.Analysis` or precomputed
    :class:`OpRoles`. Returns a flat dict: ``arith_<dtype>_J``, ``compute_J``, ``<level>_J`` for
    the :data:`LEVELS`, ``memory_J``, ``total_J``, ``memory_share``, bytes per home level,
    ``weights_resident``, and ``*_per_unit`` when the phase's units are known.
    """
    roles = _as_roles(et)
    m = (model or ReuseModel()).resolve(hw)
    s = _split(roles, m)
    pj = 1e-12
    out: dict[str, Any] = {"label": roles.label, "energy_table": table.name}
    arith: dict[str, float] = {}
    macs, other = roles.macs, roles.other_flops
    for d in sorted(set(roles.dtype) | set(roles.aux_dtype)):
        mask, aux = roles.dtype == d, roles.aux_dtype == d
        n_mac, n_other = float(macs[mask].sum()), float(other[mask].sum() + roles.aux_flops[aux].sum())
        if n_mac == 0 and n_other == 0:
            continue
        e = (n_mac * table.mac_pj(d) if n_mac else 0.0) + (n_other * table.flop_pj(d) if n_other else 0.0)
        arith[d] = e * pj
    for d, e in arith.items():
        out[f"arith_{d}_J"] = e
    compute = sum(arith.values())
    offchip_bytes = float(s["w_off"].sum() + s["a_read_off"].sum() + s["a_write_off"].sum())
    buffer_bytes = float(s["w_buf"].sum() + s["a_buf"].sum())
    pim_bytes = float(s["w_pim"].sum())
    local_bytes = offchip_bytes + buffer_bytes  # every byte served to the processor is staged once
    b = table.byte_pj
    levels = {
        "register": m.rf_bytes_per_mac * float(macs.sum()) * b["register"] * pj,
        "local": local_bytes * b["local"] * pj,
        "buffer": buffer_bytes * b["buffer"] * pj,
        "offchip": offchip_bytes * b["offchip"] * pj,
        "pim": pim_bytes * b["offchip"] * m.pim_read_fraction * pj,
    }
    for lv in LEVELS:
        out[f"{lv}_J"] = levels[lv]
    memory = sum(levels.values())
    total = compute + memory
    out.update(compute_J=compute, memory_J=memory, total_J=total,
               memory_share=memory / total if total else float("nan"),
               offchip_bytes=offchip_bytes, buffer_bytes=buffer_bytes, pim_bytes=pim_bytes,
               weight_bytes=roles.weight_bytes, weights_resident=s["resident"],
               fused_ops=int(s["fused"].sum()), macs=float(macs.sum()),
               flops=float(2 * macs.sum() + other.sum() + roles.aux_flops.sum()))
    units = units if units is not None else roles.units
    unit = unit or roles.unit_name
    if units:
        out.update(units=units, unit=unit, total_J_per_unit=total / units,
                   compute_J_per_unit=compute / units, memory_J_per_unit=memory / units)
    return out


def offchip_table(et: Any, model: ReuseModel | None = None, hw: Hardware | None = None) -> pd.DataFrame:
    """The op table with each row's bytes replaced by what the reuse model sends off-chip
    (PIM weight bytes divided by ``pim_bw_x``) and quantized contractions' dtype set: feed it to
    :func:`cohw_utils.views.roofline.roofline_summary` for the latency of the same what-if."""
    roles = _as_roles(et)
    m = (model or ReuseModel()).resolve(hw)
    s = _split(roles, m)
    t = roles.table.copy()
    costed = t["costed"].to_numpy(dtype=bool)
    read = s["w_off"] + s["a_read_off"] + s["w_pim"] / m.pim_bw_x
    t["bytes_read"] = np.where(costed, read, t["bytes_read"])
    t["bytes_written"] = np.where(costed, s["a_write_off"], t["bytes_written"])
    short = np.array([_short_or(d) for d in t["dtype"]], dtype=object)
    changed = roles.dtype != short
    if changed.any():
        t["dtype"] = np.where(changed, roles.dtype, t["dtype"])
    return t


def _short_or(d: str) -> str:
    try:
        return dtype_name(d) if d else "fp32"
    except CohwError:
        return "fp32"


def evaluate_energy(table: EnergyTable, et: Any, model: ReuseModel | None = None, hw: Hardware | None = None,
                    efficiency: float = 1.0) -> dict[str, Any]:
    """:func:`workload_energy` plus the roofline time of the same what-if on ``hw``
    (``time_s``, ``memory_bound_share``, per unit when known) and the implied average dynamic
    power ``power_W`` = joules / roofline seconds."""
    if hw is None:
        raise CohwError("evaluate_energy needs hw= (a Hardware from cohw_utils.hardware.get_hardware)")
    out = workload_energy(table, et, model, hw)
    roof = roofline_summary(offchip_table(et, model, hw), hw, efficiency)
    out.update(time_s=roof["time_s"], memory_bound_share=roof["memory_bound_share"],
               power_W=out["total_J"] / roof["time_s"] if roof["time_s"] else float("nan"))
    if out.get("units"):
        out["time_s_per_unit"] = roof["time_s"] / out["units"]
    return out
