"""Self-checks for the chapters' exercises and the onboarding capstone.

Each ``check_...`` function recomputes the answer with the package, compares the learner's
answer within a stated tolerance and returns a :class:`Verdict` that is truthy when right.
When the answer is wrong, the message says by how much and, where a common mistake explains
the gap (MACs vs FLOPs, bits vs bytes, K without V...), which one. The docstring of each
function names the chapter whose exercise it checks.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import CohwError

CAPSTONE_CONFIG = Path(__file__).parent / "data" / "configs" / "capstone" / "mixtral-8x7b" / "config.json"


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
            hint = f" Yours is {ratio:.3g}x the expected value."
    return Verdict(False, f"{what}: expected {expected:,.6g}, got {answer:,.6g}.{hint}")


# ------------------------------------------------------------------------------- Chapter 1
def check_decode_flops_per_token(workload: str, answer: float, seq_len: int = 4096) -> Verdict:
    """Chapter 1: FLOPs of one decode step (batch 1, context ``seq_len``) of ``workload``.

    The rule of thumb 2 x parameters is close but not exact: embeddings cost no FLOPs, and
    attention over the context adds 4 x layers x context x hidden.
    """
    from .analyze import analyze

    a = analyze(workload, "decode", seq_len=seq_len)
    expected = a.totals()["flops"]
    v = compare(answer, expected, f"{workload} decode FLOPs per token (context {seq_len})")
    if not v.ok and abs(float(answer) / (2 * a.parameters) - 1) < 0.01:
        return Verdict(False, v.message + " That is 2 x parameters: embeddings do no FLOPs, "
                       "and attention over the context adds some.")
    return v


def check_kv_bytes_per_token(config: str, answer: float, dtype_bytes: int = 2) -> Verdict:
    """Chapter 1-2: KV-cache bytes one token adds, for a registry name or a config.json path."""
    from . import workloads

    built = workloads.build(config, scale="full", device="meta")
    expected = workloads.kv_cache_bytes_per_token(built.config, dtype_bytes)
    return compare(answer, expected, f"KV cache bytes per token of {config} at {dtype_bytes} B/element", 0.0)


def check_top_proxy(weights: Mapping[str, float], answer: str, seq_len: int = 512,
                    rays: int = 1024, hw: str = "H100-SXM") -> Verdict:
    """Chapter 1: which workload ranks first under ``weights`` (whole registry, at the given
    LLM context, NeRF ray batch and reference accelerator)?"""
    from . import priority, proxies

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
    from .analyze import analyze

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
