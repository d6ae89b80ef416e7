"""The documentation: every public name in the API reference, every page in the navigation,
the pages' examples run, and the reference's docstring rewriting."""

import ast
import importlib.util
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"


def reference() -> set[str]:
    return {
        name
        for page in (DOCS / "api").glob("*.md")
        for name in re.findall(r"^::: (\S+)$", page.read_text(), flags=re.M)
    }


def resolve(name: str) -> object:
    """The object a dotted name in the reference stands for (a module's attribute first, so
    that ``torchrev.convert.meft.meft`` is the function, not its module)."""
    import importlib

    module, _, attribute = name.rpartition(".")
    return getattr(importlib.import_module(module), attribute)


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
    shown = {id(resolve(name)) for name in listed}
    missing = {
        name
        for name in missing
        if name not in listed
        and f"torchrev.{name.rsplit('.', 1)[1]}" not in listed
        and id(resolve(name)) not in shown
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
    text = "See :class:`torchrev.Split`, :meth:`~x.y`, :math:`a_1`.\n\n.. math::\n    a = b\n\nEnd."
    assert module.markdown(text) == (
        "See `torchrev.Split`, `x.y`, \\(a_1\\).\n\n\\[\na = b\n\\]\n\nEnd."
    )


def public_callables() -> list[tuple[str, object]]:
    """The API reference's functions, and its classes whose constructor takes parameters of
    its own (exceptions, abstract bases and classes built without arguments have no
    signature to show)."""
    found = []
    for name in sorted(reference()):
        obj = resolve(name)
        if isinstance(obj, type) and "__init__" not in vars(obj):
            continue
        if callable(obj):
            found.append((name, obj))
    return found


def example_owners() -> dict[str, bool]:
    """torchrev's top-level exports (the front page's names) in the API reference, each with
    whether its entry has an example: a fenced block in its docstring or on its page, between
    its ``:::`` line and the next."""
    import torchrev

    wanted = {id(getattr(torchrev, name)) for name in exports(torchrev) - {"ode", "pgi"}}
    owners = {}
    for page in (DOCS / "api").glob("*.md"):
        parts = re.split(r"^::: (\S+)$", page.read_text(), flags=re.M)
        for name, text in zip(parts[1::2], parts[2::2]):
            obj = resolve(name)
            if id(obj) in wanted:
                owners[name] = "```py" in text or "```py" in (obj.__doc__ or "")
    return owners


def test_every_export_of_torchrev_has_an_example_in_the_reference():
    """Examples fenced as ``python`` on the pages run (test_the_pages_examples_run)."""
    owners = example_owners()
    assert len(owners) >= 25
    assert [name for name, has in owners.items() if not has] == []


def test_the_reference_is_built_to_show_signatures_and_math():
    """mkdocstrings shows every signature, constructors merged into their class, formatted by
    ruff (in the docs extra); arithmatex marks math for MathJax."""
    config = (ROOT / "mkdocs.yml").read_text()
    for option in ("show_signature: true", "merge_init_into_class: true", "separate_signature"):
        assert option in config, option
    assert "pymdownx.arithmatex" in config and "mathjax" in config.lower()
    docs_extra = re.search(r"^docs = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M)
    assert docs_extra and '"ruff' in docs_extra.group(1)
    assert len(public_callables()) > 40


@pytest.mark.skipif(
    not os.environ.get("TORCHREV_SITE"),
    reason="needs the built site: TORCHREV_SITE=site after mkdocs build (as .ci/run does)",
)
def test_the_built_reference_shows_a_signature_for_every_public_callable():
    site = Path(os.environ["TORCHREV_SITE"]) / "api"
    pages = [page.read_text() for page in site.rglob("index.html")]
    missing = []
    for name, _ in public_callables():
        heading = f'id="{name}"'
        page = next((text for text in pages if heading in text), None)
        if page is None:
            missing.append(f"{name} (no heading)")
            continue
        after = page.split(heading, 1)[1].split(">", 1)[1]  # past this heading's own tag
        end = after.find('class="doc doc-heading"')
        if "doc-signature" not in after[: end if end > 0 else None]:
            missing.append(name)
    assert not missing, missing


@pytest.mark.skipif(
    not os.environ.get("TORCHREV_SITE"),
    reason="needs the built site: TORCHREV_SITE=site after mkdocs build (as .ci/run does)",
)
def test_the_built_reference_shows_an_example_for_every_export_of_torchrev():
    """In the built pages, each export's entry (up to the next entry of the reference, past
    its own methods) holds a highlighted code block besides its signature."""
    site = Path(os.environ["TORCHREV_SITE"]) / "api"
    pages = [page.read_text() for page in site.rglob("index.html")]
    entries = re.compile("|".join(f'id="{re.escape(name)}"' for name in reference()))
    missing = []
    for name in example_owners():
        page = next((text for text in pages if f'id="{name}"' in text), "")
        after = page.split(f'id="{name}"', 1)[-1]
        entry = after[: next((m.start() for m in entries.finditer(after)), None)]
        if '<div class="highlight">' not in entry:
            missing.append(name)
    assert not missing, missing
