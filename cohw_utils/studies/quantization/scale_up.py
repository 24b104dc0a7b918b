"""Scale-up arithmetic: Llama-2 7B/13B/70B weight and KV bytes per format, fit and decode bound.

* :func:`model_bytes`: weight bytes of a (meta) causal LM with its decoder-block linears in a
  format of :data:`SCALEUP_FORMATS` (bits per weight, scales included) and everything else
  (embedding, LM head, norms) at fp16.
* :func:`scaleup_table`: per model, format and accelerator, weight and KV-cache GB (1e9
  bytes), whether it **fits** and the roofline decode bound ``tokens/s <= batch * bandwidth /
  bytes per token``. *Fits* is the package's one serving-memory rule,
  :func:`cohw_utils.views.memory_budget.fits`: weights + KV cache <= 90% of the chip's nominal
  memory (10% runtime reserve, :data:`cohw_utils.views.memory_budget.RESERVE_FRACTION`; one
  chip, no tensor parallelism; activations not counted, so 'fits' is necessary, not
  sufficient). :func:`largest_fitting_format` picks, per model and chip, the highest-precision
  format that fits.
* :func:`load_reference`: published quantization results, rows of
  ``data/quant_reference.csv``: ``paper``, ``table``, ``model``, ``dataset``, ``metric``,
  ``format``, ``method``, ``value``, ``citation`` (a key of ``references.bib``) and ``source``
  (URL), read with :func:`cohw_utils.core.data.read_table`.

Used by Chapter 4.2b (quantization): the scale-up section and exercise 4.7.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import pandas as pd
from torch import nn

from cohw_utils.core.data import read_table
from cohw_utils.core.errors import CohwError
from cohw_utils.spine.analyze import count_parameters
from cohw_utils.studies.quantization.blocks import block_linears
from cohw_utils.studies.quantization.kv_int8 import kv_format_bytes_per_token
from cohw_utils.studies.quantization.schemes import scheme
from cohw_utils.views.memory_budget import fits

# ------------------------------------------------------------------------------------ scale-up
#: Formats of the scale-up table: (label, bits per *linear* weight as a function of the row
#: length K), with everything else (embeddings, head, norms) at 16 bits.
SCALEUP_FORMATS: dict[str, Callable[[int], float]] = {
    "fp16": lambda k: 16.0,
    "int8 per-channel": lambda k: scheme(8).bits_per_weight(k),
    "Q8_0": lambda k: 8.5,
    "Q4_0": lambda k: 4.5,
    "int4 g128": lambda k: scheme(4, 128).bits_per_weight(k),
}


def model_bytes(model: nn.Module, fmt: str) -> dict[str, float]:
    """Weight bytes of a (meta) causal LM stored in ``fmt`` (a key of :data:`SCALEUP_FORMATS`):
    decoder-block linears at the format's bits per weight (with scales), the rest at fp16."""
    if fmt not in SCALEUP_FORMATS:
        raise CohwError(f"unknown format {fmt!r}; use one of {', '.join(SCALEUP_FORMATS)}")
    lin = block_linears(model)
    lin_bits = sum(m.weight.numel() * SCALEUP_FORMATS[fmt](m.in_features) for m in lin.values())
    n_lin = sum(m.weight.numel() for m in lin.values())
    n_all = count_parameters(model)
    return {"params": n_all, "linear_params": n_lin, "bytes": lin_bits / 8 + 2 * (n_all - n_lin)}


def scaleup_table(names: Iterable[str] = ("llama-2-7b", "llama-2-13b", "llama-2-70b"),
                  hardware: dict | None = None, context: int = 4096, batch: int = 1,
                  kv: str = "fp16") -> pd.DataFrame:
    """Weight and KV bytes of each model in each format, whether it fits on each accelerator,
    and the roofline decode bound ``tokens/s <= bandwidth / bytes per token``.

    Bytes per decode token = every weight byte once (batch 1 reads all weights per step; a
    batch of B shares them) + the KV cache of ``context`` tokens x ``batch`` (in ``kv``, a
    format of :func:`cohw_utils.studies.quantization.kv_int8.kv_format_bytes_per_token`).
    Fits = :func:`cohw_utils.views.memory_budget.fits`, the package's one serving-memory rule:
    weights + KV <= (1 - 10% runtime reserve) x the chip's nominal memory (one chip, no tensor
    parallelism; activations not counted, so 'fits' is necessary, not sufficient)."""
    from cohw_utils.hardware import load_hardware
    from cohw_utils.workloads import build

    if not isinstance(context, int) or context < 0 or not isinstance(batch, int) or batch < 1:
        raise CohwError(f"context must be an integer >= 0 and batch >= 1, got context={context!r}, batch={batch!r}")
    hw = hardware if hardware is not None else load_hardware()
    rows = []
    for name in names:
        built = build(name, device="meta")
        kv_b = kv_format_bytes_per_token(built.config, kv) * context * batch
        for fmt in SCALEUP_FORMATS:
            mb = model_bytes(built.model, fmt)
            for chip in hw.values():
                total = mb["bytes"] + kv_b
                rows.append({"model": name, "format": fmt, "params": mb["params"], "weight_GB": mb["bytes"] / 1e9,
                             "kv_GB": kv_b / 1e9, "chip": chip.name, "memory_GB": (chip.mem_bytes or float("nan")) / 1e9,
                             "fits": fits(chip, total), "bound_tok_s": batch * chip.mem_bw / total})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------ references
#: Columns every row of ``data/quant_reference.csv`` has.
REFERENCE_COLUMNS = ("paper", "table", "model", "dataset", "metric", "format", "method", "value",
                     "citation", "source")


def load_reference(path: str | Path | None = None) -> pd.DataFrame:
    """Published quantization results (``data/quant_reference.csv``, or ``path``: absolute, or
    relative to :data:`cohw_utils.core.data.DATA_DIR`; columns in the module docstring)."""
    return read_table(path or "quant_reference.csv", required=REFERENCE_COLUMNS, numeric=["value"])


def largest_fitting_format(table: pd.DataFrame) -> pd.DataFrame:
    """Per (model, chip) of a :func:`scaleup_table`, the format with the most weight bytes (the
    highest precision) that still fits, and its decode bound: columns model, chip, format and
    bound_tok_s (both missing, NaN, where no format fits one chip), in the table's order."""
    rows = []
    for (model, chip), g in table.groupby(["model", "chip"], sort=False):
        fit = g[g.fits].sort_values("weight_GB", ascending=False)
        rows.append({"model": model, "chip": chip, "format": fit.iloc[0]["format"] if len(fit) else None,
                     "bound_tok_s": float(fit.iloc[0]["bound_tok_s"]) if len(fit) else float("nan")})
    return pd.DataFrame(rows, columns=["model", "chip", "format", "bound_tok_s"])
