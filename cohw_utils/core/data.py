"""Where the package's data files live, and the one reader that checks them.

Every data file (hardware specs, energy per op, published reference numbers, target op sets,
model configs) is under :data:`DATA_DIR`, and every module reads tables through
:func:`read_table`, which checks the columns the caller needs and, on error, names the file,
the row and the fix. GPU measurements captured by ``benchmarks/capture_gpu_*.py`` are read with
:func:`load_gpu_capture` (``None`` when the capture has not been run on a CUDA machine).

Used by every chapter, through the modules that own each table.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from cohw_utils.core.errors import DataFileError

__all__ = ["DATA_DIR", "GPU_DIR", "data_path", "config_path", "kept_configs", "read_table", "load_gpu_capture"]

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
GPU_DIR = DATA_DIR / "gpu"


def data_path(*parts: str | Path) -> Path:
    """The path of a packaged data file, ``DATA_DIR / parts...``; raises if it does not exist."""
    path = DATA_DIR.joinpath(*parts)
    if not path.exists():
        raise DataFileError(f"cannot read data file {path.relative_to(DATA_DIR.parent)}: it is missing; "
                            "reinstall the package (`make venv`) or restore it from git")
    return path


def config_path(key: str | Path) -> Path | None:
    """The model config file or folder ``key`` names: a path as given, or a config kept under
    ``data/configs/`` (``qwen3-30b-a3b``, ``sdxl-base-1.0/unet``); None if there is none."""
    key = str(key).strip()
    for candidate in (Path(key).expanduser(), DATA_DIR / "configs" / key):
        if candidate.is_file() or (candidate / "config.json").is_file():
            return candidate
    return None


def kept_configs() -> list[str]:
    """Names of the model configs kept in ``data/configs`` (each folder with a config.json,
    ``sdxl-base-1.0/unet`` for a pipeline's parts)."""
    root = DATA_DIR / "configs"
    return sorted(p.parent.relative_to(root).as_posix() for p in root.glob("**/config.json"))


def read_table(path: str | Path, required: Iterable[str] = (), *, numeric: Iterable[str] = (),
               **read_csv: Any) -> pd.DataFrame:
    """Read a CSV data file and check it has the columns the caller needs.

    ``path`` is absolute or relative to :data:`DATA_DIR`. ``required`` columns must be present;
    ``numeric`` columns must parse as numbers in every non-empty cell. A missing file, a missing
    column or a bad number raises :class:`DataFileError` naming the file (and the row, for a
    bad value) and what to fix. Extra keyword arguments go to :func:`pandas.read_csv`.
    """
    p = Path(path)
    if not p.is_absolute():
        p = data_path(p)
    elif not p.exists():
        raise DataFileError(f"cannot read {p}: it does not exist; check the path")
    try:
        table = pd.read_csv(p, **read_csv)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise DataFileError(f"{p.name}: cannot be read as CSV ({exc}); fix the file's format") from None
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise DataFileError(f"{p.name}: missing column(s) {', '.join(missing)}; "
                            f"the file has {', '.join(map(str, table.columns))}")
    for column in numeric:
        if column not in table.columns:
            raise DataFileError(f"{p.name}: missing numeric column {column!r}")
        values = pd.to_numeric(table[column], errors="coerce")
        bad = values.isna() & table[column].notna() & (table[column].astype(str).str.strip() != "")
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise DataFileError(f"{p.name}: row {row + 2} column {column!r} is "
                                f"{table[column].iloc[row]!r}, not a number; fix that cell")
        table[column] = values
    return table


def load_gpu_capture(topic: str, path: str | Path | None = None) -> dict[str, Any] | None:
    """The GPU capture ``data/gpu/<topic>.json`` written by ``benchmarks/capture_gpu_<topic>.py``.

    ``None`` when it has not been captured (no CUDA machine has run the script). A capture must
    carry the device name and the date it was taken; one without them raises, since a number
    with no device is not a measurement the book can print. ``path`` overrides the location.
    """
    path = Path(path) if path is not None else GPU_DIR / f"{topic}.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataFileError(f"{path.name}: not valid JSON ({exc}); re-run "
                            f"benchmarks/capture_gpu_{topic}.py on the GPU machine") from None
    meta = data.get("meta", data) if isinstance(data, dict) else {}
    missing = [k for k in ("device", "date") if k not in meta]
    if missing:
        raise DataFileError(f"{path.name}: no {', '.join(missing)} recorded; re-run "
                            f"benchmarks/capture_gpu_{topic}.py, which records them")
    return data
