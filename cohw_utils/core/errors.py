"""Errors the package raises on bad input.

Every error names the problem and the fix in one line, so the command line can print
``str(err)`` and exit non-zero, and a notebook shows one readable sentence rather than a
traceback from deep inside torch or transformers.

Used by every chapter: a bad notebook parameter raises one of these.
"""
from __future__ import annotations


class CohwError(ValueError):
    """Base class: bad input that the user can fix (the message says how)."""


class UnknownWorkloadError(CohwError, KeyError):
    """A workload name that is not in the registry and is not a path to a config.json."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class ConfigError(CohwError):
    """A model config (config.json, dataclass field) that is malformed or unsupported."""


class UncostedOpError(CohwError):
    """An aten op that has no cost rule, when the tracer runs with ``strict=True``."""


class HardwareError(CohwError):
    """An unknown accelerator name or a malformed hardware data row."""


class DataFileError(CohwError):
    """A packaged or user-supplied data file that is missing or malformed."""
