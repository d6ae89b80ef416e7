"""In-place module replacement that can be undone (peft's habit)."""

from __future__ import annotations

from torch import nn

_RECORD = "_torchrev_undo"


def replace(model: nn.Module, parent: nn.Module, name: str, new: nn.Module) -> None:
    """``setattr(parent, name, new)``, remembering the original on ``model`` for :func:`undo`."""
    record = model.__dict__.setdefault(_RECORD, [])
    record.append(("module", parent, name, getattr(parent, name)))
    setattr(parent, name, new)


def freeze(model: nn.Module, keep_trainable: set[int]) -> None:
    """Turn off ``requires_grad`` except for the parameters in ``keep_trainable`` (by id)."""
    record = model.__dict__.setdefault(_RECORD, [])
    for p in model.parameters():
        record.append(("grad", p, None, p.requires_grad))
        p.requires_grad_(id(p) in keep_trainable)


def undo(model: nn.Module) -> nn.Module:
    """Restore every module that :func:`torchrev.meft` or :func:`torchrev.rewire` replaced, and
    the parameters' ``requires_grad``; added modules (adapters) go away with their wrappers."""
    record = model.__dict__.pop(_RECORD, None)
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
