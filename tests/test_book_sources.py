"""The book builds whatever ran before it: files that tools leave in the tree are not pages.

A copy of the book's sources gets the files that pytest, Jupyter and editors leave behind
(``.pytest_cache/README.md``, checkpoints, a stray page outside the toc); the cheap Sphinx pass
of ``tools/check_book_sources.py`` must still succeed. A page that *is* broken must fail it,
so the check can fail.
"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_book_sources", ROOT / "tools" / "check_book_sources.py")
check_book_sources = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_book_sources)


def _copy_sources(dst: Path) -> Path:
    for name in ("_config.yml", "_toc.yml", "references.bib", "README.md"):
        shutil.copy(ROOT / name, dst / name)
    shutil.copytree(ROOT / "chapters", dst / "chapters",
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    return dst


def test_tool_droppings_are_not_pages(tmp_path):
    root = _copy_sources(tmp_path)
    (root / ".pytest_cache").mkdir()
    (root / ".pytest_cache" / "README.md").write_text("# pytest cache directory\n")
    (root / "chapters" / ".ipynb_checkpoints").mkdir()
    shutil.copy(ROOT / "chapters" / "glossary.md", root / "chapters" / ".ipynb_checkpoints" / "glossary-checkpoint.md")
    (root / "notes.md").write_text("# scratch notes, in no toc\n")
    result = check_book_sources.check(root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_a_broken_page_fails_the_check(tmp_path):
    root = _copy_sources(tmp_path)
    glossary = root / "chapters" / "glossary.md"
    glossary.write_text(glossary.read_text() + "\nSee {doc}`no_such_page`.\n")
    assert check_book_sources.check(root).returncode != 0
