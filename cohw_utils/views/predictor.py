"""Request latency from phase op tables: ideal and calibrated predictions (the ledger chapter).

A serving request of ``batch`` sequences, ``input_len`` prompt tokens and ``output_len`` generated
tokens per sequence is predicted from two op tables traced at the request's shapes:

* **TTFT** (time to first token) = the time of the ``prefill`` table at (batch, input_len)
  (logits of the last position only, as an engine computes them): the first output token.
* **TPOT** (time per output token) = the time of one ``decode`` step traced at the *mean*
  context of the generated tokens, ``input_len + output_len / 2``. A dense or latent attention
  step's bytes and FLOPs are linear in the context, so the step at the mean context is exactly
  the mean step (the trace is exact; the model below is not); a sliding-window layer caps it.
* **End to end** = TTFT + (output_len - 1) x TPOT; **output tokens/s** = batch x output_len /
  end-to-end. Queueing, detokenisation and scheduling are not included.

Phase time on a chip comes from :func:`cohw_utils.views.roofline.predict_times` under an
:class:`~cohw_utils.views.roofline.EfficiencyModel` plus a fixed per-step overhead:

* **ideal** (:meth:`Calibration.ideal`): every op at 100% of the spec-sheet peak and bandwidth,
  every tensor of the unfused op table moved to and from DRAM, no overhead. It is *not* a lower
  bound: a fused kernel keeps intermediates on chip and beats the unfused byte count.
* **calibrated** (:class:`Calibration`, fitted by :mod:`cohw_utils.studies.validation.ledger` on
  the ledger's calibration split): contractions reach ``compute`` of the matrix peak and
  ``bandwidth`` of the spec bandwidth; every other op's unfused bytes are scaled by ``fusion``
  (the fraction of element-wise / normalization / data-movement traffic that still reaches DRAM
  in a fusing engine) and stream at ``bandwidth``; each step (a prefill or one decode step) adds
  ``step_overhead_s`` (launches, scheduling, sampling). One set of four numbers per hardware
  vendor where the ledger has enough rows of that vendor, else the global set.

Weight formats (:data:`WEIGHT_FORMATS`) rewrite a 16-bit trace as an engine's quantized run: the
weight operand of every ``nn.Linear`` GEMM (the ``[K, N]`` argument of ``mm``/``addmm``) is read at
the format's bits plus its group scales; W8A8 formats (fp8, int8) also read the activation
operand at 8 bits and run the GEMM at that dtype's peak. Attention and the KV cache stay at the
traced dtype unless the format says otherwise. Inputs are op tables; this view never traces.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cohw_utils.core.data import DATA_DIR
from cohw_utils.core.errors import CohwError, DataFileError
from cohw_utils.hardware import Hardware
from cohw_utils.core.opclasses import CONTRACTION, ELEMENTWISE, NORMALIZATION, DATA_MOVEMENT, OTHER
from cohw_utils.spine.costfn import CostFunction
from cohw_utils.views.roofline import ATTENTION, CONV, GEMM, VIEW, EfficiencyModel, _peak_for, op_group, predict_times

__all__ = ["WeightFormat", "WEIGHT_FORMATS", "weight_format", "apply_weight_format", "Calibration",
           "load_calibration", "CALIBRATION_FILE", "phase_seconds", "RequestPrediction",
           "request_prediction", "decode_context", "sweep_seconds", "SweepTimer", "formatted"]

CALIBRATION_FILE = DATA_DIR / "calibration.json"

# ============================================================================================
# Weight formats: how an engine's quantized run differs from the 16-bit trace.
# ============================================================================================


@dataclass(frozen=True)
class WeightFormat:
    """How a serving engine stores Linear weights (and, for W8A8, activations).

    ``weight_bits`` per weight element; ``group_size`` weights share one ``scale_bytes`` of
    scale (+ zero point) data (0 = one scale per output channel); ``act_bits`` 8 for W8A8
    formats (activation operand read at 8 bits) else ``None``; ``peak`` the dtype whose matrix
    peak the GEMM runs at (``None``: the traced dtype, as weight-only kernels dequantize to it);
    ``kv_bits`` 8 where the KV cache is stored in 8 bits (attention reads K and V, and the cache
    write stores the new token, at that width), ``None``: the traced dtype.
    """

    name: str
    weight_bits: int
    group_size: int = 0
    scale_bytes: int = 2
    act_bits: int | None = None
    peak: str | None = None
    description: str = ""
    kv_bits: int | None = None


WEIGHT_FORMATS: dict[str, WeightFormat] = {f.name: f for f in (
    WeightFormat("fp16", 16, description="the traced 16-bit weights"),
    WeightFormat("bf16", 16, description="the traced 16-bit weights"),
    WeightFormat("int8-wo", 8, description="int8 weight-only, one fp16 scale per output channel "
                 "(gpt-fast's int8; TensorRT-LLM's W8A16)"),
    WeightFormat("int4-wo-g32", 4, 32, 4, description="int4 weight-only, groups of 32 with a 16-bit "
                 "scale and zero point each (gpt-fast's int4)"),
    WeightFormat("int4-wo-g128", 4, 128, 4, description="int4 weight-only, groups of 128 "
                 "(AWQ / GPTQ / TensorRT-LLM W4A16)"),
    WeightFormat("fp8", 8, scale_bytes=0, act_bits=8, peak="fp8", description="FP8 W8A8: weights and "
                 "GEMM inputs in fp8 with per-tensor scales, GEMMs at the fp8 peak; attention and KV cache at the traced dtype"),
    WeightFormat("fp8-kv8", 8, scale_bytes=0, act_bits=8, peak="fp8", kv_bits=8, description="FP8 W8A8 "
                 "as 'fp8', and the KV cache in fp8 (attention reads K and V at 1 byte)"),
    WeightFormat("int8", 8, act_bits=8, peak="int8", description="INT8 W8A8 (SmoothQuant): GEMMs "
                 "at the int8 peak; attention and KV cache at the traced dtype"),
)}


def weight_format(name: str) -> WeightFormat:
    """The :class:`WeightFormat` called ``name``; one clear error for an unknown name."""
    try:
        return WEIGHT_FORMATS[name]
    except KeyError:
        raise CohwError(f"unknown weight format '{name}'; use one of: {', '.join(WEIGHT_FORMATS)}") from None


_ELT = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
_WEIGHT_ARG = {"aten.mm.default": 1, "aten.addmm.default": 2}
_SDPA = "aten.scaled_dot_product_attention"


def apply_weight_format(table: pd.DataFrame, fmt: str | WeightFormat) -> pd.DataFrame:
    """A copy of a 16-bit op table as ``fmt`` would run it (see the module docstring).

    Rows changed: ``mm``/``addmm`` rows issued by an ``nn.Linear`` (``module_class == 'Linear'``),
    whose weight is the 2-D ``[K, N]`` argument. Their ``bytes_read`` lose the 16-bit weight and
    gain ``K*N*bits/8`` plus ``ceil(K/g)*N*scale_bytes`` (``g`` the group size; per-channel:
    ``N*scale_bytes``); a W8A8 format also halves the activation operand's bytes and sets the
    row's ``dtype`` to the format's peak dtype. Other rows are untouched.
    """
    fmt = weight_format(fmt) if isinstance(fmt, str) else fmt
    out = table.copy()
    if fmt.weight_bits == 16 and fmt.act_bits is None:
        return out
    if fmt.kv_bits is not None:
        _kv_at(out, fmt.kv_bits)
    linear = (out["module_class"] == "Linear") & out["op"].isin(list(_WEIGHT_ARG))
    for i in np.flatnonzero(linear.to_numpy()):
        row = out.iloc[i]
        elt = _ELT.get(str(row["dtype"]).removeprefix("torch."))
        shapes = row["input_shapes"]
        w_at = _WEIGHT_ARG[row["op"]]
        if elt is None or len(shapes) <= w_at or len(shapes[w_at]) != 2:
            continue
        k, n = shapes[w_at]
        scales = (math.ceil(k / fmt.group_size) * n if fmt.group_size else n) * fmt.scale_bytes
        new_w = k * n * fmt.weight_bits / 8 + scales
        read = float(row["bytes_read"]) - k * n * elt + new_w
        if fmt.act_bits is not None:
            act = math.prod(shapes[w_at - 1]) * elt
            read -= act * (1 - fmt.act_bits / (8 * elt))
        out.iat[i, out.columns.get_loc("bytes_read")] = read
        if fmt.peak is not None:
            out.iat[i, out.columns.get_loc("dtype")] = fmt.peak
    return out


def _kv_at(out: pd.DataFrame, bits: int) -> None:
    """In place: fused-attention rows read K and V, cache writes (``index_copy_``) store, at ``bits``."""
    read, written = out.columns.get_loc("bytes_read"), out.columns.get_loc("bytes_written")
    for i in np.flatnonzero(out["op"].isin([_SDPA, "aten.index_copy_.default"]).to_numpy()):
        row = out.iloc[i]
        elt = _ELT.get(str(row["dtype"]).removeprefix("torch."))
        shapes = row["input_shapes"]
        if elt is None or len(shapes) < 3:
            continue
        keep = bits / (8 * elt)
        if row["op"] == _SDPA:  # (q, k, v[, mask]): K and V shrink
            kv = (math.prod(shapes[1]) + math.prod(shapes[2])) * elt
            out.iat[i, read] = float(row["bytes_read"]) - kv * (1 - keep)
        else:  # index_copy_(cache, dim, index, source): the token written and read shrinks
            src = math.prod(shapes[2]) * elt
            out.iat[i, read] = float(row["bytes_read"]) - src * (1 - keep)
            out.iat[i, written] = float(row["bytes_written"]) * keep


# ============================================================================================
# Calibration: four efficiencies per vendor, fitted on the ledger.
# ============================================================================================
#: The bounds the fit keeps each parameter in (and a hand-made calibration must respect).
BOUNDS = {"compute": (0.05, 1.0), "bandwidth": (0.05, 1.0), "fusion": (0.0, 1.0),
          "step_overhead_s": (0.0, 0.1)}
PARAMS = tuple(BOUNDS)
_NON_CONTRACTION = (NORMALIZATION, ELEMENTWISE, DATA_MOVEMENT, OTHER)


@dataclass(frozen=True)
class Calibration:
    """Achievable fractions of a chip's spec and a per-step overhead (module docstring).

    ``params`` maps a vendor (``'NVIDIA'``, ``'AMD'``, ...) or ``'*'`` (every other vendor) to
    ``{'compute', 'bandwidth', 'fusion', 'step_overhead_s'}``. ``source`` says where the numbers
    came from (the fit, its split and date); ``fit`` holds the fit's own record (rows used,
    residuals) when it has one.
    """

    params: Mapping[str, Mapping[str, float]]
    source: str = ""
    fit: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if "*" not in self.params:
            raise CohwError("a Calibration needs a '*' entry (the parameters for any vendor)")
        for vendor, p in self.params.items():
            missing = [k for k in PARAMS if k not in p]
            if missing:
                raise CohwError(f"calibration for '{vendor}' lacks {', '.join(missing)}; give all of "
                                f"{', '.join(PARAMS)}")
            for k, (lo, hi) in BOUNDS.items():
                v = float(p[k])
                if not (np.isfinite(v) and lo <= v <= hi) or (k in ("compute", "bandwidth") and v <= 0):
                    raise CohwError(f"calibration '{vendor}'.{k} = {v!r} is outside [{lo}, {hi}]")

    @classmethod
    def ideal(cls) -> "Calibration":
        """100% of spec, unfused bytes, no overhead: the ideal roofline."""
        return cls({"*": {"compute": 1.0, "bandwidth": 1.0, "fusion": 1.0, "step_overhead_s": 0.0}},
                   source="ideal roofline: 100% of spec-sheet peak and bandwidth, unfused bytes, no overhead")

    @property
    def is_ideal(self) -> bool:
        return self.params == Calibration.ideal().params

    def for_vendor(self, vendor: str) -> dict[str, float]:
        """The four parameters that apply to a chip of ``vendor``."""
        return {k: float(v) for k, v in self.params.get(vendor, self.params["*"]).items()}

    def efficiency_model(self, hw: Hardware | str) -> tuple[EfficiencyModel, float]:
        """The :class:`EfficiencyModel` and per-step overhead (s) this calibration gives ``hw``
        (a :class:`Hardware`, or a vendor name such as ``'*'`` for a hypothetical design)."""
        vendor = hw if isinstance(hw, str) else hw.vendor
        p = self.for_vendor(vendor)
        contraction = {g: p["compute"] for g in (GEMM, CONV, ATTENTION)}
        bw = {g: p["bandwidth"] for g in (GEMM, CONV, ATTENTION)}
        # fusion 0 (all traffic on chip) is a legal fit; cap the rate at 1e6 x instead of /0
        scale = p["bandwidth"] / max(p["fusion"], 1e-6)
        bw.update({g: scale for g in _NON_CONTRACTION})
        model = EfficiencyModel(compute=contraction, bandwidth=bw,
                                source=f"calibration ({vendor}): {self.source}")
        return model, p["step_overhead_s"]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Calibration":
        d = json.loads(text)
        return cls(params=d["params"], source=d.get("source", ""), fit=d.get("fit", {}))


def load_calibration(path: str | Path | None = None) -> Calibration:
    """The calibration fitted on the ledger (``data/calibration.json``, written by
    ``benchmarks/bench_ledger.py --write``); a missing or malformed file names the fix."""
    p = Path(path) if path else CALIBRATION_FILE
    if not p.exists():
        raise DataFileError(f"no calibration file at {p.name}: run `python benchmarks/bench_ledger.py "
                            "--write` to fit one on the ledger")
    try:
        return Calibration.from_json(p.read_text())
    except (KeyError, ValueError, TypeError) as err:
        raise DataFileError(f"{p.name} is not a calibration file ({err}); refit it with "
                            "`python benchmarks/bench_ledger.py --write`") from None


def phase_seconds(table: pd.DataFrame, hw: Hardware, calibration: Calibration | None = None) -> float:
    """Seconds one traced step (a prefill, one decode step) takes on ``hw``.

    Sum of :func:`~cohw_utils.views.roofline.predict_times` under the calibration's efficiency
    model, plus its per-step overhead. Raises if the table has ops with no cost rule (their time
    would be a silent zero).
    """
    if not table["costed"].all():
        missing = sorted(set(table.loc[~table["costed"], "op"]))
        raise CohwError(f"cannot time a table with uncosted ops ({', '.join(missing[:5])}); add cost "
                        "rules in cohw_utils.spine.costs")
    model, overhead = (calibration or Calibration.ideal()).efficiency_model(hw)
    return float(predict_times(table, hw, model)["time"].sum()) + overhead


_FORMATTED: dict[tuple[int, str], CostFunction] = {}


def formatted(cf: CostFunction, fmt: str) -> CostFunction:
    """``cf`` with weight format ``fmt`` applied (:func:`apply_weight_format` on its exact tables,
    refitted: :meth:`~cohw_utils.spine.costfn.CostFunction.map_tables`); kept in memory."""
    f = weight_format(fmt)
    if f.weight_bits == 16 and f.act_bits is None:
        return cf
    key = (id(cf), fmt)
    if key not in _FORMATTED:
        if len(_FORMATTED) > 32:
            _FORMATTED.clear()
        _FORMATTED[key] = cf.map_tables(lambda t: apply_weight_format(t, f), f"weights {fmt}")
    return _FORMATTED[key]


class SweepTimer:
    """:func:`sweep_seconds` of one (cost function, chip, calibration, weight format), with each
    box's per-kind rates (peak x efficiency, bandwidth x efficiency, fixed time) computed once:
    a serving simulation asks for one point at a time, thousands of times."""

    def __init__(self, cf: CostFunction, hw: Hardware, calibration: Calibration | None = None,
                 weight_fmt: str | None = None) -> None:
        self.cf = formatted(cf, weight_fmt) if weight_fmt is not None else cf
        self.hw = hw
        self._model, self._overhead = (calibration or Calibration.ideal()).efficiency_model(hw)
        self._rates: dict[int, tuple[np.ndarray, ...]] = {}

    def _box_rates(self, box) -> tuple[np.ndarray, ...]:
        """(compute rate, byte rate, fixed seconds, count) per kind of ``box``."""
        if id(box) not in self._rates:  # boxes live as long as self.cf: their ids are stable keys
            kt = box.kind_table()
            if not kt["costed"].all():
                missing = sorted(set(kt.loc[~kt["costed"].astype(bool), "op"]))
                raise CohwError(f"cannot time a table with uncosted ops ({', '.join(missing[:5])}); add cost "
                                "rules in cohw_utils.spine.costs")
            groups = [op_group(o, c) for o, c in zip(kt["op"], kt["op_class"])]
            params = [self._model.params(g) for g in groups]
            peak = np.array([_peak_for(self.hw, c, d) for c, d in zip(kt["op_class"], kt["dtype"])], dtype=float)
            e = np.array([p[0] for p in params]) * peak
            b = np.array([p[1] for p in params]) * self.hw.mem_bw
            t0 = np.array([0.0 if g == VIEW else p[2] for g, p in zip(groups, params)])
            self._rates[id(box)] = (e, b, t0, kt["count"].to_numpy(dtype=float))
        return self._rates[id(box)]

    def __call__(self, points) -> np.ndarray:
        pts = np.atleast_2d(np.asarray(points, dtype=np.int64))
        out = np.zeros(len(pts))
        for box, sel, vals in self.cf.per_box(pts, ("flops", "bytes_read", "bytes_written")):
            e, b, t0, count = self._box_rates(box)
            t = t0 + np.maximum(vals[:, :, 0] / e, (vals[:, :, 1] + vals[:, :, 2]) / b)  # (n, kinds)
            out[sel] = t @ count + self._overhead
        return out


def sweep_seconds(cf: CostFunction, points, hw: Hardware, calibration: Calibration | None = None,
                  weight_fmt: str | None = None) -> np.ndarray:
    """Seconds of one step at each of ``points`` (an (n, n_vars) array of the cost function's
    variables), vectorized: the same model as :func:`phase_seconds` of the table at each point
    (per-kind roofline under the calibration's efficiencies, plus its step overhead), evaluated
    from the cost function's coefficients in float64 (rounding ~1e-16 relative)."""
    return SweepTimer(cf, hw, calibration, weight_fmt)(points)


# ============================================================================================
# One request.
# ============================================================================================


def decode_context(input_len: int, output_len: int) -> int:
    """The context at which the mean decode step is traced: ``input_len + output_len // 2``
    (the mean of input_len + i over the output_len - 1 decode steps i = 1..output_len-1)."""
    return input_len + output_len // 2


@dataclass(frozen=True)
class RequestPrediction:
    """Predicted times of one batch of requests; seconds unless named otherwise."""

    hardware: str
    batch: int
    input_len: int
    output_len: int
    ttft_s: float
    tpot_s: float
    e2e_s: float
    tokens_per_s: float
    mode: str
    assumptions: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["assumptions"] = list(self.assumptions)
        d.update(ttft_ms=self.ttft_s * 1e3, tpot_ms=self.tpot_s * 1e3, latency_ms=self.e2e_s * 1e3)
        return d


def request_prediction(prefill: pd.DataFrame, decode: pd.DataFrame | None, hw: Hardware, *, batch: int,
                       input_len: int, output_len: int, calibration: Calibration | None = None,
                       weight_fmt: str = "fp16") -> RequestPrediction:
    """TTFT, TPOT, end-to-end and output tokens/s of a request (module docstring).

    ``prefill`` is traced at (batch, input_len); ``decode`` at (batch,
    :func:`decode_context`) or ``None`` when ``output_len == 1``. ``weight_fmt`` rewrites both
    tables (:func:`apply_weight_format`).
    """
    if output_len < 1 or input_len < 1 or batch < 1:
        raise CohwError(f"batch, input_len and output_len must be >= 1 (got {batch}, {input_len}, {output_len})")
    if decode is None and output_len > 1:
        raise CohwError("output_len > 1 needs a decode table traced at decode_context(input_len, output_len)")
    cal = calibration or Calibration.ideal()
    ttft = phase_seconds(apply_weight_format(prefill, weight_fmt), hw, cal)
    tpot = phase_seconds(apply_weight_format(decode, weight_fmt), hw, cal) if decode is not None else 0.0
    e2e = ttft + (output_len - 1) * tpot
    p = cal.for_vendor(hw.vendor)
    assumptions = (
        f"{'ideal' if cal.is_ideal else 'calibrated'} on {hw.name}: {p['compute']:.0%} of matrix peak, "
        f"{p['bandwidth']:.0%} of {hw.mem_bw / 1e9:,.0f} GB/s, non-GEMM traffic x {p['fusion']:.2f}, "
        f"{p['step_overhead_s'] * 1e3:.2f} ms per step",
        f"weights {weight_format(weight_fmt).description}",
        f"TPOT = one decode step at the mean context {decode_context(input_len, output_len)}; "
        "end-to-end = TTFT + (output_len - 1) x TPOT; no queueing",
        "one device, no parallelism",
    )
    return RequestPrediction(hw.name, batch, input_len, output_len, ttft, tpot, e2e,
                             batch * output_len / e2e, "ideal" if cal.is_ideal else "calibrated",
                             assumptions)
