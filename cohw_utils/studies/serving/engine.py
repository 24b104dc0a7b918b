"""A real engine on this machine: transformers' continuous batching (``ContinuousBatchingManager``,
paged attention, FIFO scheduler) serving a small Llama with random weights on the CPU, fed the
same :class:`~cohw_utils.views.serving.Request` list the simulator plays.

* :func:`small_llama`: a ``LlamaForCausalLM`` built from a config (no download), eval, fp32.
* :func:`serve`: start the engine, serve one throwaway request (the first step pays for lazy
  setup), then submit each request at its arrival time from this thread
  (``time.sleep`` to the arrival, then ``add_request``), collect every result, stop. Per request
  (transformers' own timestamps, ``record_timestamps=True``): ``ttft_s`` = first token time -
  creation (the ``add_request`` call), ``tpot_s`` = (last - first token time) / (tokens - 1),
  ``e2e_s`` = last token - creation. End-of-sequence is disabled, so every request generates
  exactly its ``output_len`` tokens, as in the simulator.
* :func:`calibrate`: the step-time model the simulator is fed, fitted on *separate* runs of the
  same engine, after one untimed pass over the same shapes: lone requests per prompt length (their median TTFT is one prefill step) and N requests
  submitted together (their median TPOT is one decode step of N sequences at their mean
  context); :meth:`~cohw_utils.views.serving.LinearIteration.fit` solves its five terms on them,
  in relative error. The Poisson run the simulator predicts is never part of the fit.
* :func:`measured_vs_simulated`: serve a request list on the engine and simulate the same list with a fitted
  step model and the engine's limits; measured beside simulated median TTFT, median TPOT,
  throughput (output tokens / (last finish - first arrival)), p90 TTFT and median end-to-end.

Used by Chapter 4.6 (serving under load) and ``benchmarks/bench_serving.py``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from cohw_utils.core.errors import CohwError
from cohw_utils.views.serving import LinearIteration, Request, SchedulerConfig, simulate

__all__ = ["EngineConfig", "small_llama", "serve", "calibrate", "measured_vs_simulated"]


@dataclass(frozen=True)
class EngineConfig:
    """The engine's limits, passed to ``ContinuousBatchingConfig`` and mirrored by
    :meth:`scheduler` for the simulator: ``num_blocks`` pages of ``block_size`` tokens,
    ``max_batch_tokens`` per step, ``max_requests`` per step."""

    num_blocks: int = 64
    block_size: int = 32
    max_batch_tokens: int = 256
    max_requests: int = 32

    def scheduler(self) -> SchedulerConfig:
        return SchedulerConfig(num_blocks=self.num_blocks, block_size=self.block_size, max_num_seqs=self.max_requests,
                               max_batched_tokens=self.max_batch_tokens, chunked_prefill=True)


def small_llama(hidden: int = 256, layers: int = 4, heads: int = 4, vocab: int = 2048, seed: int = 0):
    """A Llama with random weights (seeded), fp32 on the CPU, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                      max_position_embeddings=4096, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def _manager(model, engine: EngineConfig, max_new_tokens: int):
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    # end-of-sequence is off on purpose (every request runs to its output length); the engine warns
    # about that on every start, which would fill a chapter's output
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    cb = ContinuousBatchingConfig(page_size=engine.block_size, num_blocks=engine.num_blocks,
                                  max_batch_tokens=engine.max_batch_tokens, max_requests_per_batch=engine.max_requests,
                                  allow_block_sharing=False, use_cuda_graph=False, use_async_batching=False)
    return model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)


def serve(model, requests: list[Request], engine: EngineConfig = EngineConfig(), seed: int = 0,
          timeout_s: float = 600.0) -> pd.DataFrame:
    """Run ``requests`` through the engine in real time (module docstring); one row per request:
    id, arrival_s, prompt_len, output_len, tokens, ttft_s, tpot_s, e2e_s, finish_s (from the start)."""
    if not requests:
        raise CohwError("serve needs at least one request")
    rng = np.random.default_rng(seed)
    vocab = model.config.vocab_size
    prompts = {r.id: rng.integers(1, vocab, r.prompt_len).tolist() for r in requests}
    mgr = _manager(model, engine, max(r.output_len for r in requests))
    mgr.start()
    try:
        # one throwaway request first: the engine's first step pays for allocations and lazy setup
        mgr.add_request(prompts[requests[0].id][:8], request_id="warmup", max_new_tokens=2, eos_token_id=-1)
        while (w := mgr.get_result(request_id="warmup", timeout=5.0)) is None or not w.is_finished():
            pass
        t0 = time.perf_counter()
        for r in sorted(requests, key=lambda r: r.arrival_s):
            wait = t0 + r.arrival_s - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            mgr.add_request(prompts[r.id], request_id=str(r.id), max_new_tokens=r.output_len,
                            record_timestamps=True, eos_token_id=-1)
        results = {}
        deadline = time.perf_counter() + timeout_s
        while len(results) < len(requests):
            out = mgr.get_result(timeout=1.0)
            if out is not None and out.is_finished():
                results[out.request_id] = out
            if time.perf_counter() > deadline:
                raise CohwError(f"the engine finished {len(results)} of {len(requests)} requests in {timeout_s:.0f} s")
    finally:
        mgr.stop(block=True)
    rows = []
    for r in requests:
        out = results[str(r.id)]
        if out.error:
            raise CohwError(f"the engine failed request {r.id}: {out.error}")
        ts = out.timestamps or []
        n = len(out.generated_tokens)
        rows.append({"id": r.id, "arrival_s": r.arrival_s, "prompt_len": r.prompt_len, "output_len": r.output_len,
                     "tokens": n, "ttft_s": ts[0] - out.created_time, "e2e_s": ts[-1] - out.created_time,
                     "tpot_s": (ts[-1] - ts[0]) / (n - 1) if n > 1 else np.nan, "finish_s": ts[-1] - t0})
    return pd.DataFrame(rows)


def calibrate(model, engine: EngineConfig = EngineConfig(), prompts=(16, 48, 96, 160, 240),
              batches=(1, 2, 4, 8, 16, 32), prompt_for_decode=(32, 96, 160), output_len: int = 24,
              repeats: int = 7) -> tuple[LinearIteration, pd.DataFrame]:
    """The engine's step-time model from separate runs (module docstring): ``repeats`` lone requests
    of each prompt length (their median TTFT is one prefill step), and ``batches`` of requests submitted
    together (their median TPOT is one decode step of that many sequences at their mean context).
    Returns the model and the measured steps."""
    # one untimed pass over every shape first: the CPU kernels (oneDNN primitives, allocator pools)
    # are built on a shape's first use, which would otherwise land in the calibration and not in
    # the runs it predicts
    serve(model, [Request(i, 0.02 * i, p, 2) for i, p in enumerate(prompts) if p <= engine.max_batch_tokens], engine)
    for n in batches:
        if n <= engine.max_requests and n * (max(prompt_for_decode) + 4) <= engine.num_blocks * engine.block_size:
            serve(model, [Request(i, 0.0, max(prompt_for_decode), 4) for i in range(n)], engine)
    pts = []
    for p in prompts:
        if p > engine.max_batch_tokens:
            continue
        # `repeats` lone requests, far enough apart that each finds the engine idle: median TTFT
        out = serve(model, [Request(i, 0.15 * i, p, 2) for i in range(repeats)], engine)
        pts.append({"prefill": p, "cached": 0, "decode_seqs": 0, "decode_context": 0.0,
                    "seconds": float(out["ttft_s"].median())})
    for n in batches:
        for p in prompt_for_decode:
            if n * (p + output_len) > engine.num_blocks * engine.block_size or n > engine.max_requests:
                continue
            out = serve(model, [Request(i, 0.0, p, output_len) for i in range(n)], engine)
            pts.append({"prefill": 0, "cached": 0, "decode_seqs": n, "decode_context": n * (p + output_len / 2),
                        "seconds": float(out["tpot_s"].median())})
    steps = pd.DataFrame(pts)
    return LinearIteration.fit(steps), steps


def measured_vs_simulated(model, requests: list[Request], step_model, engine: EngineConfig = EngineConfig(),
            seed: int = 0) -> pd.DataFrame:
    """``requests`` served by the engine and simulated with ``step_model`` under the engine's
    limits (module docstring): one row per metric, ``measured``, ``simulated``, ``error_%``
    (simulated - measured, relative to measured)."""
    measured = serve(model, requests, engine, seed=seed)
    s = simulate(requests, step_model, engine.scheduler()).summary()
    span = float(measured["finish_s"].max() - measured["arrival_s"].min())
    rows = {"ttft_p50_s": (float(measured["ttft_s"].median()), s["ttft_p50_s"]),
            "tpot_p50_s": (float(measured["tpot_s"].median()), s["tpot_p50_s"]),
            "output_tokens_per_s": (float(measured["tokens"].sum()) / span, s["output_tokens_per_s"]),
            "ttft_p90_s": (float(measured["ttft_s"].quantile(0.9)), s["ttft_p90_s"]),
            "e2e_p50_s": (float(measured["e2e_s"].median()), s["e2e_p50_s"])}
    out = pd.DataFrame([{"metric": k, "measured": m, "simulated": p, "error_%": 100 * (p - m) / m}
                        for k, (m, p) in rows.items()]).set_index("metric")
    out.attrs.update(preempted=s["preempted_requests"], peak_blocks=s["peak_blocks_used"])
    return out
