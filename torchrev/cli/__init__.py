"""The `torchrev` command: the only place where strings pick classes.

Every failure a user can cause ends in one line on stderr (the command, what is wrong, what
to do) and exit status 2; Ctrl-C ends in one line saying what was kept (status 130). An
unexpected exception is a bug: one line too, and ``TORCHREV_TRACEBACK=1`` shows its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from .checkpoint import load_checkpoint as load_checkpoint
from .errors import CliError, Interrupted, first_line
from .options import HelpFormatter, Parser, version


def main(argv: list[str] | None = None) -> int:
    """Run ``torchrev ARGS``; returns the exit status."""
    try:  # the commands' modules import their dependencies: seconds on a cold cache
        parser = _parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("torchrev: interrupted while starting; nothing was done", file=sys.stderr)
        return 130
    if args.command is None:
        parser.print_help()
        return 2
    return _run(args)


def _parser() -> Parser:
    from . import bench, finetune, models, train

    parser = Parser(
        prog="torchrev",
        description="Reversible neural networks for PyTorch: train and measure models.",
        epilog="`torchrev COMMAND --help` describes each command.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    train.add_parser(sub)
    bench.add_parser(sub)
    finetune.add_parser(sub)
    models.add_parser(sub)
    return parser


def _run(args: argparse.Namespace) -> int:
    prefix = f"torchrev {args.command}"
    # Under torchrun every process meets the same errors: rank 0 alone reports them, the
    # others report only what happened to them alone (internal errors), naming their rank.
    rank = os.environ.get("RANK", "0")
    shared = print if rank == "0" else _silent
    try:
        return args.run(args)
    except Interrupted as message:
        shared(f"{prefix}: {message}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        shared(f"{prefix}: interrupted; {args.interrupted}", file=sys.stderr)
        return 130
    except (CliError, ValueError, ImportError, OSError) as error:
        shared(f"{prefix}: error: {_message(error)}", file=sys.stderr)
        return 2
    except Exception as error:
        if os.environ.get("TORCHREV_TRACEBACK"):
            raise
        where = "" if rank == "0" else f" (rank {rank})"
        print(
            f"{prefix}: internal error{where}: {type(error).__name__}: {first_line(error)} (a "
            f"bug: rerun with TORCHREV_TRACEBACK=1 for the traceback and report it)",
            file=sys.stderr,
        )
        return 1


def _silent(*args: object, **kwargs: object) -> None:
    """What the processes other than rank 0 print for errors that rank 0 reports."""


def _message(error: BaseException) -> str:
    if isinstance(error, ModuleNotFoundError) and error.name:
        return f"{error.name} is not installed: pip install 'torchrev[cli]' (or [hf] to finetune)"
    if isinstance(error, OSError) and error.filename:
        return f"{error.filename}: {error.strerror or first_line(error)}"
    return first_line(error, 400)


__all__ = ["load_checkpoint", "main"]
