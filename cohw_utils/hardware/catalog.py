"""Look up an accelerator by name, or this machine (``'host'``), and tabulate the catalogue.

Kept apart from :mod:`cohw_utils.hardware.specs` (the data file and the ``Hardware`` record) so
that the probe can build a ``Hardware`` without importing the lookup that calls it: the layer has
no import cycle. Used by every chapter that names a chip (Chapters 2, 4, 5).
"""
from __future__ import annotations

from typing import Any

import pandas as pd

from cohw_utils.core.errors import HardwareError
from cohw_utils.hardware.probe import host_hardware
from cohw_utils.hardware.specs import _DTYPE_COLUMNS, Hardware, load_hardware

__all__ = ["get_hardware", "hardware_table"]


def get_hardware(name: str) -> Hardware:
    """The accelerator called ``name`` (case-insensitive), or this machine for ``'host'``.

    ``'host'`` runs (or reads from cache) :func:`cohw_utils.hardware.probe.probe_host`. An unknown
    name raises :class:`HardwareError` listing the known names.
    """
    if name.strip().lower() == "host":
        return host_hardware()
    table = load_hardware()
    by_lower = {k.lower(): v for k, v in table.items()}
    try:
        return by_lower[name.strip().lower()]
    except KeyError:
        known = ", ".join([*table, "host"])
        raise HardwareError(f"unknown accelerator {name!r}; known names: {known}") from None


def hardware_table(include_host: bool = False) -> pd.DataFrame:
    """The hardware table for display: one row per chip, indexed by name.

    Peak columns are dense TFLOP/s (TOPS for int8), bandwidth in GB/s, memory in GB, LLC in
    MiB, and ``ridge_bf16`` in FLOP/byte. ``include_host=True`` appends the probed host.
    """
    chips = list(load_hardware().values())
    if include_host:
        chips.append(get_hardware("host"))
    rows = []
    for hw in chips:
        row: dict[str, Any] = {
            "name": hw.name,
            "vendor": hw.vendor,
            "year": hw.year,
            "memory_gb": None if hw.mem_bytes is None else hw.mem_bytes / 1e9,
            "memory_type": hw.memory_type,
            "mem_bw_gbs": hw.mem_bw / 1e9,
            "llc_mib": None if hw.llc_bytes is None else hw.llc_bytes / 2**20,
        }
        for dtype, column in _DTYPE_COLUMNS.items():
            value = hw.peak_flops.get(dtype)
            row[column] = None if value is None else value / 1e12
        row["ridge_bf16"] = hw.ridge_point("bf16") if "bf16" in hw.peak_flops else None
        row["tdp_w"] = hw.tdp_w
        rows.append(row)
    return pd.DataFrame(rows).set_index("name")
