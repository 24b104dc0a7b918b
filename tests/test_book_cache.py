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
