"""The rendered book, opened page by page in headless Chromium.

Runs after the book is built (``make test`` builds the smoke book first; set ``COHW_BOOK_HTML``
to check another build, e.g. ``_build/html`` after ``make book``). Screenshots of the first
pages land in ``_build/browser/`` as artifacts.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from bookcheck import check_book, chromium_path

ROOT = Path(__file__).resolve().parents[2]
HTML = Path(os.environ.get("COHW_BOOK_HTML", ROOT / "_build" / "smoke" / "book" / "_build" / "html"))

pytestmark = pytest.mark.skipif(chromium_path() is None, reason="Chromium not installed (make browser-deps)")


@pytest.fixture(scope="module")
def book() -> Path:
    if not (HTML / "index.html").exists():
        pytest.fail(f"no built book at {HTML}: run `python tools/smoke_book.py` (or make book) first")
    return HTML


def test_every_page_loads_clean(book):
    reports = check_book(book, ROOT / "_build" / "browser", screenshots=4)
    assert len(reports) >= 3, [r.page for r in reports]
    bad = {r.page: r.problems for r in reports if r.problems}
    assert not bad, bad
    shots = list((ROOT / "_build" / "browser").glob("*.png"))
    assert shots and all(s.stat().st_size > 1000 for s in shots)


def test_a_broken_page_is_caught(book, tmp_path):
    # A copy of the book with one page sabotaged: a missing figure, an error cell, a dead link.
    broken = tmp_path / "html"
    shutil.copytree(book, broken)
    page = next(p for p in sorted(broken.rglob("*.html")) if "01_proxy" in p.name)
    html = page.read_text()
    sabotage = ('<img src="_images/missing-figure.png" alt="gone">'
                '<div class="cell_output docutils container"><div class="output traceback">'
                'Traceback (most recent call last): ValueError: boom</div></div>'
                '<a href="no_such_page.html">dead</a>')
    page.write_text(html.replace("</body>", sabotage + "</body>"))
    reports = {r.page: r for r in check_book(broken)}
    problems = reports[page.relative_to(broken).as_posix()].problems
    assert any("broken image" in p and "missing-figure" in p for p in problems), problems
    assert any("error output" in p and "boom" in p for p in problems), problems
    assert any("broken link no_such_page.html" in p for p in problems), problems
    others = [r for name, r in reports.items() if r.problems and name != page.relative_to(broken).as_posix()]
    assert not others
