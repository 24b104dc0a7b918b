"""Check that ``make book`` would accept the tree as it is now: a cheap Sphinx pass, no execution.

Runs ``jupyter-book build ROOT`` with the book's own ``_config.yml`` but notebook execution off
and Sphinx's ``dummy`` builder (it reads and resolves every page, writes nothing), warnings as
errors, output in a temporary folder. A stray Markdown or notebook file that Sphinx would read
as a page outside the toc ("document isn't included in any toctree") fails it in seconds, rather
than after the full book has executed for twenty minutes. ``make test`` runs it last, after
every other step has left whatever files it leaves.

    python tools/check_book_sources.py [ROOT]
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def check(root: Path = ROOT) -> subprocess.CompletedProcess:
    config = yaml.safe_load((root / "_config.yml").read_text())
    config.setdefault("execute", {})["execute_notebooks"] = "off"
    # glued numbers exist only once the notebooks run (the real build executes them); with
    # execution off, their roles are the one warning this check must not treat as an error
    sphinx = config.setdefault("sphinx", {}).setdefault("config", {})
    sphinx["suppress_warnings"] = [*sphinx.get("suppress_warnings", []), "mystnb.glue"]
    jb = Path(sys.executable).with_name("jupyter-book")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "_config.yml"
        cfg.write_text(yaml.safe_dump(config, sort_keys=False))
        cmd = [str(jb), "build", str(root), "--config", str(cfg), "--builder", "custom",
               "--custom-builder", "dummy", "--warningiserror", "--path-output", str(Path(tmp) / "out")]
        return subprocess.run(cmd, capture_output=True, text=True)


def main() -> int:
    root = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT
    result = check(root)
    if result.returncode:
        warnings = [l for l in (result.stdout + result.stderr).splitlines()
                    if "WARNING" in l or "Warning" in l or "toctree" in l]
        print("check_book_sources: `make book` would fail on this tree:", file=sys.stderr)
        print("\n".join(warnings[-10:]) or result.stdout[-2000:], file=sys.stderr)
        print("fix: add the file to _toc.yml, delete it, or exclude its folder in _config.yml",
              file=sys.stderr)
        return 1
    print(f"check_book_sources: {root.name}/ has exactly the pages of _toc.yml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
