"""The serving simulator (:mod:`cohw_utils.views.serving`): hand-timed schedules with a constant
step time, chunked prefill under a token budget, preemption, reserved against paged allocation,
goodput, the cost-function iteration model, and bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cohw_utils.core.errors import CohwError
from cohw_utils.views.serving import (CostFunctionIteration, LinearIteration, Request, SchedulerConfig, kv_blocks,
                                      poisson_requests, simulate)

STEP = LinearIteration(0.010, 0.0)  # every step takes 10 ms, whatever it holds


@pytest.fixture(scope="module")
def costfn_cache(tmp_path_factory):
    """One cost-function cache for this module's tests: TinyLlama's prefill and decode functions
    are built once (cold, as on a fresh machine), not once per test."""
    return str(tmp_path_factory.mktemp("costfn"))


def test_one_request_by_hand():
    r = simulate([Request(0, 0.5, 16, 4)], STEP, SchedulerConfig(num_blocks=10, block_size=16))
    row = r.requests.iloc[0]
    # step 1 (0.50-0.51) prefills 16 tokens and samples token 1; three decodes sample tokens 2-4
    assert row.ttft_s == pytest.approx(0.010) and row.e2e_s == pytest.approx(0.040)
    assert row.tpot_s == pytest.approx(0.010)
    assert r.steps["prefill_tokens"].tolist() == [16, 0, 0, 0] and r.steps["decode_seqs"].tolist() == [0, 1, 1, 1]
    # the first decode writes token 17: a second block
    assert r.steps["blocks_used"].tolist() == [1, 2, 2, 2]


def test_token_budget_chunks_the_second_prompt():
    cfg = SchedulerConfig(num_blocks=10, block_size=16, max_batched_tokens=16)
    r = simulate([Request(0, 0.0, 16, 3), Request(1, 0.0, 16, 3)], STEP, cfg).requests.set_index("id")
    # step 1: A's 16 prompt tokens; step 2: A decodes (1) + B's first 15; step 3: A + B's last one
    assert r.loc[0, "ttft_s"] == pytest.approx(0.010) and r.loc[1, "ttft_s"] == pytest.approx(0.030)
    unchunked = SchedulerConfig(num_blocks=10, block_size=16, max_batched_tokens=16, chunked_prefill=False)
    r2 = simulate([Request(0, 0.0, 16, 3), Request(1, 0.0, 16, 3)], STEP, unchunked).requests.set_index("id")
    # without chunking B waits for a step with 16 tokens of budget left: once A has finished (3 steps)
    assert r2.loc[1, "ttft_s"] == pytest.approx(0.040)


def test_preemption_recomputes_and_keeps_the_first_token_time():
    cfg = SchedulerConfig(num_blocks=4, block_size=16)
    reqs = [Request(0, 0.0, 16, 40), Request(1, 0.0, 16, 40)]  # each grows to 3-4 blocks: both cannot stay
    res = simulate(reqs, STEP, cfg)
    r = res.requests.set_index("id")
    assert r.loc[0, "preemptions"] == 0 and r.loc[1, "preemptions"] >= 1  # the newer one is evicted
    assert r.loc[1, "ttft_s"] == pytest.approx(0.010)  # its first token came before the eviction
    assert res.steps["blocks_used"].max() <= 4
    assert (r["e2e_s"] > 0).all() and len(r) == 2


def test_reserving_max_length_admits_fewer_than_paging():
    reqs = [Request(i, 0.0, 20, 10) for i in range(8)]
    paged = simulate(reqs, STEP, SchedulerConfig(num_blocks=16, block_size=16, max_seq_len=64))
    slab = simulate(reqs, STEP, SchedulerConfig(num_blocks=16, block_size=16, max_seq_len=64, allocation="reserve-max"))
    exact = simulate(reqs, STEP, SchedulerConfig(num_blocks=16, block_size=16, max_seq_len=64, allocation="reserve-exact"))
    assert slab.steps["running"].max() == 16 // 4  # 64 tokens = 4 blocks each
    assert exact.steps["running"].max() == 16 // 2  # 30 tokens = 2 blocks each
    assert paged.steps["running"].max() == 8
    assert slab.summary()["e2e_p50_s"] > paged.summary()["e2e_p50_s"]


def test_poisson_load_summary_and_goodput():
    reqs = poisson_requests(20.0, 200, prompt_len=(16, 64), output_len=(8, 32), seed=3)
    gaps = np.diff([r.arrival_s for r in reqs])
    assert reqs[0].arrival_s == 0 and abs(gaps.mean() - 1 / 20) < 0.2 / 20  # mean gap 1/rate
    res = simulate(reqs, LinearIteration(0.002, 2e-5, 1e-7), SchedulerConfig(num_blocks=64, block_size=16))
    s = res.summary(slo_ttft_s=0.05, slo_tpot_s=0.01)
    assert s["requests"] == 200 and 0 <= s["slo_met_%"] <= 100
    assert s["goodput_requests_per_s"] <= s["requests_per_s"]
    assert s["ttft_p50_s"] <= s["ttft_p90_s"] <= s["ttft_p99_s"]
    assert s["output_tokens_per_s"] == pytest.approx(res.requests.output_len.sum() / s["span_s"])
    tight = res.summary(slo_ttft_s=1e-6)
    assert tight["slo_met_%"] == 0 and tight["goodput_requests_per_s"] == 0


def test_linear_iteration_fit_recovers_its_coefficients():
    import pandas as pd
    rng = np.random.default_rng(0)
    truth = LinearIteration(c0=0.003, c_token=4e-5, c_ctx=2e-7, c_prefill=0.002, c_pair=1e-8)
    rows = []
    for _ in range(40):
        c, p, n = int(rng.integers(0, 300)), int(rng.integers(0, 500)), int(rng.integers(0, 16))
        c, n = (c, n) if c or n else (1, n)
        dec = [int(x) for x in rng.integers(1, 1000, n)]
        rows.append({"prefill": c, "cached": p if c else 0, "decode_seqs": n, "decode_context": float(sum(dec) + n),
                     "seconds": truth.step_seconds([(c, p if c else 0)] if c else [], dec)})
    m = LinearIteration.fit(pd.DataFrame(rows))
    for k in ("c0", "c_token", "c_ctx", "c_prefill", "c_pair"):
        assert getattr(m, k) == pytest.approx(getattr(truth, k), rel=1e-6), k
    # by hand: a 128-token prompt alone and one decode reading 10 cached tokens
    assert truth.step_seconds([(128, 0)], [10]) == pytest.approx(0.003 + 0.002 + 4e-5 * 129 + 2e-7 * 11 + 1e-8 * 128 * 64.5)


def test_cost_function_iteration_is_the_predictor_for_pure_steps(costfn_cache, monkeypatch):
    monkeypatch.setenv("COHW_CACHE_DIR", costfn_cache)
    from cohw_utils.hardware import get_hardware
    from cohw_utils.spine.phase_costs import phase_cost_function
    from cohw_utils.views.predictor import load_calibration, sweep_seconds
    pre = phase_cost_function("tinyllama-1.1b", "prefill", "fp16", prefill_logits="last")
    dec = phase_cost_function("tinyllama-1.1b", "decode", "fp16")
    hw, cal = get_hardware("H100-SXM"), load_calibration()
    it = CostFunctionIteration(pre, dec, hw, cal)
    assert it.step_seconds([], [100, 300]) == pytest.approx(sweep_seconds(dec, [[2, 200]], hw, cal)[0])
    assert it.step_seconds([(128, 0)], []) == pytest.approx(sweep_seconds(pre, [[1, 128]], hw, cal)[0])
    chunk = it.step_seconds([(64, 64)], [])  # the second half of a 128-token prompt
    assert chunk == pytest.approx(sweep_seconds(pre, [[1, 128]], hw, cal)[0] - sweep_seconds(pre, [[1, 64]], hw, cal)[0])
    mixed = it.step_seconds([(128, 0)], [100, 300])
    assert it.step_seconds([], [100, 300]) < mixed < it.step_seconds([], [100, 300]) + it.step_seconds([(128, 0)], [])


def test_bad_input_names_the_problem():
    with pytest.raises(CohwError, match="positive number of requests per second"):
        poisson_requests(-1.0, 10)
    with pytest.raises(CohwError, match="can never fit"):
        simulate([Request(0, 0.0, 1000, 100)], STEP, SchedulerConfig(num_blocks=8, block_size=16))
    with pytest.raises(CohwError, match="leaves no memory for a KV cache"):
        SchedulerConfig(num_blocks=0)
    with pytest.raises(CohwError, match="allocation must be one of"):
        SchedulerConfig(num_blocks=4, allocation="contiguous")
    with pytest.raises(CohwError, match="leave no room for a KV cache"):
        kv_blocks(80e9, 138e9, 327_680)
    assert kv_blocks(80e9, 13.5e9, 524_288, 16) == math.floor((72e9 - 13.5e9) / (524_288 * 16))


def test_the_real_engine_serves_every_token_and_reports_its_timestamps():
    from cohw_utils.studies.serving.engine import EngineConfig, serve, small_llama
    model = small_llama(hidden=128, layers=2, heads=2, vocab=512)
    out = serve(model, [Request(0, 0.0, 20, 5), Request(1, 0.05, 40, 3)], EngineConfig(num_blocks=16, block_size=16))
    assert out["tokens"].tolist() == [5, 3]  # end-of-sequence disabled: exactly output_len each
    assert (out["ttft_s"] > 0).all() and (out["e2e_s"] >= out["ttft_s"]).all() and (out["tpot_s"] > 0).all()
    with pytest.raises(CohwError, match="at least one request"):
        serve(model, [])


def test_a_chip_server_sized_from_its_memory_and_an_slo_sweep(costfn_cache, monkeypatch):
    monkeypatch.setenv("COHW_CACHE_DIR", costfn_cache)
    from cohw_utils.hardware import get_hardware
    from cohw_utils.studies.serving import load
    it, cfg = load.server("tinyllama-1.1b", "H100-SXM")
    h100 = get_hardware("H100-SXM")
    weights = 1_100_048_384 * 2  # TinyLlama-1.1B parameters in fp16
    assert cfg.num_blocks == kv_blocks(h100.mem_bytes, weights, 22_528, 16)  # 22 layers x 2 x 4 heads x 64 x 2 B
    sweep = load.load_sweep("tinyllama-1.1b", "H100-SXM", [2.0, 400.0], n=60, prompt_len=256, output_len=64,
                            slo_ttft_s=0.05, slo_tpot_s=0.005)
    assert sweep["normalized_latency_s"].is_monotonic_increasing  # more load, longer per-token latency
    low, high = sweep.iloc[0], sweep.iloc[1]
    assert low["slo_met_%"] >= high["slo_met_%"] and low["slo_met_%"] == 100
    assert load.max_rate_at_slo(sweep, 90) in (2.0, 400.0)
    with pytest.raises(CohwError, match="below one decode step"):
        load.load_sweep("tinyllama-1.1b", "H100-SXM", [1.0], n=5, slo_tpot_s=1e-7)
    with pytest.raises(CohwError, match="no SLO column"):
        load.max_rate_at_slo(sweep.drop(columns=["slo_met_%"]))



def test_sustained_rate_reads_the_sweep():
    import pandas as pd
    from cohw_utils.studies.serving.load import sustained_rate
    sweep = pd.DataFrame({"allocation": ["paged"] * 3 + ["reserve-max"] * 3, "rate_per_s": [1, 2, 4] * 2,
                          "normalized_latency_s": [0.01, 0.02, 0.5, 0.01, 0.6, 0.7]})
    got = sustained_rate(sweep, 0.1)
    assert got["paged"] == 2 and got["reserve-max"] == 1
    assert np.isnan(sustained_rate(sweep, 0.001)["paged"])


def test_resident_bytes_of_weight_and_kv_formats():
    from cohw_utils.studies.serving.load import resident_bytes
    w, kv = 2e9, 1000.0  # 1e9 fp16 weights, 1000 B of KV per token
    assert resident_bytes(w, kv, None) == (w, kv)
    assert resident_bytes(w, kv, "fp8-kv8") == (1e9, 500.0)  # 1 byte per weight, KV at 8 bits
    assert resident_bytes(w, kv, "fp8") == (1e9, 1000.0)     # KV stays 16-bit
    # int4 in groups of 128 with 4 bytes of scale and zero point: 0.5 + 4/128 bytes per weight
    assert resident_bytes(w, kv, "int4-wo-g128")[0] == pytest.approx(1e9 * (0.5 + 4 / 128))
    assert resident_bytes(4e9, 2000.0, "fp8-kv8", traced_bytes=4) == (1e9, 500.0)  # traced in fp32
    with pytest.raises(CohwError, match="unknown weight format"):
        resident_bytes(w, kv, "int5")


def test_scaled_chip_changes_one_resource_and_keeps_the_vendor():
    from cohw_utils.hardware import get_hardware
    from cohw_utils.studies.serving.load import scaled
    h = get_hardware("H100-SXM")
    s = scaled(h, bandwidth=2)
    assert s.mem_bw == 2 * h.mem_bw and s.mem_bytes == h.mem_bytes and s.peak_flops == h.peak_flops
    assert s.vendor == h.vendor and s.name == "H100-SXM BW x2"
    f = scaled(h, flops=2, capacity=3)
    assert f.peak("bf16") == 2 * h.peak("bf16") and f.mem_bytes == 3 * h.mem_bytes and f.mem_bw == h.mem_bw


def test_sweep_timer_one_point_at_a_time_equals_the_vectorized_sweep(costfn_cache, monkeypatch):
    monkeypatch.setenv("COHW_CACHE_DIR", costfn_cache)
    from cohw_utils.hardware import get_hardware
    from cohw_utils.spine.phase_costs import phase_cost_function
    from cohw_utils.views.predictor import SweepTimer, load_calibration, sweep_seconds
    cf = phase_cost_function("tinyllama-1.1b", "decode", "fp16")
    hw, cal = get_hardware("A100-80GB"), load_calibration()
    pts = [[1, 17], [8, 300], [64, 2000], [3, 5]]
    timer = SweepTimer(cf, hw, cal)
    one_by_one = [float(timer([p])[0]) for p in pts]
    assert one_by_one == pytest.approx(list(sweep_seconds(cf, pts, hw, cal)), rel=1e-12)
    assert one_by_one[2] > one_by_one[1] > one_by_one[0]  # more sequences and context, longer step


def test_slo_rate_brackets_the_capacity_and_more_memory_serves_more(costfn_cache, monkeypatch):
    monkeypatch.setenv("COHW_CACHE_DIR", costfn_cache)
    from cohw_utils.studies.serving import load
    kw = dict(prompt_len=(64, 512), output_len=(64, 512), n=40, horizon_s=5.0, rel_tol=0.05)
    got = load.slo_rate("tinyllama-1.1b", "A100-40GB", 0.1, 0.008, **kw)
    rate, failed = got["max_rate_per_s"], got["failed_rate_per_s"]
    assert rate > 0 and got["slo_met_%"] >= 90 and rate < failed <= rate * 1.05 + 1e-9
    sweep = load.load_sweep("tinyllama-1.1b", "A100-40GB", [rate, failed], slo_ttft_s=0.1, slo_tpot_s=0.008,
                            n=40, horizon_s=5.0, prompt_len=(64, 512), output_len=(64, 512))
    assert sweep["slo_met_%"].iloc[0] >= 90 > sweep["slo_met_%"].iloc[1]  # the bracket, re-simulated
    wi = load.what_if("tinyllama-1.1b", "A100-40GB", {"as is": None, "3x HBM": lambda h: load.scaled(h, capacity=3)},
                      0.1, 0.008, **kw)
    assert wi.loc["3x HBM", "num_blocks"] > 3 * wi.loc["as is", "num_blocks"]  # the weights are paid once
    assert wi.loc["as is", "rate_gain"] == 1.0 and wi.loc["as is", "max_rate_per_s"] == rate
    with pytest.raises(CohwError, match="below one prefill"):
        load.slo_rate("tinyllama-1.1b", "A100-40GB", 1e-6, 0.008, **kw)
    with pytest.raises(CohwError, match="llama-2-70b on A100-40GB: the weights"):
        load.server("llama-2-70b", "A100-40GB")


def test_engine_compare_reports_measured_beside_simulated():
    from cohw_utils.studies.serving.engine import EngineConfig, measured_vs_simulated, small_llama
    model = small_llama(hidden=64, layers=1, heads=2, vocab=256)
    step = LinearIteration(c0=1e-3, c_token=1e-5)
    reqs = [Request(0, 0.0, 16, 4), Request(1, 0.01, 24, 3)]
    out = measured_vs_simulated(model, reqs, step, EngineConfig(num_blocks=16, block_size=16, max_batch_tokens=64, max_requests=4))
    assert list(out.index) == ["ttft_p50_s", "tpot_p50_s", "output_tokens_per_s", "ttft_p90_s", "e2e_p50_s"]
    assert (out["measured"] > 0).all() and (out["simulated"] > 0).all()
    err = 100 * (out["simulated"] - out["measured"]) / out["measured"]
    assert np.allclose(out["error_%"], err)


def test_serving_figures_draw_what_they_are_given():
    import pandas as pd
    from cohw_utils.studies.serving import figures
    sweep = pd.DataFrame({"model": "m", "hardware": "X", "allocation": ["paged"] * 2 + ["reserve-max"] * 2,
                          "rate_per_s": [1.0, 2.0] * 2, "normalized_latency_s": [0.02, 0.03, 0.05, 0.9]})
    fig = figures.fig_allocation(sweep, bound_s=0.1)
    assert len(fig.axes[0].lines) == 3  # two policies and the bound
    res = simulate([Request(0, 0.0, 40, 3), Request(1, 0.0, 40, 3)], LinearIteration(1e-3, 1e-5),
                   SchedulerConfig(num_blocks=8, block_size=16))
    fig = figures.fig_blocks_over_time(res)
    assert len(fig.axes) == 2


def test_speculative_formula_by_hand():
    from cohw_utils.studies.serving.speculative import expected_speedup, expected_tokens
    assert expected_tokens(0.0, 4) == 1.0                      # nothing accepted: the target's own token
    assert expected_tokens(1.0, 4) == 5.0                      # everything accepted: gamma + 1
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)      # 1 + 0.5 + 0.25
    assert expected_speedup(0.5, 2, 0.25) == pytest.approx(1.75 / 1.5)
    with pytest.raises(CohwError, match="alpha"):
        expected_tokens(1.5, 4)


def test_layer_skip_draft_and_assisted_generation_keep_the_greedy_tokens():
    from cohw_utils.studies.serving.engine import small_llama
    from cohw_utils.studies.serving.speculative import acceptance_rate, layer_skip_draft, measure_pair
    target = small_llama(hidden=64, layers=3, heads=2, vocab=128)
    draft = layer_skip_draft(target, 1)
    assert len(draft.model.layers) == 1 and len(target.model.layers) == 3
    ids = torch.randint(1, 128, (1, 12))
    assert acceptance_rate(target, target, ids) == 1.0
    assert 0.0 <= acceptance_rate(target, draft, ids) <= 1.0
    got = measure_pair(target, draft, prompt_len=8, new_tokens=12, gamma=3, repeats=1)  # raises if tokens differ
    assert got["predicted_speedup"] == pytest.approx(
        (1 - got["alpha"] ** 4) / (1 - got["alpha"]) / (3 * got["c"] + 1) if got["alpha"] < 1 else 4 / (3 * got["c"] + 1))
    assert got["measured_speedup"] > 0 and 0 < got["c"]
    with pytest.raises(CohwError, match="keeps 1..2"):
        layer_skip_draft(target, 3)
    from cohw_utils.studies.serving.speculative import damp_later_blocks
    exact = damp_later_blocks(target, 1, 0.0)  # later blocks add nothing: the one-block draft is the model
    assert acceptance_rate(exact, layer_skip_draft(exact, 1), ids) == 1.0
