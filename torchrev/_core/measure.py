"""Deterministic measurement through the dispatcher: live tensor bytes and flops.

The memory planner (:mod:`torchrev._core.plan`) measures blocks with these; :mod:`torchrev.bench`
re-exports them for benchmarks and tests, so that a plan's peak and a test's are one measure.
"""

from __future__ import annotations

import itertools
import sys
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode


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
        self._sizes: dict[int, int] = {}  # storage key -> bytes it gives back when freed
        self._serials: dict[int, int] = {}  # storage key -> serial (keys are reused, serials not)
        self._events: list[tuple[int, int]] = []  # (serial, change in bytes), in order
        self._serial = itertools.count()
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
                    self._add(storage._cdata, storage.nbytes())
        return out

    def _resized(self, storage: torch.UntypedStorage, delta: int) -> None:
        # A storage first seen here held its old bytes at the starting point.
        self._seen(storage, storage.nbytes() - delta)
        self._sizes[storage._cdata] += delta
        self._add(storage._cdata, delta)

    def _seen(self, storage: torch.UntypedStorage, nbytes: int) -> None:
        """Start watching ``storage``, which holds ``nbytes`` that freeing it gives back."""
        if storage._cdata not in self._sizes:
            self._sizes[storage._cdata] = nbytes
            self._serials[storage._cdata] = next(self._serial)
            weakref.finalize(storage, self._freed, storage._cdata)

    def _freed(self, key: int) -> None:
        self._add(key, -self._sizes.pop(key))
        del self._serials[key]

    def _add(self, key: int, delta: int) -> None:
        self._events.append((self._serials[key], delta))
        self.current += delta
        self.peak = max(self.peak, self.current)

    def peak_excluding(self, tensors: Iterable[torch.Tensor]) -> int:
        """The peak had the storages of ``tensors`` (alive now; a DTensor's local shard)
        never been counted."""
        skip = {self._serials.get(local_shard(t).untyped_storage()._cdata) for t in tensors}
        current = peak = 0
        for serial, delta in self._events:
            if serial not in skip:
                current += delta
                peak = max(peak, current)
        return peak


class CountFlops(TorchDispatchMode):
    """Sum the flops of every operator called inside, with torch's own per-operator formulas.

    The formulas are those of :class:`torch.utils.flop_counter.FlopCounterMode` (matrix
    products and convolutions; elementwise operators count zero). Unlike that class this one
    tracks no modules, so it also runs through the custom autograd functions of peer
    libraries, whose no-grad forwards trip torch's module tracker.
    """

    def __init__(self) -> None:
        super().__init__()
        self.registry = FlopCounterMode(display=False).flop_registry
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2's sharded parameters and gradients), else ``t``: what
    the dispatcher sees of it."""
    if "torch.distributed.tensor" in sys.modules:
        from torch.distributed.tensor import DTensor

        if isinstance(t, DTensor):
            return t.to_local()
    return t
