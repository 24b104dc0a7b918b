"""Why a conversion stage failed: the failure classes and the classifier that files an exception under one.

A failing stage of the pipeline (:func:`cohw_utils.studies.enabling.export.convert`) does not
raise: :func:`classify_failure` files the exception under one of :data:`FAILURE_CLASSES` with its
key line, and the :class:`Failure` records the stage that stopped. The classes, most specific
first: *custom kernel* (an op of a non-aten library with no fake/meta kernel or lowering),
*data-dependent control flow* (a branch on a tensor's value), *dynamic shapes* (an axis marked
dynamic that the code specialises), *unsupported op* (an op with no ONNX lowering or no runtime
kernel for its types), *autograd (training step)* (a captured phase that calls
``loss.backward()``, which an inference graph capture cannot represent) and *other*.

Used by Chapter 3 (SW enabling) and its gap report (:mod:`.gap_report`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["FAILURE_CLASSES", "AUTOGRAD", "UNSUPPORTED_OP", "DATA_DEPENDENT", "DYNAMIC_SHAPES",
           "CUSTOM_KERNEL", "OTHER", "Failure", "classify_failure"]

AUTOGRAD = "autograd (training step)"
UNSUPPORTED_OP = "unsupported op"
DATA_DEPENDENT = "data-dependent control flow"
DYNAMIC_SHAPES = "dynamic shapes"
CUSTOM_KERNEL = "custom kernel"
OTHER = "other"
FAILURE_CLASSES = (UNSUPPORTED_OP, DATA_DEPENDENT, DYNAMIC_SHAPES, CUSTOM_KERNEL, AUTOGRAD, OTHER)


@dataclass(frozen=True)
class Failure:
    """Why a stage failed: class (one of FAILURE_CLASSES), the exception's key line, the op if
    the message names one, and the exception type."""

    stage: str
    klass: str
    key_line: str
    op: str = ""
    exc_type: str = ""



_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RULES: list[tuple[str, re.Pattern]] = [
    (CUSTOM_KERNEL, re.compile(r"tcnn|tinycudann|triton|custom op|no (fake|meta|abstract) (impl|kernel)|"
                               r"op='(?!aten\.|prims\.)[\w]+\.", re.I)),
    (DATA_DEPENDENT, re.compile(r"data[- ]dependent|GuardOnDataDependent|unbacked|\.item\(\)|"
                                r"nonzero|Could not extract specialized integer", re.I)),
    (DYNAMIC_SHAPES, re.compile(r"Constraints violated|ConstraintViolation|specializ|dynamic_shapes|"
                                r"Dim\.(DYNAMIC|AUTO)|symbolic shape", re.I)),
    (UNSUPPORTED_OP, re.compile(r"No ONNX function found|Could not find an implementation|NOT_IMPLEMENTED|"
                                r"Unsupported|not supported|Type Error: Type|is invalid|"
                                r"no (kernel|implementation|decomposition)", re.I)),
]
_KEY = re.compile(r"No ONNX function found[^\n]*|Could not find an implementation[^\n]*|Type Error:[^\n]*|"
                  r"Constraints violated[^\n]*|specialized[^\n]*|Could not guard on data-dependent[^\n]*|"
                  r"GuardOnDataDependent[^\n]*|fake tensor in the exported program[^\n]*|"
                  r"Unsupported[^\n]*|not supported[^\n]*", re.I)
_OP = [re.compile(r"op='([\w.]+)', overload='(\w+)'"), re.compile(r"implementation for (\w+)\(\d+\)"),
       re.compile(r"of operator \((\w+)\)"), re.compile(r"target=torch\.ops\.([\w.]+)")]


def _messages(exc: BaseException) -> list[str]:
    out, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        out.append(_ANSI.sub("", f"{type(exc).__name__}: {exc}"))
        exc = exc.__cause__ or exc.__context__
    return out


def classify_failure(exc: BaseException, stage: str, backward: bool = False) -> Failure:
    """File an exception from ``stage`` under one of :data:`FAILURE_CLASSES`.

    A capture of a phase that runs ``loss.backward()`` (``backward=True``) at the export stage
    is ``autograd (training step)`` whatever the message (the backward runs on fake tensors
    and leaks them into the graph's constants). Otherwise the message chain is matched against
    patterns, most specific first (custom kernel, data-dependent, dynamic shapes, unsupported
    op); no match is ``other``. ``key_line`` is the most telling line (<= 220 characters).
    """
    msgs = _messages(exc)
    text = "\n".join(msgs)
    klass = OTHER
    if backward and stage.startswith("torch.export"):
        klass = AUTOGRAD
    else:
        for name, pat in _RULES:
            if pat.search(text):
                klass = name
                break
    m = _KEY.search(text)
    if m:
        key = m.group(0)
    else:  # the root cause, unless it is an internal slip (AttributeError on None...) of a wrapper
        internal = ("AttributeError", "KeyError", "IndexError", "TypeError", "AssertionError")
        chosen = next((x for x in reversed(msgs) if not x.startswith(internal)), msgs[-1])
        key = next((ln for ln in chosen.splitlines() if ln.strip()), chosen)
    op = ""
    for pat in _OP:
        hit = pat.search(text)
        if hit:
            op = ".".join(hit.groups())
            break
    key = " ".join(key.split())
    return Failure(stage, klass, key[:217] + "..." if len(key) > 220 else key, op, type(exc).__name__)
