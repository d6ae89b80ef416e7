"""The settings of a `torchrev train` run: the model's recipe under the options given, or on
resume the checkpoint's; all checked before any work is done.

The trade-off: a resumed run refuses options that would change its result (only ``--epochs``
may extend it), so that resuming can promise the result of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models import model_info
from . import document
from .checkpoint import Checkpoint
from .config import RunConfig
from .errors import CliError, first_line
from .recipes import recipe
from .tasks import MODEL_KWARGS

#: Options a resumed run takes from its checkpoint (only --epochs may change).
FIXED_ON_RESUME = ("model", "model_kwargs", "batch_size", "lr", "weight_decay", "seed")


def run_config(args: argparse.Namespace, resumed: Checkpoint | None) -> RunConfig:
    """The run's settings: the model's recipe under the options given, or on resume the
    checkpoint's, which only --epochs may change."""
    if resumed is None:
        name = args.model or "revnet38"
        task = model_info(name).task  # unknown names raise here, before anything is written
        r = recipe(name)
        given = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "weight_decay")}
        defaults = {f.name: getattr(r, f.name) for f in fields(RunConfig) if hasattr(r, f.name)}
        kwargs = {**MODEL_KWARGS[task], **r.model_kwargs, **dict(args.model_kwargs)}
        return RunConfig(
            **{
                **defaults,
                **{k: v for k, v in given.items() if v is not None},
                "model": name,
                "model_kwargs": as_json(kwargs),
                "seed": 0 if args.seed is None else args.seed,
            }
        )
    saved = document.config(resumed.document)  # validated when the checkpoint was read
    for key in FIXED_ON_RESUME:
        value, kept = getattr(args, key), getattr(saved, key)
        if key == "model_kwargs":
            value, kept = as_json(dict(value)) or None, {k: kept.get(k) for k in dict(value)}
        if value is not None and value != kept:
            option = "--" + key.replace("_", "-")
            raise CliError(
                f"{option} {value} differs from the resumed run's ({kept}); "
                f"--resume continues a run with its own settings: drop {option}"
            )
    return RunConfig(**{**asdict(saved), "epochs": args.epochs or saved.epochs})


def as_json(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` as they come back from a checkpoint's JSON (tuples as lists), so that a
    resumed run builds its model from exactly the values the first part used."""
    try:
        return json.loads(json.dumps(kwargs))
    except TypeError as error:
        raise CliError(f"--model-kwargs: {error}; give numbers, strings, lists or tuples") from None


def build(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """The registered model ``name`` built with ``kwargs``, or a one-line error."""
    from ..models import create_model

    try:
        return create_model(name, **kwargs)
    except (TypeError, ValueError, RuntimeError) as error:
        raise CliError(
            f"cannot build {name} with {kwargs}: {first_line(error)}; fix --model-kwargs "
            f"(`torchrev models {name}` lists what it takes)"
        ) from None


def run_folder(resumed: Checkpoint) -> Path:
    """The folder of the run a checkpoint belongs to."""
    path = resumed.path
    return path.parent.parent if resumed.sharded and path.parent.suffix == ".dcp" else path.parent


def resume_out(args: argparse.Namespace, resumed: Checkpoint, epochs: int) -> Path:
    """The resumed run's folder, after checking that it has epochs left to train."""
    folder, done = run_folder(resumed), resumed.document["epoch"]
    if args.out is not None and args.out.resolve() != folder.resolve():
        raise CliError(f"--resume continues the run in {folder}; drop --out {args.out}")
    if args.epochs is not None and args.epochs <= done:
        raise CliError(
            f"--epochs {args.epochs}: the run in {folder} has trained {done} "
            f"epoch{'s' if done != 1 else ''} already; "
            f"pass --epochs N with N > {done} to train it further"
        )
    if done >= epochs:
        raise CliError(
            f"the run in {folder} is finished ({done} of {epochs} epochs); pass --epochs N "
            f"with N > {done} to train it further"
        )
    return folder


def resume_strategy(args: argparse.Namespace, resumed: Checkpoint | None) -> str | None:
    """The strategy: ``--strategy``, or a sharded checkpoint's ``fsdp``; refuses a mismatch
    (sharded checkpoints resume under FSDP, the others on one process or under DDP)."""
    if resumed is None or resumed.sharded == (args.strategy == "fsdp"):
        return args.strategy
    if resumed.sharded and args.strategy is None:
        return "fsdp"
    if resumed.sharded:
        raise CliError(
            f"{resumed.path} is a sharded checkpoint of --strategy fsdp; resume it with "
            f"--strategy fsdp (or without --strategy)"
        )
    raise CliError(
        f"{resumed.path} was written by one process or DDP; resume it without --strategy fsdp"
    )


def device(name: str) -> torch.device:
    """``--device``: ``auto`` picks CUDA when there is a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA device is available; use --device cpu")
    return torch.device(name)
