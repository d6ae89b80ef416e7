"""No import circles among torchrev's modules (issue 25 item 12).

An edge A -> B is any import of B written in A, at module level or inside a function (a
function-level import is still a dependency: it only defers the circle to the first call), but
not under ``if TYPE_CHECKING:``, which never runs. ``from .pkg import name`` is an edge to
``pkg.name`` where that is a module, else to ``pkg``; importing a module is not counted as
importing its parent packages (every module would then import ``torchrev/__init__``).

The engine (``torchrev/_core``) included: its modules refer to one another's types only under
``TYPE_CHECKING`` (a step's call, a call's step).
"""

from __future__ import annotations

import ast
from pathlib import Path

import torchrev

ROOT = Path(torchrev.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of ``tree`` outside ``if TYPE_CHECKING:`` bodies."""
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.If) and is_type_checking(node.test):
            children = node.orelse
        todo.extend(children)
    return found


def targets(node: ast.Import | ast.ImportFrom, here: str, is_package: bool, known: set) -> set:
    """The torchrev modules one import statement in module ``here`` names."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if node.level:
        package = here if is_package else here.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
    return {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in ROOT.rglob("*.py")}
    known = set(paths)
    edges = {}
    for name, path in paths.items():
        tree = ast.parse(path.read_text(), str(path))
        package = path.name == "__init__.py"
        named = set().union(*(targets(n, name, package, known) for n in imports(tree)))
        edges[name] = {t for t in named if t in known and t != name}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(edges[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_circle_and_skips_type_checking_imports():
    source = {
        "torchrev.a": "from . import b\n",
        "torchrev.b": "def f():\n    from .c import x\n",
        "torchrev.c": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n",
    }
    known = set(source) | {"torchrev"}

    def edges_of(extra: str = "") -> dict[str, set[str]]:
        out = {"torchrev": set()}
        for name, text in source.items():
            tree = ast.parse(text + (extra if name == "torchrev.c" else ""))
            named = set().union(*(targets(n, name, False, known) for n in imports(tree)))
            out[name] = {t for t in named if t in known and t != name}
        return out

    assert cycles(edges_of()) == []
    assert cycles(edges_of("import torchrev.a\n")) == [["torchrev.a", "torchrev.b", "torchrev.c"]]


def test_no_import_circles():
    edges = graph()
    assert edges.get("torchrev.cli.checkpoint") and edges.get("torchrev._core.step")
    assert cycles(edges) == []
