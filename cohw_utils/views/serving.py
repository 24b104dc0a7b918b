"""An LLM server under load: continuous batching over a paged KV cache, one iteration at a time.

:func:`simulate` plays a list of :class:`Request` (arrival time, prompt and output tokens) through
a vLLM-style scheduler (:class:`SchedulerConfig`) and an :class:`IterationModel` that says how long
each engine step takes, and returns every request's time to first token (TTFT), time per output
token (TPOT) and end-to-end latency, and every step's batch and KV-block use (:class:`SimResult`).

The scheduler, per step (the policy of vLLM's v1 scheduler and of transformers' continuous
batching, both FIFO):

* **Budget.** At most ``max_batched_tokens`` tokens and ``max_num_seqs`` sequences per step.
* **Running first.** Each running request, oldest first, gets one token (a decode) or its next
  prompt chunk (``chunked_prefill``: as many prompt tokens as the budget leaves; without it a
  prompt is scheduled whole or not at all, and only a recompute longer than the budget is chunked). A request that needs a KV block when none is free
  preempts the newest running request (``preemption="recompute"``: its blocks are freed and it
  returns to the head of the queue, to recompute its prompt and the tokens it had generated).
* **Then the queue.** Waiting requests are admitted in arrival order while the budget, the
  sequence limit and the free blocks allow; the first that does not fit stops admission
  (head-of-line, as FIFO engines do). Nothing is admitted in a step that preempted.
* **KV allocation** (``allocation``): ``"paged"`` allocates ``block_size``-token blocks as the
  cache grows (vLLM); ``"reserve-max"`` reserves ``max_seq_len`` tokens at admission, the
  contiguous per-request slab of the systems before vLLM (FasterTransformer, Orca-Max);
  ``"reserve-exact"`` reserves prompt + output (an oracle that knows each output's length).

Token timing: a request's first token is sampled at the end of the step that finishes its prompt;
each later step that schedules it (one decode) samples one more. ``ttft_s`` = first token -
arrival; ``tpot_s`` = (finish - first token) / (output tokens - 1); ``e2e_s`` = finish - arrival.
A request finishes when it has ``output_len`` tokens; its blocks are freed at once.

The loop is written here, not with an event library (simpy): the only events are steps, each
decided by the previous one, so a discrete-event framework would add a dependency and nothing
else. Time advances by each step's modelled seconds; an idle server jumps to the next arrival.

Iteration models (:class:`IterationModel`): :class:`LinearIteration` (fitted to a measured engine:
a fixed cost, a prefill-path cost, per token, per cached token a decode reads, per query-key pair
of a prompt chunk) and
:class:`CostFunctionIteration` (the calibrated predictor of Chapter 4.5 on one chip, from the
model's prefill and decode cost functions).

Used by Chapter 4.6 (serving under load), ``benchmarks/bench_serving.py``
and :mod:`cohw_utils.studies.serving`.
"""
from __future__ import annotations

import functools
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np
import pandas as pd

from cohw_utils.core.errors import CohwError

__all__ = ["Request", "poisson_requests", "SchedulerConfig", "IterationModel", "LinearIteration",
           "CostFunctionIteration", "SimResult", "simulate", "kv_blocks"]

ALLOCATIONS = ("paged", "reserve-max", "reserve-exact")


@dataclass(frozen=True)
class Request:
    """One request: ``arrival_s`` (seconds from the start), ``prompt_len`` and ``output_len`` tokens."""

    id: int
    arrival_s: float
    prompt_len: int
    output_len: int

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.output_len < 1 or self.arrival_s < 0:
            raise CohwError(f"request {self.id}: prompt_len and output_len must be >= 1 and arrival_s >= 0, "
                            f"got {self.prompt_len}, {self.output_len}, {self.arrival_s}")


def _lengths(spec, n: int, rng: np.random.Generator, name: str) -> np.ndarray:
    """``spec``: an int (every request), (lo, hi) (uniform, inclusive) or a sequence of n ints."""
    if isinstance(spec, (int, np.integer)):
        out = np.full(n, int(spec))
    elif isinstance(spec, tuple) and len(spec) == 2:
        out = rng.integers(int(spec[0]), int(spec[1]) + 1, n)
    else:
        out = np.asarray(spec, dtype=np.int64)
        if out.shape != (n,):
            raise CohwError(f"{name}: give an int, a (lo, hi) range or {n} lengths, got shape {out.shape}")
    if (out < 1).any():
        raise CohwError(f"{name} must be >= 1 token, got {int(out.min())}")
    return out


def poisson_requests(rate_per_s: float, n: int, prompt_len=128, output_len=128, seed: int = 0) -> list[Request]:
    """``n`` requests arriving as a Poisson process of ``rate_per_s`` (exponential gaps, the first
    at 0), with lengths from ``prompt_len`` / ``output_len`` (see :func:`_lengths`)."""
    if not rate_per_s > 0 or not math.isfinite(rate_per_s):
        raise CohwError(f"the request rate must be a positive number of requests per second, got {rate_per_s}")
    if n < 1:
        raise CohwError(f"need at least one request, got n={n}")
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate_per_s, n)
    arrivals = np.concatenate([[0.0], np.cumsum(gaps[1:])])
    p, o = _lengths(prompt_len, n, rng, "prompt_len"), _lengths(output_len, n, rng, "output_len")
    return [Request(i, float(a), int(x), int(y)) for i, (a, x, y) in enumerate(zip(arrivals, p, o))]


@dataclass(frozen=True)
class SchedulerConfig:
    """The engine's limits (module docstring). ``num_blocks`` KV blocks of ``block_size`` tokens."""

    num_blocks: int
    block_size: int = 16
    max_num_seqs: int = 256
    max_batched_tokens: int = 2048
    chunked_prefill: bool = True
    allocation: str = "paged"
    max_seq_len: int = 2048
    preemption: str = "recompute"

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "max_num_seqs", "max_batched_tokens", "max_seq_len"):
            if getattr(self, name) < 1:
                raise CohwError(f"SchedulerConfig.{name} must be >= 1, got {getattr(self, name)}"
                                + ("; the model leaves no memory for a KV cache on this chip"
                                   if name == "num_blocks" else ""))
        if self.allocation not in ALLOCATIONS:
            raise CohwError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if self.preemption != "recompute":
            raise CohwError(f"preemption {self.preemption!r} is not modelled; use 'recompute'")

    def blocks_for(self, tokens: int) -> int:
        return -(-int(tokens) // self.block_size)


def kv_blocks(mem_bytes: float, weight_bytes: float, kv_bytes_per_token: float, block_size: int = 16,
              reserve_fraction: float = 0.10) -> int:
    """KV blocks that fit beside the weights: ``(mem x (1 - reserve) - weights) / (bytes per token x
    block_size)`` (the reserve of :mod:`cohw_utils.views.memory_budget`). Raises if nothing fits."""
    free = mem_bytes * (1 - reserve_fraction) - weight_bytes
    if free <= 0:
        raise CohwError(f"the weights ({weight_bytes / 1e9:,.1f} GB) leave no room for a KV cache in "
                        f"{mem_bytes * (1 - reserve_fraction) / 1e9:,.1f} GB usable: use a lower-bit format or a larger chip")
    return int(free // (kv_bytes_per_token * block_size))


class IterationModel(Protocol):
    """Seconds of one engine step: ``prefill`` lists (chunk tokens, tokens already cached) per
    prompt chunk, ``decode`` the tokens already cached per decoding sequence."""

    def step_seconds(self, prefill: Sequence[tuple[int, int]], decode: Sequence[int]) -> float: ...


@dataclass(frozen=True)
class LinearIteration:
    """Seconds per step, linear in what the step holds (a model fitted to a measured engine,
    :meth:`fit`)::

        c0 + c_prefill x [a prompt chunk in the step] + c_token x (tokens processed)
           + c_ctx x (cached tokens the decodes read) + c_pair x (query-key pairs of the prompt chunks)

    Decode attention reads each cached token once (a cost per context token); prefill attention
    scores every pair of a chunk's queries with the keys before them (``c (p + (c + 1) / 2)`` pairs
    for a chunk of ``c`` after ``p`` cached). The prefill term is there because engines run steps
    with a prompt on another code path than pure decode steps (transformers: varlen attention
    against its decode fast path; vLLM: prefill against decode kernels)."""

    c0: float
    c_token: float
    c_ctx: float = 0.0
    c_prefill: float = 0.0
    c_pair: float = 0.0

    @staticmethod
    def features(prefill, decode) -> tuple[float, float, float, float, float]:
        """(1, has prefill, tokens, decode context, prefill pairs) of a step."""
        tokens = sum(c for c, _ in prefill) + len(decode)
        pairs = sum(c * (p + (c + 1) / 2) for c, p in prefill)
        return 1.0, float(bool(prefill)), float(tokens), float(sum(d + 1 for d in decode)), float(pairs)

    def step_seconds(self, prefill, decode) -> float:
        one, pre, tok, ctx, pairs = self.features(prefill, decode)
        return self.c0 + self.c_prefill * pre + self.c_token * tok + self.c_ctx * ctx + self.c_pair * pairs

    @classmethod
    def fit(cls, steps: pd.DataFrame) -> "LinearIteration":
        """Non-negative least squares in *relative* error (each step weighted by 1 / its seconds, so a 2 ms decode
        step counts as much as a 20 ms prefill) on measured steps with columns ``prefill`` (chunk
        tokens, 0 for none), ``cached`` (tokens cached before the chunk), ``decode_seqs``,
        ``decode_context`` (their cached tokens, summed) and ``seconds``. Terms with no data are 0."""
        y = steps["seconds"].to_numpy(dtype=float)
        feats = np.array([cls.features([(int(c), int(p))] if c else [], [0] * int(n))
                          for c, p, n in zip(steps["prefill"], steps["cached"], steps["decode_seqs"])])
        feats[:, 3] = steps["decode_context"].to_numpy(dtype=float)
        used = [k for k in range(5) if feats[:, k].any() and not (k == 1 and feats[:, 1].all())]
        from scipy.optimize import nnls  # costs are not negative: non-negative least squares
        coef, _ = nnls(feats[:, used] / y[:, None], np.ones(len(y)))
        c = np.zeros(5)
        c[used] = coef
        return cls(c0=float(c[0]), c_prefill=float(c[1]), c_token=float(c[2]), c_ctx=float(c[3]), c_pair=float(c[4]))


class CostFunctionIteration:
    """Step times from the calibrated predictor (:func:`~cohw_utils.views.predictor.sweep_seconds`)
    on ``hw``, from the model's ``prefill`` and ``decode`` cost functions
    (:func:`~cohw_utils.spine.phase_costs.phase_cost_function`). Assumptions, stated:

    * the decode sequences of a step are one decode step of that batch at their mean context
      (exact for the totals of dense and latent attention, whose costs are linear in the context);
    * a prompt chunk of ``c`` tokens after ``p`` cached ones costs ``prefill(1, p + c) - prefill(1, p)``
      (its share of a longer prefill); a first chunk ``prefill(1, c)`` less, when decodes share the
      step, one batch-1 decode step (the weights read once, the overhead paid once);
    * steps cached by their exact arguments.
    """

    def __init__(self, prefill, decode, hw, calibration=None, weight_fmt: str | None = None) -> None:
        from cohw_utils.views.predictor import SweepTimer

        timers = {"p": SweepTimer(prefill, hw, calibration, weight_fmt), "d": SweepTimer(decode, hw, calibration, weight_fmt)}
        self._sec = functools.lru_cache(maxsize=200_000)(lambda phase, b, t: float(timers[phase]([[b, t]])[0]))
        self.hw = hw

    def step_seconds(self, prefill, decode) -> float:
        t = 0.0
        if decode:
            t += self._sec("d", len(decode), max(1, round(sum(decode) / len(decode))))
        for c, p in prefill:
            if p > 0:
                t += self._sec("p", 1, p + c) - self._sec("p", 1, p)
            else:
                t += self._sec("p", 1, c) - (self._sec("d", 1, 1) if decode or t > 0 else 0.0)
        return max(t, 1e-9)


@dataclass
class _Live:
    req: Request
    computed: int = 0          # tokens whose KV is in the cache
    generated: int = 0         # output tokens sampled so far
    target: int = 0            # tokens to have computed when the next token is sampled
    decoding: bool = False     # False while a prompt (or a recompute after preemption) is processed
    blocks: int = 0
    first_token_s: float = math.nan
    preemptions: int = 0
    admitted_s: float = math.nan


@dataclass
class SimResult:
    """``requests``: one row per request (arrival_s, admitted_s, first_token_s, finish_s, prompt_len,
    output_len, ttft_s, tpot_s, e2e_s, preemptions); ``steps``: one row per step (start_s, seconds,
    prefill_tokens, decode_seqs, blocks_used, running, waiting); ``config``."""

    requests: pd.DataFrame
    steps: pd.DataFrame
    config: SchedulerConfig
    attrs: dict = field(default_factory=dict)

    def summary(self, slo_ttft_s: float | None = None, slo_tpot_s: float | None = None) -> dict[str, float]:
        """p50/p90/p99 of TTFT, TPOT and end-to-end latency, output tokens/s, requests/s, and the
        goodput under an SLO (requests/s that met both bounds) when one is given."""
        r = self.requests
        span = float(r["finish_s"].max() - r["arrival_s"].min())
        out: dict[str, float] = {"requests": len(r), "span_s": span,
                                 "output_tokens_per_s": float(r["output_len"].sum()) / span,
                                 "requests_per_s": len(r) / span,
                                 "preempted_requests": int((r["preemptions"] > 0).sum()),
                                 "peak_blocks_used": int(self.steps["blocks_used"].max()) if len(self.steps) else 0}
        for col in ("ttft_s", "tpot_s", "e2e_s"):
            for q in (50, 90, 99):
                out[f"{col[:-2]}_p{q}_s"] = float(np.nanpercentile(r[col], q))
        if slo_ttft_s is not None or slo_tpot_s is not None:
            ok = np.ones(len(r), dtype=bool)
            if slo_ttft_s is not None:
                ok &= r["ttft_s"].to_numpy() <= slo_ttft_s
            if slo_tpot_s is not None:
                ok &= np.nan_to_num(r["tpot_s"].to_numpy(), nan=0.0) <= slo_tpot_s
            out["slo_met_%"] = 100 * float(ok.mean())
            out["goodput_requests_per_s"] = float(ok.sum()) / span
        return out


def simulate(requests: Sequence[Request], model: IterationModel, config: SchedulerConfig,
             max_steps: int = 5_000_000) -> SimResult:
    """Play ``requests`` through the scheduler of ``config`` with step times from ``model``
    (module docstring). Raises if a request can never fit the cache."""
    cfg = config
    reqs = sorted(requests, key=lambda r: (r.arrival_s, r.id))
    for r in reqs:
        need = _reserve(cfg, r)
        if need > cfg.num_blocks or (cfg.allocation == "reserve-max" and r.prompt_len + r.output_len > cfg.max_seq_len):
            raise CohwError(f"request {r.id} ({r.prompt_len} + {r.output_len} tokens) can never fit: it needs "
                            f"{need} KV blocks of {cfg.block_size} tokens (max_seq_len {cfg.max_seq_len}) and the "
                            f"cache has {cfg.num_blocks}; shorten it or give the cache more memory")
        if not cfg.chunked_prefill and r.prompt_len > cfg.max_batched_tokens:
            raise CohwError(f"request {r.id}: without chunked prefill its prompt ({r.prompt_len} tokens) must fit "
                            f"max_batched_tokens ({cfg.max_batched_tokens}); raise it or enable chunked_prefill")
    pending = deque(reqs)
    waiting: deque[_Live] = deque()
    running: list[_Live] = []
    done: list[_Live] = []
    finish: dict[int, float] = {}
    free = cfg.num_blocks
    clock = 0.0
    steps = []
    for _ in range(max_steps):
        while pending and pending[0].arrival_s <= clock:
            r = pending.popleft()
            waiting.append(_Live(r, target=r.prompt_len))
        if not running and not waiting:
            if not pending:
                break
            clock = pending[0].arrival_s
            continue
        budget, prefill, decode, scheduled = cfg.max_batched_tokens, [], [], []
        preempted = False
        i = 0
        while i < len(running) and budget > 0:
            s = running[i]
            need = 1 if s.decoding else min(s.target - s.computed, budget)
            grow = cfg.blocks_for(s.computed + need) - s.blocks if cfg.allocation == "paged" else 0
            while grow > free and running[-1] is not s:  # preempt the newest running request
                victim = running.pop()
                free += victim.blocks
                victim.blocks, victim.computed, victim.decoding = 0, 0, False
                victim.target = victim.req.prompt_len + victim.generated
                victim.preemptions += 1
                waiting.appendleft(victim)
                preempted = True
            if grow > free:
                break  # it is the newest itself and still does not fit: wait for blocks
            free -= grow
            s.blocks += grow
            if s.decoding:
                decode.append(s.computed)
            else:
                prefill.append((need, s.computed))
            scheduled.append((s, need))
            budget -= need
            i += 1
        while (not preempted and waiting and budget > 0 and len(running) < cfg.max_num_seqs):
            s = waiting[0]
            need = min(s.target, budget)
            if not cfg.chunked_prefill and need < s.target <= cfg.max_batched_tokens:
                break  # waits for a step with room for the whole prompt (a longer recompute is chunked)
            blocks = cfg.blocks_for(need) if cfg.allocation == "paged" else _reserve(cfg, s.req)
            if blocks > free:
                break
            waiting.popleft()
            free -= blocks
            s.blocks = blocks
            if math.isnan(s.admitted_s):
                s.admitted_s = clock
            running.append(s)
            prefill.append((need, 0))
            scheduled.append((s, need))
            budget -= need
        if not scheduled:
            if pending and not running:
                clock = max(clock, pending[0].arrival_s)
                continue
            raise CohwError("the scheduler is stuck: no running request can grow and none can be admitted; "
                            "give the cache more blocks or shorten the requests")
        dt = float(model.step_seconds(prefill, decode))
        steps.append({"start_s": clock, "seconds": dt, "prefill_tokens": sum(c for c, _ in prefill),
                      "decode_seqs": len(decode), "blocks_used": cfg.num_blocks - free,
                      "running": len(running), "waiting": len(waiting)})
        clock += dt
        for s, need in scheduled:
            s.computed += need
            if s.computed >= s.target:  # a prompt finished, or a decode: one token is sampled
                s.generated += 1
                s.target, s.decoding = s.computed + 1, True
                if math.isnan(s.first_token_s):
                    s.first_token_s = clock
        for s in [s for s in running if s.generated >= s.req.output_len]:
            running.remove(s)
            free += s.blocks
            s.blocks = 0
            finish[s.req.id] = clock
            done.append(s)
    else:
        raise CohwError(f"the simulation did not finish within {max_steps:,} steps")
    rows = []
    for s in sorted(done, key=lambda s: s.req.id):
        r, end = s.req, finish[s.req.id]
        rows.append({"id": r.id, "arrival_s": r.arrival_s, "admitted_s": s.admitted_s, "first_token_s": s.first_token_s,
                     "finish_s": end, "prompt_len": r.prompt_len, "output_len": r.output_len,
                     "ttft_s": s.first_token_s - r.arrival_s,
                     "tpot_s": (end - s.first_token_s) / (r.output_len - 1) if r.output_len > 1 else math.nan,
                     "e2e_s": end - r.arrival_s, "preemptions": s.preemptions})
    return SimResult(pd.DataFrame(rows), pd.DataFrame(steps), cfg)


def _reserve(cfg: SchedulerConfig, r: Request) -> int:
    """Blocks a request holds at most: all of its tokens (paged, reserve-exact) or max_seq_len."""
    if cfg.allocation == "reserve-max":
        return cfg.blocks_for(cfg.max_seq_len)
    return cfg.blocks_for(r.prompt_len + r.output_len)
