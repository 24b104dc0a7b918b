"""Traced phases prepared for the co-design loop: one op table per phase, split once into the
per-op arrays every design point reuses.

A :class:`PreparedPhase` holds, per op row of the phase's op table
(:mod:`cohw_utils.spine.trace`): FLOPs, the peak dtype key the op runs at (the roofline's own
rule, :func:`peak_key`), the efficiency-model group, and its bytes split into **weight reads**
(:func:`cohw_utils.views.energy_model.op_roles`), **KV-cache bytes** (for LLMs: the K and V inputs
of attention and the KV-cache append) and **other activations**. Its footprint is its weights
plus its KV cache (KV bytes per token x tokens x batch), in bytes.

Weight formats
--------------
With ``quantize=True`` a phase's weights are stored in the narrowest format both the design
reads natively and the workload's domain tolerates (:data:`WEIGHT_BITS_FLOOR`; where each
floor comes from is :data:`WEIGHT_BITS_FLOOR_SOURCE`), as :meth:`cohw_utils.views.energy_model.OpRoles.quantized` transforms them (weight-only: the
MACs stay in the phase's dtype): :meth:`PreparedPhase.variant_for` names the variant
(``native``, ``int8`` or ``int4``). ``quantize=False`` runs the op table as traced.

Each phase belongs to one workload class of :data:`CLASSES` (LLM prefill and decode apart).

Used by Chapter 5 (the co-design loop).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cohw_utils.views import energy_model as energy
from cohw_utils.views import roofline
from cohw_utils import workloads
from cohw_utils.core.data import DATA_DIR
from cohw_utils.core.errors import CohwError
from cohw_utils.hardware import DTYPES, dtype_key

__all__ = ["WEIGHT_BITS_FLOOR", "WEIGHT_BITS_FLOOR_SOURCE", "CITED_WEIGHT_BITS_FLOOR", "MEASURED_FLOORS_FILE",
           "measured_weight_floor", "CLASSES", "peak_key", "PreparedPhase", "prepare"]

#: Cited assumptions: the narrowest weight format (bits) each domain tolerates without a visible
#: quality loss, with post-training quantization. LLMs: 4-bit weights (GPTQ, AWQ); diffusion and
#: vision: 8-bit (4-bit diffusion weights need calibration schemes beyond plain PTQ); NeRF and
#: the text-to-3D training step: unquantized (trained in fp32/fp16 with gradients flowing through).
CITED_WEIGHT_BITS_FLOOR: dict[str, int] = {"llm": 4, "diffusion": 8, "vision": 8, "nerf": 32, "text-to-3d": 16}
#: The measured floors, written by ``benchmarks/bench_quant.py --write-floors`` (Chapter 4.2b's model).
MEASURED_FLOORS_FILE = DATA_DIR / "measured_bit_floors.json"


def measured_weight_floor(path=None) -> dict[str, Any] | None:
    """The measured LLM weight-bit floor record (``llm``: method, bits, bits_per_weight,
    delta_pct_hi, tolerance_pct; and machine, date, training_steps), or None when the file is
    absent. A file without an integer ``llm.bits`` raises :class:`CohwError` naming the fix."""
    p = Path(path) if path is not None else MEASURED_FLOORS_FILE
    if not p.exists():
        return None
    rec = json.loads(p.read_text())
    bits = rec.get("llm", {}).get("bits")
    if not isinstance(bits, int) or not 2 <= bits <= 32:
        raise CohwError(f"{p.name}: 'llm.bits' must be an integer from 2 to 32, got {bits!r}; "
                        "rewrite it with python benchmarks/bench_quant.py --write-floors")
    return rec


def _floors() -> tuple[dict[str, int], dict[str, str]]:
    floors = dict(CITED_WEIGHT_BITS_FLOOR)
    source = {d: "cited assumption (CITED_WEIGHT_BITS_FLOOR)" for d in floors}
    rec = measured_weight_floor()
    if rec is not None:
        llm = rec["llm"]
        floors["llm"] = llm["bits"]
        source["llm"] = (f"measured: {llm['method']} is the narrowest weight format within {llm['tolerance_pct']:g}% "
                         f"perplexity (upper 95% bound {llm['delta_pct_hi']:+.2f}%) on Chapter 4.2b's model, "
                         f"{rec['training_steps']} training steps, {rec['machine']}, {rec['date'][:10]}")
    return floors, source


#: Narrowest weight format (bits) each domain tolerates, used by :meth:`PreparedPhase.variant_for`:
#: the LLM floor **measured** in Chapter 4.2b when :data:`MEASURED_FLOORS_FILE` exists (else the
#: cited 4), every other domain's **cited** (:data:`CITED_WEIGHT_BITS_FLOOR`).
#: :data:`WEIGHT_BITS_FLOOR_SOURCE` says which, per domain.
WEIGHT_BITS_FLOOR, WEIGHT_BITS_FLOOR_SOURCE = _floors()


class _KeyOf:
    """Stands in for a Hardware in :func:`roofline._peak_for` and returns the dtype key it asks
    for, so this module applies the roofline's own peak rule, not a copy of it."""

    peak_flops = {d: 1.0 for d in (*DTYPES, "int4")}

    def peak(self, dtype: Any) -> str:  # noqa: D401 - duck-typed Hardware.peak
        return dtype_key(dtype)


def peak_key(op_class: str, dtype: str) -> str:
    """The dtype key of the peak an op runs at: :func:`cohw_utils.views.roofline.op_times`' rule."""
    return roofline._peak_for(_KeyOf(), op_class, dtype)  # noqa: SLF001 - see _KeyOf


def _domain_class(domain: str, phase: str) -> str:
    if domain == "llm":
        return "LLM prefill" if phase == "prefill" else "LLM decode"
    names = {"diffusion": "diffusion", "nerf": "NeRF", "text-to-3d": "text-to-3D", "vision": "vision"}
    return names.get(domain, domain)


#: Workload classes, in display order.
CLASSES = ("LLM prefill", "LLM decode", "diffusion", "text-to-3D", "NeRF", "vision")


@dataclass
class _Rows:
    """Per-op arrays of one weight-format variant of a phase."""

    flops: np.ndarray
    w: np.ndarray      # weight bytes read
    kv: np.ndarray     # KV-cache bytes read + written
    act: np.ndarray    # other bytes
    key: np.ndarray    # peak dtype key per row (object)
    group: np.ndarray  # efficiency-model group per row (object)
    roles: Any         # energy.OpRoles of the variant
    weight_footprint: float


@dataclass
class PreparedPhase:
    """One traced phase, ready for any number of designs (see :func:`prepare`)."""

    label: str
    workload: str
    phase: str
    domain: str
    klass: str
    dtype: str
    batch: int
    seq_len: int | None
    units: int
    unit_name: str
    weight_bytes: float
    kv_bytes: float
    table: pd.DataFrame = field(repr=False)
    kv_in_place: bool = False
    variants: dict[str, _Rows] = field(default_factory=dict, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def is_moe(self) -> bool:
        """A mixture-of-experts phase (its op table has routed-expert modules): its prefill
        reads every expert's weights for the few tokens each receives, so unlike a dense
        prefill it can be bound by memory."""
        return bool(self.table["module"].str.contains(r"\.experts").any())

    @property
    def native_bits(self) -> int:
        return int(8 * {"fp32": 4, "fp16": 2, "bf16": 2}.get(self.dtype, 2))

    def variant_for(self, weight_bits: int, quantize: bool = True) -> str:
        """The weight-format variant a design with ``weight_bits`` runs (``native``/``int8``/``int4``)."""
        if not quantize:
            return "native"
        bits = max(int(weight_bits), WEIGHT_BITS_FLOOR.get(self.domain, 16))
        if bits >= self.native_bits:
            return "native"
        return "int4" if bits <= 4 else "int8"

    def rows(self, variant: str) -> _Rows:
        if variant not in self.variants:
            base = self.variants["native"]
            roles = base.roles.quantized(variant)
            ratio = roles.weight_bytes / base.roles.weight_bytes if base.roles.weight_bytes else 1.0
            self.variants[variant] = dataclasses.replace(
                base, w=roles.weight_read.copy(), roles=roles, weight_footprint=self.weight_bytes * ratio)
        return self.variants[variant]


def _kv_bytes_rows(table: pd.DataFrame, roles: Any, is_llm: bool, in_place: bool) -> tuple[np.ndarray, np.ndarray]:
    """KV-cache bytes per row (attention's K and V inputs, and the KV append), and the rows'
    total bytes after the optional in-place append."""
    total = roles.weight_read + roles.act_read + roles.written
    kv = np.zeros(len(table))
    if not is_llm:
        return kv, total
    if in_place:
        total = np.where(roles.kv_append, 2 * roles.kv_new + (roles.weight_read), total)
    kv = np.where(roles.kv_append, total - roles.weight_read, 0.0)
    esize = np.array([energy._esize(d) for d in roles.dtype])  # noqa: SLF001 - same element sizes
    for i, (op, shapes) in enumerate(zip(table["op"].to_numpy(), table["input_shapes"].to_numpy())):
        if "scaled_dot_product" in op and len(shapes) >= 3 and table["costed"].iat[i]:
            kv[i] = (np.prod(shapes[1]) + np.prod(shapes[2])) * esize[i]
    return kv, total


def prepare(analysis: Any, kv_in_place: bool = False, label: str | None = None) -> PreparedPhase:
    """Turn an :class:`~cohw_utils.spine.analyze.Analysis` into a :class:`PreparedPhase`: per-op
    FLOPs, weight / KV-cache / other bytes (:func:`cohw_utils.views.energy_model.op_roles`), the peak key of
    each op (the roofline's rule) and the footprint (weights + KV cache for its tokens x batch).

    ``kv_in_place=True`` replaces the eager ``torch.cat`` KV append by an in-place write of the
    new entries, as :class:`cohw_utils.views.energy_model.ReuseModel` does.
    """
    if not (hasattr(analysis, "table") and hasattr(analysis, "units")):
        raise CohwError(f"prepare needs an Analysis (cohw_utils.spine.analyze.analyze), got {type(analysis).__name__}")
    wl = workloads.get_workload(analysis.workload)
    table = analysis.table
    roles = energy.op_roles(analysis)
    is_llm = wl.domain == "llm"
    kv, total = _kv_bytes_rows(table, roles, is_llm, kv_in_place)
    act = np.maximum(total - roles.weight_read - kv, 0.0)
    flops = np.nan_to_num(table["flops"].to_numpy(dtype=float)) * table["costed"].to_numpy(dtype=bool)
    keys = {k: peak_key(*k) for k in set(zip(table["op_class"], table["dtype"]))}
    key = np.array([keys[k] for k in zip(table["op_class"], table["dtype"])], dtype=object)
    group_of = getattr(roofline, "op_group", None)
    group = np.array([group_of(o, c) if group_of else c for o, c in zip(table["op"], table["op_class"])],
                     dtype=object)
    kv_tokens = 0
    if is_llm and analysis.kv_bytes_per_token:
        ctx = analysis.seq_len or workloads.DEFAULT_SEQ_LEN
        kv_tokens = (ctx + (1 if analysis.phase == "decode" else 0)) * analysis.batch
    kv_foot = float((analysis.kv_bytes_per_token or 0) * kv_tokens)
    ctx_txt = f" ctx {analysis.seq_len}" if is_llm and analysis.seq_len else ""
    batch_txt = f" b{analysis.batch}" if analysis.batch > 1 else ""
    name = label or f"{analysis.workload}:{analysis.phase}{batch_txt}{ctx_txt}"
    p = PreparedPhase(label=name, workload=analysis.workload, phase=analysis.phase, domain=wl.domain,
                      klass=_domain_class(wl.domain, analysis.phase), dtype=analysis.dtype,
                      batch=analysis.batch, seq_len=analysis.seq_len, units=analysis.units,
                      unit_name=analysis.unit_name, weight_bytes=float(analysis.weight_bytes),
                      kv_bytes=kv_foot, table=table, kv_in_place=kv_in_place)
    p.variants["native"] = _Rows(flops=flops, w=roles.weight_read.copy(), kv=kv, act=act, key=key, group=group,
                                 roles=roles, weight_footprint=float(analysis.weight_bytes))
    return p
