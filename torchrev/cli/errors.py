"""What the command line says when something is wrong: one line, the fix included."""

from __future__ import annotations

from collections.abc import Iterable


class CliError(Exception):
    """A one-line error for the command line: what went wrong, where, and what to do."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the file and what to do."""


class Interrupted(Exception):
    """Ctrl-C, with what the command kept and how to continue (one line)."""


def summarise(items: Iterable[object], limit: int = 3) -> str:
    """``a, b, c and 12 more``: a long list shortened to fit an error line."""
    items = [str(item) for item in items]
    if len(items) <= limit:
        return ", ".join(items)
    return f"{', '.join(items[:limit])} and {len(items) - limit} more"


def first_line(error: BaseException, width: int = 160) -> str:
    """The first line of an exception's message, cut to ``width`` characters."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= width else text[: width - 3] + "..."
