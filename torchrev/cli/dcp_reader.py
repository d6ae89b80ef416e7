"""Reading a torch.distributed.checkpoint save without running code a file can choose.

DCP keeps a save's index in ``.metadata`` as a pickle and reads it with ``pickle.load``, and its
default planner reads non-tensor entries (optimizer settings) with
``torch.load(weights_only=False)``: a folder handed over from elsewhere could run any command
on the machine that loads it. Here the index is read by an unpickler that admits only DCP's own
metadata classes, ``torch.Size``, dtypes, layouts and paths (the types ``dcp.save`` writes), and
then checked to be one ``Metadata`` whose shard files lie inside the folder; non-tensor entries
are read with ``torch.load(weights_only=True)``. Anything else is refused in one line. The
trade-off: a save written by a future torch version that pickles a new type into its index is
refused until that type is added to the admitted list below.
"""

from __future__ import annotations

import io
import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

_METADATA = "torch.distributed.checkpoint.metadata"
#: The classes DCP's index may hold, by module (dtypes are admitted by type, below).
_ADMITTED: dict[str, frozenset[str]] = {
    _METADATA: frozenset(
        {
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "torch": frozenset({"Size"}),
    "pathlib": frozenset({"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"}),
    "pathlib._local": frozenset({"Path", "PosixPath", "PurePosixPath", "WindowsPath"}),
    "collections": frozenset({"OrderedDict"}),
}


class _Refused(Exception):
    """A global outside the admitted list: the name it asked for."""


class _IndexUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only the admitted globals."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _ADMITTED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _Refused(f"{module}.{name}")


def read_index(folder: Path) -> Any:
    """The ``Metadata`` of the save in ``folder``, or a :class:`CheckpointError` (one line)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata

    where = folder / ".metadata"
    try:
        with open(where, "rb") as handle:
            index = _IndexUnpickler(handle).load()
    except _Refused as error:
        raise CheckpointError(
            f"{where} asks to load {error}, which a torch.distributed.checkpoint index never "
            f"holds: the file was tampered with; do not use this checkpoint"
        ) from None
    except Exception as error:  # a truncated or garbled pickle raises many types
        raise CheckpointError(
            f"{where} is not a readable checkpoint index ({type(error).__name__}); it was "
            f"damaged: use another checkpoint"
        ) from None
    storage = getattr(index, "storage_data", None)
    if not isinstance(index, Metadata) or not isinstance(storage, dict):
        raise CheckpointError(
            f"{where} is not a torch.distributed.checkpoint index; it was damaged or tampered "
            f"with: use another checkpoint"
        )
    for info in storage.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(info, _StorageInfo) or not _inside(name):
            raise CheckpointError(
                f"{where} points at a shard outside its folder ({name!r}); it was tampered "
                f"with: do not use this checkpoint"
            )
    return index


def _inside(name: object) -> bool:
    """Whether a shard's file name stays in its folder (a plain name, no ``..``)."""
    if not isinstance(name, str) or not name:
        return False
    parts = (pathlib.PurePosixPath(name).parts, pathlib.PureWindowsPath(name).parts)
    return all(len(p) == 1 and p[0] not in ("..", ".") for p in parts)


def reader(folder: Path) -> Any:
    """A ``FileSystemReader`` for ``folder`` whose index comes from :func:`read_index`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("rank") is not None:
                raise CheckpointError(f"{folder}: per-rank indexes are not read by torchrev")
            index = read_index(Path(self.path))
            if getattr(index, "storage_meta", None) is None:
                index.storage_meta = StorageMeta()
            index.storage_meta.load_id = self.load_id
            return index

    return SafeReader(folder)


def planner() -> Any:
    """A ``DefaultLoadPlanner`` that reads non-tensor entries with ``weights_only=True``."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            try:
                item = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as error:
                raise CheckpointError(
                    f"an entry of the checkpoint ({read_item.dest_index.fqn}) is not plain data "
                    f"({str(error).splitlines()[0][:80]}); do not use this checkpoint"
                ) from None
            fqn = read_item.dest_index.fqn
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], item)
            else:
                self.state_dict[fqn] = item

    return SafePlanner()


def load_state(state: dict[str, Any], folder: Path, *, no_dist: bool = False) -> None:
    """``dcp.load(state, folder)`` through the safe index reader and planner.

    The index is checked before DCP starts (so a tampered one is refused in one line, not
    inside DCP's per-rank exception report); a :class:`CheckpointError` raised inside DCP is
    unwrapped from its ``CheckpointException``, and other failures are re-raised as they are.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    read_index(folder)
    try:
        dcp.load(state, storage_reader=reader(folder), planner=planner(), no_dist=no_dist)
    except CheckpointException as error:
        causes = [pair[0] for pair in error.failures.values()]
        ours = [cause for cause in causes if isinstance(cause, CheckpointError)]
        if ours:
            raise ours[0] from None
        raise RuntimeError(next((str(c) for c in causes), str(error))) from None
