"""The engine imports only torch and the standard library; the package's surface is explicit."""

import ast
import sys
from pathlib import Path

import torchrev

CORE = Path(torchrev.__file__).parent / "_core"


def test_core_imports_only_torch_and_the_standard_library():
    for path in CORE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1, f"{path.name} imports from outside _core"
                continue
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in names:
                top = name.split(".")[0]
                assert top == "torch" or top in sys.stdlib_module_names, (path.name, name)


def test_public_names_are_exported_explicitly():
    source = (Path(torchrev.__file__)).read_text()
    assert "import *" not in source
    for name in ("AdditiveCoupling", "AffineCoupling", "ReversibleSequential", "Split"):
        assert hasattr(torchrev, name)
