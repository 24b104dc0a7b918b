"""Every chapter notebook runs under papermill with its small CI parameters; two also with a reader's own.

This is ``papermill -p SMOKE True`` for each chapter; the notebooks' own ``assert`` cells must
hold, and every cell marked ``# NBVAL_CHECK_OUTPUT`` must print what the committed notebook
holds for it (its reference output, refreshed by ``tools/nbref.py``): stdout, ``text/plain`` and
``text/html``, compared exactly, as ``pytest --nbval-lax`` compares them. The comparison is
done here on the papermill run (cells matched by id) rather than by nbval because nbval can only
check a notebook by executing it a second time, which doubled the suite's notebook time.
Executed notebooks are written to ``_build/smoke/`` (``tools/smoke_book.py`` builds the book from
them to check that Sphinx renders them without warnings).
"""
from __future__ import annotations

import time
from pathlib import Path

import nbformat
import papermill
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))
OUT = ROOT / "_build" / "smoke" / "chapters"


MARK = "# NBVAL_CHECK_OUTPUT"
_COMPARED = ("text/plain", "text/html")


def _checked(outputs) -> list[tuple[str, str]]:
    """What a marked cell's outputs say: its whole stdout (however the kernel split it into
    messages) and the compared mime types of its results, in order."""
    stdout, data = [], []
    for o in outputs:
        if o.get("output_type") == "stream" and o.get("name") == "stdout":
            stdout.append(o.get("text", ""))
        for mime in _COMPARED:
            if mime in o.get("data", {}):
                text = o["data"][mime]
                data.append((mime, "".join(text) if isinstance(text, list) else text))
    return [("stdout", "".join(stdout)), *data]


def reference_mismatches(committed, executed) -> list[str]:
    """Ids of the committed notebook's marked cells whose executed outputs differ from the
    committed ones (or that the executed notebook lacks). A marked cell committed unrun (no
    execution count: its reference was never recorded) is skipped, as nbval skips it."""
    ran = {c.get("id"): c for c in executed.cells if c.cell_type == "code"}
    bad = []
    for cell in committed.cells:
        if cell.cell_type == "code" and MARK in cell.source and cell.get("execution_count") is not None:
            got = ran.get(cell.get("id"))
            if got is None or _checked(got.outputs) != _checked(cell.outputs):
                bad.append(cell.get("id"))
    return bad


def test_reference_comparison_catches_a_change():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(f"{MARK}\nprint(1)", execution_count=1)]
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", name="stdout", text="1\n")]
    same = nbformat.from_dict(nbformat.reads(nbformat.writes(nb), as_version=4))
    assert reference_mismatches(nb, same) == []
    same.cells[0].outputs[0]["text"] = "2\n"
    assert reference_mismatches(nb, same) == [nb.cells[0].id]
    nb.cells[0].execution_count = None                    # committed unrun: no reference to hold it to
    assert reference_mismatches(nb, same) == []


@pytest.mark.parametrize("notebook", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_notebook_runs_in_smoke_configuration(notebook: Path):
    OUT.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    executed = papermill.execute_notebook(
        str(notebook), str(OUT / notebook.name), parameters={"SMOKE": True},
        cwd=str(notebook.parent), kernel_name="python3", progress_bar=False, log_output=False)
    print(f"{notebook.name}: {time.perf_counter() - start:.1f} s")
    bad = reference_mismatches(nbformat.read(notebook, as_version=4), executed)
    assert not bad, (f"{notebook.name}: cells {bad} print something else than their committed reference output; "
                     f"if the change is intended, refresh them with: python tools/nbref.py chapters/{notebook.name}")


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
