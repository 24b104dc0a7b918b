"""Self-checks for the chapters' exercises and the onboarding capstone.

Each ``check_...`` function recomputes the answer with the package, compares the learner's
answer within a stated tolerance and returns a :class:`Verdict` that is truthy when right.
When the answer is wrong, the message says by how much and, where a common mistake explains
the gap (MACs vs FLOPs, bits vs bytes, K without V...), which one. The docstring of each
function names the chapter whose exercise it checks.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cohw_utils.core.errors import CohwError
from cohw_utils.core.data import DATA_DIR

if TYPE_CHECKING:  # annotations only: the chapters' modules load when a check runs
    import pandas as pd

    from cohw_utils.studies.codesign.accelerator import Accelerator
    from cohw_utils.studies.codesign.phases import PreparedPhase

CAPSTONE_CONFIG = DATA_DIR / "configs" / "capstone" / "mixtral-8x7b" / "config.json"


@dataclass(frozen=True)
class Verdict:
    """The outcome of a check: ``ok`` and a message for the learner (printed by ``repr``)."""

    ok: bool
    message: str

    def __bool__(self) -> bool:
        return self.ok

    def __repr__(self) -> str:
        return ("correct: " if self.ok else "not yet: ") + self.message


# Ratios that betray a common mistake: answer / expected -> the hint.
_COMMON = {
    0.5: "half the expected value: FLOPs are 2 x MACs (did you count MACs?), or K and V are two tensors",
    2.0: "twice the expected value: did you count each MAC as 2 FLOPs twice, or bytes for fp32 instead of fp16?",
    8.0: "8x the expected value: bits instead of bytes?",
    0.125: "1/8 of the expected value: bytes instead of bits?",
}


def compare(answer: float, expected: float, what: str, rel_tol: float = 0.02) -> Verdict:
    """Is ``answer`` within ``rel_tol`` of ``expected``? The message explains a miss."""
    try:
        answer = float(answer)
    except (TypeError, ValueError):
        return Verdict(False, f"{what}: expected a number, got {answer!r}")
    if expected == 0:
        ok = answer == 0
    else:
        ok = abs(answer - expected) <= rel_tol * abs(expected)
    if ok:
        return Verdict(True, f"{what} = {expected:,.6g} (yours {answer:,.6g}, within {rel_tol:.0%})")
    hint = ""
    if expected and answer:
        ratio = answer / expected
        for r, text in _COMMON.items():
            if abs(ratio / r - 1) < 0.03:
                hint = f" Yours is {text}."
                break
        else:
            hint = (f" Yours is off by {answer - expected:+,.6g}." if abs(ratio - 1) < 0.005
                    else f" Yours is {ratio:.3g}x the expected value.")
    return Verdict(False, f"{what}: expected {expected:,.6g}, got {answer:,.6g}.{hint}")


# ------------------------------------------------------------------------------- Chapter 1
def check_decode_flops_per_token(workload: str, answer: float, seq_len: int = 4096) -> Verdict:
    """Chapter 1: FLOPs of one decode step (batch 1, context ``seq_len``) of ``workload``.

    The rule of thumb 2 x parameters is close but not exact: embeddings cost no FLOPs, and
    attention over the context adds 4 x layers x context x hidden.
    """
    from cohw_utils.spine.analyze import analyze

    a = analyze(workload, "decode", seq_len=seq_len)
    expected = a.totals()["flops"]
    v = compare(answer, expected, f"{workload} decode FLOPs per token (context {seq_len})")
    if not v.ok and abs(float(answer) / (2 * a.parameters) - 1) < 0.01:
        return Verdict(False, v.message + " That is 2 x parameters: embeddings do no FLOPs, "
                       "and attention over the context adds some.")
    return v


def check_kv_bytes_per_token(config: str, answer: float, dtype_bytes: int = 2) -> Verdict:
    """Chapter 1-2: KV-cache bytes one token adds, for a registry name or a config.json path."""
    from cohw_utils import workloads

    built = workloads.build(config, scale="full", device="meta")
    expected = workloads.kv_cache_bytes_per_token(built.config, dtype_bytes)
    return compare(answer, expected, f"KV cache bytes per token of {config} at {dtype_bytes} B/element", 0.0)


def check_top_proxy(weights: Mapping[str, float], answer: str, seq_len: int = 512,
                    rays: int = 1024, hw: str = "H100-SXM") -> Verdict:
    """Chapter 1: which workload ranks first under ``weights`` (whole registry, at the given
    LLM context, NeRF ray batch and reference accelerator)?"""
    from cohw_utils.studies.proxies import ranking as priority
    from cohw_utils.studies.proxies import proxy_set as proxies

    table, ops = proxies.overview(hw=hw, seq_len=seq_len, rays=rays)
    ranked = priority.rank(proxies.criteria(table, ops), weights)
    best = ranked.index[0]
    if str(answer).strip().lower() == best:
        return Verdict(True, f"{best} ranks first: {ranked.loc[best, 'reasoning']}")
    if answer not in ranked.index:
        return Verdict(False, f"'{answer}' is not a proxy workload; they are {', '.join(ranked.index)}")
    return Verdict(False, f"{answer} ranks {ranked.loc[answer, 'rank']}, not first; first is decided by "
                   f"the weighted criteria: compare {answer}'s reasoning ({ranked.loc[answer, 'reasoning']}) "
                   "with the others'")


# ------------------------------------------------------------------------------- Capstone
def capstone_reference(config: str | Path = CAPSTONE_CONFIG, seq_len: int = 1024) -> dict[str, float]:
    """Reference figures of the capstone model (Mixtral-8x7B by default), all from its config."""
    from cohw_utils.spine.analyze import analyze

    pre = analyze(str(config), "prefill", seq_len=seq_len)
    dec = analyze(str(config), "decode", seq_len=seq_len)
    d = dec.totals()
    return {
        "parameters": pre.parameters,
        "active_parameters": d["flops"] / 2,  # decode FLOPs ~ 2 x active parameters
        "kv_bytes_per_token": dec.kv_bytes_per_token,
        "decode_bytes_per_token_batch1": d["bytes_read"],
        "prefill_flops_per_token": pre.totals()["flops"] / pre.units,
    }


def check_capstone(answers: Mapping[str, float], config: str | Path = CAPSTONE_CONFIG,
                   rel_tol: float = 0.05) -> Verdict:
    """Onboarding capstone: check any of ``parameters``, ``active_parameters``,
    ``kv_bytes_per_token``, ``decode_bytes_per_token_batch1`` and ``prefill_flops_per_token``
    (context 1024, bf16) against the reference, each within ``rel_tol``."""
    ref = capstone_reference(config)
    unknown = set(answers) - set(ref)
    if unknown:
        raise CohwError(f"unknown capstone answers {sorted(unknown)}; checkable: {', '.join(ref)}")
    verdicts = [compare(v, ref[k], k, rel_tol) for k, v in answers.items()]
    ok = all(verdicts)
    return Verdict(ok, "; ".join(repr(v) for v in verdicts))


def _exact(answer: float, expected: int, what: str, near: Mapping[int, str]) -> Verdict:
    """An integer answer that must be exact; ``near`` maps the values a common mistake gives
    to the explanation."""
    v = compare(answer, expected, what, 0.0)
    if v.ok:
        return v
    try:
        hint = near.get(int(round(float(answer))), "")
    except (TypeError, ValueError):
        hint = ""
    return Verdict(False, v.message + (" " + hint if hint else ""))


def _is_number(x) -> bool:
    try:
        float(x)
        return True
    except (TypeError, ValueError):
        return False


def _hardware(name: str):
    from cohw_utils.hardware import get_hardware

    return get_hardware(name)


# ------------------------------------------------------------------------------- Chapter 2
def check_kv_exceeds_weights(workload: str, answer: float, batch: int = 1, dtype: str = "fp16") -> Verdict:
    """Chapter 2: the shortest context (tokens) at which ``batch`` sequences' KV cache holds
    more bytes than ``workload``'s weights, both in ``dtype``."""
    from cohw_utils.views import kvcache
    from cohw_utils import workloads

    config = workloads.build(workload, scale="full", device="meta").config
    weights = kvcache.weight_bytes(workload, dtype)
    expected = kvcache.exceeds_weights_at(config, weights, batch, dtype)
    near = {kvcache.exceeds_weights_at(config, weights, 1, dtype):
            "That is the batch-1 figure: each of the batch's sequences has its own cache."} if batch > 1 else {}
    near[2 * expected - 1] = "Did you count only K (or only V)? Both are cached."
    return _exact(answer, expected, f"{workload}: context at which the KV cache of {batch} sequence(s) "
                  f"outgrows the weights ({dtype})", near)


_BINARY_HINT = ("That counts the chip's memory as decimal GB (1e9 bytes); memory vendors' GB is binary "
                "(2**30 bytes: an A100-40GB holds 42.9e9 bytes), see cohw_utils.hardware.specs.")


def _decimal_capacity(hw):
    """``hw`` with its capacity read as decimal GB: the mistake :data:`_BINARY_HINT` names."""
    from cohw_utils.hardware.specs import VENDOR_GB

    return replace(hw, mem_bytes=hw.mem_bytes / VENDOR_GB * 1e9)


def check_concurrent_sequences(workload: str, hardware: str, seq_len: int, answer: float,
                               reserve_fraction: float = 0.10, block_size: int | None = 16,
                               dtype: str = "fp16") -> Verdict:
    """Chapter 2: how many ``seq_len``-token sequences' KV caches fit beside ``workload``'s
    weights on one ``hardware`` chip, with ``reserve_fraction`` of memory kept for the runtime
    and the cache paged in ``block_size``-token blocks (None: contiguous)."""
    from cohw_utils.views import kvcache
    from cohw_utils import workloads

    hw = _hardware(hardware)
    config = workloads.build(workload, scale="full", device="meta").config
    layout = kvcache.memory_layout(hw, kvcache.weight_bytes(workload, dtype),
                                   kvcache.kv_bytes_per_token(config, dtype), reserve_fraction=reserve_fraction)
    expected = layout.max_sequences(seq_len, block_size)
    no_reserve = kvcache.memory_layout(hw, layout.weights, layout.kv_per_token, reserve_fraction=0.0)
    decimal = kvcache.memory_layout(_decimal_capacity(hw), layout.weights, layout.kv_per_token,
                                    reserve_fraction=reserve_fraction)
    near = {decimal.max_sequences(seq_len, block_size): _BINARY_HINT,
            no_reserve.max_sequences(seq_len, block_size):
            f"That ignores the runtime reserve ({reserve_fraction:.0%} of memory).",
            replace(layout, kv_per_token=layout.kv_per_token / 2).max_sequences(seq_len, block_size):
            "That counts only K or only V per token."}
    near.pop(expected, None)
    return _exact(answer, expected, f"{workload} on {hw.name}: concurrent {seq_len}-token sequences", near)


# ------------------------------------------------------------------------------- Chapter 3
def check_missing_ops(workload: str, phase: str, answer, target: str = "onnx-opset18") -> Verdict:
    """Chapter 3: the set of aten ops (packets, e.g. ``"aten.searchsorted"``) in ``workload``'s
    ``phase`` (tiny scale, backward included for training phases) that ``target`` lacks."""
    from cohw_utils.studies.enabling import gap_report as gaps
    from cohw_utils.views import target_coverage as targets

    if isinstance(answer, str) or not hasattr(answer, "__iter__"):
        return Verdict(False, f"answer with a collection of op names such as {{'aten.searchsorted'}}, got {answer!r}")
    given = {a if str(a).startswith("aten.") else f"aten.{a}" for a in map(str, answer)}
    expected = set(targets.missing_ops(gaps.trace_tiny_phase(workload, phase), target)["op"])
    if given == expected:
        return Verdict(True, f"{workload}:{phase} needs {len(expected)} op(s) {target} lacks: "
                       f"{', '.join(sorted(expected))}")
    parts = []
    if expected - given:
        lacking = sorted(expected - given)
        parts.append(f"you missed {', '.join(lacking)}")
        if any(o.endswith("_backward") for o in lacking):
            parts.append("(a training phase also runs its backward ops)")
    if given - expected:
        parts.append(f"{', '.join(sorted(given - expected))} {'is' if len(given - expected) == 1 else 'are'} "
                     f"either not run by this phase or covered by {target}")
    return Verdict(False, f"{workload}:{phase}: " + "; ".join(parts))


def check_runs_on_runtime(conv) -> Verdict:
    """Chapter 3: does a :class:`cohw_utils.studies.enabling.export.Conversion` run in onnxruntime with
    numerical parity? When it does not, the message names the failure and the route to a fix."""
    from cohw_utils.studies.enabling import export

    if not isinstance(conv, export.Conversion):
        return Verdict(False, f"pass the Conversion returned by export.convert() or export.fix(), "
                       f"got {type(conv).__name__}")
    name = f"{conv.workload}:{conv.phase} ({conv.dtype})"
    if conv.ok:
        p = conv.parity
        return Verdict(True, f"{name} runs in onnxruntime: max |diff| {p.max_abs:.2g} within {p.tolerance}"
                       + (f", after the fix '{conv.fix}'" if conv.fix else ""))
    if conv.status == "mismatch":
        return Verdict(False, f"{name} runs but misses parity: max |diff| {conv.parity.max_abs:.3g} "
                       f"outside {conv.parity.tolerance}")
    f = conv.failure
    route = ("export.fix(conv) decomposes the op into ones the exporter knows" if export.fixable(conv)
             else "no decomposition applies; enabling.offload() keeps that part in torch")
    return Verdict(False, f"{name} failed at {f.stage} ({f.klass}{': ' + f.op if f.op else ''}); {route}")


# ------------------------------------------------------------------------------- Chapter 4.1-4.2
def check_mbu(workload: str, hardware: str, tokens_per_s: float, answer: float, dtype: str = "fp16",
              context: int = 128) -> Verdict:
    """Chapter 4.1-4.2: the MBU (a fraction, 0-1) of decoding ``workload`` at batch 1 and
    ``tokens_per_s`` on ``hardware``: tokens/s x bytes per token (weights at ``dtype`` less
    the embedding table, KV cache of ``context`` tokens in bf16) / the chip's peak bandwidth."""
    from cohw_utils.studies.performance import mbu

    hw = _hardware(hardware)
    bpt = mbu.bytes_per_token(workload, dtype, context)
    expected = mbu.mbu(tokens_per_s, bpt, hw.mem_bw)
    if _is_number(answer) and abs(float(answer) / (100 * expected) - 1) < 0.02:
        return Verdict(False, f"that is MBU in percent ({float(answer):.1f}%); answer as a fraction "
                       f"({expected:.3f})")
    return compare(answer, expected, f"MBU of {workload} ({dtype}) at {tokens_per_s:g} tokens/s on {hw.name}")


def check_decode_bound(workload: str, hardware: str, batch: int, answer: float, context: int = 2048,
                       dtype: str = "fp16") -> Verdict:
    """Chapter 4.1-4.2: the roofline bound on decode throughput (tokens/s summed over the
    batch) of ``workload`` on ``hardware`` at ``batch`` and ``context``."""
    from cohw_utils.studies.performance import mbu

    d = mbu.decode_bound(workload, _hardware(hardware), batch, context, dtype)
    v = compare(answer, d["tokens_per_s"], f"{workload} decode bound on {hardware}, batch {batch}, "
                f"context {context} ({d['bound']}-bound)")
    if not v.ok and _is_number(answer) and abs(float(answer) / d["per_sequence_tokens_per_s"] - 1) < 0.02:
        return Verdict(False, v.message + " That is the rate of one sequence; the batch's throughput "
                       f"is {batch} times it.")
    return v


def check_max_batch(workload: str, hardware: str, context: int, answer: float, dtype: str = "fp16") -> Verdict:
    """Chapter 4.1-4.2: the largest batch of ``context``-token sequences whose weights, KV
    cache fit on one ``hardware`` chip, less the runtime reserve (10% of memory)."""
    from cohw_utils.studies.performance import memory

    hw = _hardware(hardware)
    expected = memory.max_batch(workload, hw, context, dtype)
    near = {memory.max_batch(workload, _decimal_capacity(hw), context, dtype): _BINARY_HINT,
            memory.max_batch(workload, hw, context, dtype, reserve_fraction=0.0):
            "That leaves no runtime reserve (10% of memory: CUDA context, allocator, activations)."}
    near.pop(expected, None)
    return _exact(answer, expected, f"largest batch of {workload} at {context} tokens on {hw.name}", near)


# ------------------------------------------------------------------------------- Chapter 4.3
def check_ridge_point(hardware: str, dtype: str, answer: float) -> Verdict:
    """Chapter 4.3: the ridge point (FLOP/byte) of ``hardware`` in ``dtype``: dense peak
    FLOP/s / peak memory bandwidth. Ops with a lower arithmetic intensity are memory-bound."""
    hw = _hardware(hardware)
    expected = hw.peak(dtype) / hw.mem_bw
    return compare(answer, expected, f"ridge point of {hw.name} in {dtype} (FLOP/byte)")


def check_systolic_utilization(M: int, K: int, N: int, size: int, answer: float, dataflow: str = "ws") -> Verdict:
    """Chapter 4.3: utilization (MACs / (size^2 x cycles), a fraction) of an M x K by K x N
    GEMM on a ``size`` x ``size`` systolic array with ``dataflow`` (``"ws"`` or ``"os"``)."""
    from cohw_utils.views import systolic

    expected = systolic.utilization(M, K, N, size, size, dataflow)
    map_eff = systolic.mapping_efficiency(M, K, N, size, size, dataflow)
    v = compare(answer, expected, f"utilization of {M}x{K}x{N} on a {size}x{size} {dataflow.upper()} array", 0.01)
    if not v.ok and _is_number(answer) and abs(float(answer) / map_eff - 1) < 0.01 and map_eff != expected:
        return Verdict(False, v.message + " That is the mapping efficiency alone: the fill and drain "
                       "cycles of each fold also cost time.")
    return v


# ------------------------------------------------------------------------------- Chapter 4.2b
def check_bits_per_weight(bits: int, group_size: int | None, in_features: int, answer: float,
                          symmetric: bool | None = None) -> Verdict:
    """Chapter 4.2b: storage bits per weight of ``bits``-bit codes with one fp16 scale (and,
    when asymmetric, one ``bits``-bit zero point) per ``group_size`` weights (None: per row of
    ``in_features``). Symmetric by default at 8 bits, asymmetric below (the book's defaults)."""
    from cohw_utils.studies.quantization import schemes

    sch = schemes.scheme(bits, group_size, symmetric)
    expected = sch.bits_per_weight(in_features)
    v = compare(answer, expected, f"bits per weight of {sch.name} on rows of {in_features}", 0.001)
    if not v.ok and _is_number(answer) and float(answer) == bits:
        return Verdict(False, v.message + " The scales (and zero points) are stored too.")
    if not v.ok and _is_number(answer) and not sch.symmetric and abs(float(answer) - (bits + 16 / sch.group(in_features))) < 1e-9:
        return Verdict(False, v.message + f" An asymmetric format also stores a {bits}-bit zero point per group.")
    return v


def check_weight_gb(workload: str, fmt: str, answer: float) -> Verdict:
    """Chapter 4.2b: weight gigabytes (1e9 bytes) of ``workload`` with its decoder-block
    linears in ``fmt`` (a key of :data:`cohw_utils.studies.quantization.scale_up.SCALEUP_FORMATS`) and everything
    else in fp16."""
    from cohw_utils.studies.quantization import scale_up
    from cohw_utils import workloads

    model = workloads.build(workload, device="meta").model
    mb = scale_up.model_bytes(model, fmt)
    expected = mb["bytes"] / 1e9
    v = compare(answer, expected, f"{workload} weights in {fmt} (GB)", 0.01)
    if not v.ok and _is_number(answer):
        bits = scale_up.SCALEUP_FORMATS[fmt](4096) if fmt in scale_up.SCALEUP_FORMATS else None
        naive = mb["params"] * bits / 8 / 1e9 if bits else None
        if naive and abs(float(answer) / naive - 1) < 0.01:
            return Verdict(False, v.message + " The embedding, LM head and norms stay in fp16.")
    return v


# ------------------------------------------------------------------------------- Chapter 4.4
def check_energy_ratio(answer: float, dtype: str = "fp32", level: str = "offchip", preset: str = "45nm") -> Verdict:
    """Chapter 4.4: how many ``dtype`` multiply-accumulates cost the energy of moving one
    ``dtype`` operand from ``level`` (``register``, ``local``, ``buffer``, ``offchip``) in
    the ``preset`` energy table."""
    from cohw_utils.core.dtypes import bytes_per_element
    from cohw_utils.views.energy_model import EnergyTable

    t = EnergyTable.load(preset)
    if level not in t.byte_pj:
        raise CohwError(f"unknown level {level!r}; levels: {', '.join(t.byte_pj)}")
    expected = t.byte_pj[level] * bytes_per_element(dtype) / t.mac_pj(dtype)
    v = compare(answer, expected, f"{dtype} MACs per {dtype} operand fetched from {level} ({t.name})", 0.03)
    per_byte = t.byte_pj[level] / t.mac_pj(dtype)
    if not v.ok and _is_number(answer) and abs(float(answer) / per_byte - 1) < 0.03:
        return Verdict(False, v.message + f" That is per byte; one {dtype} operand is "
                       f"{bytes_per_element(dtype):g} bytes.")
    return v


def check_decode_energy_per_token(workload: str, batch: int, answer: float, preset: str = "7nm-hbm2e",
                                  hardware: str = "H100-SXM", seq_len: int = 2048) -> Verdict:
    """Chapter 4.4: joules per generated token of ``workload``'s decode step at ``batch`` and
    context ``seq_len`` (fp16) under the ``preset`` energy table, the default reuse model and
    ``hardware``'s on-chip buffer."""
    from cohw_utils.studies.energy.estimates import decode_batch_sweep
    from cohw_utils.views.energy_model import EnergyTable

    sweep = decode_batch_sweep(workload, [batch], EnergyTable.load(preset), hw=_hardware(hardware), seq_len=seq_len)
    r = sweep.iloc[0]
    v = compare(answer, float(r["J_per_token"]), f"{workload} decode energy per token at batch {batch} "
                f"({preset}, {hardware})", 0.03)
    if not v.ok and _is_number(answer) and abs(float(answer) / float(r["compute_J_per_token"]) - 1) < 0.03:
        return Verdict(False, v.message + " That is the arithmetic alone; moving the bytes costs "
                       f"{r['memory_share']:.0%} of the total.")
    return v


# ------------------------------------------------------------------------------- Chapter 5
def check_spill_time(answer: float, weight_gb: float = 140.0, hbm_gb: float = 80.0, hbm_tbs: float = 3.35,
                     slow_gbs: float = 450.0) -> Verdict:
    """Chapter 5: time (s) to read ``weight_gb`` of weights once when ``hbm_gb`` of them sit
    in HBM at ``hbm_tbs`` and the rest in a slow tier at ``slow_gbs`` (tiers in parallel)."""
    from cohw_utils.studies.codesign.placement import spill_time

    exp = spill_time(weight_gb * 1e9, hbm_gb * 1e9, hbm_tbs * 1e12, slow_gbs * 1e9)
    v = compare(answer, exp, "weight-streaming time (s)", 0.02)
    if not v.ok:
        serial = hbm_gb * 1e9 / (hbm_tbs * 1e12) + (weight_gb - hbm_gb) * 1e9 / (slow_gbs * 1e9)
        if abs(float(answer) / serial - 1) < 0.02:
            return Verdict(False, v.message + " That is the serial sum: the model lets the two tiers transfer at "
                           "the same time, so the time is the slower of the two.")
        if abs(float(answer) / (weight_gb * 1e9 / (hbm_tbs * 1e12)) - 1) < 0.02:
            return Verdict(False, v.message + " That is all weights at HBM speed: the spilled part streams from "
                           "the slow tier.")
    return v


def check_binding(answer: str, design: Accelerator, phase: PreparedPhase, **kw: Any) -> Verdict:
    """Chapter 5: which resource binds ``phase`` on ``design`` (one of
    :data:`cohw_utils.studies.codesign.accelerator.RESOURCES`)? ``kw`` go to
    :func:`cohw_utils.studies.codesign.sweep.evaluate_designs`."""
    from cohw_utils.studies.codesign.accelerator import RESOURCES
    from cohw_utils.studies.codesign.sweep import evaluate_designs

    r = evaluate_designs(design, phase, **kw).iloc[0]
    shares = ", ".join(f"{x} {r[f'share_{x}']:.0%}" for x in RESOURCES if r[f"share_{x}"] > 0.005)
    if str(answer).strip().lower() == r["binding"].lower():
        return Verdict(True, f"{r['binding']} binds {phase.label} on {design.name} (time shares: {shares})")
    if str(answer).strip() not in RESOURCES:
        return Verdict(False, f"answer one of {', '.join(RESOURCES)}")
    return Verdict(False, f"not {answer}: the time shares by binding resource are {shares}")


def check_pareto(answer: Iterable[str], points: pd.DataFrame, columns: Sequence[str] = ("cost", "time")) -> Verdict:
    """Chapter 5: the names (index of ``points``) of the Pareto-optimal rows, every column in
    ``columns`` minimised."""
    from cohw_utils.studies.codesign.pareto import pareto_mask

    mask = pareto_mask(points[list(columns)].to_numpy())
    exp = set(points.index[mask])
    got = set(answer)
    if got == exp:
        return Verdict(True, f"the front is {sorted(exp)}")
    extra, miss = sorted(got - exp), sorted(exp - got)
    msg = []
    if extra:
        msg.append(f"{extra} {'is' if len(extra) == 1 else 'are'} dominated (another point is no worse in every "
                   "column and better in one)")
    if miss:
        msg.append(f"missing {miss}: nothing dominates {'it' if len(miss) == 1 else 'them'}")
    return Verdict(False, "; ".join(msg))


def check_calibrated_tpot(workload: str, hardware: str, context: int, answer: float, dtype: str = "fp16") -> Verdict:
    """Chapter 4.5: the calibrated time per output token (seconds) of ``workload`` decoding at batch
    1 and ``context`` on ``hardware``, by hand: bytes per token (weights less the embedding table,
    plus the KV cache; Chapter 4.1's closed form) over the calibrated bandwidth, plus the
    calibration's per-step overhead. Within 3%: the traced step also moves activations."""
    from cohw_utils.studies.performance import mbu
    from cohw_utils.views.predictor import load_calibration

    hw = _hardware(hardware)
    p = load_calibration().for_vendor(hw.vendor)
    bpt = mbu.bytes_per_token(workload, dtype, context)
    expected = bpt / (p["bandwidth"] * hw.mem_bw) + p["step_overhead_s"]
    v = compare(answer, expected, f"calibrated batch-1 TPOT of {workload} on {hw.name} at context {context} (s)", 0.03)
    if not v.ok and _is_number(answer) and abs(float(answer) / (bpt / hw.mem_bw) - 1) < 0.03:
        return Verdict(False, v.message + " That is the ideal roofline: divide by the calibrated fraction of "
                       "bandwidth and add the per-step overhead.")
    if not v.ok and _is_number(answer) and abs(float(answer) / (1e3 * expected) - 1) < 0.03:
        return Verdict(False, f"that is milliseconds ({float(answer):.3f}); answer in seconds ({expected:.5f})")
    return v
