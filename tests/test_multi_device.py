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


def test_evaluate_systems_adds_devices_and_links_to_the_design_sweep():
    """Llama-2-70B fp16 decode, batch 8 at 256 tokens, on the H100 design: one chip does not hold
    its 138 GB; one of two ranks does. Its collectives by hand: 80 layers x 2 all-reduces of
    8 x 8192 x 2 bytes and one all-gather of the 8 x 32,000 fp16 logits, ring cost on the link."""
    from cohw_utils.spine.analyze import analyze
    from cohw_utils.studies.codesign import accelerator, sweep
    from cohw_utils.studies.codesign.phases import prepare
    from cohw_utils.views.collectives import collective_time

    ref = accelerator.from_hardware("H100-SXM")
    small = ref.replace(name="half", hbm_bytes=ref.hbm_bytes / 2)
    r = md.evaluate_systems([ref, small], "llama-2-70b", "decode", (1, 2), ["nvlink4-h100", "pcie5-x16"],
                            batch=8, context=256, quantize=False)
    assert len(r) == 2 * 3 and set(r.link) == {"-", "nvlink4-h100", "pcie5-x16"}
    one = r[(r.devices == 1) & (r.design == ref.name)].iloc[0]
    # one device is exactly the one-chip sweep
    whole = sweep.evaluate_designs([ref], prepare(analyze("llama-2-70b", "decode", batch=8, seq_len=256, dtype="fp16")),
                                   quantize=False).iloc[0]
    assert one.time_s == pytest.approx(whole.time_s, rel=1e-12) and one.comm_s == 0 and not one.fits
    for link in ("nvlink4-h100", "pcie5-x16"):
        two = r[(r.devices == 2) & (r.design == ref.name) & (r.link == link)].iloc[0]
        hand = 160 * collective_time("all_reduce", 8 * 8192 * 2, 2, link) + collective_time("all_gather", 8 * 32_000 * 2, 2, link)
        assert two.comm_s == pytest.approx(hand, rel=1e-9)
        assert two.time_s == pytest.approx(two.compute_s + two.comm_s) and two.fits
        assert two.system_mm2 == pytest.approx(2 * two.package_mm2)
        assert two.tokens_per_s == pytest.approx(8 / two.time_s)
        assert two.tokens_per_s_per_device == pytest.approx(two.tokens_per_s / 2)
    # half the HBM: a rank's 69 GB of weights no longer fit
    assert not r[(r.devices == 2) & (r.design == "half")].fits.any()
    with pytest.raises(CohwError, match="needs at least one link"):
        md.evaluate_systems([ref], "llama-2-70b", "decode", (2,), [])
    with pytest.raises(CohwError, match="'prefill' or 'decode'"):
        md.evaluate_systems([ref], "llama-2-70b", "unet_step", (1,))
