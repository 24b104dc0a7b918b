"""Tensor parallelism beside offloading in the co-design loop (cohw_utils.studies.codesign.multi_device)."""
from __future__ import annotations

import pytest

from cohw_utils.core.errors import CohwError
from cohw_utils.hardware import get_hardware
from cohw_utils.studies.codesign import multi_device as md
from cohw_utils.views.parallel import rank_seconds
from cohw_utils.spine.shard import per_rank_table


def test_tp_options_split_the_weights_and_add_the_all_reduces():
    t = md.tp_options("llama-2-7b", "H100-SXM", ["nvlink4-h100", "pcie5-x16"], tps=(1, 2), context=256)
    one, nv, pcie = t.iloc[0], t[t.link == "nvlink4-h100"].iloc[0], t[t.link == "pcie5-x16"].iloc[0]
    assert len(t) == 3 and one.link == "-" and one.comm_s == 0
    # Llama-2-7B fp16: 6,738,415,616 parameters x 2 B; KV 524,288 B/token; one rank holds half of each
    assert one.rank_GB == pytest.approx((6_738_415_616 * 2 + 524_288 * 256) / 1e9)
    assert nv.rank_GB == pytest.approx(one.rank_GB / 2)
    assert nv.compute_s == pcie.compute_s and 0 < nv.comm_s < pcie.comm_s    # same work, slower link
    assert nv.time_per_token_s == pytest.approx(nv.compute_s + nv.comm_s)      # no overlap
    assert nv.tokens_per_s_per_device == pytest.approx(nv.tokens_per_s / 2)
    table = per_rank_table("llama-2-7b", "decode", tp=2, batch=1, seq_len=256, dtype="fp16")
    assert nv.time_per_token_s == pytest.approx(rank_seconds(table, get_hardware("H100-SXM"), md.native_link("H100-SXM")).total_s)


def test_native_link_and_bad_input():
    assert md.native_link("A100-80GB") == "nvlink3-a100" and md.native_link("H200-SXM") == "nvlink4-h100"
    assert md.native_link("MI300X") == "pcie5-x16"
    with pytest.raises(CohwError, match="needs at least one link"):
        md.tp_options("llama-2-7b", "H100-SXM", [], tps=(2,))
