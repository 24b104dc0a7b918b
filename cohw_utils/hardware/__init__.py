"""Layer ``hardware``: what the machines are.

Accelerator specs as a cited data file (:mod:`~cohw_utils.hardware.specs`), this machine
measured (:mod:`~cohw_utils.hardware.probe`), lookup by name (:mod:`~cohw_utils.hardware.catalog`)
and the energy meters the hardware exposes (:mod:`~cohw_utils.hardware.power_meters`, RAPL and
NVML), and the links between chips (:mod:`~cohw_utils.hardware.interconnects`). Imports only ``core``.

Public API: :class:`Hardware`, :func:`get_hardware` (``'host'`` = this machine),
:func:`load_hardware`, :func:`hardware_table`, :func:`dtype_key`, :data:`DTYPES`;
:class:`Interconnect`, :func:`get_interconnect`, :func:`load_interconnects`.

Used by Chapters 2, 4.1-4.4, 4.7 and 5.
"""
from cohw_utils.hardware.catalog import get_hardware, hardware_table
from cohw_utils.hardware.interconnects import Interconnect, get_interconnect, load_interconnects
from cohw_utils.hardware.specs import DTYPES, Hardware, dtype_key, load_hardware

__all__ = ["DTYPES", "Hardware", "Interconnect", "dtype_key", "get_hardware", "get_interconnect", "hardware_table",
           "load_hardware", "load_interconnects"]
