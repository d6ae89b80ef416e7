"""The `torchrev` command's launcher: a Ctrl-C while torch is still importing ends in one line.

Importing ``torchrev.cli`` first runs ``torchrev/__init__.py``, which imports torch (a second
or more), and Python reports a Ctrl-C that lands there with a 40-line traceback, before any of
the command's own handling exists. This module lives outside the ``torchrev`` package so that
the console script can import it without torch: it imports the command inside a ``try`` and
ends an interrupted start-up as every command ends a Ctrl-C, in one line with exit status 130.
(``python -m torchrev`` imports the package before any of its code runs, so only the
``torchrev`` command gets this.)
"""

from __future__ import annotations

import sys

STARTING = "torchrev: interrupted while starting; nothing was done"


def main() -> int:
    """Import and run ``torchrev.cli.main`` on ``sys.argv``; returns the exit status."""
    try:
        from torchrev.cli import main as run
    except KeyboardInterrupt:
        print(STARTING, file=sys.stderr)
        return 130
    return run()


if __name__ == "__main__":
    sys.exit(main())
