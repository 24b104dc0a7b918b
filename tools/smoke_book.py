"""Build the book from the smoke-executed notebooks, with warnings as errors.

``make test`` runs this after ``tests/test_notebooks.py`` has executed every chapter with its
small parameters into ``_build/smoke/chapters``. It copies the book's sources to
``_build/smoke/book``, puts the executed notebooks in place, turns execution off (they have
just run) and runs ``jupyter-book build --warningiserror``. So CI checks that every page
renders cleanly without executing the full-size notebooks a second time.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "_build" / "smoke"


def main() -> int:
    executed = SMOKE / "chapters"
    sources = sorted((ROOT / "chapters").glob("*.ipynb"))
    missing = [p.name for p in sources if not (executed / p.name).exists()]
    if missing:
        print(f"smoke_book: executed notebooks missing ({', '.join(missing)}); "
              "run `pytest tests/test_notebooks.py` first", file=sys.stderr)
        return 2
    book = SMOKE / "book"
    shutil.rmtree(book, ignore_errors=True)
    shutil.copytree(ROOT / "chapters", book / "chapters")
    for extra in ("_toc.yml", "references.bib"):
        if (ROOT / extra).exists():
            shutil.copy(ROOT / extra, book / extra)
    for p in sources:
        shutil.copy(executed / p.name, book / "chapters" / p.name)
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    config.setdefault("execute", {})["execute_notebooks"] = "off"
    (book / "_config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    jb = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(jb), "build", str(book), "--warningiserror", "--keep-going"]
    print("smoke_book:", " ".join(cmd[1:]))
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
