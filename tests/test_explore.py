"""explore(): a static figure for the book, controls in a live session."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest

from cohw_utils.core.errors import CohwError
from cohw_utils.book.explore import explore


def draw(n=1, kind="a"):
    fig, ax = plt.subplots()
    ax.plot(range(n))
    ax.set_title(f"{kind}{n}")
    return fig


def test_static_draws_defaults(monkeypatch):
    monkeypatch.setenv("COHW_STATIC", "1")
    fig = explore(draw, n=(1, 10, 1, 4), kind=["x", "y"])
    assert fig.axes[0].get_title() == "x4"


def test_live_builds_widgets(monkeypatch):
    monkeypatch.delenv("COHW_STATIC", raising=False)
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda *objs: shown.extend(objs))
    fig = explore(draw, n=(1, 10, 1), kind=["x", "y"])
    assert fig.axes[0].get_title() == "x1"
    box = next(o for o in shown if type(o).__name__ == "HBox")
    assert [c.description for c in box.children] == ["n", "kind"]
    assert type(box.children[0]).__name__ == "IntSlider"


@pytest.mark.parametrize("spec,msg", [((1, 2), "min, max, step"), ((1, 5, 1, 9), "outside"), ([], "non-empty")])
def test_bad_controls_are_named(monkeypatch, spec, msg):
    monkeypatch.setenv("COHW_STATIC", "1")
    with pytest.raises(CohwError, match=f"control 'n'.*{msg}"):
        explore(draw, n=spec)
