"""Training checkpoints: tensors in safetensors (never pickle), the run's state in JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

FORMAT = 1


class CliError(Exception):
    """A one-line error for the command line: what went wrong and what to do."""


def save(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Write ``path`` (safetensors) and ``path.with_suffix('.json')`` atomically."""
    from safetensors.torch import save_file

    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    optim = optimizer.state_dict()
    extra: dict[str, dict[str, Any]] = {}
    for index, values in optim["state"].items():
        for key, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"optim/{index}/{key}"] = value
            else:
                extra.setdefault(str(index), {})[key] = value
    tensors["rng/cpu"] = torch.get_rng_state()
    document = {
        "format": FORMAT,
        **state,
        "optimizer": {"param_groups": optim["param_groups"], "state": extra},
    }
    _atomic(path, lambda tmp: save_file(_plain(tensors), tmp))
    _atomic(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(document)))


def load(path: Path) -> tuple[dict[str, Tensor], dict]:
    """Tensors and state of a checkpoint, or a :class:`CliError` that says what is wrong."""
    from safetensors.torch import load_file

    meta = path.with_suffix(".json")
    if not path.is_file() or not meta.is_file():
        raise CliError(
            f"cannot resume: {path} and {meta.name} beside it must both exist (torchrev train "
            f"writes them to its --out folder)"
        )
    try:
        tensors = load_file(path)
        state = json.loads(meta.read_text())
    except Exception as error:  # safetensors and json raise several types
        raise CliError(
            f"cannot resume: {path} is not a readable torchrev checkpoint ({error}); delete it "
            f"or start without --resume"
        ) from None
    if state.get("format") != FORMAT or "model" not in state:
        raise CliError(f"cannot resume: {meta} is not a torchrev training state")
    return tensors, state


def restore(
    tensors: dict[str, Tensor], state: dict, model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Load model weights, optimizer state and the RNG from a loaded checkpoint."""
    weights = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
        raise CliError(
            f"cannot resume: the checkpoint holds weights of another model than "
            f"{state['model']!r} with these settings ({first})"
        ) from None
    entries: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            entries.setdefault(int(index), {})[name] = value
    for index, values in state["optimizer"]["state"].items():
        entries.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict(
        {"state": entries, "param_groups": state["optimizer"]["param_groups"]}
    )
    torch.set_rng_state(tensors["rng/cpu"])


def _plain(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    # safetensors refuses shared storage and non-contiguous tensors: give it private copies.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def _atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)
