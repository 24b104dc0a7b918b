"""What a collective costs on a link: the alpha-beta model of ring algorithms (Chapter 4.7).

One collective over ``n`` ranks, on a link of per-direction bandwidth ``B`` (bytes/s) and
latency ``alpha`` (s) per step (:class:`~cohw_utils.hardware.interconnects.Interconnect`), for a
message of ``S`` bytes, costs ``steps x alpha + factor x S / B``, with the step count and the
*bus factor* (bytes each rank puts on its link per message byte) of the ring algorithm
(Thakur, Rabenseifner and Gropp 2005; the same factors are NCCL's "bus bandwidth" corrections,
nccl-tests ``doc/PERFORMANCE.md``):

=================  ===========================================  ===========  =============
collective         ``S`` is                                     steps        factor
=================  ===========================================  ===========  =============
``all_reduce``     the buffer on each rank (in = out)           ``2(n-1)``   ``2(n-1)/n``
``all_gather``     the gathered *output* on each rank           ``n-1``      ``(n-1)/n``
``reduce_scatter`` the *input* on each rank (before scatter)    ``n-1``      ``(n-1)/n``
``all_to_all``     each rank's buffer (sent and received)       ``n-1``      ``(n-1)/n``
``broadcast``      the buffer (pipelined ring)                  ``n-1``      ``1``
``send_recv``      the message, one hop                         ``1``        ``1``
=================  ===========================================  ===========  =============

``n == 1`` costs nothing. The model ignores contention with other traffic, NCCL's tree and
low-latency protocols for small messages (which take fewer full latency steps), and in-network
reduction (NVLink SHARP); it is the bandwidth-optimal ring, the usual first-order model.

:data:`COLLECTIVE_OF_OP` maps the op packets a traced per-rank table holds (torch's
``_c10d_functional`` and ``c10d`` namespaces, as ``namespace.name`` without the overload) to
these kinds.

Used by Chapter 4.7 through :mod:`cohw_utils.views.parallel`.
"""
from __future__ import annotations

from collections.abc import Callable

from cohw_utils.core.errors import CohwError
from cohw_utils.hardware.interconnects import Interconnect, get_interconnect

__all__ = ["COLLECTIVE_COSTS", "COLLECTIVE_OF_OP", "ring_steps", "bus_factor", "collective_time",
           "bus_bytes", "bus_bandwidth"]


def ring_steps(kind: str, n: int) -> int:
    """Latency steps of the ring algorithm for ``kind`` over ``n`` ranks."""
    return {"all_reduce": 2 * (n - 1), "send_recv": 1}.get(_kind(kind), n - 1) if n > 1 else 0


def bus_factor(kind: str, n: int) -> float:
    """Bytes each rank puts on its link per message byte (table above)."""
    if n <= 1:
        return 0.0
    return {"all_reduce": 2 * (n - 1) / n, "broadcast": 1.0, "send_recv": 1.0}.get(_kind(kind), (n - 1) / n)


def _alpha_beta(kind: str) -> Callable[[float, int, Interconnect], float]:
    def cost(nbytes: float, n: int, link: Interconnect) -> float:
        return ring_steps(kind, n) * link.latency_s + bus_factor(kind, n) * nbytes / link.bw_per_dir

    cost.__name__ = f"{kind}_time"
    return cost


_KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "send_recv")

#: Collective kind -> ``cost(nbytes, n, link) -> seconds`` (module docstring).
COLLECTIVE_COSTS: dict[str, Callable[[float, int, Interconnect], float]] = {k: _alpha_beta(k) for k in _KINDS}

#: Op packet (``namespace.name``) -> collective kind.
COLLECTIVE_OF_OP: dict[str, str] = {
    **{f"_c10d_functional.{op}": "all_reduce" for op in
       ("all_reduce", "all_reduce_", "all_reduce_coalesced", "all_reduce_coalesced_")},
    **{f"_c10d_functional.{op}": "all_gather" for op in
       ("all_gather_into_tensor", "all_gather_into_tensor_coalesced", "all_gather_into_tensor_out")},
    **{f"_c10d_functional.{op}": "reduce_scatter" for op in
       ("reduce_scatter_tensor", "reduce_scatter_tensor_coalesced", "reduce_scatter_tensor_out")},
    "_c10d_functional.all_to_all_single": "all_to_all",
    "_c10d_functional.broadcast": "broadcast", "_c10d_functional.broadcast_": "broadcast",
    "_c10d_functional.isend": "send_recv", "_c10d_functional.irecv": "send_recv",
    "c10d.allreduce_": "all_reduce", "c10d.allreduce_coalesced_": "all_reduce",
    "c10d.allgather_": "all_gather", "c10d._allgather_base_": "all_gather",
    "c10d.allgather_into_tensor_coalesced_": "all_gather",
    "c10d.reduce_scatter_": "reduce_scatter", "c10d._reduce_scatter_base_": "reduce_scatter",
    "c10d.reduce_scatter_tensor_coalesced_": "reduce_scatter",
    "c10d.alltoall_": "all_to_all", "c10d.alltoall_base_": "all_to_all",
    "c10d.broadcast_": "broadcast", "c10d.send": "send_recv", "c10d.recv_": "send_recv",
}


def _kind(kind: str) -> str:
    if kind not in _KINDS:
        raise CohwError(f"unknown collective {kind!r}: choose one of {', '.join(_KINDS)}")
    return kind


def _check(nbytes: float, n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise CohwError(f"a collective over n={n!r} ranks: n must be a whole number >= 1")
    if not nbytes >= 0:
        raise CohwError(f"a collective of {nbytes!r} bytes: the message size must be >= 0")


def collective_time(kind: str, nbytes: float, n: int, link: Interconnect | str) -> float:
    """Seconds of one ``kind`` collective of ``nbytes`` over ``n`` ranks on ``link`` (an
    :class:`Interconnect` or its name in the data file)."""
    _check(nbytes, n)
    link = get_interconnect(link) if isinstance(link, str) else link
    return COLLECTIVE_COSTS[_kind(kind)](float(nbytes), n, link)


def bus_bytes(kind: str, nbytes: float, n: int) -> float:
    """Bytes each rank sends on its link for one ``kind`` collective of ``nbytes``."""
    _check(nbytes, n)
    return bus_factor(kind, n) * nbytes


def bus_bandwidth(kind: str, nbytes: float, n: int, seconds: float) -> float:
    """NCCL's bus bandwidth of a measured collective: ``nbytes / seconds x factor`` (bytes/s),
    comparable with the link's bandwidth whatever the collective and the rank count."""
    if not seconds > 0:
        raise CohwError(f"bus_bandwidth: seconds must be > 0, got {seconds!r}")
    return bus_bytes(kind, nbytes, n) / seconds
