"""Every chapter notebook runs under papermill with its small CI parameters.

This is ``papermill -p SMOKE True`` for each chapter; the notebooks' own ``assert`` cells must
hold. Executed notebooks are written to ``_build/smoke/`` (``tools/smoke_book.py`` builds the
book from them to check that Sphinx renders them without warnings).
"""
from __future__ import annotations

import time
from pathlib import Path

import papermill
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))
OUT = ROOT / "_build" / "smoke" / "chapters"


@pytest.mark.parametrize("notebook", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_notebook_runs_in_smoke_configuration(notebook: Path):
    OUT.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    papermill.execute_notebook(
        str(notebook), str(OUT / notebook.name), parameters={"SMOKE": True},
        cwd=str(notebook.parent), kernel_name="python3", progress_bar=False, log_output=False)
    print(f"{notebook.name}: {time.perf_counter() - start:.1f} s")
