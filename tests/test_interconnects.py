"""The interconnect data file (cohw_utils.hardware.interconnects) and the collective cost model
(cohw_utils.views.collectives), against hand-computed ring costs."""
from __future__ import annotations

import pytest

from cohw_utils.core.errors import CohwError, HardwareError
from cohw_utils.hardware.interconnects import Interconnect, get_interconnect, load_interconnects
from cohw_utils.views import collectives

LINK = Interconnect("test", "scale-up", bw_per_dir=450e9, latency_s=5e-6, max_devices=8, source="by hand")


def test_every_row_loads_with_a_source():
    links = load_interconnects()
    assert {"nvlink3-a100", "nvlink4-h100", "nvlink5-b200", "pcie4-x16", "pcie5-x16", "ib-ndr"} <= set(links)
    for link in links.values():
        assert link.bw_per_dir > 0 and link.latency_s >= 0 and "http" in link.source


def test_vendor_totals_are_halved_per_direction():
    assert get_interconnect("NVLink4-H100").bw_per_dir == 450e9   # "NVLink: 900GB/s" bidirectional
    assert get_interconnect("nvlink3-a100").bw_per_dir == 300e9   # "NVLink: 600GB/s"
    assert get_interconnect("pcie5-x16").bw_per_dir == 64e9       # "PCIe Gen5: 128GB/s"
    assert get_interconnect("ib-ndr").bw_per_dir == 50e9          # 400 Gb/s per port
    assert get_interconnect("ib-xdr").bw_per_dir == 100e9         # 800 Gb/s per port
    assert get_interconnect("roce-400g").bw_per_dir == 50e9       # one 400GbE port
    assert get_interconnect("tpu-v5p-ici").bw_per_dir == 600e9    # "1200 GBps" bidirectional per chip


def test_unknown_link_lists_the_known_ones():
    with pytest.raises(HardwareError, match="nvlink4-h100"):
        get_interconnect("nvlink9")


def test_ring_all_reduce_by_hand():
    # 8 ranks, 1 GiB: 14 latency steps of 5 us, 2 x 7/8 x 2**30 bytes at 450 GB/s
    expected = 14 * 5e-6 + 1.75 * 1073741824 / 450e9
    assert collectives.collective_time("all_reduce", 2**30, 8, LINK) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.00424566265, rel=1e-9)


def test_all_gather_moves_half_an_all_reduce():
    s, n = 2**28, 4
    ag = collectives.collective_time("all_gather", s, n, LINK) - (n - 1) * LINK.latency_s
    ar = collectives.collective_time("all_reduce", s, n, LINK) - 2 * (n - 1) * LINK.latency_s
    assert ag == pytest.approx(ar / 2)
    assert collectives.collective_time("reduce_scatter", s, n, LINK) == collectives.collective_time("all_gather", s, n, LINK)
    assert collectives.collective_time("send_recv", s, 2, LINK) == pytest.approx(5e-6 + s / 450e9)


def test_one_rank_costs_nothing_and_bad_input_is_named():
    assert all(collectives.collective_time(k, 1e9, 1, LINK) == 0 for k in collectives.COLLECTIVE_COSTS)
    with pytest.raises(CohwError, match="unknown collective"):
        collectives.collective_time("all_shuffle", 1, 2, LINK)
    with pytest.raises(CohwError, match="n must be"):
        collectives.collective_time("all_reduce", 1, 0, LINK)
    with pytest.raises(CohwError, match="message size"):
        collectives.collective_time("all_reduce", -1, 2, LINK)


def test_bus_bandwidth_is_nccls():
    # nccl-tests: busbw = algbw x 2(n-1)/n for all-reduce
    assert collectives.bus_bandwidth("all_reduce", 1e9, 8, 0.01) == pytest.approx(1e11 * 14 / 8)
    assert collectives.bus_bandwidth("all_gather", 1e9, 8, 0.01) == pytest.approx(1e11 * 7 / 8)


def test_every_traced_collective_has_a_kind():
    from cohw_utils.spine import costs

    for ns, names in (("_c10d_functional", "all_reduce all_gather_into_tensor reduce_scatter_tensor all_to_all_single"),
                      ("c10d", "allreduce_ _allgather_base_ _reduce_scatter_base_ alltoall_base_ send recv_")):
        for n in names.split():
            assert f"{ns}.{n}" in collectives.COLLECTIVE_OF_OP
            assert costs.has_rule(getattr(getattr(__import__("torch").ops, ns), n).default)
