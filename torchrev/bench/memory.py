"""Deterministic memory measurement: live tensor bytes seen through the dispatcher."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MiB = 2**20


class LiveTensorBytes(TorchDispatchMode):
    """Track the bytes of tensor storages alive relative to when the context was entered.

    Every operator call is seen; a storage an operator returns that none of its arguments
    already had is new and counts until it is freed. A storage that existed before entry (or
    was made outside the dispatcher) counts only by how much it is resized, since its bytes
    were part of the starting point. ``current`` and ``peak`` are therefore
    "bytes above the starting point", exact and repeatable: unlike allocator statistics they
    do not depend on caching, fragmentation or other threads, so tests may assert on them.

    What it cannot see: memory an operator uses internally and frees before returning
    (workspace), allocations made outside the dispatcher (RNG state copies), and the release
    of a tensor that existed before entry (the caller's input, dropped mid-step). All are
    small next to activations, or the same for every method compared.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        self._resize: Any = None

    def __enter__(self) -> LiveTensorBytes:
        # NOTE [storage resize]: UntypedStorage.resize_ does not go through the dispatcher,
        # yet some libraries free activations with it (memcnn's inputs, FSDP's shards). Wrap
        # it while measuring so those frees and re-allocations are counted.
        self._resize = torch.UntypedStorage.resize_
        original, tracker = self._resize, self

        def resize(storage: torch.UntypedStorage, size: int) -> Any:
            before = storage.nbytes()
            out = original(storage, size)
            tracker._resized(storage, storage.nbytes() - before)
            return out

        torch.UntypedStorage.resize_ = resize  # type: ignore[method-assign]
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        torch.UntypedStorage.resize_ = self._resize  # type: ignore[method-assign]
        super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        inputs = {
            t.untyped_storage()._cdata
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage._cdata not in inputs and storage._cdata not in self._sizes:
                    self._seen(storage, storage.nbytes())
                    self._add(storage.nbytes())
        return out

    def _resized(self, storage: torch.UntypedStorage, delta: int) -> None:
        # A storage first seen here held its old bytes at the starting point.
        self._seen(storage, storage.nbytes() - delta)
        self._sizes[storage._cdata] += delta
        self._add(delta)

    def _seen(self, storage: torch.UntypedStorage, nbytes: int) -> None:
        """Start watching ``storage``, which holds ``nbytes`` that freeing it gives back."""
        if storage._cdata not in self._sizes:
            self._sizes[storage._cdata] = nbytes
            weakref.finalize(storage, self._freed, storage._cdata)

    def _freed(self, key: int) -> None:
        self._add(-self._sizes.pop(key))

    def _add(self, delta: int) -> None:
        self.current += delta
        self.peak = max(self.peak, self.current)


def peak_live_bytes(step: Callable[[], Any]) -> int:
    """Peak bytes of tensors alive during ``step()`` beyond those alive before it.

    Call it with parameters and their ``.grad`` already allocated (run one step first and
    zero the gradients without setting them to None) to measure activations and temporaries
    only, "beyond parameters and gradients".
    """
    with LiveTensorBytes() as tracker:
        step()
    return tracker.peak
