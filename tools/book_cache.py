"""Keep the book's execution cache honest: a notebook re-executes when its code *or the package*
changes.

``make book`` executes notebooks through jupyter-cache (``execute_notebooks: cache`` in
``_config.yml``, the cache in ``_build/.jupyter_cache``), which re-runs a notebook only when its
code cells change. But every chapter's numbers come from ``cohw_utils``: a changed cost rule,
data file or pinned requirement must re-execute every chapter too. This script hashes the
package, its data files and the requirements; when the hash differs from the one the cache was
built with (or with ``--force``), it deletes the cache *and* Sphinx's environment
(``_build/.doctrees``), so the next build re-reads and executes everything: Sphinx re-reads only
the pages whose source changed, so with the execution cache gone but its environment kept, an
unchanged notebook would be neither re-read nor re-executed and the book would keep outputs of
the old package. The environment is also dropped when the execution cache is missing.

    python tools/book_cache.py [--force]      # `make book FORCE=1` passes --force
"""
from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "_build" / ".jupyter_cache"
KEY = ROOT / "_build" / ".jupyter_cache.key"
DOCTREES = ROOT / "_build" / ".doctrees"  # Sphinx's environment: which pages it has read
INPUTS = ("cohw_utils", "requirements.txt", "requirements-nodeps.txt", "pyproject.toml")


def package_hash() -> str:
    h = hashlib.sha256()
    for name in INPUTS:
        p = ROOT / name
        # sources and data only: caches and build output a run may leave inside the package
        # (__pycache__, _build, hidden folders) must not make the next build re-execute everything
        files = sorted(f for f in p.rglob("*") if f.is_file() and not any(
            part == "__pycache__" or part == "_build" or part.startswith(".") for part in f.relative_to(p).parts)) \
            if p.is_dir() else [p]
        for f in files:
            h.update(str(f.relative_to(ROOT)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def main(argv: list[str]) -> int:
    force = "--force" in argv
    key = package_hash()
    old = KEY.read_text().strip() if KEY.exists() else None
    if force or old != key or not CACHE.exists():
        why = ("forced" if force else "the package, its data or the requirements changed" if old != key
               else "there is no execution cache")
        for path in (CACHE, DOCTREES):
            if path.exists():
                shutil.rmtree(path)
        print(f"book_cache: cleared the execution cache and Sphinx's environment ({why}); every chapter executes")
        KEY.parent.mkdir(parents=True, exist_ok=True)
        KEY.write_text(key + "\n")
    else:
        print("book_cache: package unchanged; chapters whose code is unchanged come from the cache")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
