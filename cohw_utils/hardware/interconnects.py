"""Interconnects: the links collectives run over, as a cited data file (Chapter 4.7).

Semantics and units (SI, per device):

* ``Interconnect.bw_per_dir``: bandwidth one device can drive in **one direction** on this
  link or fabric, bytes/s (1 GB/s = 1e9 B/s). Vendors print NVLink and Infinity Fabric as a
  bidirectional total (H100: "900 GB/s"); the data file holds half of it, and says so per row.
  Network ports (InfiniBand, Ethernet) are printed per direction in Gb/s: divided by 8.
* ``Interconnect.latency_s``: the time of one step of a collective (one hop, one small
  message), seconds; the ``notes`` column says where each figure comes from, or that it is an
  assumption where no source states it.
* ``Interconnect.max_devices``: devices in one domain at this bandwidth (an NVLink domain of 8
  GPUs), or None where the fabric scales out.
* ``kind``: ``scale-up`` (in-node GPU links), ``scale-out`` (NIC networks), ``host`` (PCIe).

The table lives in ``cohw_utils/data/interconnects.csv`` (see ``cohw_utils/data/README.md``);
the cost of a collective on a link is :mod:`cohw_utils.views.collectives`.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from cohw_utils.core.data import read_table
from cohw_utils.core.errors import HardwareError

__all__ = ["Interconnect", "load_interconnects", "get_interconnect", "INTERCONNECT_COLUMNS"]

INTERCONNECT_COLUMNS = ("name", "kind", "bw_gbs_per_dir", "latency_us", "max_devices", "source",
                        "citation", "notes")
_KINDS = ("scale-up", "scale-out", "host")


@dataclass(frozen=True)
class Interconnect:
    """One link or fabric (module docstring for units)."""

    name: str
    kind: str
    bw_per_dir: float
    latency_s: float
    max_devices: int | None
    source: str
    notes: str = ""


@functools.lru_cache(maxsize=1)
def load_interconnects() -> dict[str, Interconnect]:
    """Every row of ``interconnects.csv`` by lower-case name, validated (a bad row raises
    :class:`HardwareError` naming the row, the field and the fix)."""
    table = read_table("interconnects.csv", INTERCONNECT_COLUMNS,
                       numeric=("bw_gbs_per_dir", "latency_us", "max_devices"), keep_default_na=False,
                       na_values={"max_devices": [""]})
    out: dict[str, Interconnect] = {}
    for line, row in enumerate(table.itertuples(index=False), start=2):
        where = f"interconnects.csv line {line} ({row.name!r})"
        if row.kind not in _KINDS:
            raise HardwareError(f"{where}: kind {row.kind!r} is not one of {', '.join(_KINDS)}")
        bw, lat = float(row.bw_gbs_per_dir), float(row.latency_us)
        if not (bw > 0 and lat >= 0):
            raise HardwareError(f"{where}: bw_gbs_per_dir must be > 0 and latency_us >= 0 (got {bw}, {lat})")
        if not str(row.source).strip():
            raise HardwareError(f"{where}: every row needs a source (title and URL)")
        key = str(row.name).strip().lower()
        if key in out:
            raise HardwareError(f"{where}: the name repeats; names must be unique")
        devices = None if (isinstance(row.max_devices, float) and math.isnan(row.max_devices)) else int(row.max_devices)
        out[key] = Interconnect(str(row.name).strip(), row.kind, bw * 1e9, lat * 1e-6, devices,
                                str(row.source), str(row.notes))
    return out


def get_interconnect(name: str | Interconnect) -> Interconnect:
    """The link named ``name`` (case-insensitive), or ``name`` itself if it is one."""
    if isinstance(name, Interconnect):
        return name
    links = load_interconnects()
    key = str(name).strip().lower()
    if key not in links:
        raise HardwareError(f"unknown interconnect {name!r}; known: {', '.join(sorted(links))} "
                            "(add a row to cohw_utils/data/interconnects.csv, with its source)")
    return links[key]
