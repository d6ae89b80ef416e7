"""Argument types and the parser behaviour shared by the subcommands."""

from __future__ import annotations

import argparse
import ast
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that points at ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default unless it has none or the help already says it; wraps
    descriptions and epilogs to the terminal, except indented lines (tables), kept as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for paragraph in text.split("\n\n"):
            lines = paragraph.splitlines()
            if any(line.startswith("  ") for line in lines):
                paragraphs.append("\n".join(indent + line for line in lines))
            else:
                text = " ".join(lines)
                paragraphs.append(textwrap.fill(text, width, initial_indent=indent,
                                                subsequent_indent=indent))  # fmt: skip
        return "\n\n".join(paragraphs)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if any(action.default is v for v in (None, False, argparse.SUPPRESS)) or "default" in text:
            return text
        if not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _number(text: str, kind: type, valid: Callable[[float], bool], what: str) -> Any:
    """``text`` as ``kind`` if ``valid``, else argparse's one-line error saying ``what``."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not valid(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "a positive integer")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: 0 < v < float("inf"), "a positive number")


def nonnegative_float(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v < float("inf"), "a number >= 0")


def compile_backend(text: str) -> str:
    """A torch.compile backend this torch knows (``torch.compiler.list_backends``)."""
    import torch

    if text not in torch.compiler.list_backends(exclude_tags=()):
        raise argparse.ArgumentTypeError(
            f"must be a torch.compile backend such as inductor or aot_eager "
            f"(torch.compiler.list_backends() lists them), got {text!r}"
        )
    return text


def keyword(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE a Python literal (``depth=4``, ``channels=(8,16,16)``) or a
    bare string."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE such as depth=4, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def add_out(parser: argparse.ArgumentParser, default: str) -> None:
    """``--out`` and ``--overwrite``, the same for every command."""
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output folder (default: {default}, or {default}-2, -3, ... if that holds a run)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results already in --out (otherwise a folder holding results is "
        "refused, so that no run is lost)",
    )


def version() -> str:
    import torch

    from .. import __version__

    return f"torchrev {__version__} (torch {torch.__version__}, Python {sys.version.split()[0]})"
