"""Chapter 5's decode plane (:mod:`cohw_utils.studies.codesign.shape_plane`): the lines read from a
decode cost function, the crossover batch against the exact totals, and what fits."""
from __future__ import annotations

import numpy as np
import pytest

from cohw_utils.core.errors import CohwError
from cohw_utils.hardware import get_hardware
from cohw_utils.spine import phase_costs
from cohw_utils.spine.costfn import Variable, build_cost_function
from cohw_utils.studies.codesign import shape_plane


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COHW_CACHE_DIR", str(tmp_path / "cache"))


def test_lines_and_crossover_agree_with_the_exact_totals():
    # TinyLlama: GQA with 4 KV heads of 64 for 32 query heads -> 22 x 2 x 256 x 2 B = 22,528 B/token
    plane = shape_plane.decode_plane(["tinyllama-1.1b"], ["H100-SXM", "A100-80GB"], [64, 1024])
    cf = phase_costs.phase_cost_function("tinyllama-1.1b", "decode", "fp16")
    for r in plane.itertuples():
        tot = cf.totals_exact((40, r.context))
        assert tot["flops"] == r.flops_fixed + 40 * r.flops_per_seq
        assert tot["bytes_read"] + tot["bytes_written"] == r.bytes_fixed + 40 * r.bytes_per_seq
        assert r.kv_bytes_per_seq == 22_528 * (r.context + 1)
        hw = get_hardware(r.hardware)
        if r.crossover_batch == r.crossover_batch:  # a crossover: compute time first reaches memory time there
            b = int(r.crossover_batch)
            t = cf.totals(np.array([[b - 1, r.context], [b, r.context]]))
            comp, mem = t[:, 0] / hw.peak("fp16"), (t[:, 1] + t[:, 2]) / hw.mem_bw
            assert comp[1] >= mem[1] and (b == 1 or comp[0] < mem[0])
        else:
            assert r.intensity_per_seq < r.ridge or r.crossover_batch != r.crossover_batch
        weights = cf.meta["weight_bytes"]
        assert weights + r.max_batch_fits * r.kv_bytes_per_seq <= hw.mem_bytes
        assert weights + (r.max_batch_fits + 1) * r.kv_bytes_per_seq > hw.mem_bytes
    short = plane[(plane.context == 64) & (plane.hardware == "H100-SXM")].iloc[0]
    long = plane[(plane.context == 1024) & (plane.hardware == "H100-SXM")].iloc[0]
    assert short.intensity_per_seq > long.intensity_per_seq  # each sequence brings more cache bytes


def test_decode_lines_refuses_a_function_of_batch_alone():
    cf = build_cost_function(_table, [Variable("batch")])  # a hand-made table: one GEMM of batch rows
    with pytest.raises(CohwError, match=r"\(batch, seq_len\)"):
        shape_plane.decode_lines(cf, [128])


def _table(p):
    import pandas as pd
    return pd.DataFrame({"op": ["aten.mm.default"], "module": ["m"], "module_class": ["Linear"], "phase": ["x"],
                         "pass": ["forward"], "op_class": ["contraction"], "dtype": ["fp16"], "costed": [True],
                         "input_shapes": [((p["batch"], 4), (4, 4))], "output_shapes": [((p["batch"], 4),)],
                         "flops": [32 * p["batch"]], "flops_effective": [32 * p["batch"]], "macs": [16 * p["batch"]],
                         "bytes_read": [8 * p["batch"] + 32], "bytes_written": [8 * p["batch"]]})
