"""The one serving-memory budget: does a model fit on a chip, and how much is left for the KV cache.

Every chapter that asks "does it fit" asks it here (Chapters 2, 4.1-4.2, 4.2b, 4.4, 5), so one
rule gives one answer. Units: bytes (``Hardware.mem_bytes``).

The rule: of a chip's capacity, :data:`RESERVE_FRACTION` (10%) is held back for the runtime
(CUDA context, allocator pools, fragmentation; vLLM's default ``gpu_memory_utilization=0.9``
holds back the same 10%); weights, any activation memory the caller states, and the KV cache
share the rest. So a model *fits* when ``weights + kv + activations <= (1 - reserve) x capacity``.
A caller may pass ``reserve_fraction=0`` to ask the raw-capacity question, and must say so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from cohw_utils.core.errors import CohwError
from cohw_utils.hardware import Hardware

__all__ = ["RESERVE_FRACTION", "MemoryLayout", "memory_layout", "usable_bytes", "fits"]

#: Share of a chip's memory held back for the runtime (vLLM's gpu_memory_utilization=0.9).
RESERVE_FRACTION = 0.10
GB = 1e9


def usable_bytes(hw: Hardware, reserve_fraction: float = RESERVE_FRACTION) -> float:
    """Bytes of ``hw``'s memory a model may use: capacity less the runtime reserve."""
    if hw.mem_bytes is None:
        raise CohwError(f"{hw.name} has no memory capacity in the hardware data; pick another chip")
    if not 0 <= reserve_fraction < 1:
        raise CohwError(f"reserve_fraction must be in [0, 1), got {reserve_fraction}")
    return (1.0 - reserve_fraction) * hw.mem_bytes


def fits(hw: Hardware, resident_bytes: float, reserve_fraction: float = RESERVE_FRACTION) -> bool:
    """Whether ``resident_bytes`` (weights + KV cache + activations) fit in ``hw``'s usable memory.

    A chip with no capacity in the data (a CPU host) is taken to fit."""
    if hw.mem_bytes is None:
        return True
    return bool(resident_bytes <= usable_bytes(hw, reserve_fraction))


@dataclass(frozen=True)
class MemoryLayout:
    """One accelerator's memory split for serving one model (bytes)."""

    hardware: str
    capacity: float
    weights: float
    runtime_reserve: float
    activations: float
    kv_per_token: float

    @property
    def kv_budget(self) -> float:
        return self.capacity - self.weights - self.runtime_reserve - self.activations

    @property
    def max_tokens(self) -> int:
        """Tokens of KV cache that fit in the budget (0 when the model does not fit)."""
        return max(0, int(self.kv_budget // self.kv_per_token))

    def max_sequences(self, seq_len: int, block_size: int | None = None) -> int:
        """Concurrent sequences of ``seq_len`` tokens whose KV cache fits the budget."""
        tokens = seq_len if not block_size else math.ceil(seq_len / block_size) * block_size
        return max(0, int(self.kv_budget // (self.kv_per_token * tokens)))

    def table(self) -> pd.DataFrame:
        """Weights / runtime reserve / activations / KV budget in GB and % of capacity."""
        parts = {"weights": self.weights, "runtime reserve": self.runtime_reserve,
                 "activations": self.activations, "KV-cache budget": self.kv_budget}
        return pd.DataFrame({"GB": {k: v / GB for k, v in parts.items()},
                             "% of capacity": {k: 100 * v / self.capacity for k, v in parts.items()}})


def memory_layout(hw: Hardware, weights: float, kv_per_token: float, activations: float = 0.0,
                  reserve_fraction: float = RESERVE_FRACTION) -> MemoryLayout:
    """Split ``hw.mem_bytes`` into weights, a runtime reserve (``reserve_fraction`` of capacity),
    ``activations`` and the KV-cache budget. Raises when the weights alone do not fit."""
    if hw.mem_bytes is None:
        raise CohwError(f"{hw.name} has no memory capacity in the hardware data; pick another chip")
    if not 0 <= reserve_fraction < 1:
        raise CohwError(f"reserve_fraction must be in [0, 1), got {reserve_fraction}")
    layout = MemoryLayout(hw.name, hw.mem_bytes, weights, reserve_fraction * hw.mem_bytes,
                          activations, kv_per_token)
    if layout.kv_budget <= 0:
        raise CohwError(
            f"the model does not fit on {hw.name}: weights {weights / GB:.1f} GB + reserves "
            f"{(layout.runtime_reserve + activations) / GB:.1f} GB > {hw.mem_bytes / GB:.0f} GB; "
            "use a bigger chip, lower-precision weights or tensor parallelism")
    return layout


