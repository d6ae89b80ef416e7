"""Sharded checkpoints of `torchrev train --strategy fsdp`, through torch.distributed.checkpoint.

``last.dcp`` and ``best.dcp`` are folders; each save is a subfolder ``epoch-NNNN`` holding the
shards every process wrote and ``torchrev.json`` (the run's settings, history and the model's
configuration). A save is written under a temporary name, completed with ``torchrev.json``
and only then renamed, in one step, to its final name; the older saves are removed after that.
So the newest complete subfolder is always a consistent set (shards and settings of one
epoch), whatever moment a run is killed at. The trade-off: two saves coexist on disk for a
moment.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import dcp_reader
from .errors import CheckpointError, first_line

SUFFIX = ".dcp"
DOCUMENT = "torchrev.json"


def is_sharded(path: Path) -> bool:
    """Whether ``path`` is a sharded checkpoint folder (``*.dcp`` or one of its saves)."""
    return path.suffix == SUFFIX or (path / DOCUMENT).is_file()


def newest(path: Path) -> Path | None:
    """The newest complete save in a ``*.dcp`` folder (or ``path`` itself if it is one)."""
    if (path / DOCUMENT).is_file():
        return path
    saves = sorted(p for p in path.glob("epoch-*") if (p / DOCUMENT).is_file())
    return saves[-1] if saves else None


def save(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    document: dict[str, Any],
    main: bool,
) -> None:
    """Every process: write this epoch's save into ``folder`` (``last.dcp`` or ``best.dcp``),
    with the optimizer state and the RNG if ``optimizer`` is given."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    name = f"epoch-{document['epoch']:04d}"
    tmp = folder / f".{name}.tmp"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    if optimizer is None:
        state: dict[str, Any] = {"model": get_model_state_dict(model)}
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state, "rng": torch.get_rng_state()}
        document = {**document, "optimizer": {"sharded": True}}  # resumable
    dcp.save(state, checkpoint_id=tmp)  # returns on rank 0 once every shard is written
    if main:
        (tmp / DOCUMENT).write_text(json.dumps(document))
        final = folder / name
        shutil.rmtree(final, ignore_errors=True)  # a save of this epoch from before a resume
        os.replace(tmp, final)
        for old in folder.glob("epoch-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load(save: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every process: the model's and optimizer's shards and the RNG of ``save`` (read
    without unpickling anything the files choose, see ``dcp_reader.py``)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state, "rng": torch.get_rng_state()}
    dcp_reader.load_state(state, save)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    torch.set_rng_state(state["rng"])


def load_weights(save: Path, model: nn.Module) -> None:
    """One process, no process group needed: the full weights of ``save`` into ``model``
    (read without unpickling anything the files choose, see ``dcp_reader.py``)."""
    weights = model.state_dict()
    try:
        with warnings.catch_warnings():  # DCP warns that it reads on one process: we mean it
            warnings.simplefilter("ignore", UserWarning)
            dcp_reader.load_state({"model": weights}, save, no_dist=True)
    except CheckpointError:
        raise
    except Exception as error:  # DCP wraps what went wrong in several exception types
        raise CheckpointError(
            f"{save}: its shards do not fit a {type(model).__name__} or are damaged "
            f"({first_line(error, 100)}); load it with the model it was trained with"
        ) from None
    model.load_state_dict(weights)
