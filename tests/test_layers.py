"""The package's layer contract: imports point down only, and there is no import cycle.

Layers, lowest first (``CONTRIBUTING.md`` draws the map)::

    core  <  workloads, hardware  <  spine  <  views  <  studies  <  book  <  cli

A module may import its own layer and any layer below it, never one above; ``workloads`` and
``hardware`` sit side by side and do not import each other. Every import counts, the ones inside
functions too (a function-local import is how cycles hide). Two further rules:

* views take op tables or configs and never trace: no view imports ``spine.trace`` or
  ``spine.analyze``;
* nothing but ``cli`` imports ``book``.

Written as an AST walk rather than with import-linter, since it is forty lines and needs no
extra dependency; it reads every ``import`` statement of every module, at any depth.
"""
from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "cohw_utils"
RANK = {"core": 0, "workloads": 1, "hardware": 1, "spine": 2, "views": 3, "studies": 4,
        "book": 5, "cli": 6, "__main__": 6, "__init__": 0}
TOP_LEVEL_FILES = {"__init__.py", "__main__.py", "cli.py"}
MAX_LINES = 750


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every cohw_utils module this file imports, resolved to the deepest module that exists."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            if t.startswith("cohw_utils"):
                found.add(_resolve(t))
    found.discard(name)
    return found


def _resolve(dotted: str) -> str:
    parts = dotted.split(".")
    while parts:
        p = PKG.parent.joinpath(*parts)
        if p.with_suffix(".py").exists() or (p / "__init__.py").exists():
            return ".".join(parts)
        parts = parts[:-1]
    return dotted


MODULES = {(_module_name(p)): p for p in sorted(PKG.rglob("*.py"))}
GRAPH = {m: _imports(p) for m, p in MODULES.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_top_level_holds_only_layers_and_the_command_line():
    files = {p.name for p in PKG.glob("*.py")}
    assert files <= TOP_LEVEL_FILES, f"modules at the top of cohw_utils/: {sorted(files - TOP_LEVEL_FILES)}"
    layers = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert layers == set(RANK) - {"cli", "__main__", "__init__"}, layers


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_only(module):
    me = _layer(module)
    if module == "cohw_utils":
        return
    up = sorted(t for t in GRAPH[module] if t != "cohw_utils" and RANK[_layer(t)] > RANK[me])
    assert not up, f"{module} (layer {me}) imports from a higher layer: {up}"
    if me in ("workloads", "hardware"):
        other = "hardware" if me == "workloads" else "workloads"
        side = sorted(t for t in GRAPH[module] if _layer(t) == other)
        assert not side, f"{module} imports the sibling layer {other}: {side}"
    if me == "views":
        traced = sorted(t for t in GRAPH[module] if t in ("cohw_utils.spine.trace", "cohw_utils.spine.analyze"))
        assert not traced, f"view {module} traces ({traced}); take an op table as an argument instead"
    if me != "cli" and module != "cohw_utils.__main__":
        book = sorted(t for t in GRAPH[module] if _layer(t) == "book" and me != "book")
        assert not book, f"{module} imports the book layer: {book}"


def test_no_import_cycles_even_through_function_local_imports():
    # A package's __init__ re-exporting its submodules is not a cycle of the code's design.
    graph = {m: {t for t in deps if not (m.startswith(t + ".") and MODULES[t].name == "__init__.py")}
             for m, deps in GRAPH.items()}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        pytest.fail(f"import cycle: {' -> '.join(err.args[1])}")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_are_small_and_say_what_they_are(module):
    path = MODULES[module]
    text = path.read_text()
    lines = text.count("\n")
    assert lines <= MAX_LINES, f"{module} has {lines} lines; split it along its sections (limit {MAX_LINES})"
    doc = ast.get_docstring(ast.parse(text))
    assert doc and len(doc) > 40, f"{module} has no docstring stating what it holds"
    assert "hapter" in doc, f"{module}'s docstring does not name the chapter(s) that use it"


def _public_defs():
    for module, path in MODULES.items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                yield module, node


def test_one_meaning_per_public_name():
    where: dict[str, list[str]] = {}
    for module, node in _public_defs():
        where.setdefault(node.name, []).append(module)
    twice = {name: mods for name, mods in where.items() if len(mods) > 1}
    assert not twice, f"public names defined in more than one module: {twice}"


#: ``explore`` returns a figure in the static book and a widget live: a control, not a figure.
NOT_FIGURES = {"explore"}


def test_names_say_what_they_are():
    """Figures are ``fig_*``; ``check_*`` is an exercise verdict (``book.exercises``) only."""
    wrong = []
    for module, node in _public_defs():
        if not isinstance(node, ast.FunctionDef):
            continue
        returns = ast.unparse(node.returns) if node.returns else ""
        figure_like = (returns.endswith("Figure") or node.name == "figure" or node.name.startswith("plot_")
                       or node.name.endswith(("_figure", "_chart")))
        if figure_like and not node.name.startswith("fig_") and node.name not in NOT_FIGURES:
            wrong.append(f"{module}.{node.name} returns a Figure: call it fig_...")
        if node.name.startswith("check_") and module != "cohw_utils.book.exercises":
            wrong.append(f"{module}.{node.name}: check_* is for exercise verdicts; a validator is validate_...")
    assert not wrong, "\n".join(wrong)
