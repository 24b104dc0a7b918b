"""Why a conversion stage failed: the failure classes and the classifier that files an exception under one.

A failing stage of the pipeline (:func:`cohw_utils.studies.enabling.export.convert`) does not
raise: :func:`classify_failure` files the exception under one of :data:`FAILURE_CLASSES` with its
key line, and the :class:`Failure` records the stage that stopped. The classes, most specific
first: *custom kernel* (an op of a non-aten library with no fake/meta kernel or lowering),
*data-dependent control flow* (a branch on a tensor's value), *dynamic shapes* (an axis marked
dynamic that the code specialises), *autograd (training step)* (autograd's own errors, or the
exporter finding tensors created outside its graph among the constants, which is what a
``loss.backward()`` inside a capture leaves: fake gradient tensors), *unsupported op* (an op
with no ONNX lowering or no runtime kernel for its types) and *other*.

The class is read from the exception's message chain alone, never from what the caller knows
about the phase: a training step that fails on a data-dependent branch is filed
*data-dependent*, and one whose message matches nothing is *other*.

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

# torch.export's message when a tensor made outside the traced graph became a constant of it:
# the fake gradients that a loss.backward() inside the capture writes to every parameter's .grad.
_LEAKED = r"fake tensor in the exported program constant"



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
    (AUTOGRAD, re.compile(_LEAKED + r"|does not require grad and does not have a grad_fn|"
                          r"backward through the graph a second time|autograd|\.backward\(", re.I)),
    (UNSUPPORTED_OP, re.compile(r"No ONNX function found|Could not find an implementation|NOT_IMPLEMENTED|"
                                r"Unsupported|not supported|Type Error: Type|is invalid|"
                                r"no (kernel|implementation|decomposition)", re.I)),
]
_KEY = re.compile(_LEAKED + r"[^\n]*|element 0 of tensors[^\n]*|No ONNX function found[^\n]*|Could not find an implementation[^\n]*|Type Error:[^\n]*|"
                  r"Constraints violated[^\n]*|specialized[^\n]*|Could not guard on data-dependent[^\n]*|"
                  r"GuardOnDataDependent[^\n]*|no fake impl[^\n]*|"
                  r"Unsupported[^\n]*|not supported[^\n]*", re.I)
_OP = [re.compile(r"op='([\w.]+)', overload='(\w+)'"), re.compile(r"UnsupportedOperatorException: ([\w.]+)"), re.compile(r"implementation for (\w+)\(\d+\)"),
       re.compile(r"of operator \((\w+)\)"), re.compile(r"target=torch\.ops\.([\w.]+)")]


def _messages(exc: BaseException) -> list[str]:
    out, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        out.append(_ANSI.sub("", f"{type(exc).__name__}: {exc}"))
        exc = exc.__cause__ or exc.__context__
    return out


def classify_failure(exc: BaseException, stage: str) -> Failure:
    """File an exception from ``stage`` under one of :data:`FAILURE_CLASSES`, from its message.

    The message chain (the exception, its ``__cause__`` and ``__context__``) is matched against
    patterns, most specific first (custom kernel, data-dependent, dynamic shapes, autograd,
    unsupported op); no match is ``other``. ``key_line`` is the most telling line (<= 220
    characters), ``op`` the operator the message names, if any.
    """
    msgs = _messages(exc)
    text = "\n".join(msgs)
    klass = next((name for name, pat in _RULES if pat.search(text)), OTHER)
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
