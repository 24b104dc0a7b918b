"""Let a reader move a parameter and watch a figure change.

:func:`explore` draws a figure at its default parameters, which is what the rendered book
shows, and, in a live Jupyter session, puts ipywidgets controls under it that redraw the figure
as the reader moves them. Book builds and CI set ``COHW_STATIC=1`` (the Makefile does), so the
executed notebooks store a plain figure rather than widget state that needs a kernel.

A control is ``(min, max, step)`` or ``(min, max, step, default)`` for a number (an integer
slider when all are ints, a float slider otherwise; ``log=True`` is not supported: pass powers
of two as a list instead), or a list of choices (a dropdown; the first is the default).

Used by Chapters 2, 3, 4.3 and 4.4 (live controls beside their figures).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from matplotlib.figure import Figure

from cohw_utils.core.errors import CohwError


def _default(name: str, spec: Any) -> Any:
    if isinstance(spec, tuple):
        if len(spec) not in (3, 4) or not all(isinstance(v, (int, float)) for v in spec):
            raise CohwError(f"control '{name}': use (min, max, step) or (min, max, step, default), got {spec}")
        lo, hi = spec[0], spec[1]
        value = spec[3] if len(spec) == 4 else lo
        if not lo <= value <= hi:
            raise CohwError(f"control '{name}': default {value} outside [{lo}, {hi}]")
        return value
    if isinstance(spec, Sequence) and not isinstance(spec, str) and len(spec) > 0:
        return spec[0]
    raise CohwError(f"control '{name}': use a (min, max, step[, default]) tuple or a non-empty list, got {spec!r}")


def _widget(name: str, spec: Any):
    import ipywidgets as w

    if isinstance(spec, tuple):
        lo, hi, step = spec[:3]
        value = _default(name, spec)
        cls = w.IntSlider if all(isinstance(v, int) for v in spec) else w.FloatSlider
        return cls(value=value, min=lo, max=hi, step=step, description=name, continuous_update=False)
    return w.Dropdown(options=list(spec), value=spec[0], description=name)


def static() -> bool:
    """True when figures must be static (book builds, CI): ``COHW_STATIC=1``."""
    return os.environ.get("COHW_STATIC", "") not in ("", "0")


def explore(draw: Callable[..., Figure], **controls: Any) -> Figure:
    """Draw ``draw(**defaults)``; in a live session add controls that redraw it.

    Returns the figure drawn at the defaults (so a notebook can also assert on it).
    """
    defaults = {name: _default(name, spec) for name, spec in controls.items()}
    fig = draw(**defaults)
    if static():
        return fig
    import ipywidgets as w
    from IPython.display import display

    out = w.Output()
    widgets = {name: _widget(name, spec) for name, spec in controls.items()}

    def redraw(**values):
        import matplotlib.pyplot as plt

        with out:
            out.clear_output(wait=True)
            f = draw(**values)
            display(f)
            plt.close(f)

    ui = w.interactive_output(redraw, widgets)
    display(w.HBox(list(widgets.values())), out, ui)
    import matplotlib.pyplot as plt

    plt.close(fig)  # the live view shows the redrawn copy instead
    return fig
