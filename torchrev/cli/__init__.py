"""The `torchrev` command: the only place where strings pick classes."""

from __future__ import annotations

import argparse
import sys

from . import bench, finetune, train
from .checkpoint import CliError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="torchrev",
        description="Reversible neural networks for PyTorch: train and measure models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train.add_parser(sub)
    bench.add_parser(sub)
    finetune.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except (CliError, ValueError) as error:
        print(f"torchrev {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"torchrev {args.command}: interrupted; `torchrev train --resume "
            f"<out>/{train.CHECKPOINT}` continues from the last finished epoch",
            file=sys.stderr,
        )
        return 130
