"""The metadata of a `torchrev train` checkpoint, and its validation.

One JSON object per checkpoint (a safetensors file's metadata, or a sharded save's
``torchrev.json``). It holds each fact once: the model's registered name and keyword arguments
only in ``config`` (the run's settings, which ``load_checkpoint`` and ``--resume`` both read),
the epoch reached, the history (one row per epoch, 1 to ``epoch``), the best epoch, the wall
time and the input transform. Whatever a reader uses is checked first, so an edited or damaged
file is refused in one line instead of being half obeyed. The trade-off: a checkpoint edited by
hand on purpose (say, to change ``epochs``) is refused too; resume with ``--epochs`` instead.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from .config import RunConfig
from .errors import CheckpointError, summarise
from .inputs import InputSpec

FORMAT = 3

#: The metadata's fields and their types; a field of another type means the file was damaged.
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": int,
    "epoch": int,
    "config": dict,
    "history": list,
    "best": (dict, type(None)),
    "wall_seconds": (int, float),
    "input": dict,
    "optimizer": dict,
}
_OPTIONAL = ("optimizer", "strategy")
_TYPES: dict[str, type | tuple[type, ...]] = {
    "str": str,
    "int": int,
    "float": (int, float),
    "bool": bool,
    "dict[str, Any]": dict,
}


def validate(document: Any, path: Path) -> None:
    """Refuse metadata that is not what torchrev train wrote, in one line naming the fields."""
    if not isinstance(document, dict):
        raise CheckpointError(f"{path}: its torchrev metadata is not a JSON object; it was damaged")
    missing = [key for key in _FIELDS if key not in document and key not in _OPTIONAL]
    wrong = [k for k, kind in _FIELDS.items() if k in document and not _is(document[k], kind)]
    if not missing and not wrong and document["format"] != FORMAT:
        what = f"has format {document['format']}"
    elif missing or wrong:
        what = f"lacks {summarise(missing)}" if missing else ""
        if wrong:
            what += f"{'; ' if missing else ''}has a wrong type in {summarise(wrong)}"
    else:
        _check_config(document["config"], path)
        _check_input(document["input"], path)
        _check_progress(document, path)
        return
    raise CheckpointError(
        f"{path}: its torchrev metadata {what} (this torchrev reads format {FORMAT}); it was "
        f"damaged or written by another version: use another checkpoint"
    )


def config(document: dict[str, Any]) -> RunConfig:
    """The run's settings of a validated document."""
    return RunConfig(**document["config"])


def inputs(document: dict[str, Any]) -> InputSpec:
    """The input transform of a validated document."""
    return InputSpec(**document["input"])


def _is(value: Any, kind: type | tuple[type, ...]) -> bool:
    """``isinstance``, where a bool is not a number."""
    return isinstance(value, kind) and (not isinstance(value, bool) or kind is bool)


def _check_config(saved: dict[str, Any], path: Path) -> None:
    expected = {f.name: _TYPES[str(f.type)] for f in fields(RunConfig)}
    wrong = [k for k, kind in expected.items() if k not in saved or not _is(saved[k], kind)]
    wrong += [k for k in saved if k not in expected]
    if not wrong and (saved["epochs"] < 1 or saved["batch_size"] < 1):
        wrong = ["epochs" if saved["epochs"] < 1 else "batch_size"]
    if wrong:
        raise CheckpointError(
            f"{path}: its run settings are damaged ({summarise(wrong)}); use another checkpoint"
        )


def _check_input(spec: dict[str, Any], path: Path) -> None:
    expected = {f.name: _TYPES[str(f.type)] for f in fields(InputSpec)}
    if set(spec) != set(expected) or not all(_is(spec[k], t) for k, t in expected.items()):
        raise CheckpointError(
            f"{path}: its input transform is damaged (expected {', '.join(expected)}); use "
            f"another checkpoint"
        )


def _check_progress(document: dict[str, Any], path: Path) -> None:
    """Epoch, history and best agree: rows for epochs 1..epoch in order, best among them."""
    epoch, history, best = document["epoch"], document["history"], document["best"]
    numbers = [row.get("epoch") if isinstance(row, dict) else None for row in history]
    problem = None
    if not 1 <= epoch <= document["config"]["epochs"]:
        problem = f"epoch {epoch} is outside 1..{document['config']['epochs']}"
    elif numbers != list(range(1, epoch + 1)):
        problem = f"its history's epochs ({summarise(numbers, 4)}) are not 1..{epoch}"
    elif best is not None and not (
        _is(best.get("epoch"), int) and 1 <= best["epoch"] <= epoch
        and _is(best.get("score"), (int, float))
    ):  # fmt: skip
        problem = f"its best epoch ({best.get('epoch')}) is not one of epochs 1..{epoch}"
    elif document["wall_seconds"] < 0:
        problem = "its wall time is negative"
    if problem:
        raise CheckpointError(
            f"{path}: {problem}; the checkpoint was edited or damaged: use another checkpoint"
        )
