"""Every chapter notebook runs under papermill with its small CI parameters; two also with a reader's own.

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


#: A reader's own parameters for the chapters whose outcome claims are guarded
#: (cohw_utils.book.claims): each must run to the end, reporting rather than asserting the claims.
EDITED_PARAMETERS = {
    "05_codesign_loop": {
        "REFERENCE_HW": "A100-80GB", "ENERGY_PRESET": "45nm", "SPILL": "kv", "PREDICTOR": "ideal",
        "QUANTIZE": False,
        "GRID": {"tflops16": [250, 1000, 4000], "hbm_tbs": [1, 4, 16], "hbm_gb": [40, 160],
                 "sram_mb": [32, 512], "formats": [["fp8", "int8"]], "slow": [None]},
    },
    "04c_quantization": {
        "METHODS": ["fp32", "rtn-int8", "gptq-int4"], "SENSITIVITY": ["rtn-int4"],
        "SCALEUP": ["llama-2-13b"], "CONTEXT": 2048,
    },
}


@pytest.mark.parametrize("stem", sorted(EDITED_PARAMETERS))
def test_notebook_runs_with_a_readers_parameters(stem: str):
    out = ROOT / "_build" / "smoke" / "edited"   # not the smoke book's folder
    out.mkdir(parents=True, exist_ok=True)
    notebook = ROOT / "chapters" / f"{stem}.ipynb"
    nb = papermill.execute_notebook(
        str(notebook), str(out / notebook.name), parameters={"SMOKE": True, **EDITED_PARAMETERS[stem]},
        cwd=str(notebook.parent), kernel_name="python3", progress_bar=False, log_output=False)
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    line = text.split("parameters edited from the chapter's defaults: ", 1)[1].splitlines()[0]
    assert set(line.split(", ")) == set(EDITED_PARAMETERS[stem])   # the guard saw exactly the reader's edits
