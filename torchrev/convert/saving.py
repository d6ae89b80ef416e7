"""Saving what a conversion trains, and reloading it on top of the pretrained model.

A fine-tuned MEFT model differs from its pretrained original only by its adapters and heads,
so that is all that is saved (kilobytes to megabytes, not the model), in safetensors, with the
conversion's settings in a small JSON file beside it, as peft's ``save_pretrained`` does. The
trade-off: reloading needs the same pretrained model to convert again, and a rewiring done
with a ``spec`` needs that spec passed again (functions are not saved).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._replace import converted, settings

WEIGHTS = "adapters.safetensors"
CONFIG = "torchrev_config.json"


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only what the conversion trains (adapters and heads): save this instead of the model."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_adapters(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load :func:`adapter_state_dict` output into a model converted the same way."""
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise ValueError(
            f"load_adapters: {len(unknown)} entries match no parameter of this model (first: "
            f"{unknown[0]}); convert the model with the same meft settings before loading."
        )
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def save_adapters(model: nn.Module, directory: str | Path) -> Path:
    """Write ``directory/adapters.safetensors`` (what trains) and ``torchrev_config.json``
    (how the model was converted); returns the directory."""
    from safetensors.torch import save_file

    config = settings(model)
    if config is None:
        raise ValueError(
            "save_adapters: this model was not converted by torchrev.meft or torchrev.rewire."
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.contiguous() for name, t in adapter_state_dict(model).items()}
    save_file(tensors, directory / WEIGHTS, metadata={"format": "pt"})
    (directory / CONFIG).write_text(json.dumps(config, indent=1) + "\n")
    return directory


def from_adapters(model: nn.Module, directory: str | Path, spec: Any = None) -> nn.Module:
    """Convert the pretrained ``model`` as the saved one was and load its adapters; returns it.

    ``model`` is the pretrained model the adapters were trained on (unconverted, or already
    converted with the same settings). ``spec`` is needed again when the conversion used one.
    """
    from safetensors.torch import load_file

    from .meft import meft
    from .rewire import rewire

    directory = Path(directory)
    config = json.loads((directory / CONFIG).read_text())
    if not converted(model):
        if config.get("spec") is not None and spec is None:
            raise ValueError(
                f"from_adapters: {directory} was converted with a spec "
                f"({config['spec']!r}); pass the same spec= again."
            )
        if config["method"] == "meft":
            keys = ("variant", "rank", "reversible_layers", "exact", "recompute_attention")
            options = {k: config[k] for k in keys if k in config}
            meft(model, **options, trainable=tuple(config["trainable"]), spec=spec)
        else:
            trainable = config["trainable"]
            rewire(
                model,
                spec,
                exact=config["exact"],
                trainable=None if trainable is None else tuple(trainable),
            )
    load_adapters(model, load_file(directory / WEIGHTS))
    return model
