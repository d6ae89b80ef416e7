"""In-place module replacement that can be undone (peft's habit)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

_RECORD = "_torchrev_undo"
_SETTINGS = "_torchrev_settings"


def replace(model: nn.Module, parent: nn.Module, name: str, new: nn.Module) -> None:
    """``setattr(parent, name, new)``, remembering the original on ``model`` for :func:`undo`."""
    record = model.__dict__.setdefault(_RECORD, [])
    record.append(("module", parent, name, getattr(parent, name)))
    setattr(parent, name, new)


def freeze(model: nn.Module, names: Iterable[str], keep: Iterable[nn.Parameter] = ()) -> None:
    """Turn off ``requires_grad`` except for ``keep`` and the parameters of modules whose own
    name (the last part of its path) is in ``names`` (``"classifier"``, ``"lm_head"``)."""
    names = set(names)
    kept = {id(p) for p in keep} | {
        id(p)
        for path, module in model.named_modules()
        if path.split(".")[-1] in names
        for p in module.parameters()
    }
    record = model.__dict__.setdefault(_RECORD, [])
    for p in model.parameters():
        record.append(("grad", p, None, p.requires_grad))
        p.requires_grad_(id(p) in kept)


def remember(model: nn.Module, settings: dict[str, Any]) -> None:
    """Keep the conversion's settings (JSON values) on ``model``, for saving its adapters."""
    model.__dict__[_SETTINGS] = settings


def settings(model: nn.Module) -> dict[str, Any] | None:
    """What :func:`remember` kept, or ``None`` for a model torchrev did not convert."""
    return model.__dict__.get(_SETTINGS)


def undo(model: nn.Module) -> nn.Module:
    """Restore every module that :func:`torchrev.meft` or :func:`torchrev.rewire` replaced, and
    the parameters' ``requires_grad``; added modules (adapters) go away with their wrappers."""
    record = model.__dict__.pop(_RECORD, None)
    model.__dict__.pop(_SETTINGS, None)
    if not record:
        raise ValueError("undo: this model was not converted by torchrev (nothing to undo).")
    for kind, target, name, old in reversed(record):
        if kind == "module":
            setattr(target, name, old)
        else:
            target.requires_grad_(old)
    return model


def converted(model: nn.Module) -> bool:
    return bool(model.__dict__.get(_RECORD))
