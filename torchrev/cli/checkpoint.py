"""Checkpoints of `torchrev train`: safetensors files, or sharded folders under FSDP; never
pickle.

A checkpoint holds the model's weights, and for ``last`` also the optimizer state and the RNG,
as tensors; the run's settings, its history and the model's configuration (the registered
name and the keyword arguments it was built with) go in the file's metadata as JSON. So
:func:`load_checkpoint` rebuilds the trained model from the file alone, and a run resumes from
it to exactly the result of an uninterrupted one. Tensors and settings are one file, written
under a temporary name and renamed in one step, so they always belong to the same epoch
(sharded saves keep the same promise, see ``sharded.py``). The trade-off: metadata is text,
so optimizer fields that are not tensors are stored as JSON numbers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import document as document_
from . import sharded
from .document import FORMAT
from .errors import CheckpointError as CheckpointError
from .errors import first_line, summarise
from .inputs import TrainedModel

LAST, BEST = "last.safetensors", "best.safetensors"
LAST_SHARDED, BEST_SHARDED = "last" + sharded.SUFFIX, "best" + sharded.SUFFIX
_KEY = "torchrev"


def save(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, doc: dict) -> None:
    """Write ``path`` atomically: weights (and optimizer state and RNG if ``optimizer``)."""
    from safetensors.torch import save_file

    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    document: dict[str, Any] = {"format": FORMAT, **doc}
    if optimizer is not None:
        optim = optimizer.state_dict()
        extra: dict[str, dict[str, Any]] = {}
        for index, values in optim["state"].items():
            for key, value in values.items():
                if isinstance(value, Tensor):
                    tensors[f"optim/{index}/{key}"] = value
                else:
                    extra.setdefault(str(index), {})[key] = value
        document["optimizer"] = {"param_groups": optim["param_groups"], "state": extra}
        tensors["rng/cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, state in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng/cuda/{i}"] = state
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(plain, str(tmp), metadata={_KEY: json.dumps(document)})
    os.replace(tmp, path)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read from disk: its file (or sharded save folder), its validated
    metadata, and its tensors (``None`` for a sharded save, read by every process)."""

    path: Path
    document: dict[str, Any]
    tensors: dict[str, Tensor] | None

    @property
    def sharded(self) -> bool:
        return self.tensors is None


def save_sharded(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, doc: dict, main: bool
) -> None:
    """Every process of an FSDP run: a sharded save into ``folder`` (see ``sharded.py``)."""
    sharded.save(folder, model, optimizer, {"format": FORMAT, **doc}, main)


def read(path: str | os.PathLike[str]) -> Checkpoint:
    """A checkpoint (a file, a ``*.dcp`` folder, or a run folder: its ``last``), or a
    :class:`CheckpointError` that says what is wrong."""
    path = _locate(Path(path))
    if sharded.is_sharded(path):
        save = sharded.newest(path)
        if save is None:
            raise CheckpointError(f"{path} holds no complete save; use another checkpoint")
        document = _parse((save / sharded.DOCUMENT).read_text(), save / sharded.DOCUMENT)
        document_.validate(document, save)
        return Checkpoint(save, document, None)
    tensors, metadata = _read_file(path)
    if _KEY not in metadata:
        raise CheckpointError(
            f"{path} has no torchrev metadata; only checkpoints written by torchrev train load"
        )
    document = _parse(metadata[_KEY], path)
    document_.validate(document, path)
    return Checkpoint(path, document, tensors)


def _parse(text: str, where: Path) -> Any:
    try:
        return json.loads(text)
    except ValueError as error:
        raise CheckpointError(
            f"{where}: its torchrev metadata is not valid JSON ({first_line(error, 60)}); it "
            f"was damaged: use another checkpoint"
        ) from None


def _locate(path: Path) -> Path:
    """The checkpoint a path names: itself, or a run folder's ``last`` (file or sharded)."""
    if path.is_dir() and not sharded.is_sharded(path):
        for name in (LAST, LAST_SHARDED):
            if (path / name).exists():
                return path / name
        raise CheckpointError(
            f"{path} holds no {LAST} or {LAST_SHARDED}; pass a run folder of torchrev train "
            f"or a checkpoint in it"
        )
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a run folder or its {LAST}")
    return path


def _read_file(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(
            "reading checkpoints needs safetensors: pip install safetensors"
        ) from None
    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(str(path)), metadata
    except Exception as error:  # safetensors raises several types for damaged files
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({first_line(error, 80)}); it may be "
            f"truncated: use another checkpoint"
        ) from None


def build_model(document: dict, path: Path) -> nn.Module:
    """The registered model a checkpoint's (validated) settings describe, freshly initialised."""
    from ..models import create_model

    config = document_.config(document)
    try:
        return create_model(config.model, **config.model_kwargs)
    except (TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(
            f"{path}: this torchrev cannot build the model its settings name, "
            f"{config.model!r} ({first_line(error, 80)}); it was edited or written by another "
            f"version: use another checkpoint"
        ) from None


def load_weights(model: nn.Module, tensors: dict[str, Tensor], path: Path) -> None:
    """Copy a checkpoint's weights into ``model``; a mismatch raises one summarised line."""
    weights = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = sorted(
        k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape
    )
    if missing or unexpected or shapes:
        problems = ((missing, "missing"), (unexpected, "unexpected"), (shapes, "reshaped"))
        parts = [f"{len(keys)} {what} ({summarise(keys)})" for keys, what in problems if keys]
        raise CheckpointError(
            f"{path}: its weights do not fit a {type(model).__name__}: {'; '.join(parts)}; "
            f"load it with the model it was trained with"
        )
    model.load_state_dict(weights)


def require_resumable(checkpoint: Checkpoint) -> None:
    """Refuse a checkpoint that holds weights only (``best``) as a point to resume from."""
    if "optimizer" not in checkpoint.document or (
        checkpoint.tensors is not None and "rng/cpu" not in checkpoint.tensors
    ):
        last = LAST_SHARDED if checkpoint.sharded else LAST
        raise CheckpointError(
            f"{checkpoint.path} holds weights only (a best checkpoint); resume from the {last} "
            f"beside it"
        )


def restore(checkpoint: Checkpoint, optimizer: torch.optim.Optimizer) -> None:
    """Load the optimizer state and the RNG of a ``last`` checkpoint (weights: load_weights)."""
    require_resumable(checkpoint)
    tensors, document, path = checkpoint.tensors or {}, checkpoint.document, checkpoint.path
    try:
        entries: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim/"):
                _, index, name = key.split("/", 2)
                entries.setdefault(int(index), {})[name] = value
        for index, values in document["optimizer"]["state"].items():
            entries.setdefault(int(index), {}).update(values)
        optimizer.load_state_dict(
            {"state": entries, "param_groups": document["optimizer"]["param_groups"]}
        )
        torch.set_rng_state(tensors["rng/cpu"])
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as error:
        raise CheckpointError(
            f"{path}: its optimizer state or RNG does not fit this model "
            f"({first_line(error, 80)}); it was damaged: use another checkpoint"
        ) from None
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda/")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def load_checkpoint(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> TrainedModel:
    """The trained model of a `torchrev train` checkpoint, taking its data set's raw examples.

    The returned :class:`~torchrev.cli.inputs.TrainedModel` (eval mode, on ``device``) applies
    the normalisation the run trained with (saved in the checkpoint), so it takes the data as
    the data set gives it: for the digits, ``load_digits().images`` of scikit-learn. Its
    ``.model`` is the registered model itself, for normalised inputs. The model's registered
    name and configuration come from the checkpoint's metadata. ``path`` is
    ``best.safetensors``, ``last.safetensors``, a sharded ``best.dcp`` or ``last.dcp`` folder
    (``--strategy fsdp``; read on one process, without unpickling anything the files choose),
    or a run folder for its ``last``. Raises :class:`CheckpointError` (a ``ValueError``)
    naming the file and what is wrong.

    Example:
        ```py
        from sklearn.datasets import load_digits
        import torchrev

        model = torchrev.load_checkpoint("runs/revnet38/best.safetensors")
        predicted = model(load_digits().images).argmax(1)  # raw 8x8 images, values 0..16
        ```
    """
    checkpoint = read(path)
    model = _trained(checkpoint)
    return TrainedModel(model, document_.inputs(checkpoint.document)).to(device).eval()


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> nn.Module:
    """The registered model of a checkpoint, in eval mode, for normalised inputs (what the
    run trained on; :func:`load_checkpoint` adds the normalisation)."""
    return _trained(read(path)).to(device).eval()


def _trained(checkpoint: Checkpoint) -> nn.Module:
    model = build_model(checkpoint.document, checkpoint.path)
    if checkpoint.tensors is None:
        sharded.load_weights(checkpoint.path, model)
    else:
        load_weights(model, checkpoint.tensors, checkpoint.path)
    return model


def consolidate(path: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write a sharded checkpoint (``best.dcp``, ``last.dcp`` or one of their saves) as one
    safetensors file of its weights and settings, for sharing: the file loads with
    :func:`load_checkpoint` on any machine, and holds no optimizer state (resume from the
    sharded ``last.dcp``). Refuses a checkpoint that is already one file."""
    checkpoint = read(path)
    if not checkpoint.sharded:
        raise CheckpointError(f"{checkpoint.path} is already one safetensors file; copy it")
    model = _trained(checkpoint)
    document = {k: v for k, v in checkpoint.document.items() if k not in ("format", "optimizer")}
    target = Path(out)
    save(target, model, None, document)
    return target
