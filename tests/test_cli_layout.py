"""The command line's modules import one way: no circle among them, lazy imports included."""

import ast
from pathlib import Path

import torchrev

CLI = Path(torchrev.__file__).parent / "cli"


def imports(path: Path) -> set[str]:
    """The sibling modules ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found |= {alias.name for alias in node.names}
    return found & {p.stem for p in CLI.glob("*.py")}


def test_no_circles_between_cli_modules():
    graph = {p.stem: imports(p) for p in CLI.glob("*.py") if p.stem != "__init__"}
    circles = []

    def visit(module: str, path: list[str]) -> None:
        for target in sorted(graph.get(module, ())):
            if target in path:
                circles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target != "__init__":
                visit(target, [*path, target])

    for module in graph:
        visit(module, [module])
    assert not circles, sorted(set(circles))
