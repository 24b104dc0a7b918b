"""Outcome claims a chapter makes for its own parameters, guarded against a reader's edits.

Chapters 4.2b (quantization) and 5 (the co-design loop) state outcomes such as "the chosen decode
design is more than 2x faster than the reference" or "the first hardware requirement is 2x HBM
bandwidth". Those are findings *of the chapter's parameters*: a reader who edits the parameters
cell (another reference chip, another energy table, fewer methods) may get a different answer,
and that is a result to read, not an error. So:

- :data:`DEFAULTS` holds each guarded chapter's default parameters (``SMOKE`` excluded: the CI
  configuration shrinks sizes but keeps every claim). ``tests/test_claims.py`` checks that each
  entry equals what the notebook's own ``parameters`` cell assigns, so the two cannot drift.
- :func:`edited_parameters` names the parameters whose value in a namespace (the notebook's
  ``globals()``, read before the SMOKE shrink) differs from the defaults.
- :func:`claim` asserts a claim when nothing is edited (so the book build and CI check every claim
  on the defaults) and otherwise prints whether it holds for the reader's parameters.

Structural claims (true by construction whatever the parameters: bytes fall with bits, the sweep
reproduces the roofline's time) stay plain ``assert``; only outcome claims go through :func:`claim`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cohw_utils.core.errors import CohwError

#: Default parameters of each guarded chapter, by notebook stem (must equal its parameters cell).
DEFAULTS: dict[str, dict[str, Any]] = {
    "05_codesign_loop": {
        "DEVICE": "auto",
        "REFERENCE_HW": "H100-SXM",
        "SEQ_LEN": 2048,
        "LONG_CONTEXT": 8192,
        "DECODE_BATCH": 32,
        "RAYS": 4096,
        "WEIGHTS": {"trend": 0.3, "demand": 0.3, "novelty": 0.2, "memory_bound": 0.2},
        "ENERGY_PRESET": "7nm-hbm2e",
        "QUANTIZE": True,
        "SPILL": "weights",
        "POWER": True,
        "PREDICTOR": "calibrated",
        "GRID": {
            "tflops16": [250, 350, 500, 700, 1000, 1400, 2000, 2800, 4000],
            "hbm_tbs": [1, 1.5, 2, 3, 4, 6, 8, 12, 16],
            "hbm_gb": [40, 80, 160, 320],
            "sram_mb": [32, 128, 512, 2048],
            "formats": [("fp8", "int8"), ("fp8", "int8", "int4")],
            "slow": [None, "LPDDR5X"],
        },
        "SYSTEM_MODEL": "llama-2-70b",
        "SYSTEM_DEVICES": [1, 2, 4, 8],
        "SYSTEM_LINKS": None,
    },
    "04c_quantization": {
        "DEVICE": "auto",
        "TRAIN_STEPS": 600,
        "BATCH": 8,
        "EVAL_WINDOWS": 48,
        "CALIB_WINDOWS": 32,
        "METHODS": ["fp32", "bf16", "rtn-int8", "gguf-q8_0", "rtn-int4", "rtn-int4-g128", "gguf-q4_0",
                    "gptq-int4", "gptq-int4-g128", "awq-int4-g128", "rtn-int3-g128", "gptq-int3-g128",
                    "awq-int3-g128"],
        "SENSITIVITY": ["rtn-int4", "rtn-int2"],
        "SENS_WINDOWS": 16,
        "DECODE_TOKENS": 16,
        "LADDER_SHAPE": (11008, 4096),
        "LADDER_LAYERS": 2,
        "SCALEUP": ["llama-2-7b", "llama-2-13b", "llama-2-70b"],
        "CONTEXT": 4096,
    },
}


#: Parameters of each chapter that cannot change an outcome (where output goes, the CI switch).
NEUTRAL: dict[str, tuple[str, ...]] = {
    "05_codesign_loop": ("SMOKE", "REPORT_DIR"),
    "04c_quantization": ("SMOKE",),
}


def edited_parameters(chapter: str, namespace: Mapping[str, Any]) -> tuple[str, ...]:
    """Names of ``chapter``'s parameters whose value in ``namespace`` differs from :data:`DEFAULTS`.

    A parameter missing from ``namespace`` counts as edited (the reader removed it). Lists and
    tuples compare by their items, so papermill's list for a tuple default is not an edit.
    """
    if chapter not in DEFAULTS:
        raise CohwError(f"no guarded parameters for chapter {chapter!r}; known: {sorted(DEFAULTS)} "
                        "(add the chapter's defaults to cohw_utils.book.claims.DEFAULTS)")

    def norm(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [norm(v) for v in value]
        if isinstance(value, Mapping):
            return {k: norm(v) for k, v in value.items()}
        return value

    missing = object()
    return tuple(name for name, default in DEFAULTS[chapter].items()
                 if norm(namespace.get(name, missing)) != norm(default))


def claim(holds: Any, statement: str, edited: Sequence[str] = ()) -> bool:
    """Check an outcome claim: assert it on the chapter's defaults, report it on a reader's parameters.

    ``holds`` is the claim's truth value (a numpy bool is fine); ``statement`` says it in words;
    ``edited`` is :func:`edited_parameters`'s answer. Returns the truth value.
    """
    ok = bool(holds)
    if not edited:
        if not ok:
            raise AssertionError(f"claim fails with the chapter's default parameters: {statement}")
        return ok
    verdict = "holds" if ok else "does NOT hold"
    which = ", ".join(edited) if len(edited) <= 2 else f"{len(edited)} edited"
    print(f"[{verdict} with your parameters ({which})] {statement}")
    return ok
