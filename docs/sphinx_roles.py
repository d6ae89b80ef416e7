"""A griffe extension for the API reference: the docstrings' reStructuredText, as Markdown.

The docstrings are written for readers of the source (``:class:`X```, ``.. math::``), which
Markdown would show raw; when the reference is built, this rewrites roles as code spans and
math (``:math:`` roles, ``.. math::`` directives) between arithmatex's delimiters, which
MathJax renders in the browser; the source stays as it is. griffe is imported only when
mkdocs asks for the extension, so the tests check :func:`markdown` without the docs tools.
"""

from __future__ import annotations

import re
from typing import Any

ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj):`~?([^`]+)`")
INLINE_MATH = re.compile(r":math:`([^`]+)`")
MATH = re.compile(r"^( *)\.\. math::[ ]*(.*)$")


def markdown(text: str) -> str:
    """``text`` with Sphinx roles as code spans and math as arithmatex's delimiters."""
    text = INLINE_MATH.sub(lambda m: f"\\({m.group(1)}\\)", ROLE.sub(r"`\1`", text))
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        match = MATH.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent, body = match.group(1), [match.group(2)] if match.group(2) else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or lines[i].startswith(indent + " ")):
            body.append(lines[i].strip())
            i += 1
        out += [f"{indent}\\[", *(f"{indent}{b}" for b in body if b), f"{indent}\\]", ""]
    return "\n".join(out)


def __getattr__(name: str) -> Any:
    """``SphinxRoles``: the griffe extension that rewrites every docstring with
    :func:`markdown` (mkdocs.yml names it)."""
    if name != "SphinxRoles":
        raise AttributeError(name)
    import griffe

    class SphinxRoles(griffe.Extension):
        def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
            if obj.docstring is not None:
                obj.docstring.value = markdown(obj.docstring.value)

    return SphinxRoles
