"""tools/book_cache.py: a changed package clears both the execution cache and Sphinx's environment
(else unchanged notebooks are neither re-read nor re-executed and the book keeps stale outputs)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("book_cache", ROOT / "tools" / "book_cache.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "CACHE", tmp_path / ".jupyter_cache")
    monkeypatch.setattr(mod, "KEY", tmp_path / ".jupyter_cache.key")
    monkeypatch.setattr(mod, "DOCTREES", tmp_path / ".doctrees")
    monkeypatch.setattr(mod, "package_hash", lambda: state["hash"])
    return mod


state = {"hash": "a"}


def _populate(mod):
    for d in (mod.CACHE, mod.DOCTREES):
        d.mkdir(exist_ok=True)
        (d / "x").write_text("x")


def test_changed_package_clears_cache_and_environment(tmp_path, monkeypatch, capsys):
    mod = _tool(tmp_path, monkeypatch)
    state["hash"] = "a"
    _populate(mod)
    mod.main([])  # no key yet: a first build clears both
    assert not mod.CACHE.exists() and not mod.DOCTREES.exists()
    _populate(mod)
    mod.main([])  # same package: both kept
    assert mod.CACHE.exists() and mod.DOCTREES.exists() and "unchanged" in capsys.readouterr().out
    state["hash"] = "b"
    mod.main([])  # the package changed: both go
    assert not mod.CACHE.exists() and not mod.DOCTREES.exists()
    _populate(mod)
    __import__("shutil").rmtree(mod.CACHE)
    mod.main([])  # the execution cache went missing: the environment goes too
    assert not mod.DOCTREES.exists()
    _populate(mod)
    mod.main(["--force"])
    assert not mod.CACHE.exists() and not mod.DOCTREES.exists() and "forced" in capsys.readouterr().out


def test_build_output_inside_the_package_does_not_change_its_hash(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("book_cache2", ROOT / "tools" / "book_cache.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    pkg = tmp_path / "cohw_utils"
    (pkg / "spine").mkdir(parents=True)
    (pkg / "spine" / "costs.py").write_text("x = 1\n")
    monkeypatch.setattr(mod, "ROOT", tmp_path)
    monkeypatch.setattr(mod, "INPUTS", ("cohw_utils",))
    before = mod.package_hash()
    for junk in ("studies/_build/traces/t.json", "spine/__pycache__/costs.pyc", ".ipynb_checkpoints/a.py"):
        (pkg / junk).parent.mkdir(parents=True, exist_ok=True)
        (pkg / junk).write_text("run output")
    assert mod.package_hash() == before  # a chapter's trace file must not re-execute the whole book
    (pkg / "spine" / "costs.py").write_text("x = 2\n")
    assert mod.package_hash() != before
