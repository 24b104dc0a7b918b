"""Open every page of a built book in headless Chromium and report what a reader would see broken.

Checks per page: the page loads (HTTP 200), every ``<img>`` (figures included) has decoded
to a non-empty image, no cell output shows an error or a traceback, and every link inside the
book points to a page that exists (and, for links within the page, to an anchor that exists).
Pages are served from a local ``http.server`` on 127.0.0.1, as a reader's browser would
fetch them. Chromium is Debian's (``/usr/bin/chromium``), driven by Playwright.
"""
from __future__ import annotations

import functools
import http.server
import shutil
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SKIP_PAGES = {"genindex.html", "search.html"}

_PAGE_PROBE = """() => {
  const imgs = [...document.querySelectorAll('img')].map(i => ({
      src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0 && i.naturalHeight > 0}));
  const errors = [...document.querySelectorAll(
      '.output.traceback, .output.error, div.cell_output .traceback, .nboutput .stderr.error')]
      .map(e => e.innerText.slice(0, 200));
  const outputs = [...document.querySelectorAll('.cell_output, .output')]
      .filter(e => e.innerText.includes('Traceback (most recent call last)'))
      .map(e => e.innerText.slice(0, 200));
  const links = [...document.querySelectorAll('a[href]')].map(a => a.getAttribute('href'));
  const ids = [...document.querySelectorAll('[id]')].map(e => e.id);
  return {imgs, errors: errors.concat(outputs), links, ids};
}"""


@dataclass
class PageReport:
    page: str
    status: int | None = None
    problems: list[str] = field(default_factory=list)


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@contextmanager
def serve(root: Path):
    """Serve ``root`` on 127.0.0.1 (a free port) for the duration of the block."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


def pages(root: Path) -> list[Path]:
    """The book's content pages (Sphinx's index/search pages and static files excluded)."""
    return sorted(p for p in root.rglob("*.html")
                  if p.name not in SKIP_PAGES and "_static" not in p.parts and "_sources" not in p.parts)


def _check_link(root: Path, page_url: str, base: str, href: str, ids: set[str]) -> str | None:
    if href.startswith(("http://", "https://", "mailto:", "javascript:")) and not href.startswith(base):
        return None  # outside the book
    target = urlparse(urljoin(page_url, href))
    if href.startswith("#"):
        anchor = unquote(target.fragment)
        return None if not anchor or anchor in ids else f"broken anchor {href}"
    rel = unquote(target.path[len(urlparse(base).path):])
    path = root / rel
    if path.is_dir():
        path = path / "index.html"
    return None if path.exists() else f"broken link {href}"


def check_book(root: Path, screenshot_dir: Path | None = None, screenshots: int = 3) -> list[PageReport]:
    """Load every page of the book at ``root`` and return one report per page."""
    from playwright.sync_api import sync_playwright

    exe = chromium_path()
    if exe is None:
        raise RuntimeError("Chromium not found: install Debian's 'chromium' (make browser-deps)")
    reports = []
    with serve(root) as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        for i, path in enumerate(pages(root)):
            rel = path.relative_to(root).as_posix()
            url = urljoin(base, rel)
            rep = PageReport(rel)
            response = page.goto(url, wait_until="load")
            rep.status = response.status if response else None
            if rep.status != 200:
                rep.problems.append(f"HTTP {rep.status}")
            page.wait_for_load_state("networkidle")
            probe = page.evaluate(_PAGE_PROBE)
            rep.problems += [f"broken image {im['src']}" for im in probe["imgs"] if not im["ok"]]
            rep.problems += [f"error output: {e}" for e in probe["errors"]]
            ids = set(probe["ids"])
            here = page.url  # after any redirect (Sphinx's index.html is one)
            for href in probe["links"]:
                bad = _check_link(root, here, base, href, ids)
                if bad:
                    rep.problems.append(bad)
            if screenshot_dir is not None and i < screenshots:
                screenshot_dir.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshot_dir / (rel.replace("/", "_") + ".png")), full_page=False)
            reports.append(rep)
        browser.close()
    return reports
