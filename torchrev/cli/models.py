"""`torchrev models [NAME]`: the registered models, and the keyword arguments each one takes
(what ``--model-kwargs`` may set).

The trade-off: a model's factory fixes some of its class's arguments (RevNet-38's channels
and blocks), which the class signature does not show; the listing names the class's arguments
and types, and the first line of the factory's docstring gives the model's own sizes.
"""

from __future__ import annotations

import argparse
import inspect
import typing

from ..models import list_models, model_info
from .options import HelpFormatter
from .recipes import recipe
from .tasks import MODEL_KWARGS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list the registered models, or the keyword arguments of one",
        description="List the registered models, or one model's keyword arguments (what "
        "`torchrev train --model NAME --model-kwargs KEY=VALUE ...` may set) and what "
        "torchrev train sets for its data.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("name", nargs="?", metavar="NAME", help="a registered model")
    parser.set_defaults(run=run, interrupted="nothing was written")


def keywords(name: str) -> str:
    """``key: type, ...``: the keyword arguments of model ``name``'s class."""
    factory = model_info(name).factory
    cls = typing.get_type_hints(factory).get("return")
    if cls is None:
        return "(not listed: the factory declares no class)"
    parameters = inspect.signature(cls).parameters.values()
    return ", ".join(
        f"{p.name}: {p.annotation}" if p.annotation is not p.empty else p.name
        for p in parameters
        if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD
    )


def run(args: argparse.Namespace) -> int:
    if args.name is None:
        for name in list_models():
            doc = (inspect.getdoc(model_info(name).factory) or "").split("\n")[0]
            print(f"{name:<13} {model_info(name).task:<15} {doc}")
        print("`torchrev models NAME` lists a model's keyword arguments.")
        return 0
    info = model_info(args.name)  # an unknown name raises with the closest matches
    print(f"{args.name} ({info.task}): {(inspect.getdoc(info.factory) or '').splitlines()[0]}")
    print(f"keyword arguments: {keywords(args.name)}")
    train = {**MODEL_KWARGS[info.task], **recipe(args.name).model_kwargs}
    shown = " ".join(f"{k}={v!r}".replace(" ", "") for k, v in train.items())
    print(f"torchrev train sets: {shown} (--model-kwargs overrides them)")
    return 0
