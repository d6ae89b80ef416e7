"""The documentation: every public name in the API reference, every page in the navigation,
the pages' examples run, and the reference's docstring rewriting."""

import ast
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"


def reference() -> set[str]:
    return {
        name
        for page in (DOCS / "api").glob("*.md")
        for name in re.findall(r"^::: (\S+)$", page.read_text(), flags=re.M)
    }


def exports(module) -> set[str]:
    """The names a package's ``__init__.py`` re-exports (``from x import y as y``)."""
    tree = ast.parse(Path(module.__file__).read_text())
    return {
        alias.asname
        for node in tree.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
        if alias.asname and not alias.asname.startswith("_")
    }


def test_every_public_name_is_in_the_api_reference():
    """torchrev's exports and those of torchrev.convert, .ode, .models and .bench."""
    import torchrev.bench
    import torchrev.convert
    import torchrev.models

    listed = reference()
    missing = {f"torchrev.{name}" for name in exports(torchrev) - {"ode"}}
    for module in (torchrev.convert, torchrev.ode, torchrev.models, torchrev.bench):
        missing |= {f"{module.__name__}.{name}" for name in exports(module)}
    missing = {
        name
        for name in missing
        if name not in listed and f"torchrev.{name.rsplit('.', 1)[1]}" not in listed
    }
    assert not missing, sorted(missing)


def test_every_page_is_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert pages == set(re.findall(r"([\w/-]+\.md)$", nav, flags=re.M))


def test_the_pages_examples_run():
    """Blocks fenced as ``python`` run; ``py`` marks an example that needs files of a run."""
    for page in sorted(DOCS.rglob("*.md")):
        for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S):
            exec(compile(block, str(page), "exec"), {})


def test_sphinx_roles_become_markdown():
    spec = importlib.util.spec_from_file_location("sphinx_roles", DOCS / "sphinx_roles.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = "See :class:`torchrev.Split` and :meth:`~x.y`.\n\n    .. math::\n        a = b\n\nEnd."
    assert module.markdown(text) == (
        "See `torchrev.Split` and `x.y`.\n\n    ```\n    a = b\n    ```\n\nEnd."
    )
