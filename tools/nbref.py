"""Refresh the reference outputs that tests/test_notebooks.py checks, and strip everything else.

Usage: ``python tools/nbref.py chapters/01_proxy_workloads.ipynb [...]``

Executes each notebook in the smoke configuration (``COHW_SMOKE=1``), then keeps the outputs
of cells whose source contains ``# NBVAL_CHECK_OUTPUT`` (deterministic numbers: parameter
counts, FLOPs, bytes) and clears all other outputs and execution counts. The committed
notebook thus carries exactly the references the papermill smoke run is compared against (as ``pytest --nbval-lax`` would).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

MARK = "# NBVAL_CHECK_OUTPUT"


def refresh(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    os.environ["COHW_SMOKE"] = "1"
    executed = nbformat.read(path, as_version=4)
    NotebookClient(executed, timeout=1800, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    for cell, done in zip(nb.cells, executed.cells):
        if cell.cell_type != "code":
            continue
        cell.execution_count = None
        cell.outputs = []
        if MARK in cell.source:
            for out in done.outputs:
                out.pop("execution_count", None)
                if out.get("output_type") == "execute_result":
                    out["execution_count"] = None
            cell.outputs = done.outputs
            cell.execution_count = done.execution_count  # nbval skips "unrun" cells
    nbformat.write(nb, path)
    print(f"{path}: references refreshed")


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        refresh(Path(arg))
